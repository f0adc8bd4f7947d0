"""Best-shot selection on synthetic frames: when crops go out, and what quality means."""

from __future__ import annotations

import cv2
import numpy as np

from appliance.bestshot import BestShot, sharpness, static_quality
from appliance.config import SendingConfig
from appliance.types import Detections


def _frame(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)


def _dets(boxes: list[tuple[float, float, float, float]], conf: list[float], ids: list[int]) -> Detections:
    return Detections(np.array(boxes, np.float32), np.array(conf, np.float32), np.zeros(len(boxes), np.int32),
                      np.array(ids, np.int64))


def test_new_track_then_only_clear_improvements() -> None:
    bs = BestShot(SendingConfig(min_crop_interval_s=0.0, improve_margin=0.1, max_crops_per_track=3))
    img = _frame()
    small = _dets([(100, 100, 140, 180)], [0.5], [7])  # 80 px high, mid confidence
    picks = bs.select(img, small, 0.0)
    assert [(p.track_id, p.reason) for p in picks] == [(7, "NEW_TRACK")]
    assert bs.select(img, small, 0.1) == []  # same view: nothing new
    big = _dets([(100, 100, 200, 356)], [0.9], [7])  # full height, confident: clearly better
    picks = bs.select(img, big, 0.2)
    assert [p.reason for p in picks] == ["IMPROVED"] and picks[0].quality > 0.8
    evaluated = bs.sharpness_evaluated
    assert bs.select(img, small, 0.3) == []  # worse again
    assert bs.sharpness_evaluated == evaluated  # ... decided without computing sharpness


def test_cap_interval_untracked_and_tiny_boxes() -> None:
    bs = BestShot(SendingConfig(min_crop_interval_s=1.0, improve_margin=0.0, max_crops_per_track=2,
                                min_crop_height_px=48))
    img = _frame()
    d = _dets([(10, 10, 60, 150), (300, 100, 320, 130), (400, 50, 450, 200)], [0.9, 0.9, 0.9], [1, 2, -1])
    picks = bs.select(img, d, 0.0)
    assert [p.track_id for p in picks] == [1]  # 2 is 30 px high, -1 untracked
    assert bs.select(img, d, 0.5) == []  # min interval
    assert len(bs.select(img, d, 1.5)) == 1  # improve_margin 0: any equal quality counts
    assert bs.select(img, d, 3.0) == []  # capped at 2
    bs.select(img, Detections.empty(), 4.0, ended_track_ids=[1, 2])
    assert bs.tracks_known == 0


def test_refresh_after_interval() -> None:
    bs = BestShot(SendingConfig(min_crop_interval_s=0.0, refresh_interval_s=10.0, max_crops_per_track=5))
    img = _frame()
    d = _dets([(100, 100, 150, 220)], [0.8], [3])
    assert [p.reason for p in bs.select(img, d, 0.0)] == ["NEW_TRACK"]
    assert bs.select(img, d, 5.0) == []
    assert [p.reason for p in bs.select(img, d, 10.5)] == ["REFRESH"]


def test_quality_terms() -> None:
    img = _frame()
    blurred = cv2.GaussianBlur(img, (31, 31), 10)
    box = (100, 100, 200, 356)
    assert sharpness(img, box, 150.0) > 0.9 > 0.5 > sharpness(blurred, box, 150.0)
    d = _dets([(0, 100, 100, 356), (200, 100, 300, 356), (200, 100, 300, 164)], [0.9, 0.9, 0.9], [1, 2, 3])
    upper, cut = static_quality(d, (640, 480), 256)
    assert cut.tolist() == [True, False, False]
    assert upper[0] < upper[1] and upper[2] < upper[1]  # cut by the edge, or small, scores lower
    assert float(upper.max()) <= 1.0 + 1e-6


def test_full_mode_sends_no_crops() -> None:
    bs = BestShot(SendingConfig(mode="full"))
    assert bs.select(_frame(), _dets([(10, 10, 100, 300)], [0.9], [1]), 0.0) == []
