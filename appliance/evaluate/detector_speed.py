"""Detector throughput on 1 and 2 pinned cores: our runtime variants beside Ultralytics' predict.

Each core set runs in a child process started under ``taskset -c`` (OpenVINO sizes its thread
pool from the affinity mask at start-up). Inside a child, every variant and Ultralytics'
``YOLO(ir).predict`` on the same IR process the same in-memory frames, interleaved round by round
(A B C A B C ...), so background load on a shared machine hits all of them alike. Reported:
median FPS per variant; the fastest of ours is what ``plan_runtime`` picks by default.

Usage: python -m appliance.evaluate.detector_speed [--assets DIR] [--frames 60] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from appliance.detect.base import DEFAULT_MODEL_DIR, DetectorConfig
from appliance.detect.openvino import OpenVinoDetector
from appliance.evaluate.report import RESULTS_DIR, bar_chart, result_line, write_json
from appliance.types import Frame
from common.assets import data_path, model_path, require

NAME = "bench-detector"
CORE_SETS = ("0", "0,1")
SEQ = ("mot15", "train", "PETS09-S2L1", "img1")


def variants(cpus: int, model_dir: Path) -> dict[str, tuple[DetectorConfig, str]]:
    """name -> (config, 'detect' | 'stream')."""
    base = {"model_dir": model_dir}
    out = {
        "sync_latency": (DetectorConfig(**base, performance_hint="LATENCY", streams=1, threads=cpus), "detect"),
        "stream_latency_x1": (
            DetectorConfig(**base, performance_hint="LATENCY", streams=1, threads=cpus, inflight_requests=1),
            "stream",
        ),
        "stream_latency_x2": (
            DetectorConfig(**base, performance_hint="LATENCY", streams=1, threads=cpus, inflight_requests=2),
            "stream",
        ),
    }
    if cpus >= 2:
        out["stream_throughput_2s_x2"] = (
            DetectorConfig(**base, performance_hint="THROUGHPUT", streams=cpus, threads=cpus, inflight_requests=cpus),
            "stream",
        )
        out["stream_throughput_2s_x3"] = (
            DetectorConfig(
                **base, performance_hint="THROUGHPUT", streams=cpus, threads=cpus, inflight_requests=cpus + 1
            ),
            "stream",
        )
    out["default"] = (DetectorConfig(**base), "stream")
    return out


def child(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING)
    cpus = len(os.sched_getaffinity(0))
    root = require(data_path(*SEQ, assets=args.assets), "PETS09-S2L1 frames")
    model_dir = require(model_path(DEFAULT_MODEL_DIR, assets=args.assets), "detector IR")
    images = [cv2.imread(str(p)) for p in sorted(root.glob("*.jpg"))[: args.frames]]
    frames = [Frame("bench", i, 0, img) for i, img in enumerate(images)]
    runners: dict[str, Callable[[], int]] = {}
    detectors = []
    for name, (cfg, mode) in variants(cpus, model_dir).items():
        det = OpenVinoDetector(cfg)
        detectors.append(det)
        if mode == "detect":
            runners[name] = lambda det=det: sum(len(det.detect(img)) for img in images)
        else:
            runners[name] = lambda det=det: sum(len(d) for _, d in det.stream(frames))
    plan = detectors[-1].plan
    try:
        from ultralytics import YOLO

        peer = YOLO(str(model_dir), task="detect")
        peer.predict(images[0], classes=[0], verbose=False)  # warm-up (loads the IR)
        runners["ultralytics_predict"] = lambda: sum(
            len(peer.predict(img, classes=[0], imgsz=640, verbose=False)[0].boxes) for img in images
        )
    except ImportError:
        pass
    for run in runners.values():  # warm-up
        run()
    fps: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(args.rounds):
        for name, run in runners.items():
            t0 = time.perf_counter()
            run()
            fps[name].append(len(images) / (time.perf_counter() - t0))
    for det in detectors:
        det.close()
    out = {
        "cpus": cpus,
        "default_plan": {
            "hint": plan.hint,
            "threads": plan.threads,
            "streams": plan.streams,
            "inflight": plan.inflight,
        },
        "fps_median": {k: statistics.median(v) for k, v in fps.items()},
        "fps_rounds": fps,
    }
    print(json.dumps(out))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--assets", default=None, help="folder holding models/ and data/ (default: shared assets)")
    ap.add_argument("--frames", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--results", type=Path, default=RESULTS_DIR)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args)
    per_set: dict[str, Any] = {}
    for cores in CORE_SETS:
        cmd = ["taskset", "-c", cores, sys.executable, "-m", "appliance.evaluate.detector_speed", "--child"]
        cmd += ["--frames", str(args.frames), "--rounds", str(args.rounds)]
        if args.assets:
            cmd += ["--assets", args.assets]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr)
            return proc.returncode
        per_set[cores] = json.loads(proc.stdout.strip().splitlines()[-1])
    metrics: dict[str, float] = {}
    for label, cores in (("1core", "0"), ("2core", "0,1")):
        med = per_set[cores]["fps_median"]
        metrics[f"fps_{label}"] = med["default"]
        ours_best = max((k for k in med if k != "ultralytics_predict"), key=med.get)
        per_set[cores]["fastest_ours"] = ours_best
        if "ultralytics_predict" in med:
            metrics[f"ultralytics_fps_{label}"] = med["ultralytics_predict"]
            metrics[f"ratio_{label}"] = med["default"] / med["ultralytics_predict"]
    write_json(
        NAME, {"metrics": metrics, "per_core_set": per_set, "frames": args.frames, "rounds": args.rounds}, args.results
    )
    names = [k for k in per_set["0,1"]["fps_median"]]
    bar_chart(
        args.results / f"{NAME}.png",
        "YOLO11n INT8 IR, PETS09 768x576 frames, detector only",
        [f"{c.count(',') + 1} core" for c in CORE_SETS],
        {n: [per_set[c]["fps_median"].get(n, np.nan) for c in CORE_SETS] for n in names},
        "frames / s",
    )
    print(result_line(NAME, metrics))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
