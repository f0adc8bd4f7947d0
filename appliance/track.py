"""Multi-object tracking (ByteTrack) behind one small class; the only module that imports supervision.

Three ByteTrack implementations can sit behind :class:`Tracker` (``TrackerConfig.backend``):

- ``reidfleet``: :mod:`appliance.bytetrack`, the original algorithm in numpy alone (no
  supervision, scipy or lap on the appliance).
- ``supervision``: ``sv.ByteTrack`` from supervision 0.30 (deprecated there, removed in 0.31), a
  faithful port of the original ByteTrack (score-fused first association, fixed 0.5 second stage).
- ``trackers``: roboflow ``trackers``' ``ByteTrackTracker``, its successor. It pulls the
  non-headless ``opencv-python`` wheel (GUI libraries) into the image.

The default and the reasoning, with measurements, are in docs/appliance-tracking.md. Either way
the pipeline sees our :class:`~appliance.types.Detections` in and out, in input order, with
``tracker_id`` filled (-1 where a box belongs to no confirmed track), and the ids of tracks that
ended in the last update so the server can close them.
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

import numpy as np
from pydantic import Field

from appliance.types import UNTRACKED, Detections
from common.configfile import StrictModel

BACKENDS = ("reidfleet", "supervision", "trackers")


class TrackerConfig(StrictModel):
    """ByteTrack settings, named for what they do; each backend maps them to its own knobs."""

    backend: Literal["reidfleet", "supervision", "trackers"] = Field(
        "reidfleet", description="ByteTrack implementation (see docs/appliance-tracking.md)."
    )
    activation_threshold: float = Field(
        0.5, gt=0.0, lt=1.0, description="Score that makes a box 'high' (first association, may start a track)."
    )
    lost_track_buffer: int = Field(
        30, ge=0, le=10000, description="Frames (at 30 FPS; scaled to the real rate) a lost track waits to return."
    )
    minimum_iou: float = Field(0.1, gt=0.0, lt=1.0, description="Least IoU between a track and a box to match them.")
    minimum_consecutive_frames: int = Field(
        1, ge=1, le=100, description="Matched frames before a track gets an id (filters one-frame ghosts)."
    )


class Tracker:
    """ByteTrack over our ``Detections``. One instance per camera; ids are per instance."""

    def __init__(self, cfg: TrackerConfig, frame_rate: float) -> None:
        if not frame_rate > 0:
            raise ValueError(f"frame_rate must be > 0, got {frame_rate}")
        self.cfg = cfg
        self.frame_rate = float(frame_rate)
        self.ended_track_ids: list[int] = []
        self._alive: set[int] = set()
        self._impl: Any = self._build()

    def _build(self) -> Any:
        cfg = self.cfg
        if cfg.backend == "reidfleet":
            from appliance.bytetrack import ByteTrack

            return ByteTrack(
                activation_threshold=cfg.activation_threshold,
                lost_track_buffer=cfg.lost_track_buffer,
                minimum_iou=cfg.minimum_iou,
                frame_rate=self.frame_rate,
                minimum_consecutive_frames=cfg.minimum_consecutive_frames,
            )
        if cfg.backend == "supervision":
            try:
                import supervision as sv
            except ImportError as exc:
                raise ImportError(
                    "tracker backend 'supervision' needs supervision==0.30.0 (not in the appliance image); "
                    "use tracker.backend: reidfleet"
                ) from exc

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # sv.ByteTrack is deprecated in 0.30; we pin it on purpose
                return sv.ByteTrack(
                    track_activation_threshold=cfg.activation_threshold,
                    lost_track_buffer=cfg.lost_track_buffer,
                    minimum_matching_threshold=1.0 - cfg.minimum_iou,
                    frame_rate=self.frame_rate,
                    minimum_consecutive_frames=cfg.minimum_consecutive_frames,
                )
        try:
            from trackers import ByteTrackTracker
        except ImportError as exc:
            raise ImportError(
                "tracker backend 'trackers' needs roboflow's trackers package (pip install trackers); "
                "or set tracker.backend: supervision"
            ) from exc
        return ByteTrackTracker(
            lost_track_buffer=cfg.lost_track_buffer,
            frame_rate=self.frame_rate,
            track_activation_threshold=cfg.activation_threshold,
            minimum_consecutive_frames=cfg.minimum_consecutive_frames,
            minimum_iou_threshold=cfg.minimum_iou,
            high_conf_det_threshold=cfg.activation_threshold,
        )

    def update(self, detections: Detections) -> Detections:
        """Feed one frame's boxes (every frame, empty ones too: time passes for the tracks).

        Returns the same boxes in the same order with ``tracker_id`` set; fills ``ended_track_ids``.
        """
        if self.cfg.backend == "reidfleet":
            ids = self._impl.update(detections.xyxy, detections.confidence)
            alive = self._impl.alive_ids
            self.ended_track_ids = sorted(self._alive - alive)
            self._alive = alive
            return detections.with_tracker_id(ids)

        import supervision as sv

        n = len(detections)
        sv_in = sv.Detections(
            xyxy=detections.xyxy.astype(np.float32, copy=False),
            confidence=detections.confidence,
            class_id=detections.class_id,
            data={"row": np.arange(n)},
        )
        if self.cfg.backend == "supervision":
            out = self._impl.update_with_detections(sv_in)
            alive = {
                int(t.external_track_id)
                for t in [*self._impl.tracked_tracks, *self._impl.lost_tracks]
                if t.external_track_id >= 0
            }
        else:
            out = self._impl.update(sv_in)
            alive = {int(t.tracker_id) for t in self._impl.tracks if t.tracker_id >= 0}
        ids = np.full(n, UNTRACKED, np.int64)
        if len(out) and out.tracker_id is not None:
            ids[np.asarray(out.data["row"], np.intp)] = np.asarray(out.tracker_id, np.int64)
        self.ended_track_ids = sorted(self._alive - alive)
        self._alive = alive
        return detections.with_tracker_id(ids)

    @property
    def active_track_ids(self) -> list[int]:
        """Confirmed tracks still alive (tracked or briefly lost)."""
        return sorted(self._alive)

    def reset(self) -> None:
        """Forget every track and restart ids (per instance; other cameras are untouched)."""
        self._impl = self._build()
        self._alive = set()
        self.ended_track_ids = []
