"""The only appliance module that knows the wire format: ``edge_frame`` Avro records.

One message per processed frame: every box with its track id, the best-shot crops picked for
this frame as JPEGs, the ids of tracks that just ended, and (in full-frame mode, or for live view)
a rate-limited full-frame JPEG. Encoded with the shared single-object codec so any consumer
can pick the writer schema by fingerprint.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from appliance.bestshot import CropPick
from appliance.config import SendingConfig
from appliance.types import Detections, Frame
from schemas.codec import AvroCodec


class EncodeError(RuntimeError):
    """An image OpenCV could not JPEG-encode (never expected for a valid BGR frame)."""


def jpeg(image_bgr: np.ndarray, quality: int) -> bytes:
    ok, buf = cv2.imencode(".jpg", image_bgr, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise EncodeError(f"cv2.imencode failed for an image of shape {image_bgr.shape}")
    return buf.tobytes()


@dataclass(frozen=True, slots=True)
class Encoded:
    """One encoded message and where its bytes went (for the bytes-per-frame metrics)."""

    value: bytes
    crop_bytes: int
    frame_jpeg_bytes: int
    crops: int


class EdgeFrameEncoder:
    """Builds and encodes ``edge_frame`` records for one device. Keeps the full-frame rate limit."""

    def __init__(self, device_id: str, codec: AvroCodec | None = None) -> None:
        self.device_id = device_id
        self.codec = codec or AvroCodec("edge_frame")
        self._last_full_s: float | None = None

    def _full_frame_due(self, cfg: SendingConfig, now_s: float) -> bool:
        if cfg.mode == "track" and cfg.full_frame_fps <= 0:
            return False
        if cfg.full_frame_fps <= 0:  # full mode without a cap: every frame
            return True
        return self._last_full_s is None or now_s - self._last_full_s >= 1.0 / cfg.full_frame_fps - 1e-6

    def record(
        self,
        frame: Frame,
        detections: Detections,
        crops: list[CropPick],
        ended_track_ids: list[int],
        model_id: str,
        model_version: str,
        cfg: SendingConfig,
        now_s: float,
    ) -> tuple[dict[str, Any], int, int]:
        """The Avro record as a dict, plus crop and full-frame JPEG byte counts."""
        xyxy = detections.xyxy.tolist()
        conf = detections.confidence.tolist()
        cls = detections.class_id.tolist()
        tid = detections.tracker_id.tolist()
        dets = [
            {"x1": b[0], "y1": b[1], "x2": b[2], "y2": b[3], "score": c, "class_id": k, "track_id": t}
            for b, c, k, t in zip(xyxy, conf, cls, tid, strict=True)
        ]
        crop_records = []
        crop_bytes = 0
        for pick in crops:
            x1, y1, x2, y2 = pick.crop_xyxy
            data = jpeg(frame.image[y1:y2, x1:x2], cfg.crop_jpeg_quality)
            crop_bytes += len(data)
            b = xyxy[pick.box_index]
            crop_records.append(
                {
                    "track_id": pick.track_id,
                    "jpeg": data,
                    "x1": b[0], "y1": b[1], "x2": b[2], "y2": b[3],
                    "score": conf[pick.box_index],
                    "quality": pick.quality,
                    "reason": pick.reason,
                }
            )
        frame_jpeg = None
        if self._full_frame_due(cfg, now_s):
            frame_jpeg = jpeg(frame.image, cfg.frame_jpeg_quality)
            self._last_full_s = now_s
        w, h = frame.resolution_wh
        rec = {
            "device_id": self.device_id,
            "camera_id": frame.camera_id,
            "frame_index": frame.frame_index,
            "captured_at_us": frame.captured_at_ns // 1000,
            "sent_at_us": time.time_ns() // 1000,
            "frame_width": w,
            "frame_height": h,
            "model_id": model_id,
            "model_version": model_version,
            "detections": dets,
            "crops": crop_records,
            "ended_track_ids": [int(t) for t in ended_track_ids],
            "frame_jpeg": frame_jpeg,
            "dropped_frames": int(frame.dropped_before),
        }
        return rec, crop_bytes, len(frame_jpeg) if frame_jpeg else 0

    def encode(self, *args: Any, **kwargs: Any) -> Encoded:
        """Same arguments as :meth:`record`; returns the wire bytes."""
        rec, crop_bytes, frame_bytes = self.record(*args, **kwargs)
        return Encoded(self.codec.encode(rec), crop_bytes, frame_bytes, len(rec["crops"]))
