"""Resolve model files in the shared assets and prove they are the bytes the project was measured with.

The expected digests are pinned here (copied from the assets' MANIFEST.md / SHA256SUMS) rather than
read from a file next to the weights, so a swapped weight file and a swapped checksum file cannot
agree with each other by accident.
"""

from __future__ import annotations

from pathlib import Path

from common.assets import model_path, require
from schemas.model_manifest import sha256_file

KNOWN_SHA256: dict[str, str] = {
    "osnet_x0_25_msmt17.pth": "6f57607fed9f502b9efed546108132ee715df5a5b6e6932c6269bacb47f59f99",
    "osnet_x0_25_market1501.pth": "c0ff09177a21417a19bc73bbf5af4eb5d2b097c2074ed35e67819ee6cd93612c",
}
_OMZ = {
    ("person-attributes-recognition-crossroad-0230", "FP32"): (
        "ca288994e74a27bc1912e610460054ca79165ad68c2ec555ccda2738591c1502",
        "9a2c20aa88b282219d31b67c9252cdf844d6ce387090eb676e79e284fa3a25d8"),
    ("person-attributes-recognition-crossroad-0230", "FP16"): (
        "e77cf6191fa27d09310cf388a966ceefc2edde1235daf3eb9714ee865435d289",
        "ff3b5f76cecac2f3338f6a1b43f2e2f4e73073ac8f884457fe4bff8bd387905f"),
    ("person-attributes-recognition-crossroad-0230", "FP16-INT8"): (
        "4859c1df8a118a6de0fd0b1765a90f9480d9eccbbfa87371af763bfc6c2089a2",
        "fd1c3de4609a5e42bea0a6dd1d5ce430c2932ce7ad92879957538c08595c0361"),
    ("person-reidentification-retail-0277", "FP16"): (
        "82039b1bb986231c50345550e59def94e63579998e9cddbd1a312f293eb87729",
        "6bb69e09d07733cc3896b29081d2627f92db7b9aacd50f1a8c3df491cb10f1b7"),
    ("person-reidentification-retail-0286", "FP16"): (
        "cc547e622d8aeabf97938213f68171bf59ac7d01c910ceadfea984aa96e5d1b5",
        "d06beb9e2b2661d42b233f64ef623f3518fc46dc11f6b7dd53cda8962d9d1bd9"),
    ("person-reidentification-retail-0287", "FP32"): (
        "09af746c1068a3e89355e1f0226d3d6982dc1cd77634b1f70a40f1f654a94be1",
        "7f53d18d11253455e0e11646b2176cf6509cc7c97cb5376f9b91b4c41e09a06c"),
    ("person-reidentification-retail-0287", "FP16"): (
        "95125bc630208d9a27370b11bd04d220f93f64b60fe4be5bc576e9aebb69603d",
        "8811b3db2f6ebacbf2c05510593783316026ff779d9b048b6ca2581f17baf86c"),
    ("person-reidentification-retail-0287", "FP16-INT8"): (
        "1881e88e4d85a72c1c25e21b76d9193d4d37065ee5f779fabbc21aa6c1196331",
        "2f8bb06123e6981e6babcd6a3ab34df8edf5d01f864287b30bbf15b8ca434856"),
    ("person-reidentification-retail-0288", "FP32"): (
        "30f452b2ed2763f7bf429eea23f8f243ad0e7f3cdd7226db6888f1660efb3424",
        "6496b8d51741703c9e9c7f6474cb96c60de1856d7b4fd77235e48cea146066a5"),
    ("person-reidentification-retail-0288", "FP16"): (
        "0d5021c772e603dce69d9ef2e326ecf0a43234cc8b4c5bb5e8aa566f090bdb51",
        "08e24c2f1dd976ff8e1f667b93db2950ac8db8da09e163e1ca6463b82d1dbc42"),
}
for (_name, _prec), (_xml, _bin) in _OMZ.items():
    KNOWN_SHA256[f"intel/{_name}/{_prec}/{_name}.xml"] = _xml
    KNOWN_SHA256[f"intel/{_name}/{_prec}/{_name}.bin"] = _bin

# Best first: FP32 keeps the published accuracy; INT8 only when nothing else is there.
PRECISION_PREFERENCE = ("FP32", "FP16", "FP16-INT8")


class WeightsError(ValueError):
    """A model file that is missing, altered or does not fit the architecture."""


def verify_sha256(path: Path, expected: str | None) -> Path:
    """Raise WeightsError naming the file and both digests when the bytes are not the expected ones."""
    require(path, "model file")
    if expected is not None:
        actual = sha256_file(path)
        if actual != expected:
            raise WeightsError(
                f"{path}: sha256 {actual} does not match the manifest ({expected}); the file is corrupt or "
                "not the published model. Re-copy it from the shared assets.")
    return path


def shared_model_file(rel: str, assets: str | None = None) -> Path:
    """A file under <assets>/models, checked against its pinned sha256."""
    if rel not in KNOWN_SHA256:
        raise WeightsError(f"no pinned sha256 for {rel}; known: {', '.join(sorted(KNOWN_SHA256))}")
    return verify_sha256(model_path(rel, assets=assets), KNOWN_SHA256[rel])


def omz_ir(name: str, precision: str | None, assets: str | None = None) -> tuple[Path, str]:
    """(xml path, precision) of an Open Model Zoo IR, verified; precision None = best one present."""
    options = [precision] if precision else [p for p in PRECISION_PREFERENCE if (name, p) in _OMZ]
    for prec in options:
        if (name, prec) not in _OMZ:
            known = sorted(p for n, p in _OMZ if n == name)
            raise WeightsError(f"{name} has no {prec} IR in the shared assets; available: {', '.join(known)}")
        xml_rel = f"intel/{name}/{prec}/{name}.xml"
        if precision or model_path(xml_rel, assets=assets).exists():
            shared_model_file(xml_rel, assets)
            shared_model_file(xml_rel[:-4] + ".bin", assets)
            return model_path(xml_rel, assets=assets), prec
    raise WeightsError(f"{name}: no IR found under {model_path('intel', name, assets=assets)}")
