"""Checks an edge frame before anything of it is used, and decodes its crops.

A message that fails any check goes whole to the dead-letter topic and none of it is applied, so
"in the DLQ" always means "not counted": an operator can fix and replay it without double counting.
Each failure has a stable ``error_type`` (dead_letter.avsc) and a reason that says where it is.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from server.config import ValidationSettings


class InvalidFrame(ValueError):
    """An edge frame that is well-formed Avro but cannot be trusted."""

    def __init__(self, error_type: str, reason: str) -> None:
        super().__init__(reason)
        self.error_type = error_type
        self.reason = reason


def _finite(*vals: float) -> bool:
    return all(math.isfinite(v) for v in vals)


def check_box(where: str, x1: float, y1: float, x2: float, y2: float, w: int, h: int, tol: float) -> None:
    """``where`` names the box in the error ("detections[3]")."""
    isfinite = math.isfinite
    if isfinite(x1) and isfinite(y1) and isfinite(x2) and isfinite(y2) and x2 > x1 and y2 > y1 \
            and -tol * w <= x1 and -tol * h <= y1 and x2 <= w + tol * w and y2 <= h + tol * h:
        return  # the common case: one pass of comparisons, no message built
    if not _finite(x1, y1, x2, y2):
        raise InvalidFrame("invalid_box", f"{where}: non-finite coordinate ({x1}, {y1}, {x2}, {y2})")
    if not (x2 > x1 and y2 > y1):
        raise InvalidFrame("invalid_box", f"{where}: empty or inverted box ({x1}, {y1}, {x2}, {y2})")
    tx, ty = tol * w, tol * h
    if x1 < -tx or y1 < -ty or x2 > w + tx or y2 > h + ty:
        raise InvalidFrame("invalid_box", f"{where}: box ({x1:.1f}, {y1:.1f}, {x2:.1f}, {y2:.1f}) lies outside "
                           f"the {w}x{h} frame")


def check_frame(rec: dict[str, Any], cfg: ValidationSettings, now_us: int | None = None) -> None:
    """Raise :class:`InvalidFrame` for the first problem found (cheap checks before JPEG decoding)."""
    if not rec["device_id"] or len(rec["device_id"]) > 128:
        raise InvalidFrame("invalid_field", f"device_id {rec['device_id']!r}: must be 1-128 characters")
    if not rec["camera_id"] or len(rec["camera_id"]) > 128:
        raise InvalidFrame("invalid_field", f"camera_id {rec['camera_id']!r}: must be 1-128 characters")
    w, h = rec["frame_width"], rec["frame_height"]
    if not (0 < w <= cfg.max_frame_side_px and 0 < h <= cfg.max_frame_side_px):
        raise InvalidFrame("invalid_field", f"frame size {w}x{h} outside 1..{cfg.max_frame_side_px}")
    if rec["frame_index"] < 0:
        raise InvalidFrame("invalid_field", f"frame_index {rec['frame_index']} is negative")
    now_us = now_us if now_us is not None else time.time_ns() // 1000
    cap = rec["captured_at_us"]
    if cap < cfg.min_captured_at_us or cap > now_us + int(cfg.max_clock_skew_s * 1e6):
        raise InvalidFrame("invalid_timestamp", f"captured_at_us {cap} is not a plausible capture time "
                           f"(server clock {now_us})")
    dets, crops = rec["detections"], rec["crops"]
    if len(dets) > cfg.max_detections:
        raise InvalidFrame("too_large", f"{len(dets)} detections > {cfg.max_detections}")
    if len(crops) > cfg.max_crops:
        raise InvalidFrame("too_large", f"{len(crops)} crops > {cfg.max_crops}")
    tol = cfg.box_tolerance_frac
    seen_tracks: set[int] = set()
    for i, d in enumerate(dets):
        where = f"detections[{i}]"
        check_box(where, d["x1"], d["y1"], d["x2"], d["y2"], w, h, tol)
        if not (math.isfinite(d["score"]) and 0.0 <= d["score"] <= 1.0):
            raise InvalidFrame("invalid_field", f"{where}.score {d['score']} not in [0, 1]")
        if not 0 <= d["class_id"] < 10_000:
            raise InvalidFrame("invalid_field", f"{where}.class_id {d['class_id']} is absurd")
        tid = d["track_id"]
        if tid < -1:
            raise InvalidFrame("invalid_field", f"{where}.track_id {tid} < -1")
        if tid >= 0:
            if tid in seen_tracks:
                raise InvalidFrame("invalid_field", f"{where}: track_id {tid} appears twice in one frame")
            seen_tracks.add(tid)
    crop_tracks: set[int] = set()
    for i, c in enumerate(crops):
        where = f"crops[{i}]"
        if c["track_id"] < 0:
            raise InvalidFrame("invalid_field", f"{where}.track_id {c['track_id']}: crops need a track")
        if c["track_id"] in crop_tracks:
            raise InvalidFrame("invalid_field", f"{where}: two crops for track {c['track_id']} in one frame")
        crop_tracks.add(c["track_id"])
        check_box(where, c["x1"], c["y1"], c["x2"], c["y2"], w, h, tol)
        if not (_finite(c["quality"], c["score"]) and 0.0 <= c["quality"] <= 1.0 and 0.0 <= c["score"] <= 1.0):
            raise InvalidFrame("invalid_field", f"{where}: quality {c['quality']} / score {c['score']} "
                               "not in [0, 1]")
        n = len(c["jpeg"])
        if n == 0 or n > cfg.max_crop_bytes:
            raise InvalidFrame("bad_jpeg", f"{where}: JPEG of {n} bytes (allowed 1..{cfg.max_crop_bytes})")
    for i, t in enumerate(rec["ended_track_ids"]):
        if t < 0:
            raise InvalidFrame("invalid_field", f"ended_track_ids[{i}] = {t} is negative")


@dataclass(frozen=True)
class DecodedCrop:
    track_id: int
    image_bgr: np.ndarray | None  # None when the embedder decodes the JPEG itself (nvJPEG on the GPU)
    quality: float
    score: float
    xyxy: tuple[float, float, float, float]
    reason: str
    jpeg: bytes = b""


def crop_of(c: dict[str, Any], image_bgr: np.ndarray | None = None, jpeg: bytes = b"") -> DecodedCrop:
    """A record's crop (a ``crops`` entry of an edge frame) as the matcher and embedders take it."""
    return DecodedCrop(int(c["track_id"]), image_bgr, float(c["quality"]), float(c["score"]),
                       (c["x1"], c["y1"], c["x2"], c["y2"]), str(c["reason"]), jpeg)


