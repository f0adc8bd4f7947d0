"""Privacy by default: every person image the dashboard shows is blurred unless an admin turns it off,
and the retention period an admin sets is the one :mod:`dashboard.retention` enforces.

Why blur the head region of each person box instead of running a face detector: a detector misses
small, turned or occluded faces and then shows them sharp; the head of an upright person sits in the
top fifth of its box, so blurring that band (with a margin) fails closed. With no boxes known (a crop
with nothing else), the whole image is treated as one person.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import cv2
import numpy as np
from pydantic import Field

from common.configfile import StrictModel
from dashboard.config import PrivacyConfig

HEAD_FRACTION = 0.28  # of the box height, measured from the top (head + neck + a margin)


class PrivacySettings(StrictModel):
    """What an admin can change at run time; persisted as JSON next to the other dashboard state."""

    blur_people: bool = True
    retention_days: int = Field(30, ge=1, le=3650)
    show_gender: bool = True
    changed_by: str = ""
    changed_at: str = ""


_lock = threading.Lock()


def load_settings(path: str | Path, defaults: PrivacyConfig) -> PrivacySettings:
    """The saved settings, or the config defaults when nothing was saved yet.

    A corrupt file is an error (not silently replaced by defaults that might be less private).
    """
    p = Path(path)
    if not p.exists():
        return PrivacySettings(**defaults.model_dump())
    try:
        return PrivacySettings.model_validate_json(p.read_text())
    except ValueError as exc:
        raise ValueError(f"privacy settings file {p} is unreadable ({exc.__class__.__name__}); fix or delete it "
                         f"to fall back to the config defaults") from None


def save_settings(path: str | Path, settings: PrivacySettings, user: str) -> PrivacySettings:
    """Write atomically (temp file + rename) so a crash never leaves half a file behind."""
    stamped = settings.model_copy(update={"changed_by": user, "changed_at": datetime.now(UTC).isoformat()})
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with _lock:
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=".settings.", suffix=".tmp")
        with os.fdopen(fd, "w") as fh:
            json.dump(stamped.model_dump(), fh, indent=2)
        os.replace(tmp, p)
    return stamped


def _blur_region(img: np.ndarray, x1: int, y1: int, x2: int, y2: int) -> None:
    h, w = img.shape[:2]
    x1, x2 = max(0, min(w, x1)), max(0, min(w, x2))
    y1, y2 = max(0, min(h, y1)), max(0, min(h, y2))
    if x2 - x1 < 2 or y2 - y1 < 2:
        return
    roi = img[y1:y2, x1:x2]
    # Pixelate then blur: a Gaussian alone can be partly inverted on tiny regions, blocks cannot.
    rh, rw = roi.shape[:2]
    small = cv2.resize(roi, (max(1, rw // 8), max(1, rh // 8)), interpolation=cv2.INTER_AREA)
    blocks = cv2.resize(small, (rw, rh), interpolation=cv2.INTER_NEAREST)
    k = max(3, (min(rw, rh) // 4) | 1)
    img[y1:y2, x1:x2] = cv2.GaussianBlur(blocks, (k, k), 0)


def blur_heads(image_bgr: np.ndarray, boxes_xyxy: Sequence[Sequence[float]] | np.ndarray | None) -> np.ndarray:
    """A copy with the head band of every person box blurred (the whole top of the image when no boxes)."""
    out = np.ascontiguousarray(image_bgr).copy()
    h, w = out.shape[:2]
    boxes = np.asarray(boxes_xyxy if boxes_xyxy is not None and len(boxes_xyxy) else [[0, 0, w, h]],
                       dtype=np.float32).reshape(-1, 4)
    for x1, y1, x2, y2 in boxes:
        bw, bh = x2 - x1, y2 - y1
        if bw <= 0 or bh <= 0:
            continue
        margin = 0.08 * bw
        _blur_region(out, int(x1 - margin), int(y1 - 0.03 * bh), int(x2 + margin) + 1,
                     int(y1 + HEAD_FRACTION * bh) + 1)
    return out


def blur_crop(crop_bgr: np.ndarray) -> np.ndarray:
    """A person crop is one person box filling the image."""
    return blur_heads(crop_bgr, None)
