"""YOLO11 pre- and post-processing in numpy (+ one cv2 resize): no runtime import.

Kept apart from the runtime so it can be unit-tested on synthetic arrays and reused by any
backend that runs the same graph (OpenVINO today, onnxruntime or a GPU runtime later).

Letterbox follows Ultralytics exactly (bilinear resize of the uint8 image, centred padding of
114 with the same ``±0.1`` rounding), so our boxes and Ultralytics' from the same IR agree to
the pixel and AP comparisons measure the decoder, not a preprocessing difference.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import numpy.typing as npt

from appliance.types import Detections

PAD_VALUE = 114


@dataclass(frozen=True, slots=True)
class Letterbox:
    """Geometry of one letterbox: ``source = (input - pad) / scale``."""

    scale: float
    pad_x: int  # left padding in input pixels
    pad_y: int  # top padding in input pixels
    resized_wh: tuple[int, int]
    source_wh: tuple[int, int]

    @classmethod
    def fit(cls, source_wh: tuple[int, int], input_wh: tuple[int, int]) -> Letterbox:
        sw, sh = source_wh
        iw, ih = input_wh
        if sw <= 0 or sh <= 0:
            raise ValueError(f"image has no pixels: {sw}x{sh}")
        scale = min(iw / sw, ih / sh)
        rw, rh = round(sw * scale), round(sh * scale)
        pad_x = round((iw - rw) / 2 - 0.1)
        pad_y = round((ih - rh) / 2 - 0.1)
        return cls(scale, pad_x, pad_y, (rw, rh), (sw, sh))


def check_image(image_bgr: np.ndarray) -> None:
    """Reject what would silently produce garbage boxes (grey, RGBA, float, empty images)."""
    if not isinstance(image_bgr, np.ndarray):
        raise TypeError(f"image must be a numpy array, got {type(image_bgr).__name__}")
    if image_bgr.ndim != 3 or image_bgr.shape[2] != 3:
        raise ValueError(f"image must be H x W x 3 (BGR), got shape {image_bgr.shape}")
    if image_bgr.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got {image_bgr.dtype}")
    if image_bgr.shape[0] == 0 or image_bgr.shape[1] == 0:
        raise ValueError(f"image has no pixels: shape {image_bgr.shape}")


def letterbox_into(
    image_bgr: np.ndarray, canvas_hwc: npt.NDArray[np.uint8], previous: Letterbox | None = None
) -> Letterbox:
    """Resize ``image_bgr`` into the centre of the preallocated ``canvas_hwc`` (H x W x 3 uint8).

    The canvas is usually an inference request's own input tensor, so the only copy on the hot
    path is the resize itself. Padding is rewritten only when the geometry changed since
    ``previous`` (a camera's frames keep one size, so normally never).
    """
    check_image(image_bgr)
    ih, iw = canvas_hwc.shape[:2]
    box = Letterbox.fit((image_bgr.shape[1], image_bgr.shape[0]), (iw, ih))
    rw, rh = box.resized_wh
    if previous != box:
        canvas_hwc[...] = PAD_VALUE
    roi = canvas_hwc[box.pad_y : box.pad_y + rh, box.pad_x : box.pad_x + rw]
    if (rw, rh) == box.source_wh:
        roi[...] = image_bgr
    else:
        out = cv2.resize(image_bgr, (rw, rh), dst=roi, interpolation=cv2.INTER_LINEAR)
        if out is not roi and not np.shares_memory(out, roi):  # binding could not write in place
            roi[...] = out
    return box


def nms(xyxy: npt.NDArray[np.float32], scores: npt.NDArray[np.float32], iou_threshold: float) -> npt.NDArray[np.intp]:
    """Greedy non-maximum suppression; returns kept indices, best score first.

    Same rule as torchvision's ``nms`` (IoU > threshold suppresses, no +1 in areas).
    """
    order = np.argsort(-scores, kind="stable")
    x1, y1, x2, y2 = (xyxy[:, i] for i in range(4))
    areas = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    keep: list[int] = []
    while order.size:
        i = int(order[0])
        keep.append(i)
        rest = order[1:]
        if not rest.size:
            break
        w = np.clip(np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]), 0, None)
        h = np.clip(np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]), 0, None)
        inter = w * h
        iou = inter / np.maximum(areas[i] + areas[rest] - inter, 1e-9)
        order = rest[iou <= iou_threshold]
    return np.asarray(keep, dtype=np.intp)


def decode(
    output: np.ndarray,
    box: Letterbox,
    *,
    conf_threshold: float,
    iou_threshold: float,
    classes: tuple[int, ...] = (0,),
    max_detections: int = 300,
    max_candidates: int = 30000,
) -> Detections:
    """Turn a raw YOLO11 head output ``[1, 4 + C, A]`` into boxes in source pixels.

    Rows 0-3 are ``cx, cy, w, h`` in input pixels, rows 4.. are per-class scores that the graph
    already passed through a sigmoid (no objectness). Only the rows of ``classes`` are read, so
    person-only decoding touches 5 of 84 rows. Multi-class NMS is per class (box offset trick),
    like Ultralytics with ``agnostic=False``.
    """
    if output.ndim != 3 or output.shape[0] != 1 or output.shape[1] < 5:
        raise ValueError(f"expected a YOLO head output [1, 4+classes, anchors], got {output.shape}")
    n_classes = output.shape[1] - 4
    bad = [c for c in classes if not 0 <= c < n_classes]
    if bad:
        raise ValueError(f"class ids {bad} outside the model's 0..{n_classes - 1}")
    head = output[0]
    if len(classes) == 1:
        cls_scores = head[4 + classes[0]]
        best = np.full(cls_scores.shape, classes[0], np.int32)
        score = cls_scores
    else:
        rows = head[[4 + c for c in classes]]
        arg = rows.argmax(axis=0)
        score = rows[arg, np.arange(rows.shape[1])]
        best = np.asarray(classes, np.int32)[arg]
    cand = np.flatnonzero(score > conf_threshold)
    if cand.size > max_candidates:
        cand = cand[np.argsort(-score[cand], kind="stable")[:max_candidates]]
    if not cand.size:
        return Detections.empty()
    cx, cy, w, h = head[0, cand], head[1, cand], head[2, cand], head[3, cand]
    xyxy = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1).astype(np.float32)
    conf = score[cand].astype(np.float32)
    cls = best[cand]
    offset = xyxy + (cls.astype(np.float32) * 7680.0)[:, None] if len(classes) > 1 else xyxy
    keep = nms(offset, conf, iou_threshold)[:max_detections]
    xyxy = xyxy[keep]
    xyxy[:, [0, 2]] -= box.pad_x
    xyxy[:, [1, 3]] -= box.pad_y
    xyxy /= box.scale
    sw, sh = box.source_wh
    xyxy[:, [0, 2]] = np.clip(xyxy[:, [0, 2]], 0, sw)
    xyxy[:, [1, 3]] = np.clip(xyxy[:, [1, 3]], 0, sh)
    return Detections(xyxy, conf[keep], cls[keep])
