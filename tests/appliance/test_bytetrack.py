"""Our numpy ByteTrack's parts on synthetic input: optimal assignment, motion, lifecycle."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from appliance.bytetrack import ByteTrack, linear_assignment, match


def _brute_force(cost: np.ndarray) -> float:
    n, m = cost.shape
    if n <= m:
        return min(sum(cost[i, p[i]] for i in range(n)) for p in itertools.permutations(range(m), n))
    return _brute_force(cost.T)


@pytest.mark.parametrize("shape", [(1, 1), (3, 3), (2, 5), (5, 2), (6, 6), (4, 7)])
def test_assignment_is_optimal(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(sum(shape))
    for _ in range(20):
        cost = rng.uniform(0, 1, shape)
        if rng.random() < 0.5:
            cost = np.round(cost, 1)  # ties
        rows, cols = linear_assignment(cost)
        assert len(rows) == min(shape) and len(set(cols.tolist())) == len(cols)
        assert list(rows) == sorted(rows)
        assert cost[rows, cols].sum() == pytest.approx(_brute_force(cost))


def test_match_respects_threshold() -> None:
    cost = np.array([[0.1, 0.9], [0.95, 0.99]])
    pairs, u_rows, u_cols = match(cost, 0.8)
    assert pairs == [(0, 0)] and u_rows == [1] and u_cols == [1]
    assert match(np.empty((0, 3)), 0.5) == ([], [], [0, 1, 2])


def _walk(n_frames: int, speed: float, start: float = 10.0) -> list[np.ndarray]:
    return [np.array([[start + speed * f, 50, start + speed * f + 30, 130]], float) for f in range(n_frames)]


def test_confirms_on_second_hit_and_follows_motion() -> None:
    bt = ByteTrack(frame_rate=30)
    ids = [int(bt.update(box, np.array([0.9]))[0]) for box in _walk(20, 8.0)]
    assert ids[0] == 1  # first frame: confirmed at once (reference behaviour)
    assert set(ids) == {1}
    bt2 = ByteTrack(frame_rate=30)
    bt2.update(np.empty((0, 4)), np.empty(0))
    later = [int(bt2.update(box, np.array([0.9]))[0]) for box in _walk(5, 8.0)]
    assert later[0] == -1 and set(later[1:]) == {1}  # after frame 1 a new track needs a second hit


def test_weak_boxes_keep_a_track_but_never_start_one() -> None:
    bt = ByteTrack(frame_rate=30)
    walk = _walk(12, 5.0)
    for box in walk[:6]:
        bt.update(box, np.array([0.9]))
    weak = [int(bt.update(box, np.array([0.3]))[0]) for box in walk[6:]]  # occluded: low score
    assert set(weak) == {1}
    fresh = ByteTrack(frame_rate=30)
    assert all(int(fresh.update(box, np.array([0.3]))[0]) == -1 for box in walk)


def test_lost_track_returns_within_buffer_and_ends_after() -> None:
    bt = ByteTrack(frame_rate=30, lost_track_buffer=10)
    walk = _walk(40, 4.0)
    for box in walk[:5]:
        bt.update(box, np.array([0.9]))
    for _ in range(5):  # gone for 5 frames (< 10)
        bt.update(np.empty((0, 4)), np.empty(0))
    assert int(bt.update(walk[10], np.array([0.9]))[0]) == 1  # same id after the gap
    for _ in range(12):  # gone longer than the buffer
        bt.update(np.empty((0, 4)), np.empty(0))
    assert bt.alive_ids == set()
    bt.update(walk[30], np.array([0.9]))
    assert int(bt.update(walk[31], np.array([0.9]))[0]) == 2  # a new person, a new id


def test_invalid_boxes_are_ignored() -> None:
    bt = ByteTrack(frame_rate=30)
    boxes = np.array([[10, 10, 5, 40], [0, 0, np.nan, 10], [10, 10, 40, 90]], float)
    ids = bt.update(boxes, np.array([0.9, 0.9, 0.9]))
    assert ids.tolist() == [-1, -1, 1]
