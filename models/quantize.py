"""Post-training INT8 quantisation of an OpenVINO IR with NNCF and a calibration image folder.

Use images from the site's own cameras where possible: calibration on the scenes a model will see
keeps INT8 accuracy closest to FP32. The detector's box-decoding tail (sigmoid, DFL, the final
multiplies) stays in floating point, as Ultralytics does, because INT8 there shifts boxes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np

from schemas.model_manifest import InputSpec

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp"}


def preprocess(image_bgr: np.ndarray, spec: InputSpec) -> np.ndarray:
    """One image → the model's input tensor, exactly as the manifest describes it."""
    _, _, h, w = spec.shape if spec.layout == "NCHW" else (spec.shape[0], spec.shape[3], spec.shape[1], spec.shape[2])
    if spec.resize == "letterbox":
        ih, iw = image_bgr.shape[:2]
        r = min(h / ih, w / iw)
        nh, nw = round(ih * r), round(iw * r)
        canvas = np.full((h, w, 3), spec.pad_value, np.uint8)
        top, left = (h - nh) // 2, (w - nw) // 2
        canvas[top:top + nh, left:left + nw] = cv2.resize(image_bgr, (nw, nh), interpolation=cv2.INTER_LINEAR)
        img = canvas
    else:
        img = cv2.resize(image_bgr, (w, h), interpolation=cv2.INTER_LINEAR)
    if spec.color == "RGB":
        img = img[:, :, ::-1]
    x = img.astype(np.float32) / spec.scale
    x = (x - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    x = x.transpose(2, 0, 1)[None] if spec.layout == "NCHW" else x[None]
    return np.ascontiguousarray(x)


def calibration_images(folder: Path, limit: int) -> Iterator[np.ndarray]:
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise FileNotFoundError(f"no calibration images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {folder}")
    for p in paths[:limit]:
        img = cv2.imread(str(p), cv2.IMREAD_COLOR)
        if img is None:
            log.warning("skipping unreadable calibration image %s", p)
            continue
        yield img


def quantize_ir(fp32_xml: Path, calib_dir: Path, spec: InputSpec, out_xml: Path, *, task: str,
                subset_size: int = 300) -> Path:
    """Quantise ``fp32_xml`` to INT8 and save it as ``out_xml`` (+ .bin). Returns ``out_xml``."""
    import nncf
    import openvino as ov

    core = ov.Core()
    model = core.read_model(fp32_xml)
    tensors = [preprocess(img, spec) for img in calibration_images(calib_dir, subset_size)]
    if not tensors:
        raise ValueError(f"no readable calibration images under {calib_dir}")
    ignored = None
    if task == "detect":
        # Keep YOLO's decode tail in float: sigmoid scores, DFL and the stride multiplies.
        ignored = nncf.IgnoredScope(
            types=["Sigmoid"],
            patterns=[r".*dfl.*", r".*model\.23/.*/(Add|Sub|Mul|Div).*"],
            validate=False,
        )
    quantized = nncf.quantize(
        model,
        nncf.Dataset(tensors),
        preset=nncf.QuantizationPreset.MIXED,
        subset_size=min(subset_size, len(tensors)),
        ignored_scope=ignored,
    )
    out_xml.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(quantized, out_xml, compress_to_fp16=False)
    log.info("saved INT8 model %s (%d calibration images)", out_xml, len(tensors))
    return out_xml
