"""edge_frame records: round trip through the shared codec, JPEGs, full-frame rate limit."""

from __future__ import annotations

import cv2
import numpy as np

from appliance.bestshot import CropPick
from appliance.config import SendingConfig
from appliance.encode import EdgeFrameEncoder
from appliance.types import Detections, Frame
from schemas.codec import AvroCodec


def _frame(i: int) -> Frame:
    img = np.zeros((360, 640, 3), np.uint8)
    cv2.rectangle(img, (100, 50), (160, 250), (0, 200, 255), -1)
    return Frame("cam", i, 1_700_000_000_000_000_000 + i, img, dropped_before=2)


def test_round_trip_with_crop_and_ended_ids() -> None:
    enc = EdgeFrameEncoder("dev-1")
    d = Detections(np.array([[100, 50, 160, 250]], np.float32), np.array([0.8], np.float32),
                   np.zeros(1, np.int32), np.array([5_000_001], np.int64))
    pick = CropPick(5_000_001, 0, (94, 30, 166, 270), 0.7, "NEW_TRACK")
    out = enc.encode(_frame(3), d, [pick], [5_000_000], "m", "v1", SendingConfig(), 0.3)
    rec = AvroCodec("edge_frame").decode(out.value)
    assert rec["device_id"] == "dev-1" and rec["frame_index"] == 3 and rec["dropped_frames"] == 2
    assert rec["frame_width"] == 640 and rec["frame_height"] == 360
    assert rec["detections"][0]["track_id"] == 5_000_001 and rec["ended_track_ids"] == [5_000_000]
    crop = rec["crops"][0]
    img = cv2.imdecode(np.frombuffer(crop["jpeg"], np.uint8), cv2.IMREAD_COLOR)
    assert img.shape == (240, 72, 3)
    assert crop["reason"] == "NEW_TRACK" and abs(crop["quality"] - 0.7) < 1e-6
    assert rec["frame_jpeg"] is None and out.crop_bytes == len(crop["jpeg"]) and out.crops == 1


def test_full_frame_rate_limit() -> None:
    codec = AvroCodec("edge_frame")
    enc = EdgeFrameEncoder("d")
    cfg = SendingConfig(mode="full", full_frame_fps=2.0)
    sent = [codec.decode(enc.encode(_frame(i), Detections.empty(), [], [], "m", "v", cfg, i / 10).value)
            for i in range(20)]
    assert [i for i, r in enumerate(sent) if r["frame_jpeg"]] == [0, 5, 10, 15]
    every = SendingConfig(mode="full")
    enc2 = EdgeFrameEncoder("d")
    assert all(enc2.encode(_frame(i), Detections.empty(), [], [], "m", "v", every, i / 10).frame_jpeg_bytes
               for i in range(3))
    track = SendingConfig()
    assert EdgeFrameEncoder("d").encode(_frame(0), Detections.empty(), [], [], "m", "v", track, 0).frame_jpeg_bytes == 0
