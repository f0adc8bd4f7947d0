"""MOTA, IDF1 and HOTA on MOT15 PETS09-S2L1 and TUD-Campus: our detector + Tracker beside
Ultralytics' ``model.track(tracker="bytetrack.yaml", persist=True)`` on the same IR and frames.

Both see the same JPEG frames, person class only, detections down to confidence 0.1 (Ultralytics'
own default for tracking; ByteTrack's second stage needs the weak boxes). Scores come from
TrackEval's HOTA, CLEAR and Identity metrics fed per frame with IoU similarities, exactly as its
MOTChallenge loader would (MOT15 ground truth has no distractor classes to strip). Reported values
are means over the sequences, in percent.

The run also feeds the same cached detections to both ByteTrack implementations behind
``appliance.track.Tracker`` (sv.ByteTrack from supervision 0.30 and roboflow ``trackers``) frame by
frame, interleaved, to compare accuracy and ``update`` latency on equal input. ``--tune`` sweeps a
small grid of Tracker settings instead (see docs/appliance-tracking.md).

Usage: python -m appliance.evaluate.track_mot [--assets DIR] [--tune]
"""

from __future__ import annotations

import argparse
import configparser
import itertools
import json
import logging
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from appliance.detect import build_detector
from appliance.detect.base import DEFAULT_MODEL_DIR, DetectorConfig
from appliance.evaluate.report import RESULTS_DIR, bar_chart, result_line, write_json
from appliance.track import BACKENDS, Tracker, TrackerConfig
from appliance.types import Detections
from common.assets import data_path, model_path, require

NAME = "eval-track"
SEQUENCES = ("PETS09-S2L1", "TUD-Campus")
TRACK_CONF = 0.1
log = logging.getLogger(__name__)

# rows: frame, id, x, y, w, h (MOT convention, frames from 1)
MotRows = np.ndarray


@dataclass
class Sequence:
    name: str
    frames: list[Path]
    frame_rate: float
    gt: MotRows


