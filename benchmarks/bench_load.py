"""`just bench-load`: the most cameras one server process sustains, and capture → reid_output latency there.

Set-up: an embedded tansu broker, one real server process (``python -m server run``, the embedder and
batching of its config), and recorded real appliance output (``benchmarks.replay``) played as N cameras at
``--fps`` (default 15) by player processes (so the load generator never shares a GIL with the measuring
side). A reader consumes reid_output and times each result: latency = time the result is readable minus
the frame's capture stamp (set when the player sends it, as a camera would).

Each step plays N cameras for ``--step-s`` seconds. "Sustained" = the backlog (frames sent minus frames
with a result) stays bounded: over the second half of the step it grows by less than 5 % of the input
rate, and it never exceeds 3 s of input. The backlog is counted end to end from what was sent and what
came out, not from broker watermarks (tansu reports wrong high watermarks). N doubles from ``--start``
until a step fails, then bisects. Between steps the server drains its backlog.

Peer: the reference thesis' server, 170 requests (frames) per second, drawn as cameras at the same FPS.
Writes results/bench-load.json and .png; last line ``RESULT bench-load cameras=N p50_ms=.. p95_ms=..``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from benchmarks.replay import DEFAULT_DIR, ensure_recordings
from common.assets import REPO_ROOT
from common.kafka import LINGER_MS

THESIS_FRAMES_PER_S = 170.0
RESULTS = REPO_ROOT / "results"


class ResultReader:
    """Consumes reid_output; counts distinct (device, frame) results and keeps (arrival, latency) pairs."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        from confluent_kafka import Consumer

        from common.kafka import consumer_config
        from schemas.codec import AvroCodec

        self.codec = AvroCodec("reid_output")
        self.seen: set[tuple[str, int]] = set()
        # (monotonic arrival, latency s, capture → matched in the server s, matched → readable here s)
        self.samples: list[tuple[float, float, float, float]] = []
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._c = Consumer(consumer_config(bootstrap, f"bench-load-{time.time_ns()}", "bench-load-reader",
                                           **{"enable.auto.offset.store": True, "auto.offset.reset": "latest",
                                              "fetch.wait.max.ms": 10}))
        self._c.subscribe([topic])
        self._t = threading.Thread(target=self._loop, name="result-reader", daemon=True)
        self._t.start()

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                # poll() returns with the first message; consume(n, timeout) would hold every result until n
                # messages or the timeout (at 1,500 results/s, consume(500, 0.1) added ~50 ms to the mean).
                first = self._c.poll(0.1)
                msgs = [first, *self._c.consume(1000, 0)] if first is not None else []
                now_us, mono = time.time_ns() // 1000, time.monotonic()
                with self.lock:
                    for m in msgs:
                        if m.error():
                            continue
                        r = self.codec.decode(m.value())
                        key = (r["device_id"], r["frame_index"])
                        if key in self.seen:
                            continue
                        self.seen.add(key)
                        self.samples.append((mono, (now_us - r["captured_at_us"]) / 1e6,
                                             (r["processed_at_us"] - r["captured_at_us"]) / 1e6,
                                             (now_us - r["processed_at_us"]) / 1e6))
        finally:
            self._c.close()

    def count(self, prefix: str) -> int:
        with self.lock:
            return sum(1 for d, _ in self.seen if d.startswith(prefix))

    def stop(self) -> None:
        self._stop.set()
        self._t.join(10)


def pythonpath_env() -> dict[str, str]:
    """The environment for child processes: this checkout first on PYTHONPATH, keeping what was there."""
    old = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT) + (os.pathsep + old if old else "")}


