"""Crop validation and batching shared by every embedder and the gender classifier.

One place checks that each crop is a non-empty BGR uint8 image, so a bad crop fails with its
index instead of as an opaque shape error deep inside a runtime.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np


class CropError(ValueError):
    """A crop that is not a non-empty HxWx3 uint8 BGR image."""


def check_crop(i: int, crop: np.ndarray) -> np.ndarray:
    if not isinstance(crop, np.ndarray):
        raise CropError(f"crop {i}: expected a numpy array, got {type(crop).__name__}")
    if crop.ndim != 3 or crop.shape[2] != 3 or crop.shape[0] < 1 or crop.shape[1] < 1:
        raise CropError(f"crop {i}: expected HxWx3 BGR with H, W >= 1, got shape {crop.shape}")
    if crop.dtype != np.uint8:
        raise CropError(f"crop {i}: expected uint8 pixels, got {crop.dtype}")
    return crop


def resize_stack(crops_bgr: Sequence[np.ndarray], height: int, width: int) -> np.ndarray:
    """(N, height, width, 3) uint8 BGR; stretched like torchreid's and OMZ's own pipelines (no letterbox)."""
    out = np.empty((len(crops_bgr), height, width, 3), dtype=np.uint8)
    for i, crop in enumerate(crops_bgr):
        crop = check_crop(i, crop)
        if crop.shape[0] == height and crop.shape[1] == width:
            out[i] = crop
        else:
            # Bilinear matches torchvision's Resize used in torchreid's evaluation transforms.
            out[i] = cv2.resize(crop, (width, height), interpolation=cv2.INTER_LINEAR)
    return out


def batches(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]