def load_sequence(root: Path, name: str) -> Sequence:
    seq_dir = require(root / name, f"MOT15 sequence {name}")
    info = configparser.ConfigParser()
    info.read(seq_dir / "seqinfo.ini")
    rate = float(info["Sequence"]["frameRate"])
    length = int(info["Sequence"]["seqLength"])
    frames = [seq_dir / "img1" / f"{i:06d}.jpg" for i in range(1, length + 1)]
    missing = [p.name for p in frames if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{seq_dir}/img1 lacks {len(missing)} frames, e.g. {missing[:3]}")
    gt = np.loadtxt(seq_dir / "gt" / "gt.txt", delimiter=",", ndmin=2)
    gt = gt[(gt[:, 0] >= 1) & (gt[:, 0] <= length)]
    return Sequence(name, frames, rate, gt[:, :6])


def rows_from(frame_no: int, d: Detections) -> list[list[float]]:
    keep = d.tracker_id >= 0
    return [
        [frame_no, int(t), x1, y1, x2 - x1, y2 - y1]
        for (x1, y1, x2, y2), t in zip(d.xyxy[keep].tolist(), d.tracker_id[keep].tolist(), strict=True)
    ]


def score(gt: MotRows, pred: MotRows, n_frames: int) -> dict[str, float]:
    """HOTA / MOTA / IDF1 (percent) via TrackEval's metric classes on one sequence."""
    from trackeval.datasets._base_dataset import _BaseDataset
    from trackeval.metrics import CLEAR, HOTA, Identity

    gt_uid = {v: i for i, v in enumerate(np.unique(gt[:, 1]).tolist())}
    tr_uid = {v: i for i, v in enumerate(np.unique(pred[:, 1]).tolist())} if len(pred) else {}
    data: dict[str, Any] = {
        "num_timesteps": n_frames,
        "num_gt_ids": len(gt_uid),
        "num_tracker_ids": len(tr_uid),
        "num_gt_dets": len(gt),
        "num_tracker_dets": len(pred),
        "gt_ids": [],
        "tracker_ids": [],
        "similarity_scores": [],
    }
    for f in range(1, n_frames + 1):
        g = gt[gt[:, 0] == f]
        p = pred[pred[:, 0] == f] if len(pred) else np.empty((0, 6))
        data["gt_ids"].append(np.array([gt_uid[v] for v in g[:, 1].tolist()], int))
        data["tracker_ids"].append(np.array([tr_uid[v] for v in p[:, 1].tolist()], int))
        data["similarity_scores"].append(_BaseDataset._calculate_box_ious(g[:, 2:6], p[:, 2:6], box_format="xywh"))
    hota = HOTA(config={"PRINT_CONFIG": False}).eval_sequence(data)
    clear = CLEAR(config={"PRINT_CONFIG": False}).eval_sequence(data)
    ident = Identity(config={"PRINT_CONFIG": False}).eval_sequence(data)
    return {
        "hota": float(np.mean(hota["HOTA"]) * 100),
        "mota": float(clear["MOTA"] * 100),
        "idf1": float(ident["IDF1"] * 100),
        "id_switches": int(clear["IDSW"]),
        "tracks": len(tr_uid),
    }


def detect_sequence(seq: Sequence, model_dir: Path, iou: float | None, conf: float = TRACK_CONF) -> list[Detections]:
    extra = {} if iou is None else {"iou_threshold": iou}
    det = build_detector(DetectorConfig(model_dir=model_dir, conf_threshold=conf, **extra))
    try:
        out = []
        for p in seq.frames:
            img = cv2.imread(str(p), cv2.IMREAD_COLOR)
            if img is None:
                raise ValueError(f"cannot decode {p}")
            out.append(det.detect(img))
        return out
    finally:
        det.close()


def track_sequences(
    dets: list[Detections], frame_rate: float, configs: dict[str, TrackerConfig]
) -> dict[str, tuple[MotRows, list[float]]]:
    """Run several trackers over the same detections, interleaved frame by frame (fair timing)."""
    trackers = {k: Tracker(c, frame_rate) for k, c in configs.items()}
    rows: dict[str, list[list[float]]] = {k: [] for k in configs}
    times: dict[str, list[float]] = {k: [] for k in configs}
    for i, d in enumerate(dets, start=1):
        for k, t in trackers.items():
            t0 = time.perf_counter()
            out = t.update(d)
            times[k].append((time.perf_counter() - t0) * 1000)
            rows[k] += rows_from(i, out)
    return {k: (np.array(rows[k], float).reshape(-1, 6), times[k]) for k in configs}


def run_ultralytics(seq: Sequence, model_dir: Path) -> MotRows:
    from ultralytics import YOLO

    model = YOLO(str(model_dir), task="detect")
    rows: list[list[float]] = []
    for i, p in enumerate(seq.frames, start=1):
        r = model.track(str(p), persist=True, tracker="bytetrack.yaml", classes=[0], imgsz=640, verbose=False)[0]
        if r.boxes.id is None:
            continue
        xyxy, ids = r.boxes.xyxy.cpu().numpy().tolist(), r.boxes.id.cpu().numpy().tolist()
        for (x1, y1, x2, y2), t in zip(xyxy, ids, strict=True):
            rows.append([i, int(t), x1, y1, x2 - x1, y2 - y1])
    return np.array(rows, float).reshape(-1, 6)


def mean_over(per_seq: dict[str, dict[str, float]], key: str) -> float:
    return float(statistics.fmean(v[key] for v in per_seq.values()))


def tune(
    seqs: list[Sequence], model_dir: Path, det_iou: float | None, backends: tuple[str, ...], det_conf: float
) -> None:
    """Small, principled grid, one setting for all sequences: prints mean HOTA/IDF1/MOTA per setting."""
    dets = {s.name: detect_sequence(s, model_dir, det_iou, det_conf) for s in seqs}
    grid = {
        "activation_threshold": (0.25, 0.4, 0.5, 0.6),
        "minimum_iou": (0.1, 0.2, 0.3),
        "lost_track_buffer": (30, 60),
        "minimum_consecutive_frames": (1, 2),
    }
    rows = []
    for backend in backends:
        for values in itertools.product(*grid.values()):
            cfg = TrackerConfig(backend=backend, **dict(zip(grid, values, strict=True)))
            per = {
                s.name: score(s.gt, track_sequences(dets[s.name], s.frame_rate, {"x": cfg})["x"][0], len(s.frames))
                for s in seqs
            }
            rows.append((mean_over(per, "hota"), mean_over(per, "idf1"), mean_over(per, "mota"), backend, values, per))
    rows.sort(key=lambda r: -(r[0] + r[1]))
    print("hota idf1 mota backend", list(grid))
    for r in rows:
        per = " ".join(f"{k}:{v['hota']:.1f}/{v['idf1']:.1f}" for k, v in r[5].items())
        print(f"{r[0]:.2f} {r[1]:.2f} {r[2]:.2f} {r[3]} {r[4]} {per}")
    for backend in backends:
        d = TrackerConfig(backend=backend)
        key = (d.activation_threshold, d.minimum_iou, d.lost_track_buffer, d.minimum_consecutive_frames)
        hit = [r for r in rows if r[3] == backend and r[4] == key]
        if hit:
            print("default", backend, f"{hit[0][0]:.2f} {hit[0][1]:.2f} {hit[0][2]:.2f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--assets", default=None, help="folder holding models/ and data/ (default: shared assets)")
    ap.add_argument("--results", type=Path, default=RESULTS_DIR)
    ap.add_argument("--tune", action="store_true", help="sweep Tracker settings instead of the comparison")
    ap.add_argument("--det-iou", type=float, default=None, help="detector NMS IoU for --tune (default: config)")
    ap.add_argument("--det-conf", type=float, default=TRACK_CONF, help="detector confidence for --tune")
    ap.add_argument("--backends", default=",".join(BACKENDS), help="tracker backends for --tune, comma-separated")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    root = data_path("mot15", "train", assets=args.assets)
    model_dir = require(model_path(DEFAULT_MODEL_DIR, assets=args.assets), "detector IR")
    seqs = [load_sequence(root, n) for n in SEQUENCES]
    if args.tune:
        tune(seqs, model_dir, args.det_iou, tuple(b for b in args.backends.split(",") if b), args.det_conf)
        return 0

    t_start = time.perf_counter()
    default = TrackerConfig()
    configs = {b: default.model_copy(update={"backend": b}) for b in BACKENDS}
    ours: dict[str, dict[str, float]] = {}
    backends: dict[str, dict[str, Any]] = {b: {"per_sequence": {}, "update_ms": []} for b in BACKENDS}
    theirs: dict[str, dict[str, float]] = {}
    for s in seqs:
        dets = detect_sequence(s, model_dir, None)
        runs = track_sequences(dets, s.frame_rate, configs)
        for b, (rows, ms) in runs.items():
            backends[b]["per_sequence"][s.name] = score(s.gt, rows, len(s.frames))
            backends[b]["update_ms"] += ms
        ours[s.name] = backends[default.backend]["per_sequence"][s.name]
        theirs[s.name] = score(s.gt, run_ultralytics(s, model_dir), len(s.frames))
    for b in BACKENDS:
        ms = backends[b].pop("update_ms")
        backends[b]["update_ms_median"] = float(np.median(ms))
        backends[b]["update_ms_p95"] = float(np.percentile(ms, 95))
        for k in ("mota", "idf1", "hota"):
            backends[b][k] = mean_over(backends[b]["per_sequence"], k)

    metrics = {k: mean_over(ours, k) for k in ("mota", "idf1", "hota")}
    metrics |= {f"ultralytics_{k}": mean_over(theirs, k) for k in ("mota", "idf1", "hota")}
    metrics["update_ms"] = backends[default.backend]["update_ms_median"]
    write_json(
        NAME,
        {
            "metrics": metrics,
            "per_sequence": {"ours": ours, "ultralytics": theirs},
            "tracker_backends": backends,
            "settings": {
                "tracker": default.model_dump(),
                "detector_conf": TRACK_CONF,
                "detector_iou": DetectorConfig.model_fields["iou_threshold"].default,
                "ultralytics": "bytetrack.yaml defaults, conf 0.1, iou 0.7",
                "sequences": list(SEQUENCES),
            },
            "target": "ours >= ultralytics on IDF1 and HOTA",
            "met": bool(
                metrics["idf1"] >= metrics["ultralytics_idf1"] and metrics["hota"] >= metrics["ultralytics_hota"]
            ),
            "seconds": round(time.perf_counter() - t_start, 1),
        },
        args.results,
    )
    bar_chart(
        args.results / f"{NAME}.png",
        "MOT15 PETS09-S2L1 + TUD-Campus (mean), YOLO11n INT8 IR + ByteTrack",
        ["MOTA", "IDF1", "HOTA"],
        {
            f"reidfleet ({default.backend})": [metrics["mota"], metrics["idf1"], metrics["hota"]],
            "Ultralytics track()": [
                metrics["ultralytics_mota"],
                metrics["ultralytics_idf1"],
                metrics["ultralytics_hota"],
            ],
        },
        "score (%)",
    )
    print(json.dumps({b: {k: round(v, 2) for k, v in d.items() if k != "per_sequence"} for b, d in backends.items()}))
    print(result_line(NAME, metrics))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
