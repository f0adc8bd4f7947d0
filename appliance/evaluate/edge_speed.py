"""bench-edge: the whole appliance loop beside the bare detector and Ultralytics' ``track()``.

What is compared, on the same IR (YOLO11n INT8), the same 1080p clip and the same pinned cores:
- ``detector``: ``OpenVinoDetector.stream`` over frames already decoded in memory, on the IR as shipped
  (640x640 input): the reference of the issue's loop/detector target;
- ``detector_rect``: the same at the loop's rectangular input (640x384 for this 16:9 clip,
  ``detector.rect_input``): loop/detector_rect is the loop's own overhead at equal network work;
- ``loop``: our full loop, 1080p decode -> detect -> ByteTrack -> best-shot -> JPEG/Avro -> produce
  to a local tansu broker (``common.tansu.EmbeddedKafka``), exactly as ``python -m appliance run``;
- ``ultralytics``: ``YOLO(ir_dir).track(video, tracker="bytetrack.yaml")`` from ``.venv-bench``,
  the tool a user would pick instead (it decodes, detects and tracks, and sends nothing).

Every measurement is its own child process under ``taskset -c`` (OpenVINO sizes its threads from
the affinity mask at start-up). Rounds interleave the systems (D L U D L U ...) for 1 and 2 cores,
so background load on a shared machine hits all of them alike; we report medians of per-round
ratios. FPS is ``(N - 1) / (t_last - t_first)`` over per-frame completion times for all three (no
start-up or warm-up in it). Bytes per frame come from the loop in track-aware mode and in
full-frame mode (a 1080p JPEG per frame, the thesis' behaviour).

Usage: python -m appliance.evaluate.edge_speed [--assets DIR] [--frames 120] [--rounds 2]
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from appliance.evaluate.report import RESULTS_DIR, result_line, write_json
from common.assets import REPO_ROOT, data_path, model_path, require

NAME = "bench-edge"
CORE_SETS = {"1c": "0", "2c": "0,1"}
SEQ = ("mot15", "train", "PETS09-S2L1", "img1")
CACHE = REPO_ROOT / ".cache" / "bench-edge"
IR = "yolo11n_int8_openvino_model"
CHILD_TIMEOUT_S = 600


def make_clips(frames_dir: Path, n: int) -> dict[str, Path]:
    """H.264 clips of the first ``n`` PETS frames: 1920x1080 (upscaled, padded to 16:9 like a camera)
    and native 768x576; cached under .cache/bench-edge (gitignored)."""
    if shutil.which("ffmpeg") is None:
        raise SystemExit("ffmpeg not found: install it (apt-packages.txt; ./just installs it)")
    CACHE.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, vf in (
        ("1080p", "scale=1440:1080,pad=1920:1080:240:0"),
        ("576p", "null"),
    ):
        path = CACHE / f"pets_{name}_{n}f.mp4"
        if not path.is_file():
            tmp = path.with_suffix(".tmp.mp4")
            cmd = [
                "ffmpeg", "-y", "-loglevel", "error", "-framerate", "7", "-start_number", "1",
                "-i", str(frames_dir / "%06d.jpg"), "-frames:v", str(n), "-vf", vf,
                "-c:v", "libx264", "-preset", "medium", "-crf", "23", "-pix_fmt", "yuv420p", str(tmp),
            ]
            subprocess.run(cmd, check=True)
            tmp.replace(path)
        out[name] = path
    return out


def _fps(times: list[float]) -> float:
    return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else 0.0


def _cpu_ms(cpu: list[float]) -> float:
    """Process CPU time (all threads) per frame between the first and the last frame: on a shared,
    overloaded machine this is what the same work would cost on a dedicated core."""
    return (cpu[-1] - cpu[0]) / (len(cpu) - 1) * 1000 if len(cpu) > 1 else 0.0


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# -- children (one measurement each, pinned by the parent) --------------------------------------
def child_detector(args: argparse.Namespace, rect: bool = False) -> dict[str, Any]:
    import cv2

    from appliance.detect.base import DetectorConfig
    from appliance.detect.openvino import OpenVinoDetector
    from appliance.types import Frame

    cap = cv2.VideoCapture(args.video)
    frames = []
    while True:
        ok, img = cap.read()
        if not ok:
            break
        frames.append(Frame("bench", len(frames), 0, img))
    cap.release()
    det = OpenVinoDetector(DetectorConfig(model_dir=Path(args.model_dir), rect_input=rect))
    for _ in det.stream(frames[:4]):  # warm-up
        pass
    times, cpu = [], []
    for _ in det.stream(frames):
        times.append(time.perf_counter())
        cpu.append(time.process_time())
    # no det.close(): destroying the compiled model can deadlock in OpenVINO 2026.4 (see pipeline._retire);
    # the child exits with os._exit right after printing
    return {"fps": _fps(times), "cpu_ms_per_frame": _cpu_ms(cpu), "frames": len(times), "rss_mb": _rss_mb()}


def child_loop(args: argparse.Namespace) -> dict[str, Any]:
    from appliance.config import load
    from appliance.pipeline import Pipeline

    with tempfile.TemporaryDirectory() as spool:
        cfg = load(None, [
            f"source.url={args.video}", f"detector.model_dir={args.model_dir}", f"kafka.bootstrap={args.bootstrap}",
            f"kafka.topic={args.topic}", f"spool.dir={spool}", "http.port=0", "device_id=bench-edge",
            f"sending.mode={args.mode}",
        ])
        pipe = Pipeline(cfg, serve_http=False)
        pipe.start()
        try:
            pipe.run()
            idle = pipe.publisher.wait_idle(120)
            tele = pipe.telemetry()
        finally:
            if pipe.source is not None:
                pipe.source.close()
            pipe.publisher.close()  # the detector is left to os._exit (see child_detector)
    n = pipe.frames_processed
    assert pipe.first_frame_at is not None and pipe.last_frame_at is not None
    assert pipe.first_frame_cpu_s is not None and pipe.last_frame_cpu_s is not None
    return {
        "fps": (n - 1) / (pipe.last_frame_at - pipe.first_frame_at),
        "cpu_ms_per_frame": (pipe.last_frame_cpu_s - pipe.first_frame_cpu_s) / (n - 1) * 1000,
        "frames": n,
        "rss_mb": _rss_mb(),
        "bytes_per_frame": pipe.bytes_produced / max(n, 1),
        "crop_bytes_per_frame": pipe.crop_bytes / max(n, 1),
        "frame_jpeg_bytes_per_frame": pipe.frame_jpeg_bytes / max(n, 1),
        "delivered": tele["kafka"]["sent_messages"],
        "all_delivered": idle,
        "latency_ms": tele["latency_ms"],
    }


def child_ultralytics(args: argparse.Namespace) -> dict[str, Any]:
    from ultralytics import YOLO

    model = YOLO(args.model_dir, task="detect")
    times, cpu = [], []
    for _ in model.track(source=args.video, stream=True, persist=True, tracker="bytetrack.yaml", classes=[0],
                         imgsz=640, verbose=False):
        times.append(time.perf_counter())
        cpu.append(time.process_time())
    return {"fps": _fps(times), "cpu_ms_per_frame": _cpu_ms(cpu), "frames": len(times), "rss_mb": _rss_mb()}


def child_detector_rect(args: argparse.Namespace) -> dict[str, Any]:
    return child_detector(args, rect=True)


CHILDREN = {"detector": child_detector, "detector_rect": child_detector_rect, "loop": child_loop,
            "ultralytics": child_ultralytics}
SYSTEMS = tuple(CHILDREN)  # the order each round runs them in


def _python_for(system: str) -> str:
    """The appliance's own venv for our code (what ships); .venv-bench for Ultralytics."""
    if system == "ultralytics":
        bench = REPO_ROOT / ".venv-bench" / "bin" / "python"
        return str(bench) if bench.exists() else sys.executable
    own = REPO_ROOT / ".venv" / "bin" / "python"
    return str(own) if own.exists() else sys.executable


