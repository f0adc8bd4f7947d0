"""Embedders on the real shared weights and real Market crops (no mocks)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from common.assets import data_path
from common.configfile import ConfigError
from server.embed.base import build_embedder
from server.embed.osnet_model import OSNet, StateDictMismatch, fold_batchnorm, load_torchreid_state_dict
from server.embed.osnet_torch import load_osnet
from server.embed.preprocess import CropError
from server.embed.weights import WeightsError, shared_model_file

REPO = Path(__file__).resolve().parents[2]


def _market(n_ids: int = 6) -> tuple[list[np.ndarray], np.ndarray]:
    files = sorted(data_path("market1501_subset", "bounding_box_test").glob("*.jpg"))
    ids = sorted({f.name[:4] for f in files})[:n_ids]
    files = [f for f in files if f.name[:4] in ids]
    return [cv2.imread(str(f)) for f in files], np.array([int(f.name[:4]) for f in files])


@pytest.fixture(scope="module")
def market() -> tuple[list[np.ndarray], np.ndarray]:
    return _market()


@pytest.mark.parametrize("weights", ["msmt17", "market1501"])
def test_real_weights_load_strictly(weights: str) -> None:
    path = shared_model_file(f"osnet_x0_25_{weights}.pth")
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = OSNet("osnet_x0_25")
    assert load_torchreid_state_dict(model, dict(state)) == 565  # every backbone tensor, classifier dropped
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_missing_tensor_is_an_error_not_a_skip() -> None:
    state = dict(torch.load(shared_model_file("osnet_x0_25_msmt17.pth"), map_location="cpu", weights_only=True))
    del state["conv3.1.conv2a.conv2.weight"]
    with pytest.raises(StateDictMismatch, match=r"1 missing.*conv3\.1\.conv2a\.conv2\.weight"):
        load_torchreid_state_dict(OSNet("osnet_x0_25"), state)


def test_corrupt_weight_file_gives_clear_error(tmp_path: Path) -> None:
    good = shared_model_file("osnet_x0_25_msmt17.pth")
    bad = tmp_path / "osnet.pth"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # truncated copy
    with pytest.raises(WeightsError, match="cannot read as a PyTorch state dict"):
        load_osnet(bad)
    with pytest.raises(WeightsError, match="does not match the manifest"):
        build_embedder({"type": "osnet_torch", "device": "cpu", "weights_path": str(bad),
                        "sha256": "6f57607fed9f502b9efed546108132ee715df5a5b6e6932c6269bacb47f59f99"})


def test_altered_shared_file_fails_sha256(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    data = bytearray(shared_model_file("osnet_x0_25_msmt17.pth").read_bytes())
    data[-100] ^= 0xFF
    (models / "osnet_x0_25_msmt17.pth").write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="sha256"):
        build_embedder({"type": "osnet_torch", "device": "cpu"}, assets=str(tmp_path))


def test_unknown_embedder_lists_known_names() -> None:
    with pytest.raises(ConfigError, match="known: intel_reid, osnet_openvino, osnet_torch"):
        build_embedder({"type": "resnet9000"})
    with pytest.raises(ConfigError, match="batch_size"):
        build_embedder({"type": "osnet_torch", "batch_size": 0})


def test_folded_batchnorm_is_the_same_function() -> None:
    model = load_osnet(shared_model_file("osnet_x0_25_msmt17.pth"))
    x = torch.randn(4, 3, 256, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(model(x), fold_batchnorm(model)(x), atol=1e-3, rtol=1e-4)


def test_matches_torchreid_module_bit_for_bit() -> None:
    """Against torchreid 0.2.5's own osnet.py (pip package, or the sdist unpacked in .cache/torchreid)."""
    src = REPO / ".cache/torchreid/torchreid-0.2.5/torchreid/reid/models/osnet.py"
    if importlib.util.find_spec("torchreid") is not None:
        from torchreid.reid.models import osnet as tr  # type: ignore[import-not-found]
    elif src.is_file():
        spec = importlib.util.spec_from_file_location("torchreid_osnet", src)
        assert spec and spec.loader
        tr = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(tr)
    else:
        pytest.skip("torchreid not installed; `pip download --no-deps torchreid==0.2.5 -d .cache/torchreid` + untar")
    state = torch.load(shared_model_file("osnet_x0_25_msmt17.pth"), map_location="cpu", weights_only=True)
    ref = tr.osnet_x0_25(num_classes=state["classifier.weight"].shape[0], pretrained=False)
    ref.load_state_dict(state, strict=True)
    mine = load_osnet(shared_model_file("osnet_x0_25_msmt17.pth"))
    x = torch.randn(4, 3, 256, 128, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(ref.eval()(x), mine(x))


@pytest.mark.parametrize("cfg", [
    {"type": "osnet_torch", "device": "cpu"},
    {"type": "osnet_torch", "device": "cpu", "weights": "market1501"},
    {"type": "intel_reid", "model": "0288"},
    {"type": "intel_reid", "model": "0277"},
])
def test_same_person_closer_than_different_people(cfg: dict, market: tuple[list[np.ndarray], np.ndarray]) -> None:
    crops, pids = market
    emb = build_embedder(cfg)
    f = emb.embed(crops)
    assert f.shape == (len(crops), emb.dim) and f.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(f, axis=1), 1.0, atol=1e-4)
    sim = f @ f.T
    same = pids[:, None] == pids[None, :]
    off_diag = ~np.eye(len(pids), dtype=bool)
    assert sim[same & off_diag].mean() > sim[~same].mean() + 0.1
    # Nearest other image is the same person for most images.
    np.fill_diagonal(sim, -np.inf)
    assert (pids[sim.argmax(1)] == pids).mean() > 0.7


