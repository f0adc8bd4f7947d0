"""Tracker on a real MOT15 snippet (real detector): stable ids, ended tracks reported, per-instance reset."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from appliance.detect.base import DEFAULT_MODEL_DIR, DetectorConfig
from appliance.detect.openvino import OpenVinoDetector
from appliance.track import Tracker, TrackerConfig
from appliance.types import Detections

SEQ = Path("data") / "mot15" / "train" / "PETS09-S2L1"
N_FRAMES = 40
FPS = 7.0


@pytest.fixture(scope="module")
def snippet(assets: Path) -> Iterator[tuple[list[Detections], np.ndarray]]:
    """Detections (conf >= 0.1, as the tracker wants) and ground truth for the first frames."""
    det = OpenVinoDetector(DetectorConfig(model_dir=assets / "models" / DEFAULT_MODEL_DIR, conf_threshold=0.1))
    try:
        frames = [cv2.imread(str(assets / SEQ / "img1" / f"{i:06d}.jpg")) for i in range(1, N_FRAMES + 1)]
        dets = [det.detect(f) for f in frames]
    finally:
        det.close()
    gt = np.loadtxt(assets / SEQ / "gt" / "gt.txt", delimiter=",", ndmin=2)
    yield dets, gt[gt[:, 0] <= N_FRAMES]


def _backends() -> list[str]:
    out = ["reidfleet", "supervision"]
    try:
        import trackers  # noqa: F401

        out.append("trackers")
    except ImportError:
        pass
    return out


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a = np.prod(a[:, 2:] - a[:, :2], axis=1)
    area_b = np.prod(b[:, 2:] - b[:, :2], axis=1)
    return inter / (area_a[:, None] + area_b[None, :] - inter)


@pytest.mark.parametrize("backend", _backends())
def test_ids_stay_with_the_same_person(snippet: tuple[list[Detections], np.ndarray], backend: str) -> None:
    dets, gt = snippet
    tracker = Tracker(TrackerConfig(backend=backend), FPS)
    ids_per_person: dict[int, list[int]] = {}
    for f, d in enumerate(dets, start=1):
        out = tracker.update(d)
        assert len(out) == len(d)
        np.testing.assert_array_equal(out.xyxy, d.xyxy)  # same boxes, same order
        g = gt[gt[:, 0] == f]
        tracked = out[out.tracker_id >= 0]
        if not len(g) or not len(tracked):
            continue
        g_xyxy = np.hstack([g[:, 2:4], g[:, 2:4] + g[:, 4:6]])
        iou = _iou(g_xyxy, tracked.xyxy)
        for gi, person in enumerate(g[:, 1].astype(int)):
            j = int(iou[gi].argmax())
            if iou[gi, j] >= 0.5:
                ids_per_person.setdefault(person, []).append(int(tracked.tracker_id[j]))
    long_lived = {p: ids for p, ids in ids_per_person.items() if len(ids) >= N_FRAMES // 2}
    assert len(long_lived) >= 4, ids_per_person
    # id consistency: share of matched (person, frame) pairs that carry the person's main id
    main = {p: Counter(ids).most_common(1)[0] for p, ids in long_lived.items()}
    consistent = sum(count for _, count in main.values()) / sum(len(ids) for ids in long_lived.values())
    assert consistent >= 0.85, long_lived
    kept = [p for p, ids in long_lived.items() if main[p][1] / len(ids) >= 0.9]
    assert len(kept) >= len(long_lived) - 1, long_lived  # at most one person switches in 40 frames
    assert len({i for i, _ in main.values()}) == len(main), "two people share one id"


@pytest.mark.parametrize("backend", _backends())
def test_ended_tracks_are_reported_once(snippet: tuple[list[Detections], np.ndarray], backend: str) -> None:
    dets, _ = snippet
    cfg = TrackerConfig(backend=backend, lost_track_buffer=30)
    tracker = Tracker(cfg, FPS)
    ended: list[int] = []
    for d in dets[:10]:
        tracker.update(d)
        ended += tracker.ended_track_ids
    alive = set(tracker.active_track_ids)
    assert len(alive) >= 3
    # the scene empties: after the lost buffer (30 frames at 30 FPS = 7 frames at 7 FPS) all tracks end
    for _ in range(20):
        out = tracker.update(Detections.empty())
        assert len(out) == 0
        ended += tracker.ended_track_ids
    assert alive <= set(ended)
    assert len(ended) == len(set(ended)), "a track was reported ended twice"
    assert tracker.active_track_ids == [] and tracker.ended_track_ids == []


@pytest.mark.parametrize("backend", _backends())
def test_reset_is_per_instance(snippet: tuple[list[Detections], np.ndarray], backend: str) -> None:
    dets, _ = snippet
    a, b = Tracker(TrackerConfig(backend=backend), FPS), Tracker(TrackerConfig(backend=backend), FPS)
    first = [a.update(d).tracker_id.copy() for d in dets[:5]]
    for d in dets[:5]:
        b.update(d)
    b.reset()
    again = [b.update(d).tracker_id.copy() for d in dets[:5]]
    for x, y in zip(first, again, strict=True):
        np.testing.assert_array_equal(x, y)  # b restarted from scratch, a's ids did not leak into it
    assert a.update(dets[5]).tracker_id.max() >= 1


def test_bad_frame_rate_is_refused() -> None:
    with pytest.raises(ValueError, match="frame_rate"):
        Tracker(TrackerConfig(), 0)
