"""The detector plugin seam: a :class:`Detector` protocol and its config.

The pipeline only sees this protocol, so a backend (OpenVINO on CPU today; a GPU or NPU runtime
later) is one module registered by name in :mod:`appliance.detect`, imported only when chosen.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

import numpy as np
from pydantic import Field, field_validator

from appliance.types import PERSON_CLASS_ID, Detections, Frame
from common.assets import model_path
from common.configfile import StrictModel

DEFAULT_MODEL_DIR = "yolo11n_int8_openvino_model"


class ModelLoadError(RuntimeError):
    """A model directory that cannot be used: missing, truncated, corrupt or of the wrong shape."""


class DetectorConfig(StrictModel):
    """Detector settings. Hardware-dependent values left ``None`` are chosen at start-up from the
    CPUs this process may use (see ``appliance.detect.openvino.plan_runtime``)."""

    type: str = Field("openvino", description="Backend name; see appliance.detect.DETECTORS.")
    model_dir: Path = Field(
        default_factory=lambda: model_path(DEFAULT_MODEL_DIR),
        description="OpenVINO IR folder (one .xml + .bin; metadata.yaml / manifest.json optional).",
    )
    device: str = Field("CPU", min_length=1, description="OpenVINO device name (CPU, GPU, NPU, AUTO).")
    conf_threshold: float = Field(0.25, gt=0.0, lt=1.0, description="Minimum class score kept.")
    iou_threshold: float = Field(
        0.6, gt=0.0, le=1.0, description="NMS IoU above which the weaker box is dropped (measured: eval-detect)."
    )
    classes: tuple[int, ...] = Field((PERSON_CLASS_ID,), min_length=1, description="COCO class ids to keep.")
    rect_input: bool = Field(
        True,
        description="Shape the network input to the frame (640x384 for 16:9, 640x480 for 4:3) instead of the "
        "IR's 640x640 square: same scale and boxes, 25-40 % less compute (appliance/detect/rect.py).",
    )
    max_detections: int = Field(300, ge=1, le=10000, description="Boxes kept per frame after NMS.")
    inflight_requests: int | None = Field(
        None, ge=1, le=16, description="Requests in flight in stream(); None = chosen from the CPU count."
    )
    threads: int | None = Field(None, ge=1, le=256, description="INFERENCE_NUM_THREADS; None = allowed CPUs.")
    streams: int | None = Field(None, ge=1, le=64, description="NUM_STREAMS; None = chosen from the CPU count.")
    performance_hint: Literal["auto", "LATENCY", "THROUGHPUT"] = Field(
        "auto", description="OpenVINO PERFORMANCE_HINT; auto = the measured best for the CPU count."
    )

    @field_validator("type")
    @classmethod
    def _known_type(cls, value: str) -> str:
        from appliance.detect import DETECTORS

        if value not in DETECTORS:
            raise ValueError(f"unknown detector type {value!r}; known: {', '.join(sorted(DETECTORS))}")
        return value

    @field_validator("classes")
    @classmethod
    def _unique_classes(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(c < 0 for c in value) or len(set(value)) != len(value):
            raise ValueError("classes must be distinct non-negative class ids")
        return value


@runtime_checkable
class Detector(Protocol):
    """What the pipeline calls. ``stream`` keeps several frames in flight and yields in input order."""

    model_id: str
    model_version: str

    def detect(self, image_bgr: np.ndarray) -> Detections: ...

    def stream(self, frames: Iterable[Frame]) -> Iterator[tuple[Frame, Detections]]: ...

    def close(self) -> None: ...