def test_openvino_osnet_equals_torch(market: tuple[list[np.ndarray], np.ndarray]) -> None:
    crops = market[0][:16]
    a = build_embedder({"type": "osnet_torch", "device": "cpu"}).embed(crops)
    ov = build_embedder({"type": "osnet_openvino"})
    assert ov.model_id == "osnet_x0_25_msmt17_256x128"
    assert float((a * ov.embed(crops)).sum(1).min()) > 0.999


def test_jpeg_path_and_bad_inputs(market: tuple[list[np.ndarray], np.ndarray]) -> None:
    emb = build_embedder({"type": "osnet_torch", "device": "cpu", "batch_size": 3})
    crops = market[0][:5]
    jpegs = [cv2.imencode(".png", c)[1].tobytes() for c in crops]  # lossless, so both paths see the same pixels
    np.testing.assert_allclose(emb.embed_jpegs(jpegs), emb.embed(crops), atol=1e-5)
    assert emb.embed([]).shape == (0, 512)
    with pytest.raises(CropError, match="crop 1: expected HxWx3"):
        emb.embed([crops[0], np.zeros((10, 10), np.uint8)])
    with pytest.raises(CropError, match="crop 0: expected uint8"):
        emb.embed([crops[0].astype(np.float32)])
    with pytest.raises(CropError, match="crop 2: not a decodable image"):
        emb.embed_jpegs([jpegs[0], jpegs[1], b"\xff\xd8garbage"])


