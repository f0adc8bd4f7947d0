"""CPU seconds per process and per thread while a command runs: who uses the box's cores.

Why: the whole-consumer benchmark on the lent GPU box runs the consumer, its embedder workers, the commit and
mirror processes and the broker side by side on 16 cores, and a thread whose wall time is well above its CPU
time may wait for the GIL or for a core. This tells which: it reads every thread's CPU counters
(``/proc/<pid>/task/<tid>/stat``) and the box's busy time (``/proc/stat``) every ``--interval`` seconds while
the command runs, and writes the cumulative series, so any window (a benchmark's pipeline phase, given by its
``window_epoch_s``) can be cut out afterwards. Threads are keyed by process and thread name
(``common.service.set_os_name`` names the server's children and threads).

Usage: ``python3 benchmarks/cpu_sampler.py --out cpu.json [--interval 0.2] -- COMMAND ...``
       ``python3 benchmarks/cpu_sampler.py --report cpu.json --window START END`` (epoch seconds)
Linux only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def thread_ticks(names: dict[str, str]) -> dict[str, int]:
    """Cumulative user+system ticks of every user-space thread now, keyed ``pid/tid``; ``names`` gets each one's
    ``pid process-name/thread-name`` (kernel threads, which have no command line, are left out)."""
    out: dict[str, int] = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or not _read(f"/proc/{pid}/cmdline"):
            continue
        pcomm = (_read(f"/proc/{pid}/comm") or "?").strip()
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            stat = _read(f"/proc/{pid}/task/{tid}/stat")
            if not stat:
                continue
            # comm may hold spaces and parentheses: the fields after the last ')' are fixed.
            fields = stat[stat.rindex(")") + 2:].split()
            key = f"{pid}/{tid}"
            out[key] = int(fields[11]) + int(fields[12])  # utime, stime
            names[key] = f"{pid} {pcomm}/{stat[stat.index('(') + 1:stat.rindex(')')]}"
    return out


def busy_ticks() -> tuple[int, int]:
    """(busy, total) ticks of all CPUs since boot."""
    parts = [int(x) for x in (_read("/proc/stat") or "cpu 0 0 0 0").split("\n")[0].split()[1:]]
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0)
    return sum(parts) - idle, sum(parts)


def sample(cmd: list[str], out: Path, interval: float) -> int:
    proc = subprocess.Popen(cmd)
    times: list[float] = []
    busy: list[tuple[int, int]] = []
    series: dict[str, list[int]] = {}
    names: dict[str, str] = {}
    base = thread_ticks(names)  # threads alive before the command: count only what they use from now on
    while True:
        done = proc.poll() is not None
        now = time.time()
        ticks = thread_ticks(names)
        i = len(times)
        times.append(now)
        busy.append(busy_ticks())
        for key, t in ticks.items():
            s = series.get(key)
            if s is None:
                s = series[key] = [0] * i
            s.append(t - base.get(key, 0))
        for s in series.values():  # a thread that exited keeps its last count
            if len(s) < i + 1:
                s.append(s[-1] if s else 0)
        if done:
            break
        time.sleep(interval)
    by_name: dict[str, list[int]] = {}  # threads of one name in one process, summed (their last names)
    for key, s in series.items():
        agg = by_name.setdefault(names[key], [0] * len(s))
        for j, v in enumerate(s):
            agg[j] += v
    keep = {k: v for k, v in by_name.items() if v[-1] - v[0] >= 0.05 * TICK}
    out.write_text(json.dumps({"tick_hz": TICK, "cpus": os.cpu_count(), "t": times, "busy": busy,
                               "series": keep}))
    report(out, None)
    return proc.returncode


def report(path: Path, window: tuple[float, float] | None, top: int = 25) -> dict[str, Any]:
    """Print and return CPU seconds per process and the top threads inside ``window`` (default: the whole run)."""
    d = json.loads(path.read_text())
    t = d["t"]
    lo, hi = 0, len(t) - 1
    if window is not None:
        lo = max(0, next((i for i, x in enumerate(t) if x >= window[0]), 0) - 1)
        hi = next((i for i, x in enumerate(t) if x >= window[1]), len(t) - 1)
    span = t[hi] - t[lo] or 1.0
    hz = d["tick_hz"]
    (b0, a0), (b1, a1) = d["busy"][lo], d["busy"][hi]
    threads = {k: (v[hi] - v[lo]) / hz for k, v in d["series"].items()}
    procs: dict[str, float] = {}
    for k, s in threads.items():
        p = k.split("/")[0]
        procs[p] = procs.get(p, 0.0) + s
    box = (b1 - b0) / hz
    res = {"window_s": span, "box_busy_cores": box / span, "cpus": d["cpus"],
           "processes_cpu_s": dict(sorted(procs.items(), key=lambda kv: -kv[1])),
           "threads_cpu_s": dict(sorted(threads.items(), key=lambda kv: -kv[1])[:top])}
    print(f"window {span:.2f} s: box busy {box / span:.1f} of {d['cpus']} cores "
          f"({(a1 - a0) / hz / span:.1f} cores counted)")
    for p, s in list(res["processes_cpu_s"].items())[:12]:
        print(f"  {p:<36} {s:7.2f} s  ({s / span:4.1f} cores)")
    print("  top threads:")
    for k, s in list(res["threads_cpu_s"].items())[:top]:
        print(f"    {k:<48} {s:7.2f} s")
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="cpu_sampler", description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, help="where the samples go (JSON)")
    ap.add_argument("--interval", type=float, default=0.2, help="seconds between samples")
    ap.add_argument("--report", type=Path, help="summarise an earlier --out file instead of running a command")
    ap.add_argument("--window", type=float, nargs=2, metavar=("START", "END"), help="epoch seconds to cut out")
    ap.add_argument("cmd", nargs=argparse.REMAINDER, help="-- COMMAND ...")
    a = ap.parse_args(argv)
    if a.report:
        report(a.report, tuple(a.window) if a.window else None)
        return 0
    cmd = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd
    if not cmd or a.out is None:
        ap.error("give --out FILE -- COMMAND ... (or --report FILE)")
    return sample(cmd, a.out, a.interval)


if __name__ == "__main__":
    sys.exit(main())
