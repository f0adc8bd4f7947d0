"""How each model family is fed and what it outputs, written once for manifests and loaders."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from schemas.model_manifest import InputSpec

IMAGENET_MEAN = [0.485, 0.456, 0.406]  # applied after dividing by scale
IMAGENET_STD = [0.229, 0.224, 0.225]


@dataclass(frozen=True)
class ModelPreset:
    model_id: str
    task: Literal["detect", "reid", "attributes"]
    entrypoint: str
    input: InputSpec
    output: str
    precision: str
    source: str
    license: str
    classes: tuple[str, ...] = field(default_factory=tuple)


def _yolo(imgsz: int, precision: str) -> ModelPreset:
    return ModelPreset(
        model_id=f"yolo11n_coco_{precision.lower()}_{imgsz}",
        task="detect",
        entrypoint="yolo11n.xml",
        input=InputSpec(name="x", shape=[1, 3, imgsz, imgsz], color="RGB", scale=255.0, resize="letterbox"),
        output=f"[1,84,{(imgsz // 8) ** 2 + (imgsz // 16) ** 2 + (imgsz // 32) ** 2}]: cx,cy,w,h in input pixels "
        "+ 80 sigmoid class scores; no NMS",
        precision=precision,
        source="Ultralytics YOLO11n (COCO), exported to OpenVINO IR",
        license="AGPL-3.0",
        classes=("person",),
    )


PRESETS: dict[str, ModelPreset] = {
    "yolo11n_int8_640": _yolo(640, "INT8"),
    "yolo11n_fp32_640": _yolo(640, "FP32"),
    "person-reidentification-retail-0288": ModelPreset(
        model_id="intel_reid_0288_256x128",
        task="reid",
        entrypoint="person-reidentification-retail-0288.xml",
        input=InputSpec(name="data", shape=[1, 3, 256, 128], color="BGR"),
        output="reid_embedding [1,256]",
        precision="FP32",
        source="Intel Open Model Zoo",
        license="Apache-2.0",
    ),
}