def test_cpu_decode_share_splits_each_part(market: tuple[list[np.ndarray], np.ndarray],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``cpu_decode_share`` each part's first crops are decoded by OpenCV threads and the rest by nvJPEG; the
    vectors come back in input order and equal the plain path's. nvJPEG is stood in for by the same decode on the
    CPU (planar RGB, then the packed resize, as the GPU path does), so the split itself is what is tested here."""
    from server.embed import osnet_torch
    from server.embed.gpu_resize import resize_packed_bilinear

    seen: list[int] = []

    def fake_nvjpeg(jpegs: list[bytes], device: torch.device, first_index: int = 0) -> torch.Tensor:
        seen.extend(range(first_index, first_index + len(jpegs)))
        rgb = [cv2.imdecode(np.frombuffer(j, np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1].transpose(2, 0, 1)
               for j in jpegs]
        sizes = torch.tensor([c.size for c in rgb])
        flat = torch.from_numpy(np.concatenate([np.ascontiguousarray(c).reshape(-1) for c in rgb]))
        hw = torch.tensor([c.shape[1:] for c in rgb])
        return resize_packed_bilinear(flat, torch.cumsum(sizes, 0) - sizes, hw[:, 0], hw[:, 1], planar=True,
                                      out_h=256, out_w=128)

    monkeypatch.setattr(osnet_torch, "decode_resize_jpegs_gpu", fake_nvjpeg)
    monkeypatch.setattr(osnet_torch.OsnetTorchEmbedder, "decodes_jpegs", property(lambda self: True))
    crops = market[0][:12]
    jpegs = [cv2.imencode(".png", c)[1].tobytes() for c in crops]
    plain = build_embedder({"type": "osnet_torch", "device": "cpu", "batch_size": 5}).embed_jpegs(jpegs)
    assert seen == list(range(12))
    seen.clear()
    emb = build_embedder({"type": "osnet_torch", "device": "cpu", "batch_size": 5, "cpu_decode_share": 0.4})
    np.testing.assert_allclose(emb.embed_jpegs(jpegs), plain, atol=1e-5)
    # Parts of 5, 5 and 2 crops: OpenCV took the first 2, 2 and 1 of them, nvJPEG the rest (at least one each).
    assert seen == [2, 3, 4, 7, 8, 9, 11]
    with pytest.raises(CropError, match="crop 5: not a decodable image"):
        emb.embed_jpegs([*jpegs[:5], b"\xff\xd8garbage", *jpegs[6:]])
    seen.clear()
    one = build_embedder({"type": "osnet_torch", "device": "cpu", "cpu_decode_share": 0.9}).embed_jpegs(jpegs[:1])
    np.testing.assert_allclose(one, plain[:1], atol=1e-5)
    assert seen == [0]


def test_nvimgcodec_decoder_needs_its_package_and_says_so(monkeypatch: pytest.MonkeyPatch,
                                                         market: tuple[list[np.ndarray], np.ndarray]) -> None:
    """Without nvImageCodec the hardware decoder is a start-up error that names what to install; on a CPU device
    the setting is ignored and the JPEG path still embeds (no GPU decoder is built there)."""
    import sys

    from server.embed.jpeg_gpu import NvImageCodecDecoder, check_soi

    monkeypatch.setitem(sys.modules, "nvidia", None)  # `from nvidia import nvimgcodec` now fails as if uninstalled
    with pytest.raises(RuntimeError, match=r"pip install '\.\[nvimgcodec\]'"):
        NvImageCodecDecoder(torch.device("cuda"))
    emb = build_embedder({"type": "osnet_torch", "device": "cpu", "jpeg_decoder": "nvimgcodec"})
    assert not emb.decodes_jpegs
    jpegs = [cv2.imencode(".jpg", c)[1].tobytes() for c in market[0][:3]]
    plain = build_embedder({"type": "osnet_torch", "device": "cpu"}).embed_jpegs(jpegs)
    np.testing.assert_allclose(emb.embed_jpegs(jpegs), plain, atol=1e-6)
    with pytest.raises(CropError, match="crop 5: not a JPEG"):
        check_soi([*jpegs, b"\x89PNG...."], first_index=2)
    with pytest.raises(ConfigError):
        build_embedder({"type": "osnet_torch", "jpeg_decoder": "nvimgcodec", "nvimgcodec_backends": "fast"})


def test_gpu_path_equals_cpu_when_cuda_present(market: tuple[list[np.ndarray], np.ndarray]) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU here; bench-embed-gpu covers it on the GPU machine")
    crops = market[0]
    gpu = build_embedder({"type": "osnet_torch", "device": "cuda"}).embed(crops)
    cpu = build_embedder({"type": "osnet_torch", "device": "cpu"}).embed(crops)
    assert float((gpu * cpu).sum(1).min()) > 0.999



def test_packed_gpu_resize_matches_opencv() -> None:
    """The batched resize used on the GPU, run on CPU tensors, against cv2.INTER_LINEAR (up- and downscaling)."""
    from server.embed.gpu_resize import resize_packed_bilinear

    rng = np.random.default_rng(0)
    crops = [cv2.GaussianBlur(rng.integers(0, 256, (int(h), int(w), 3), dtype=np.uint8), (5, 5), 0)
             for h, w in rng.integers([20, 10], [400, 260], size=(12, 2))]
    sizes = np.array([c.size for c in crops])
    offsets = torch.from_numpy(np.concatenate([[0], np.cumsum(sizes)[:-1]]))
    hs, ws = torch.tensor([c.shape[0] for c in crops]), torch.tensor([c.shape[1] for c in crops])
    ref = np.stack([cv2.resize(c, (128, 256), interpolation=cv2.INTER_LINEAR) for c in crops]).transpose(0, 3, 1, 2)
    hwc = torch.from_numpy(np.concatenate([c.reshape(-1) for c in crops]))
    out = resize_packed_bilinear(hwc, offsets, hs, ws, planar=False, out_h=256, out_w=128, channel_order=(2, 1, 0))
    assert np.abs(out.numpy() - ref[:, ::-1]).max() < 1.0  # OpenCV's fixed-point weights: < 1 grey level
    chw = torch.from_numpy(np.concatenate([c.transpose(2, 0, 1).reshape(-1) for c in crops]))
    out = resize_packed_bilinear(chw, offsets, hs, ws, planar=True, out_h=256, out_w=128)
    assert np.abs(out.numpy() - ref).max() < 1.0
