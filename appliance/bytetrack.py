"""ByteTrack in numpy alone: the original algorithm, without supervision's or scipy's install weight.

Same rules as the reference implementation (Zhang et al., ECCV 2022) and its supervision 0.30
port: an 8-state constant-velocity Kalman filter on (cx, cy, aspect, h); a first association of
high-score boxes to tracked and lost tracks on score-fused IoU cost; a second association of the
weak boxes (0.1 < score < activation) to the still unmatched tracked ones at cost 0.5; new tracks
from unmatched high boxes (score >= activation + 0.1), confirmed on their second hit; lost tracks
dropped after ``lost_track_buffer`` frames at 30 FPS (scaled to the real rate).

What differs, on purpose:
- the Kalman predict and update run batched over all tracks (one numpy call per step);
- each output box keeps the index of the detection it came from, so ids go back to the caller's
  boxes directly instead of being re-matched by IoU afterwards;
- ids are per instance; tracks that end are reported (``ended_ids``);
- the optimal assignment is a small Hungarian solver here (the matrices are tracks x boxes, tens
  at most), so the appliance needs neither scipy nor lap.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

_STD_POS = 1.0 / 20
_STD_VEL = 1.0 / 160
_F = np.eye(8)
_F[:4, 4:] = np.eye(4)
_H = np.eye(4, 8)
LOW_SCORE = 0.1
SECOND_STAGE_COST = 0.5
UNCONFIRMED_COST = 0.7
DUPLICATE_IOU_DISTANCE = 0.15

TRACKED, LOST, REMOVED = 1, 2, 3


def linear_assignment(cost: npt.NDArray[np.floating]) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]:
    """Minimum-cost assignment of rows to columns (Hungarian, O(n^2 m), shortest augmenting paths).

    Returns ``(rows, cols)`` like ``scipy.optimize.linear_sum_assignment`` (rows ascending).
    """
    cost = np.asarray(cost, np.float64)
    if cost.size == 0:
        return np.empty(0, np.intp), np.empty(0, np.intp)
    transposed = cost.shape[0] > cost.shape[1]
    a = cost.T if transposed else cost
    n, m = a.shape
    u = np.zeros(n + 1)
    v = np.zeros(m + 1)
    p = np.zeros(m + 1, np.intp)  # p[j]: row (1-based) assigned to column j; column 0 is virtual
    way = np.zeros(m + 1, np.intp)
    for i in range(1, n + 1):
        p[0] = i
        j0 = 0
        minv = np.full(m + 1, np.inf)
        used = np.zeros(m + 1, bool)
        while True:
            used[j0] = True
            i0 = p[j0]
            free = ~used[1:]
            cur = a[i0 - 1] - u[i0] - v[1:]
            better = free & (cur < minv[1:])
            minv[1:][better] = cur[better]
            way[1:][better] = j0
            masked = np.where(free, minv[1:], np.inf)
            j1 = int(np.argmin(masked)) + 1
            delta = masked[j1 - 1]
            u[p[used]] += delta
            v[used] -= delta
            minv[1:][free] -= delta
            j0 = j1
            if p[j0] == 0:
                break
        while j0:
            j1 = way[j0]
            p[j0] = p[j1]
            j0 = j1
    cols = np.flatnonzero(p[1:])
    rows = p[1:][cols] - 1
    if transposed:
        rows, cols = cols, rows
    order = np.argsort(rows)
    return rows[order].astype(np.intp), cols[order].astype(np.intp)


def match(cost: np.ndarray, thresh: float) -> tuple[list[tuple[int, int]], list[int], list[int]]:
    """Optimal matches with cost <= ``thresh``; costs above it are capped so they never win."""
    n, m = cost.shape
    if not n or not m:
        return [], list(range(n)), list(range(m))
    rows, cols = linear_assignment(np.minimum(cost, thresh + 1e-4))
    ok = cost[rows, cols] <= thresh
    pairs = list(zip(rows[ok].tolist(), cols[ok].tolist(), strict=True))
    mr = set(rows[ok].tolist())
    mc = set(cols[ok].tolist())
    return pairs, [i for i in range(n) if i not in mr], [j for j in range(m) if j not in mc]


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if not len(a) or not len(b):
        return np.zeros((len(a), len(b)))
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a = np.prod(a[:, 2:] - a[:, :2], axis=1)
    area_b = np.prod(b[:, 2:] - b[:, :2], axis=1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def _xyah(xyxy: np.ndarray) -> np.ndarray:
    w, h = xyxy[2] - xyxy[0], xyxy[3] - xyxy[1]
    return np.array([xyxy[0] + w / 2, xyxy[1] + h / 2, w / max(h, 1e-6), h])


@dataclass(eq=False)
class Track:
    mean: np.ndarray
    cov: np.ndarray
    score: float
    internal_id: int
    frame_id: int
    start_frame: int
    external_id: int = -1
    state: int = TRACKED
    activated: bool = False
    tracklet_len: int = 1
    last_det: int = -1  # index of the detection matched in the current frame, -1 if none

    @property
    def xyxy(self) -> np.ndarray:
        cx, cy, a, h = self.mean[:4]
        w = a * h
        return np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])


def _initiate(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    h = z[3]
    std = [2 * _STD_POS * h, 2 * _STD_POS * h, 1e-2, 2 * _STD_POS * h,
           10 * _STD_VEL * h, 10 * _STD_VEL * h, 1e-5, 10 * _STD_VEL * h]  # fmt: skip
    return np.r_[z, np.zeros(4)], np.diag(np.square(std))


def _predict(tracks: list[Track]) -> None:
    if not tracks:
        return
    mean = np.stack([t.mean for t in tracks])
    cov = np.stack([t.cov for t in tracks])
    for i, t in enumerate(tracks):
        if t.state != TRACKED:
            mean[i, 7] = 0
    h = mean[:, 3]
    std = np.stack([_STD_POS * h, _STD_POS * h, np.full_like(h, 1e-2), _STD_POS * h,
                    _STD_VEL * h, _STD_VEL * h, np.full_like(h, 1e-5), _STD_VEL * h], axis=1)  # fmt: skip
    q = np.zeros_like(cov)
    idx = np.arange(8)
    q[:, idx, idx] = np.square(std)
    mean = mean @ _F.T
    cov = _F @ cov @ _F.T + q
    for i, t in enumerate(tracks):
        t.mean, t.cov = mean[i], cov[i]


def _update(t: Track, z: np.ndarray) -> None:
    h = t.mean[3]
    r = np.diag(np.square([_STD_POS * h, _STD_POS * h, 1e-1, _STD_POS * h]))
    s = _H @ t.cov @ _H.T + r
    pht = t.cov @ _H.T
    gain = np.linalg.solve(s, pht.T).T
    t.mean = t.mean + gain @ (z - _H @ t.mean)
    t.cov = t.cov - gain @ s @ gain.T


class ByteTrack:
    """One camera's ByteTrack state. ``update`` takes (N,4) xyxy + (N,) scores and returns one id per
    box (-1 = no confirmed track)."""

    def __init__(
        self,
        activation_threshold: float = 0.5,
        lost_track_buffer: int = 30,
        minimum_iou: float = 0.1,
        frame_rate: float = 30.0,
        minimum_consecutive_frames: int = 1,
    ) -> None:
        self.activation_threshold = activation_threshold
        # the reference starts tracks only from boxes a little above the activation score
        self.new_track_threshold = min(activation_threshold + 0.1, 1.0)
        self.match_cost = 1.0 - minimum_iou
        self.max_time_lost = int(frame_rate / 30.0 * lost_track_buffer)
        self.minimum_consecutive_frames = minimum_consecutive_frames
        self.reset()

    def reset(self) -> None:
        self.frame_id = 0
        self.tracked: list[Track] = []
        self.lost: list[Track] = []
        self._next_internal = 0
        self._next_external = 1

    @property
    def alive_ids(self) -> set[int]:
        return {t.external_id for t in (*self.tracked, *self.lost) if t.external_id >= 0}

    def _confirm(self, t: Track) -> None:
        t.activated = True
        if t.external_id < 0:
            t.external_id = self._next_external
            self._next_external += 1

    def _hit(self, t: Track, box: np.ndarray, score: float, det: int, reactivate: bool) -> None:
        _update(t, _xyah(box))
        t.frame_id = self.frame_id
        t.score = score
        t.state = TRACKED
        t.last_det = det
        if reactivate:
            t.tracklet_len = 0
            t.activated = True
        else:
            t.tracklet_len += 1
            if t.tracklet_len >= self.minimum_consecutive_frames:
                self._confirm(t)

    def update(self, xyxy: np.ndarray, scores: np.ndarray) -> np.ndarray:
        self.frame_id += 1
        xyxy = np.asarray(xyxy, np.float64).reshape(-1, 4)
        scores = np.asarray(scores, np.float64).reshape(-1)
        valid = (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1]) & np.isfinite(xyxy).all(axis=1)
        high = np.flatnonzero(valid & (scores >= self.activation_threshold))
        low = np.flatnonzero(valid & (scores > LOW_SCORE) & (scores < self.activation_threshold))
        for t in (*self.tracked, *self.lost):
            t.last_det = -1

        unconfirmed = [t for t in self.tracked if not t.activated]
        confirmed = [t for t in self.tracked if t.activated]
        pool = confirmed + [t for t in self.lost if t not in confirmed]
        _predict(pool)

        # 1st association: high boxes to tracked + lost tracks, IoU cost fused with the box score
        pool_xyxy = np.array([t.xyxy for t in pool]).reshape(-1, 4)
        cost = 1.0 - iou_matrix(pool_xyxy, xyxy[high]) * scores[high][None, :]
        pairs, u_pool, u_high = match(cost, self.match_cost)
        for ti, di in pairs:
            t = pool[ti]
            self._hit(t, xyxy[high[di]], float(scores[high[di]]), int(high[di]), reactivate=t.state != TRACKED)

        # 2nd association: weak boxes to the tracks still unmatched that were tracked last frame
        remaining = [pool[i] for i in u_pool if pool[i].state == TRACKED]
        rem_xyxy = np.array([t.xyxy for t in remaining]).reshape(-1, 4)
        pairs2, u_rem, _ = match(1.0 - iou_matrix(rem_xyxy, xyxy[low]), SECOND_STAGE_COST)
        for ti, di in pairs2:
            self._hit(remaining[ti], xyxy[low[di]], float(scores[low[di]]), int(low[di]), reactivate=False)
        for i in u_rem:
            remaining[i].state = LOST

        # unconfirmed tracks (one hit so far) get one chance at the leftover high boxes
        left = [high[i] for i in u_high]
        unc_xyxy = np.array([t.xyxy for t in unconfirmed]).reshape(-1, 4)
        left_arr = np.asarray(left, np.intp)
        cost_u = 1.0 - iou_matrix(unc_xyxy, xyxy[left_arr]) * scores[left_arr][None, :]
        pairs3, u_unc, u_left = match(cost_u, UNCONFIRMED_COST)
        for ti, di in pairs3:
            self._hit(unconfirmed[ti], xyxy[left_arr[di]], float(scores[left_arr[di]]), int(left_arr[di]), False)
        for i in u_unc:
            unconfirmed[i].state = REMOVED

        # new tracks from the leftover high boxes that are confident enough
        new: list[Track] = []
        for i in u_left:
            d = int(left_arr[i])
            if scores[d] < self.new_track_threshold:
                continue
            mean, cov = _initiate(_xyah(xyxy[d]))
            t = Track(mean, cov, float(scores[d]), self._next_internal, self.frame_id, self.frame_id, last_det=d)
            self._next_internal += 1
            if self.frame_id == 1 and self.minimum_consecutive_frames <= 1:
                self._confirm(t)
            new.append(t)

        for t in self.lost:
            if t.state == LOST and self.frame_id - t.frame_id > self.max_time_lost:
                t.state = REMOVED
        everyone = [*self.tracked, *[t for t in self.lost if t not in self.tracked], *new]
        self.tracked = [t for t in everyone if t.state == TRACKED]
        self.lost = [t for t in everyone if t.state == LOST]
        self._remove_duplicates()

        ids = np.full(len(xyxy), -1, np.int64)
        for t in self.tracked:
            if t.activated and t.last_det >= 0 and t.external_id >= 0:
                ids[t.last_det] = t.external_id
        return ids

    def _remove_duplicates(self) -> None:
        """A lost track that reappears as a new track: keep the older of the two."""
        if not self.tracked or not self.lost:
            return
        dist = 1.0 - iou_matrix(np.array([t.xyxy for t in self.tracked]), np.array([t.xyxy for t in self.lost]))
        drop_a, drop_b = set(), set()
        for ia, ib in zip(*np.nonzero(dist < DUPLICATE_IOU_DISTANCE), strict=True):
            a, b = self.tracked[ia], self.lost[ib]
            if a.frame_id - a.start_frame > b.frame_id - b.start_frame:
                drop_b.add(int(ib))
            else:
                drop_a.add(int(ia))
        self.tracked = [t for i, t in enumerate(self.tracked) if i not in drop_a]
        self.lost = [t for i, t in enumerate(self.lost) if i not in drop_b]