def rss_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds the process has used (from /proc; None once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def _metric_lines(port: int) -> list[str]:
    """The server's Prometheus exposition, line by line ([] while it does not answer)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=3) as r:
            return r.read().decode().splitlines()
    except OSError:
        return []


def scrape(port: int, name: str) -> float | None:
    for line in _metric_lines(port):
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return None


def scrape_server(port: int) -> dict[str, float]:
    """Sums and counts of the server's stage and capture→stored histograms (for per-step deltas)."""
    out: dict[str, float] = {}
    for line in _metric_lines(port):
        if line.startswith(("reidfleet_server_stage_seconds_sum", "reidfleet_server_stage_seconds_count",
                            "reidfleet_server_frame_latency_seconds_sum",
                            "reidfleet_server_frame_latency_seconds_count", "reidfleet_server_batch_messages_sum",
                            "reidfleet_server_input_delay_seconds_sum", "reidfleet_server_input_delay_seconds_count",
                            "reidfleet_server_messages_total", "reidfleet_server_dlq_total",
                            "reidfleet_server_batch_messages_count")):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def server_breakdown(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """Where a step's latency went inside the server: mean seconds per batch in each stage, mean frames per
    batch, and the server's own capture→stored mean (the rest of the end-to-end time is broker and reader)."""
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    batches = d.get("reidfleet_server_batch_messages_count", 0.0)
    out: dict[str, Any] = {"batches": int(batches)}
    if batches:
        out["frames_per_batch"] = round(d.get("reidfleet_server_batch_messages_sum", 0.0) / batches, 1)
        out["stage_ms_per_batch"] = {
            k.split('stage="')[1].split('"')[0]: round(v / batches * 1000, 2)
            for k, v in d.items() if k.startswith("reidfleet_server_stage_seconds_sum")}
    n = d.get("reidfleet_server_frame_latency_seconds_count", 0.0)
    if n:
        out["server_capture_to_stored_mean_ms"] = round(d["reidfleet_server_frame_latency_seconds_sum"] / n * 1000, 1)
    # Frames the server took in, by outcome (a step that does not drain: lost, dead-lettered or still queued?)
    out["messages"] = {("dlq:" if "dlq_total" in k else "") + k.split('"')[1]: int(v) for k, v in d.items()
                       if k.startswith(("reidfleet_server_messages_total{", "reidfleet_server_dlq_total{"))}
    n = d.get("reidfleet_server_input_delay_seconds_count", 0.0)
    if n:
        out["produced_to_batched_mean_ms"] = round(d["reidfleet_server_input_delay_seconds_sum"] / n * 1000, 1)
    return out


class Rig:
    """Broker + server process + result reader, started once for all steps."""

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        from common.kafka import ensure_topics
        from common.tansu import EmbeddedKafka, free_port

        self.args, self.work = args, work
        self.broker = EmbeddedKafka(log_file=work / "tansu.log").start()
        ensure_topics(self.broker.bootstrap)
        self.port = free_port()
        cfg: dict[str, Any] = yaml.safe_load(Path(args.server_config).read_text()) if args.server_config else {}
        cfg.setdefault("kafka", {})["bootstrap"] = self.broker.bootstrap
        cfg.setdefault("health", {})["port"] = self.port
        cfg.setdefault("vectors", {"type": "qdrant_local", "path": str(work / "qdrant")})
        cfg.setdefault("store", {"url": f"sqlite:///{work / 'analytics.db'}"})
        if args.assets:
            cfg.setdefault("assets", args.assets)
        (work / "server.yaml").write_text(yaml.safe_dump(cfg))
        self.cfg = cfg
        env = pythonpath_env()
        cmd = [sys.executable, "-m", "server", "run", "--config", str(work / "server.yaml")]
        for s in args.set:
            cmd += ["--set", s]
        self.server_log = open(work / "server.log", "wb")  # noqa: SIM115 - closed in close()
        self.server = subprocess.Popen(cmd, cwd=work, env=env, stdout=self.server_log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while scrape(self.port, "reidfleet_server_gallery_identities") is None:
            if self.server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start: {(work / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        self.reader = ResultReader(self.broker.bootstrap, "reid_output")
        self.pids = {"server": self.server.pid, "broker": self.broker._proc.pid if self.broker._proc else 0,
                     "bench": os.getpid()}

    def rss(self) -> dict[str, int | None]:
        return {k: rss_bytes(p) for k, p in self.pids.items()}

    def cpu(self) -> dict[str, float | None]:
        return {k: cpu_seconds(p) for k, p in self.pids.items()}

    def play(self, prefix: str, cameras: int, duration_s: float) -> dict[str, Any]:
        """Play ``cameras`` for ``duration_s`` over ``--players`` processes; sample backlog every second."""
        a = self.args
        players = max(1, min(a.players, cameras))
        procs = []
        env = pythonpath_env()
        per = [cameras // players + (1 if i < cameras % players else 0) for i in range(players)]
        first = 0
        progress: list[dict[str, Any]] = [{} for _ in range(players)]
        for n in per:
            cmd = [sys.executable, "-m", "benchmarks.replay", "play", "--bootstrap", self.broker.bootstrap,
                   "--dir", str(a.recordings), "--cameras", str(n), "--first-camera", str(first), "--fps",
                   str(a.fps), "--duration-s", str(duration_s), "--prefix", prefix, "--linger-ms", str(a.linger_ms)]
            first += n
            procs.append(subprocess.Popen(cmd, cwd=self.work, env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.DEVNULL, text=True))

        def follow(i: int, p: subprocess.Popen[str]) -> None:
            assert p.stdout is not None
            for line in p.stdout:
                try:
                    progress[i] = json.loads(line)
                except ValueError:
                    continue

        threads = [threading.Thread(target=follow, args=(i, p), daemon=True) for i, p in enumerate(procs)]
        for t in threads:
            t.start()
        series = []
        t0 = time.monotonic()
        crops0 = scrape(self.port, "reidfleet_server_crops_total") or 0.0
        while any(p.poll() is None for p in procs):
            time.sleep(1.0)
            sent = sum(pr.get("acked", 0) for pr in progress)
            done = self.reader.count(prefix + "-")
            series.append({"t": round(time.monotonic() - t0, 2), "sent": sent, "done": done,
                           "backlog": sent - done, "behind_s": max((pr.get("behind_s", 0) for pr in progress),
                                                                   default=0), "rss": self.rss(),
                           "cpu_s": self.cpu(),
                           "gallery": scrape(self.port, "reidfleet_server_gallery_identities")})
        for t in threads:
            t.join(5)
        crops1 = scrape(self.port, "reidfleet_server_crops_total") or 0.0
        return {"series": series, "sent": sum(pr.get("acked", 0) for pr in progress),
                "player_crops": sum(pr.get("crops", 0) for pr in progress), "server_crops": crops1 - crops0,
                "elapsed_s": time.monotonic() - t0}

    def drain(self, prefix: str, sent: int, timeout_s: float) -> bool:
        """Wait for this step's backlog; True if it cleared within ``timeout_s``. Either way the next step
        starts only on an idle server (waiting up to 10 more minutes), so steps never inherit a backlog."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.reader.count(prefix + "-") >= sent:
                return True
            time.sleep(0.5)
        hard = time.monotonic() + 600
        last, still = -1, time.monotonic()
        while time.monotonic() < hard and self.reader.count(prefix + "-") < sent:
            n = self.reader.count(prefix + "-")
            if n != last:
                last, still = n, time.monotonic()
            elif time.monotonic() - still > 30:  # nothing more comes: results were lost or the server died
                break
            time.sleep(1.0)
        return False

    def close(self) -> None:
        self.reader.stop()
        if self.server.poll() is None:
            self.server.terminate()
            try:
                self.server.wait(60)
            except subprocess.TimeoutExpired:
                self.server.kill()
        self.server_log.close()
        self.broker.stop()


def judge(run: dict[str, Any], cameras: int, fps: float, window: tuple[float, float]) -> dict[str, Any]:
    """Backlog bounded? Latency percentiles over the step's second half."""
    rate = cameras * fps
    series = run["series"]
    half = [s for s in series if s["t"] >= series[-1]["t"] / 2] if series else []
    slope = float(np.polyfit([s["t"] for s in half], [s["backlog"] for s in half], 1)[0]) if len(half) >= 3 else 0.0
    max_backlog = max((s["backlog"] for s in half), default=0)
    inside = [s for s in run["samples"] if window[0] <= s[0] <= window[1]]
    lat = [s[1] for s in inside]
    behind = max((s["behind_s"] for s in series), default=0.0)
    ok = slope <= 0.05 * rate and max_backlog <= 3 * rate and bool(lat)
    return {"cameras": cameras, "input_frames_per_s": rate, "sustained": ok, "backlog_slope_per_s": round(slope, 2),
            "max_backlog_frames": max_backlog, "player_behind_max_s": round(behind, 3),
            "results_per_s": round(len(lat) / max(window[1] - window[0], 1e-6), 1),
            "p50_ms": round(float(np.percentile(lat, 50)) * 1000, 1) if lat else None,
            "p95_ms": round(float(np.percentile(lat, 95)) * 1000, 1) if lat else None,
            "p99_ms": round(float(np.percentile(lat, 99)) * 1000, 1) if lat else None,
            "crops_per_s": round(run["server_crops"] / max(run["elapsed_s"], 1e-6), 1),
            "sent": run["sent"], "latency_parts_ms": _parts(inside)}


def _parts(samples: list[tuple[float, float, float, float]]) -> dict[str, float]:
    """p50/p95 of the two halves of the latency, split at the server's match (the result's processed_at):
    capture → matched is broker in + batching + decode/embed/match; matched → readable is the SQL commit,
    the produce and the broker out to this reader."""
    if not samples:
        return {}
    arr = np.array([(s[2], s[3]) for s in samples]) * 1000
    return {f"{name}_p{q}": round(float(np.percentile(arr[:, i], q)), 1)
            for i, name in enumerate(("capture_to_matched", "matched_to_readable")) for q in (50, 95)}


def step(rig: Rig, n: int, idx: int, args: argparse.Namespace) -> dict[str, Any]:
    prefix = f"s{idx:02d}n{n}"
    with rig.reader.lock:
        start = len(rig.reader.samples)
    t_start = time.monotonic()
    metrics0 = scrape_server(rig.port)
    run = rig.play(prefix, n, args.step_s)
    t_end = time.monotonic()
    drained = rig.drain(prefix, run["sent"], args.drain_s)
    metrics1 = scrape_server(rig.port)  # after the drain: the step's whole intake, stage times and outcomes
    with rig.reader.lock:
        run["samples"] = rig.reader.samples[start:]
    res = judge(run, n, args.fps, (t_start + (t_end - t_start) / 2, t_end))
    res["drained_after"] = drained
    res["sustained"] = res["sustained"] and drained
    res["series"] = [{k: v for k, v in s.items() if k not in ("rss", "gallery", "cpu_s")} for s in run["series"]]
    res["rss_end"] = run["series"][-1]["rss"] if run["series"] else {}
    res["server"] = server_breakdown(metrics0, metrics1)
    print(f"step {idx}: {n} cameras -> {'OK' if res['sustained'] else 'NOT sustained'} "
          f"(backlog slope {res['backlog_slope_per_s']}/s, max {res['max_backlog_frames']}, p50 {res['p50_ms']} ms, "
          f"p95 {res['p95_ms']} ms, {res['crops_per_s']} crops/s, player behind {res['player_behind_max_s']} s)",
          flush=True)
    print(f"  server: {res['server']}\n  latency parts: {res['latency_parts_ms']}", flush=True)
    return res


def search(rig: Rig, args: argparse.Namespace,
           on_step: Callable[[list[dict[str, Any]]], None] = lambda _s: None) -> list[dict[str, Any]]:
    steps: list[dict[str, Any]] = []
    good, bad = 0, None
    n = args.start
    while n <= args.max_cameras:
        r = step(rig, n, len(steps), args)
        steps.append(r)
        on_step(steps)
        if not r["sustained"]:
            bad = n
            break
        good = n
        n *= 2
    for _ in range(args.bisect):
        if bad is None or bad - good <= max(1, good // 8):
            break
        mid = (good + bad) // 2
        r = step(rig, mid, len(steps), args)
        steps.append(r)
        on_step(steps)
        if r["sustained"]:
            good = mid
        else:
            bad = mid
    return steps


def chart(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = sorted(result["steps"], key=lambda s: s["cameras"])
    xs = [s["cameras"] for s in steps]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax1.plot(xs, [s["input_frames_per_s"] for s in steps], "o--", color="grey", label="frames/s sent")
    ax1.plot(xs, [s["results_per_s"] for s in steps], "o-", color="tab:blue", label="results/s (ours)")
    ax1.axhline(THESIS_FRAMES_PER_S, color="tab:red", ls=":", label=f"thesis server: {THESIS_FRAMES_PER_S:.0f} req/s")
    for s in steps:
        ax1.annotate("ok" if s["sustained"] else "lag", (s["cameras"], s["results_per_s"]), fontsize=7,
                     textcoords="offset points", xytext=(0, 5), ha="center")
    ax1.set_xlabel(f"cameras at {result['fps']:g} FPS")
    ax1.set_ylabel("frames / s")
    ax1.set_xscale("log", base=2)
    ax1.legend(fontsize=8)
    ax1.set_title("throughput")
    ax2.plot(xs, [s["p50_ms"] or 0 for s in steps], "o-", label="p50")
    ax2.plot(xs, [s["p95_ms"] or 0 for s in steps], "s-", label="p95")
    ax2.axhline(500, color="tab:red", ls=":", label="target p95 500 ms")
    ax2.set_yscale("log")
    ax2.set_xscale("log", base=2)
    ax2.set_xlabel("cameras")
    ax2.set_ylabel("capture → reid_output (ms)")
    ax2.legend(fontsize=8)
    ax2.set_title(f"latency; sustained: {result['cameras']} cameras ({result['device']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    from common.logs import setup_logging

    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_load", description=__doc__.split("\n\n")[0])
    p.add_argument("--assets", default=None, help="shared assets folder (recording needs the sample videos)")
    p.add_argument("--recordings", type=Path, default=DEFAULT_DIR, help="replay recordings (made if missing)")
    p.add_argument("--fps", type=float, default=15.0)
    p.add_argument("--step-s", type=float, default=30.0, help="seconds per step (the real measurement: 120)")
    p.add_argument("--drain-s", type=float, default=60.0, help="a sustained step's backlog clears within this")
    p.add_argument("--start", type=int, default=1)
    p.add_argument("--max-cameras", type=int, default=1024)
    p.add_argument("--bisect", type=int, default=3, help="bisection steps after the first failing step")
    p.add_argument("--players", type=int, default=1, help="player processes (more on many-core machines)")
    p.add_argument("--linger-ms", type=float, default=LINGER_MS,
                   help=f"players' producer linger.ms (default {LINGER_MS}: what appliances use)")
    p.add_argument("--server-config", default=None, help="server YAML (default: built-in defaults)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="server --set override")
    p.add_argument("--device", default="cpu", help="label for the result (cpu, h100, ...)")
    p.add_argument("--out", type=Path, default=RESULTS / "bench-load.json")
    p.add_argument("--chart-from", type=Path, default=None, help="only redraw the PNG of a results JSON")
    a = p.parse_args(argv)
    if a.chart_from:
        chart(json.loads(a.chart_from.read_text()), a.chart_from.with_suffix(".png"))
        return 0
    setup_logging("bench-load", "WARNING")
    recs = ensure_recordings(a.assets, a.recordings)
    a.out.parent.mkdir(parents=True, exist_ok=True)

    def summarize(steps: list[dict[str, Any]], rig: Rig, rss_final: dict[str, int | None]) -> dict[str, Any]:
        ok = [s for s in steps if s["sustained"]]
        best = max(ok, key=lambda s: s["cameras"]) if ok else None
        return {
            "bench": "bench-load", "device": a.device, "fps": a.fps, "step_s": a.step_s,
            "cameras": best["cameras"] if best else 0, "p50_ms": best["p50_ms"] if best else None,
            "p95_ms": best["p95_ms"] if best else None,
            "criterion": "backlog over the second half of a step grows < 5 % of the input rate and stays < 3 s of "
                         "input; drained within drain_s after the step",
            "recordings": [{"name": r.name, "frames": len(r.frames), "crops": r.crops} for r in recs],
            "peer": {"name": "reference thesis server", "frames_per_s": THESIS_FRAMES_PER_S,
                     "cameras_at_fps": THESIS_FRAMES_PER_S / a.fps},
            "server_config": rig.cfg, "server_overrides": a.set, "rss_final_bytes": rss_final,
            "players": {"processes": a.players, "linger_ms": a.linger_ms},
            "machine": {"cpus": os.cpu_count(), "load_avg": os.getloadavg(), "python": platform.python_version()},
            "steps": steps,
        }

    with tempfile.TemporaryDirectory(prefix="reidfleet-load-") as tmp:
        rig = Rig(a, Path(tmp))
        try:
            step(rig, 1, -1, argparse.Namespace(**{**vars(a), "step_s": 10.0}))  # warm-up: models, caches, group
            # After every step the result so far is written: a run cut short (a time limit) keeps its numbers.
            steps = search(rig, a, lambda done: a.out.write_text(json.dumps(summarize(done, rig, rig.rss()),
                                                                            indent=1)))
            result = summarize(steps, rig, rig.rss())
        finally:
            rig.close()
    a.out.write_text(json.dumps(result, indent=1))
    try:
        chart(result, a.out.with_suffix(".png"))
    except ImportError:  # the lent GPU machine has no matplotlib: redraw here with --chart-from
        print("matplotlib missing: no chart (redraw with --chart-from the JSON)", flush=True)
    print(f"RESULT bench-load cameras={result['cameras']} p50_ms={result['p50_ms']} p95_ms={result['p95_ms']} "
          f"fps={a.fps:g} device={a.device}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
