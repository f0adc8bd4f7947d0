"""Person AP50 and AP50:95 on the COCO val2017 subset: our decoder beside Ultralytics on the same IR.

Both run the same OpenVINO IR at the same low confidence (0.001, as COCO AP needs the whole
precision-recall curve), person class only, and are scored by pycocotools over all images of the
subset (images without people count for false positives). Ultralytics runs with its own NMS IoU
default (0.7, what its ``val`` uses); ours runs with the configured IoU and, for the record, at
Ultralytics' IoU too, which isolates the decoder from the threshold choice.

Usage: python -m appliance.evaluate.detect_ap [--assets DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from appliance.detect import build_detector
from appliance.detect.base import DEFAULT_MODEL_DIR, DetectorConfig
from appliance.evaluate.report import RESULTS_DIR, bar_chart, result_line, write_json
from common.assets import data_path, model_path, require

NAME = "eval-detect"
PERSON_COCO_ID = 1
ULTRALYTICS_IOU = 0.7
log = logging.getLogger(__name__)


def coco_ap(gt: Any, detections: list[dict[str, Any]], image_ids: list[int]) -> tuple[float, float]:
    """(AP50, AP50:95) in percent for the person category over ``image_ids``."""
    from pycocotools.cocoeval import COCOeval

    if not detections:
        return 0.0, 0.0
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(detections)
        ev = COCOeval(gt, dt, "bbox")
        ev.params.catIds = [PERSON_COCO_ID]
        ev.params.imgIds = image_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[1] * 100), float(ev.stats[0] * 100)


def to_coco(image_id: int, xyxy: np.ndarray, scores: np.ndarray) -> list[dict[str, Any]]:
    return [
        {
            "image_id": image_id,
            "category_id": PERSON_COCO_ID,
            "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
            "score": float(s),
        }
        for (x1, y1, x2, y2), s in zip(xyxy.tolist(), scores.tolist(), strict=True)
    ]


def run_ours(images: list[tuple[int, Path]], model_dir: Path, iou: float, conf: float) -> list[dict[str, Any]]:
    det = build_detector(DetectorConfig(model_dir=model_dir, conf_threshold=conf, iou_threshold=iou))
    out: list[dict[str, Any]] = []
    try:
        for image_id, path in images:
            img = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if img is None:
                raise ValueError(f"cannot decode {path}")
            d = det.detect(img)
            out += to_coco(image_id, d.xyxy, d.confidence)
    finally:
        det.close()
    return out


def run_ultralytics(images: list[tuple[int, Path]], model_dir: Path, conf: float) -> list[dict[str, Any]]:
    from ultralytics import YOLO

    model = YOLO(str(model_dir), task="detect")
    out: list[dict[str, Any]] = []
    for image_id, path in images:
        r = model.predict(str(path), conf=conf, iou=ULTRALYTICS_IOU, classes=[0], imgsz=640, verbose=False)[0]
        b = r.boxes
        out += to_coco(image_id, b.xyxy.cpu().numpy(), b.conf.cpu().numpy())
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--assets", default=None, help="folder holding models/ and data/ (default: shared assets)")
    ap.add_argument("--conf", type=float, default=0.001, help="confidence threshold for both systems")
    ap.add_argument("--results", type=Path, default=RESULTS_DIR)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from pycocotools.coco import COCO

    root = require(data_path("coco_val2017_subset", assets=args.assets), "COCO val2017 subset")
    model_dir = require(model_path(DEFAULT_MODEL_DIR, assets=args.assets), "detector IR")
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(root / "annotations" / "instances_val2017.json"))
    image_ids = sorted(gt.getImgIds())
    images = [(i, require(root / "val2017" / gt.imgs[i]["file_name"], "COCO image")) for i in image_ids]

    ours_iou = DetectorConfig.model_fields["iou_threshold"].default
    t0 = time.perf_counter()
    ours = run_ours(images, model_dir, ours_iou, args.conf)
    ours_at_peer_iou = run_ours(images, model_dir, ULTRALYTICS_IOU, args.conf)
    theirs = run_ultralytics(images, model_dir, args.conf)
    ap50, ap = coco_ap(gt, ours, image_ids)
    ap50_peer_iou, ap_peer_iou = coco_ap(gt, ours_at_peer_iou, image_ids)
    u_ap50, u_ap = coco_ap(gt, theirs, image_ids)
    n_person = len(gt.getAnnIds(imgIds=image_ids, catIds=[PERSON_COCO_ID], iscrowd=False))

    metrics = {"ap50": ap50, "ap": ap, "ultralytics_ap50": u_ap50, "ultralytics_ap": u_ap}
    write_json(
        NAME,
        {
            "metrics": metrics,
            "ours_at_ultralytics_iou": {"iou_threshold": ULTRALYTICS_IOU, "ap50": ap50_peer_iou, "ap": ap_peer_iou},
            "settings": {
                "conf_threshold": args.conf,
                "ours_iou_threshold": ours_iou,
                "ultralytics_iou_threshold": ULTRALYTICS_IOU,
                "classes": ["person"],
                "images": len(image_ids),
                "person_boxes": n_person,
                "model_dir": str(model_dir),
            },
            "target": "ours >= ultralytics - 0.5 AP",
            "met": bool(ap >= u_ap - 0.5 and ap50 >= u_ap50 - 0.5),
            "seconds": round(time.perf_counter() - t0, 1),
        },
        args.results,
    )
    bar_chart(
        args.results / f"{NAME}.png",
        f"Person AP, COCO val2017 subset ({len(image_ids)} images), YOLO11n INT8 IR",
        ["AP50", "AP50:95"],
        {f"reidfleet (NMS IoU {ours_iou})": [ap50, ap], f"Ultralytics {_ultra_version()}": [u_ap50, u_ap]},
        "AP (%)",
    )
    print(json.dumps({"ours_at_ultralytics_iou": [ap50_peer_iou, ap_peer_iou]}))
    print(result_line(NAME, metrics))
    return 0


def _ultra_version() -> str:
    try:
        import ultralytics

        return ultralytics.__version__
    except ImportError:  # pragma: no cover
        return "?"


if __name__ == "__main__":
    raise SystemExit(main())
