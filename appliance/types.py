"""The edge currency: a captured :class:`Frame` and the :class:`Detections` found in it.

Named like supervision's ``Detections`` (struct of arrays, ``xyxy`` in source pixels) so the
tracker adapter is trivial, but owned here so that only ``track.py`` imports supervision and
only ``encode.py`` knows the wire format. Shapes are checked on construction; stages return new
objects instead of mutating.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

UNTRACKED = -1
PERSON_CLASS_ID = 0


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded BGR frame. ``frame_index`` counts source frames, so gaps mean drops."""

    camera_id: str
    frame_index: int
    captured_at_ns: int  # wall clock (time.time_ns) at capture
    image: npt.NDArray[np.uint8]  # H x W x 3, BGR
    dropped_before: int = 0  # frames the source skipped right before this one (live: latest wins)

    @property
    def resolution_wh(self) -> tuple[int, int]:
        return int(self.image.shape[1]), int(self.image.shape[0])


@dataclass(frozen=True, slots=True)
class Detections:
    """N boxes: ``xyxy`` float32 (N, 4) in source pixels, ``confidence`` (N,), ``class_id`` (N,),
    ``tracker_id`` (N,) with -1 for untracked."""

    xyxy: npt.NDArray[np.float32]
    confidence: npt.NDArray[np.float32]
    class_id: npt.NDArray[np.int32]
    tracker_id: npt.NDArray[np.int64] = field(default_factory=lambda: np.empty(0, np.int64))

    def __post_init__(self) -> None:
        n = len(self.xyxy)
        object.__setattr__(self, "xyxy", np.asarray(self.xyxy, np.float32).reshape(n, 4))
        object.__setattr__(self, "confidence", np.asarray(self.confidence, np.float32).reshape(n))
        object.__setattr__(self, "class_id", np.asarray(self.class_id, np.int32).reshape(n))
        tid = np.asarray(self.tracker_id, np.int64)
        if tid.size == 0 and n:
            tid = np.full(n, UNTRACKED, np.int64)
        object.__setattr__(self, "tracker_id", tid.reshape(n))

    @classmethod
    def empty(cls) -> Detections:
        return cls(np.empty((0, 4), np.float32), np.empty(0, np.float32), np.empty(0, np.int32))

    def __len__(self) -> int:
        return len(self.xyxy)

    def __getitem__(self, index: slice | npt.NDArray[np.bool_] | npt.NDArray[np.integer]) -> Detections:
        return Detections(self.xyxy[index], self.confidence[index], self.class_id[index], self.tracker_id[index])

    def with_tracker_id(self, tracker_id: npt.NDArray[np.int64]) -> Detections:
        return Detections(self.xyxy, self.confidence, self.class_id, tracker_id)
