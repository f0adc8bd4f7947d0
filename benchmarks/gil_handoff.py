"""What a batch's trip to the embedder workers costs the consumer's prepare thread beside a busy matcher thread,
per interpreter switch interval (``batch.switch_interval_ms``).

The consumer's prepare thread sends each batch's parts to the embedder worker processes and reads their answers
(:class:`server.embed.remote.RemoteEmbedder`) while the matcher's thread runs Python in the same interpreter.
Every blocking call hands the GIL over, and the prepare thread then waits up to the switch interval to get it
back. This replays that trip through the same ``_Worker`` pipe code: each of ``--workers`` child processes
takes a part of ~2 MB of message bytes, spends ``--work-ms`` as the GPU would (off the parent's interpreter) and
answers with the vectors and records of that part. Measured: the round trip's median, without a busy thread and
with one, at Python's 5 ms and at shorter intervals, interleaved (A B C A B C ...).

Usage: ``python -m benchmarks.gil_handoff [--rounds 3] [--trips 20]`` → results/gil-handoff.{json,png} and a
``RESULT gil-handoff ...`` line.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np


def _child(conn: Any, work_s: float, rows: int) -> None:
    """A stand-in embedder worker: answers each part after ``work_s`` of work outside the parent's interpreter."""
    answer = ("ok", (np.ones((rows, 512), np.float32), [{"frame_index": i, "crops": [{"quality": 0.5}] * 4}
                                                        for i in range(rows // 4)]))
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        time.sleep(work_s)
        conn.send(answer)


class _Pool:
    """Child processes behind the consumer's own pipe code (``_Worker.send`` / ``_Worker.recv``)."""

    def __init__(self, n: int, work_s: float, rows: int) -> None:
        from server.embed.remote import _Worker

        ctx = mp.get_context("spawn")
        self.workers = []
        for _ in range(n):
            w = _Worker.__new__(_Worker)  # the pipe and framing of a real worker, without building a model
            w.conn, child = ctx.Pipe()
            w.proc = ctx.Process(target=_child, args=(child, work_s, rows), daemon=True)
            w.proc.start()
            child.close()
            import socket

            w._sock = socket.fromfd(w.conn.fileno(), socket.AF_UNIX, socket.SOCK_STREAM)
            self.workers.append(w)

    def trip(self, part: list[bytes]) -> None:
        for w in self.workers:
            w.send(("intake", part, None))
        for w in self.workers:
            w.recv()

    def close(self) -> None:
        for w in self.workers:
            w.conn.send(None)
            w.close()


def measure(pool: _Pool, part: list[bytes], switch_s: float, busy: bool, trips: int) -> float:
    """Median round trip (s) of ``trips`` batches at this switch interval, with or without a busy thread."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(switch_s)
    stop = threading.Event()

    def matcher() -> None:  # pure Python, as the matcher's per-track work is
        x = 0
        while not stop.is_set():
            for i in range(2000):
                x = (x + i) % 1_000_003

    th = threading.Thread(target=matcher, daemon=True)
    if busy:
        th.start()
    walls = []
    try:
        for _ in range(trips):
            t = time.perf_counter()
            pool.trip(part)
            walls.append(time.perf_counter() - t)
    finally:
        stop.set()
        if busy:
            th.join()
        sys.setswitchinterval(old)
    return statistics.median(walls)


def chart(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(res["overhead_ms"])
    vals = [res["overhead_ms"][k] for k in labels]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    bars = ax.bar(labels, vals, color=["tab:gray"] + ["tab:red"] + ["tab:green"] * (len(vals) - 2))
    for b, v in zip(bars, vals, strict=True):
        ax.text(b.get_x() + b.get_width() / 2, v, f"{v:.1f}", ha="center", va="bottom")
    ax.set_ylabel("round trip above the workers' own time (ms)")
    ax.set_title(f"{res['workers']} workers, {res['part_mb']:.1f} MB a part, {res['cpus']} cores", fontsize=9)
    fig.suptitle("prepare thread's trip to the embedder workers beside a busy matcher thread")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="gil_handoff", description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--messages", type=int, default=170, help="messages per worker part (~12 KB each)")
    ap.add_argument("--work-ms", type=float, default=30.0, help="each worker's own time per part")
    ap.add_argument("--switch-ms", default="1,0.5", help="shorter switch intervals to compare with 5 ms")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--trips", type=int, default=20)
    ap.add_argument("--out", default="results")
    a = ap.parse_args(argv)
    part = [os.urandom(12_000) for _ in range(a.messages)]
    pool = _Pool(a.workers, a.work_ms / 1000, 4 * a.messages)
    variants = [("alone, 5 ms", 0.005, False), ("busy, 5 ms", 0.005, True)] + [
        (f"busy, {s} ms", float(s) / 1000, True) for s in a.switch_ms.split(",") if s]
    runs: dict[str, list[float]] = {name: [] for name, _, _ in variants}
    try:
        measure(pool, part, 0.005, False, 3)  # warm-up
        for _ in range(a.rounds):
            for name, switch_s, busy in variants:
                runs[name].append(measure(pool, part, switch_s, busy, a.trips))
    finally:
        pool.close()
    work = a.work_ms
    med = {k: statistics.median(v) * 1e3 for k, v in runs.items()}
    res = {"cpus": os.cpu_count(), "workers": a.workers, "part_mb": a.messages * 12_000 / 1e6, "work_ms": work,
           "round_trip_ms": med, "overhead_ms": {k: v - work for k, v in med.items()},
           "runs_ms": {k: [x * 1e3 for x in v] for k, v in runs.items()}}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gil-handoff.json").write_text(json.dumps(res, indent=2))
    try:
        chart(res, out / "gil-handoff.png")
    except ImportError:
        print("  (matplotlib missing: no chart)")
    for k, v in med.items():
        print(f"  {k:<14} round trip {v:6.1f} ms (workers' own {work:.0f} ms)")
    keys = " ".join(f"overhead_ms_{k.split(', ')[0]}_{k.split(', ')[1].replace(' ms', '').replace('.', 'p')}"
                    f"={v - work:.1f}" for k, v in med.items())
    print(f"RESULT gil-handoff {keys}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
