"""Build ``edge_frame`` records from boxes and crops: for tests, evaluations and replay tools.

The appliance makes these in production (appliance/encode.py); the server may not import the
appliance, so evaluations that feed the server from ground truth or from stored crops build the
same records here, through the shared Avro schema.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np


@dataclass(frozen=True)
class Box:
    track_id: int
    xyxy: tuple[float, float, float, float]
    score: float = 0.9
    crop_jpeg: bytes | None = None  # set when this frame carries a crop for the track
    quality: float = 0.5
    reason: str = "NEW_TRACK"


def jpeg_bytes(image_bgr: np.ndarray, quality: int = 90) -> bytes:
    ok, buf = cv2.imencode(".jpg", image_bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return buf.tobytes()


def edge_frame(device_id: str, camera_id: str, frame_index: int, captured_at_us: int,
               boxes: Sequence[Box], frame_wh: tuple[int, int] = (1280, 720),
               ended_track_ids: Iterable[int] = ()) -> dict[str, Any]:
    dets, crops = [], []
    for b in boxes:
        x1, y1, x2, y2 = (float(v) for v in b.xyxy)
        dets.append({"x1": x1, "y1": y1, "x2": x2, "y2": y2, "score": b.score, "class_id": 0,
                     "track_id": b.track_id})
        if b.crop_jpeg is not None:
            crops.append({"track_id": b.track_id, "jpeg": b.crop_jpeg, "x1": x1, "y1": y1, "x2": x2, "y2": y2,
                          "score": b.score, "quality": b.quality, "reason": b.reason})
    return {"device_id": device_id, "camera_id": camera_id, "frame_index": frame_index,
            "captured_at_us": captured_at_us, "sent_at_us": captured_at_us, "frame_width": frame_wh[0],
            "frame_height": frame_wh[1], "model_id": "ground_truth", "model_version": "0", "detections": dets,
            "crops": crops, "ended_track_ids": list(ended_track_ids), "frame_jpeg": None, "dropped_frames": 0}
