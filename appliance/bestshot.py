"""Track-aware sending: which person crops are worth a message.

The server embeds a person once per crop, so sending a crop per box per frame (or a full frame)
wastes bandwidth and GPU time on near-identical views. Per track we send a crop when the track
starts (``NEW_TRACK``), when its crop quality clearly improves on the best one sent
(``IMPROVED``), and optionally on a slow timer for long tracks (``REFRESH``), capped per track and
spaced by a minimum interval. Boxes still go out every frame.

Quality in [0, 1] combines what makes a crop useful for Re-ID:
- size: box height against the embedder's input height (tiny people embed badly),
- sharpness: variance of the Laplacian of the grey crop, measured on a 64 px high resize,
- the detector's confidence (occluded or partial people score lower),
- a penalty when the box is cut by the frame edge (half a person).
Size, confidence and edge are vectorised over all boxes; the Laplacian (the only costly part) is
computed only for boxes that could actually trigger a crop.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np
import numpy.typing as npt

from appliance.config import SendingConfig
from appliance.types import UNTRACKED, Detections

SHARPNESS_HEIGHT_PX = 64
EDGE_TOLERANCE_PX = 2.0
EDGE_PENALTY = 0.5
W_SIZE, W_SHARP, W_CONF = 0.4, 0.3, 0.3
MAX_TRACKS = 10_000  # state kept at most; protects memory if a tracker never reports ended ids


@dataclass(frozen=True, slots=True)
class CropPick:
    """One crop to send: ``crop_xyxy`` are integer pixel bounds (margin included, clipped)."""

    track_id: int
    box_index: int
    crop_xyxy: tuple[int, int, int, int]
    quality: float
    reason: str  # NEW_TRACK | IMPROVED | REFRESH


@dataclass(slots=True)
class _TrackState:
    sent: int = 0
    best_quality: float = -1.0
    last_sent_s: float = -1e18
    last_seen_s: float = 0.0


def crop_bounds(
    xyxy: npt.NDArray[np.float32], margin: float, resolution_wh: tuple[int, int]
) -> npt.NDArray[np.int32]:
    """Boxes grown by ``margin`` x size on each side, rounded outwards and clipped to the frame."""
    w = xyxy[:, 2] - xyxy[:, 0]
    h = xyxy[:, 3] - xyxy[:, 1]
    grown = np.stack(
        [xyxy[:, 0] - margin * w, xyxy[:, 1] - margin * h, xyxy[:, 2] + margin * w, xyxy[:, 3] + margin * h], axis=1
    )
    out = np.empty_like(grown, dtype=np.int32)
    out[:, :2] = np.floor(grown[:, :2])
    out[:, 2:] = np.ceil(grown[:, 2:])
    fw, fh = resolution_wh
    out[:, [0, 2]] = np.clip(out[:, [0, 2]], 0, fw)
    out[:, [1, 3]] = np.clip(out[:, [1, 3]], 0, fh)
    return out


def sharpness(image_bgr: npt.NDArray[np.uint8], xyxy: tuple[int, int, int, int], ref: float) -> float:
    """Sharpness score in [0, 1): ``1 - exp(-var(Laplacian) / ref)`` on a small grey resize."""
    x1, y1, x2, y2 = xyxy
    roi = image_bgr[y1:y2, x1:x2]
    if roi.shape[0] < 2 or roi.shape[1] < 2:
        return 0.0
    scale = SHARPNESS_HEIGHT_PX / roi.shape[0]
    size = (max(2, round(roi.shape[1] * scale)), SHARPNESS_HEIGHT_PX)
    small = cv2.resize(roi, size, interpolation=cv2.INTER_AREA)
    grey = cv2.cvtColor(small, cv2.COLOR_BGR2GRAY)
    var = float(cv2.Laplacian(grey, cv2.CV_32F).var())
    return 1.0 - float(np.exp(-var / ref))


def static_quality(
    detections: Detections, resolution_wh: tuple[int, int], target_height_px: int
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]]:
    """Quality without sharpness (sharpness counted as 1, an upper bound) and the cut-by-edge flags."""
    xyxy = detections.xyxy
    h = xyxy[:, 3] - xyxy[:, 1]
    size = np.clip(h / float(target_height_px), 0.0, 1.0)
    fw, fh = resolution_wh
    cut = (
        (xyxy[:, 0] <= EDGE_TOLERANCE_PX)
        | (xyxy[:, 1] <= EDGE_TOLERANCE_PX)
        | (xyxy[:, 2] >= fw - EDGE_TOLERANCE_PX)
        | (xyxy[:, 3] >= fh - EDGE_TOLERANCE_PX)
    )
    base = W_SIZE * size + W_CONF * np.clip(detections.confidence, 0.0, 1.0)
    upper = (base + W_SHARP) * np.where(cut, EDGE_PENALTY, 1.0)
    return upper.astype(np.float32), cut


@dataclass
class BestShot:
    """Per-camera best-shot selector. Not thread-safe: the pipeline thread owns it."""

    cfg: SendingConfig
    _tracks: dict[int, _TrackState] = field(default_factory=dict)
    sharpness_evaluated: int = 0

    def select(
        self,
        image_bgr: npt.NDArray[np.uint8],
        detections: Detections,
        now_s: float,
        ended_track_ids: list[int] | tuple[int, ...] = (),
    ) -> list[CropPick]:
        """Crops to send for this frame (at most one per track); forgets the ended tracks."""
        for tid in ended_track_ids:
            self._tracks.pop(int(tid), None)
        cfg = self.cfg
        picks: list[CropPick] = []
        if cfg.mode != "track" or not len(detections):
            return picks
        resolution_wh = (int(image_bgr.shape[1]), int(image_bgr.shape[0]))
        upper, cut = static_quality(detections, resolution_wh, cfg.target_height_px)
        heights = detections.xyxy[:, 3] - detections.xyxy[:, 1]
        bounds = crop_bounds(detections.xyxy, cfg.crop_margin, resolution_wh)
        for i, tid in enumerate(detections.tracker_id.tolist()):
            if tid == UNTRACKED:
                continue
            state = self._tracks.get(tid)
            if state is None:
                state = self._tracks[tid] = _TrackState()
            state.last_seen_s = now_s
            if heights[i] < cfg.min_crop_height_px or state.sent >= cfg.max_crops_per_track:
                continue
            if now_s - state.last_sent_s < cfg.min_crop_interval_s:
                continue
            refresh_due = cfg.refresh_interval_s > 0 and now_s - state.last_sent_s >= cfg.refresh_interval_s
            if state.sent and not refresh_due and upper[i] < state.best_quality + cfg.improve_margin:
                continue  # even a perfectly sharp crop would not be a clear improvement: skip the Laplacian
            x1, y1, x2, y2 = (int(v) for v in bounds[i])
            if x2 - x1 < 2 or y2 - y1 < 2:
                continue
            sharp = sharpness(image_bgr, (x1, y1, x2, y2), cfg.sharpness_ref)
            self.sharpness_evaluated += 1
            quality = float(upper[i] - W_SHARP * (1.0 - sharp) * (EDGE_PENALTY if cut[i] else 1.0))
            if not state.sent:
                reason = "NEW_TRACK"
            elif quality >= state.best_quality + cfg.improve_margin:
                reason = "IMPROVED"
            elif refresh_due:
                reason = "REFRESH"
            else:
                continue
            state.sent += 1
            state.best_quality = max(state.best_quality, quality)
            state.last_sent_s = now_s
            picks.append(CropPick(tid, i, (x1, y1, x2, y2), min(max(quality, 0.0), 1.0), reason))
        if len(self._tracks) > MAX_TRACKS:
            for tid, _ in sorted(self._tracks.items(), key=lambda kv: kv[1].last_seen_s)[: len(self._tracks) // 2]:
                del self._tracks[tid]
        return picks

    @property
    def tracks_known(self) -> int:
        return len(self._tracks)

    def reset(self) -> None:
        self._tracks.clear()
