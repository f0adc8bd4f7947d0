"""The model artifact manifest: what a model directory contains and how to feed it.

Shared by ``models/`` (which writes it after export/quantisation), the fleet manager (which signs
and publishes artifacts) and the appliance (which verifies every file's sha256 before loading a
model). One manifest per model directory, ``manifest.json``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal

from pydantic import Field

from common.configfile import StrictModel

MANIFEST_NAME = "manifest.json"


class ManifestError(ValueError):
    """A model directory that does not match its manifest (missing, changed or extra files)."""


class ArtifactFile(StrictModel):
    path: str = Field(description="Path relative to the model directory, '/'-separated.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size_bytes: int = Field(ge=0)


class InputSpec(StrictModel):
    name: str = Field(description="Input tensor name ('' when unnamed).")
    shape: list[int] = Field(description="Static input shape, e.g. [1, 3, 640, 640].")
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    color: Literal["RGB", "BGR"] = Field(description="Channel order the model expects.")
    scale: float = Field(1.0, description="x = (pixel / scale - mean) / std; 255 for 0-1 input.")
    mean: list[float] = Field(default_factory=lambda: [0.0, 0.0, 0.0])
    std: list[float] = Field(default_factory=lambda: [1.0, 1.0, 1.0])
    resize: Literal["letterbox", "stretch"] = "stretch"
    pad_value: int = Field(114, ge=0, le=255, description="Letterbox padding value.")


class ModelManifest(StrictModel):
    model_id: str = Field(description="Names data and input, e.g. yolo11n_coco_int8_640.")
    version: str = Field(min_length=1, description="Artifact version; fleets roll out by this.")
    task: Literal["detect", "reid", "attributes"]
    runtime: Literal["openvino", "onnx", "torch"] = "openvino"
    precision: str = Field("INT8", description="FP32, FP16, INT8 or mixed.")
    entrypoint: str = Field(description="File the runtime opens, e.g. yolo11n.xml.")
    input: InputSpec
    output: str = Field("", description="Human description of the output layout.")
    classes: list[str] = Field(default_factory=list)
    metrics: dict[str, float] = Field(default_factory=dict, description="Measured quality, e.g. coco_person_ap50.")
    source: str = ""
    license: str = ""
    files: list[ArtifactFile]


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def load_manifest(model_dir: Path) -> ModelManifest:
    path = model_dir / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{model_dir} has no {MANIFEST_NAME}")
    try:
        return ModelManifest.model_validate_json(path.read_text())
    except ValueError as exc:
        raise ManifestError(f"{path} is not a valid model manifest: {exc}") from exc


def verify_model_dir(model_dir: Path, manifest: ModelManifest | None = None) -> ModelManifest:
    """Check every listed file exists with the listed size and sha256; raise saying which does not."""
    manifest = manifest or load_manifest(model_dir)
    problems = []
    for f in manifest.files:
        p = model_dir / f.path
        if not p.is_file():
            problems.append(f"{f.path}: missing")
        elif p.stat().st_size != f.size_bytes:
            problems.append(f"{f.path}: {p.stat().st_size} bytes, manifest says {f.size_bytes}")
        elif sha256_file(p) != f.sha256:
            problems.append(f"{f.path}: sha256 differs from the manifest")
    if manifest.entrypoint not in {f.path for f in manifest.files}:
        problems.append(f"entrypoint {manifest.entrypoint} is not among the manifest's files")
    if problems:
        raise ManifestError(f"{model_dir} does not match its manifest: " + "; ".join(problems))
    return manifest