def run_child(system: str, cores: str, video: Path, model_dir: Path, **extra: str) -> dict[str, Any]:
    cmd = ["taskset", "-c", cores, _python_for(system), "-m", "appliance.evaluate.edge_speed", "--child", system,
           "--video", str(video), "--model-dir", str(model_dir)]
    for k, v in extra.items():
        cmd += [f"--{k.replace('_', '-')}", v]
    env = {**os.environ, "REIDFLEET_LOG_LEVEL": "WARNING"}
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env, cwd=REPO_ROOT)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"{system} on cores {cores} failed with exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def chart(path: Path, rounds: dict[str, list[dict[str, dict[str, Any]]]], bytes_track: float,
          bytes_full: float) -> None:
    """Wall FPS (what this run saw) beside frames per CPU-second (what a dedicated core would give),
    plus bytes per frame on the wire."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2), dpi=120, gridspec_kw={"width_ratios": [2, 2, 1]})
    labels = {"loop": "reidfleet full loop", "detector": "bare OpenVINO detector (IR 640x640)",
              "detector_rect": "bare detector at the loop's 640x384", "ultralytics": "Ultralytics track()"}
    labels = {k: v for k, v in labels.items() if all(k in r for c in CORE_SETS for r in rounds[c])}
    width = 0.8 / len(labels)
    panels = (
        (axes[0], lambda r: r["fps"], "wall frames / s (median of rounds)", "wall clock (shared, loaded box)"),
        (axes[1], lambda r: 1000.0 / r["cpu_ms_per_frame"], "frames per CPU-second (median)",
         "CPU cost (= FPS on a dedicated core)"),
    )
    for ax, value, ylabel, title in panels:
        for i, (key, label) in enumerate(labels.items()):
            xs = [g + (i - (len(labels) - 1) / 2) * width for g in range(len(CORE_SETS))]
            ys = [statistics.median(value(r[key]) for r in rounds[c]) for c in CORE_SETS]
            bars = ax.bar(xs, ys, width, label=label)
            ax.bar_label(bars, fmt="%.1f", fontsize=8)
        ax.set_xticks(range(len(CORE_SETS)), ["1 core", "2 cores"])
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.margins(y=0.2)
    axes[0].legend(fontsize=8, loc="upper left")
    bars = axes[2].bar(["track-aware\n(ours)", "full-frame JPEG\n(thesis)"], [bytes_track / 1024, bytes_full / 1024],
                       color=["tab:blue", "tab:gray"])
    axes[2].bar_label(bars, fmt="%.1f", fontsize=8)
    axes[2].set_yscale("log")
    axes[2].set_ylabel("KiB per frame on the wire (log)")
    axes[2].set_title("bandwidth", fontsize=10)
    fig.suptitle("bench-edge: 1080p PETS09 clip, YOLO11n INT8 IR, pinned cores")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--assets", default=None, help="folder holding models/ and data/ (default: shared assets)")
    ap.add_argument("--frames", type=int, default=120, help="frames of PETS09-S2L1 in the clip (max 300)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds per core set")
    ap.add_argument("--results", type=Path, default=RESULTS_DIR)
    ap.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    ap.add_argument("--video", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--bootstrap", help=argparse.SUPPRESS)
    ap.add_argument("--topic", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="track", help=argparse.SUPPRESS)
    ap.add_argument("--replot", action="store_true", help="redraw the PNG from results/bench-edge.json")
    args = ap.parse_args(argv)
    if args.replot:
        saved = json.loads((args.results / f"{NAME}.json").read_text())
        m = saved["metrics"]
        chart(args.results / f"{NAME}.png", saved["rounds"], m["bytes_per_frame_track"], m["bytes_per_frame_full"])
        return 0
    if args.child:
        logging.basicConfig(level=logging.WARNING)
        faulthandler.dump_traceback_later(CHILD_TIMEOUT_S, exit=True)  # a hung child shows where, then exits
        print(json.dumps(CHILDREN[args.child](args)), flush=True)
        sys.stderr.flush()
        os._exit(0)

    from common.kafka import ensure_topics
    from common.tansu import EmbeddedKafka
    from schemas.topics import TopicSpec

    frames_dir = require(data_path(*SEQ, assets=args.assets), "PETS09-S2L1 frames")
    model_dir = require(model_path(IR, assets=args.assets), "detector IR")
    clips = make_clips(frames_dir, min(args.frames, 300))
    video = clips["1080p"]
    topic = "bench_edge"
    rounds: dict[str, list[dict[str, dict[str, Any]]]] = {c: [] for c in CORE_SETS}
    t_start = time.perf_counter()
    with EmbeddedKafka() as broker:
        ensure_topics(broker.bootstrap, [TopicSpec(topic, 1, 1)])
        for r in range(args.rounds):
            for label, cores in CORE_SETS.items():
                res = {}
                for system in SYSTEMS:
                    extra = {"bootstrap": broker.bootstrap, "topic": topic} if system == "loop" else {}
                    res[system] = run_child(system, cores, video, model_dir, **extra)
                    print(f"round {r + 1} {label} {system}: {res[system]['fps']:.2f} FPS, "
                          f"{res[system]['cpu_ms_per_frame']:.1f} CPU ms/frame", file=sys.stderr)
                rounds[label].append(res)
        full = run_child("loop", CORE_SETS["2c"], video, model_dir, bootstrap=broker.bootstrap, topic=topic,
                         mode="full")
        native = run_child("loop", CORE_SETS["1c"], clips["576p"], model_dir, bootstrap=broker.bootstrap,
                           topic=topic)

    def med(label: str, system: str, key: str = "fps") -> float:
        return statistics.median(r[system][key] for r in rounds[label])

    def ratio(label: str, a: str, b: str) -> float:
        return statistics.median(r[a]["fps"] / r[b]["fps"] for r in rounds[label])

    def cpu_ratio(label: str, a: str, b: str) -> float:
        """FPS ratio a/b as a dedicated core would give it: CPU ms per frame of b over a's."""
        return statistics.median(r[b]["cpu_ms_per_frame"] / r[a]["cpu_ms_per_frame"] for r in rounds[label])

    fps = {c: {s: med(c, s) for s in SYSTEMS} for c in CORE_SETS}
    bytes_track = statistics.median(r["loop"]["bytes_per_frame"] for c in CORE_SETS for r in rounds[c])
    bytes_full = full["bytes_per_frame"]
    rss = max(r["loop"]["rss_mb"] for c in CORE_SETS for r in rounds[c])
    metrics = {
        "loop_fps_1c": fps["1c"]["loop"],
        "detector_fps_1c": fps["1c"]["detector"],
        "ultralytics_fps_1c": fps["1c"]["ultralytics"],
        "loop_vs_detector_1c": ratio("1c", "loop", "detector"),
        "loop_vs_ultralytics_1c": ratio("1c", "loop", "ultralytics"),
        "loop_fps_2c": fps["2c"]["loop"],
        "loop_vs_detector_2c": ratio("2c", "loop", "detector"),
        "loop_vs_ultralytics_2c": ratio("2c", "loop", "ultralytics"),
        # The same network work on both sides (640x384): what decode, tracking and sending cost the loop.
        "detector_rect_fps_1c": fps["1c"]["detector_rect"],
        "loop_vs_detector_rect_1c": ratio("1c", "loop", "detector_rect"),
        "loop_vs_detector_rect_2c": ratio("2c", "loop", "detector_rect"),
        "rss_mb": rss,
        "bytes_per_frame_track": bytes_track,
        "bytes_per_frame_full": bytes_full,
        "bandwidth_reduction": bytes_full / max(bytes_track, 1.0),
        "loop_fps_576p_1c": native["fps"],
        "loop_cpu_ms_per_frame_1c": med("1c", "loop", "cpu_ms_per_frame"),
        "detector_cpu_ms_per_frame_1c": med("1c", "detector", "cpu_ms_per_frame"),
        "detector_rect_cpu_ms_per_frame_1c": med("1c", "detector_rect", "cpu_ms_per_frame"),
        "ultralytics_cpu_ms_per_frame_1c": med("1c", "ultralytics", "cpu_ms_per_frame"),
        "cpu_loop_vs_detector_1c": cpu_ratio("1c", "loop", "detector"),
        "cpu_loop_vs_ultralytics_1c": cpu_ratio("1c", "loop", "ultralytics"),
        "cpu_loop_vs_ultralytics_2c": cpu_ratio("2c", "loop", "ultralytics"),
    }
    targets = {
        "loop_vs_detector_1c >= 0.95": metrics["loop_vs_detector_1c"] >= 0.95,
        "loop_vs_ultralytics_1c >= 1.15": metrics["loop_vs_ultralytics_1c"] >= 1.15,
        "loop_vs_ultralytics_2c >= 1.5": metrics["loop_vs_ultralytics_2c"] >= 1.5,
        "rss_mb <= 512": rss <= 512,
        "bytes_per_frame_track <= bytes_per_frame_full / 10": bytes_track * 10 <= bytes_full,
    }
    write_json(NAME, {
        "metrics": metrics,
        "targets_met": targets,
        "clip": {"path": str(video.relative_to(REPO_ROOT)), "frames": min(args.frames, 300), "size": "1920x1080",
                 "source": "MOT15 PETS09-S2L1 frames, scaled to 1440x1080 and padded to 1920x1080, H.264 crf 23"},
        "rounds": rounds,
        "full_frame_run": full,
        "native_576p_run": native,
        "load_average": os.getloadavg(),
        "seconds": round(time.perf_counter() - t_start, 1),
    }, args.results)
    chart(args.results / f"{NAME}.png", rounds, bytes_track, bytes_full)
    keys = ["loop_fps_1c", "detector_fps_1c", "ultralytics_fps_1c", "loop_vs_detector_1c", "loop_vs_ultralytics_1c",
            "loop_vs_ultralytics_2c", "rss_mb", "bytes_per_frame_track", "bytes_per_frame_full",
            "loop_vs_detector_rect_1c"]
    print(result_line(NAME, {k: metrics[k] for k in keys}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