_SOF = frozenset((0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF))


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's frame header, without decoding; None if the bytes are not a JPEG
    whose header can be read. Walks the marker segments from SOI to the first SOF."""
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    i = 2
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
            continue
        length = (data[i + 2] << 8) | data[i + 3]
        if length < 2:
            return None
        if marker in _SOF:
            if i + 9 > n:
                return None
            h, w = (data[i + 5] << 8) | data[i + 6], (data[i + 7] << 8) | data[i + 8]
            return (w, h) if w and h else None
        i += 2 + length
    return None


def _check_size(i: int, c: dict[str, Any], iw: int, ih: int, w: int, h: int, cfg: ValidationSettings) -> None:
    if min(ih, iw) < cfg.min_crop_side_px or iw > 2 * w + 64 or ih > 2 * h + 64:
        raise InvalidFrame("bad_jpeg", f"crops[{i}] (track {c['track_id']}): decoded size {iw}x{ih} does not "
                           f"fit a {w}x{h} frame")


def undecoded_crops(rec: dict[str, Any], cfg: ValidationSettings) -> list[DecodedCrop]:
    """The crops with their JPEG bytes for an embedder that decodes on the GPU: the header is checked
    here (a JPEG, a plausible size) so a frame with a bad crop is rejected before any of it is used;
    a crop whose body turns out corrupt fails the GPU decode and the batch is redone on the CPU path."""
    out = []
    w, h = rec["frame_width"], rec["frame_height"]
    for i, c in enumerate(rec["crops"]):
        size = jpeg_size(c["jpeg"])
        if size is None:
            raise InvalidFrame("bad_jpeg", f"crops[{i}] (track {c['track_id']}): {len(c['jpeg'])} bytes are not a "
                               "JPEG with a readable frame header")
        _check_size(i, c, size[0], size[1], w, h, cfg)
        out.append(crop_of(c, jpeg=c["jpeg"]))
    return out


def decode_crops(rec: dict[str, Any], cfg: ValidationSettings) -> list[DecodedCrop]:
    """Decode every crop JPEG; a crop that does not decode, or decodes to nonsense, rejects the frame."""
    out = []
    w, h = rec["frame_width"], rec["frame_height"]
    for i, c in enumerate(rec["crops"]):
        buf = np.frombuffer(c["jpeg"], dtype=np.uint8)
        # Only JPEG (the field's contract, and all the GPU decoder takes), though OpenCV would read PNG too.
        img = cv2.imdecode(buf, cv2.IMREAD_COLOR) if jpeg_size(c["jpeg"]) is not None else None
        if img is None:
            raise InvalidFrame("bad_jpeg", f"crops[{i}] (track {c['track_id']}): {len(buf)} bytes do not decode "
                               "as an image")
        ih, iw = img.shape[:2]
        _check_size(i, c, iw, ih, w, h, cfg)
        out.append(crop_of(c, img))
    return out
