"""`just soak`: ``--minutes`` (default 20) at 80 % of the sustained load, memory of every process over time.

The load is ``--fraction`` (0.8) of ``cameras`` in results/bench-load.json (or ``--cameras``), played from
the replay recordings into the same rig as bench-load (tansu, one server process, result reader, player
processes). Every ``--sample-s`` the RSS of the server, the broker, this process and the players, the
backlog (frames sent minus frames with a result) and latency are recorded. A leak shows as RSS that keeps
growing after the first minutes (``growth_after_warmup``: end minus the value at 20 % of the run).
Writes results/soak.json and .png; last line ``RESULT soak minutes=.. cameras=.. server_rss_growth_mb=..``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.bench_load import RESULTS, Rig, scrape_server, server_breakdown
from benchmarks.replay import DEFAULT_DIR, ensure_recordings
from common.kafka import LINGER_MS


def main(argv: list[str] | None = None) -> int:
    from common.logs import setup_logging

    p = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--assets", default=None)
    p.add_argument("--recordings", type=Path, default=DEFAULT_DIR)
    p.add_argument("--minutes", type=float, default=20.0)
    p.add_argument("--cameras", type=int, default=0, help="0 = fraction x cameras of results/bench-load.json")
    p.add_argument("--fraction", type=float, default=0.8)
    p.add_argument("--fps", type=float, default=15.0)
    p.add_argument("--players", type=int, default=1)
    p.add_argument("--linger-ms", type=float, default=LINGER_MS, help="players' producer linger.ms (as appliances)")
    p.add_argument("--retention-s", type=float, default=300.0,
                   help="server identity.retention_s for the run (default 300): short enough that identities expire "
                   "during the soak, so the gallery reaches its steady state (a site's 24 h retention does the "
                   "same over days); 0 keeps the server's setting")
    p.add_argument("--server-config", default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", type=Path, default=RESULTS / "soak.json")
    a = p.parse_args(argv)
    setup_logging("soak", "WARNING")
    cameras = a.cameras
    if not cameras:
        load = json.loads((RESULTS / "bench-load.json").read_text())
        cameras = max(1, int(load["cameras"] * a.fraction))
    ensure_recordings(a.assets, a.recordings)
    if a.retention_s:
        a.set = [f"identity.retention_s={a.retention_s:g}", *a.set]
    with tempfile.TemporaryDirectory(prefix="reidfleet-soak-") as tmp:
        rig = Rig(a, Path(tmp))
        try:
            with rig.reader.lock:
                start = len(rig.reader.samples)
            stages: list[dict[str, Any]] = []
            stop = threading.Event()

            def sample_stages() -> None:  # the server's own stage times per minute: where a slowdown comes from
                t0, prev = time.monotonic(), scrape_server(rig.port)
                while not stop.wait(60.0):
                    cur = scrape_server(rig.port)
                    stages.append({"minute": round((time.monotonic() - t0) / 60, 1), **server_breakdown(prev, cur)})
                    prev = cur

            sampler = threading.Thread(target=sample_stages, daemon=True)
            sampler.start()
            run = rig.play("soak", cameras, a.minutes * 60)
            stop.set()
            drained = rig.drain("soak", run["sent"], 120)
            with rig.reader.lock:
                samples = rig.reader.samples[start:]
        finally:
            rig.close()
    series = run["series"]
    procs = sorted({k for s in series for k in s["rss"]})
    memory: dict[str, dict[str, Any]] = {}
    for name in procs:
        vals = [s["rss"][name] for s in series if s["rss"].get(name)]
        if not vals:
            continue
        warm = vals[int(len(vals) * 0.2)]
        memory[name] = {"start_mb": round(vals[0] / 2**20, 1), "end_mb": round(vals[-1] / 2**20, 1),
                        "peak_mb": round(max(vals) / 2**20, 1),
                        "growth_after_warmup_mb": round((vals[-1] - warm) / 2**20, 1)}
    # CPU share of each process per fifth of the run (cores busy): a process whose work per frame grows with
    # the run's history (a broker scanning its whole log, a gallery never compacted) shows it here.
    for name in memory:
        pts = [(s["t"], s["cpu_s"][name]) for s in series if s.get("cpu_s", {}).get(name) is not None]
        if len(pts) >= 10:
            edges = [pts[int(i * (len(pts) - 1) / 5)] for i in range(6)]
            memory[name]["cpu_cores_by_fifth"] = [round((c1 - c0) / max(t1 - t0, 1e-9), 2)
                                                  for (t0, c0), (t1, c1) in itertools.pairwise(edges)]
    gallery = [s["gallery"] for s in series if s.get("gallery") is not None]
    if gallery and "server" in memory:
        warm_i = int(len(gallery) * 0.2)
        memory["server"]["gallery_identities"] = {"start": int(gallery[0]), "at_warmup": int(gallery[warm_i]),
                                                  "end": int(gallery[-1]), "peak": int(max(gallery))}
    lat = [s[1] for s in samples]
    result = {"bench": "soak", "minutes": a.minutes, "cameras": cameras, "fps": a.fps, "sent": run["sent"],
              "retention_s": a.retention_s or None, "server_overrides": a.set, "server_by_minute": stages,
              "drained": drained, "max_backlog_frames": max((s["backlog"] for s in series), default=0),
              "p50_ms": round(float(np.percentile(lat, 50)) * 1000, 1) if lat else None,
              "p95_ms": round(float(np.percentile(lat, 95)) * 1000, 1) if lat else None,
              "memory": memory, "series": series}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ts = [s["t"] / 60 for s in series]
    for name in memory:
        ax1.plot(ts, [(s["rss"].get(name) or 0) / 2**20 for s in series], label=name)
    ax1.set_xlabel("minutes")
    ax1.set_ylabel("RSS (MiB)")
    ax1.legend(fontsize=8)
    ax1.set_title(f"memory, {cameras} cameras at {a.fps:g} FPS")
    ax2.plot(ts, [s["backlog"] for s in series], color="tab:orange", label="backlog (frames sent - results)")
    ax2.set_xlabel("minutes")
    ax2.set_ylabel("frames")
    if gallery:
        ax3 = ax2.twinx()
        ax3.plot([s["t"] / 60 for s in series if s.get("gallery") is not None], gallery, color="tab:green",
                 label="gallery identities")
        ax3.set_ylabel("gallery identities")
        ax3.legend(fontsize=8, loc="upper right")
    ax2.legend(fontsize=8, loc="upper left")
    ax2.set_title("backlog and gallery size")
    fig.tight_layout()
    fig.savefig(a.out.with_suffix(".png"), dpi=110)
    plt.close(fig)
    srv = memory.get("server", {})
    print(f"RESULT soak minutes={a.minutes:g} cameras={cameras} drained={drained} "
          f"server_rss_start_mb={srv.get('start_mb')} server_rss_end_mb={srv.get('end_mb')} "
          f"server_rss_peak_mb={srv.get('peak_mb')} server_rss_growth_mb={srv.get('growth_after_warmup_mb')} "
          f"p95_ms={result['p95_ms']} gallery_end={srv.get('gallery_identities', {}).get('end')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
