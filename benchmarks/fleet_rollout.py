"""``just bench-fleet``: how fast a fleet takes a new model, and how fast a bad one is rolled back.

Runs a real mosquitto (TLS, ACL), the artifact server, the fleet manager and N real agents
(``appliance.agent`` + ``appliance.ota``) in one process on loopback. The agents' health check is
``IrParseCheck`` (OpenVINO parses the IR; no inference) so 20 agents fit on 2 cores; the full
detector check costs its ``duration_s`` more per device (tests/appliance/test_ota.py).

Measured: wall time from ``RolloutEngine.start`` (what ``rollout start`` does) until every agent
runs the new model (seen on the devices' own A/B slots), with the default waves (5 % canary, x2);
time from the start of a campaign with a broken (signed, loadable-looking) model until the canary
has rolled itself back and reported it, and until the campaign is aborted; time from a desired
config change to all agents reporting it applied.

There is no peer we can run offline. The chart puts our times beside Mender's documented client
default (``UpdatePollIntervalSeconds`` = 1800 s: a device may take up to 30 min just to notice a
deployment); that bar is a documented default, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from common.logs import setup_logging

MENDER_DEFAULT_POLL_S = 1800.0


def _wait(pred: Any, timeout_s: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if pred():
            return time.monotonic()
        time.sleep(0.01)
    raise TimeoutError(f"timed out after {timeout_s} s")


def run(agents: int, runs: int, out_dir: Path) -> dict[str, Any]:
    from tests.fleetkit import FleetKit, mosquitto_reachable_tmpdir

    root = mosquitto_reachable_tmpdir()
    kit = FleetKit(root)
    try:
        manager = kit.start_manager(tick_s=0.1)
        ids = [f"bench-{i:03d}" for i in range(agents)]
        for d in ids:
            kit.start_agent(kit.add_device(d), telemetry_interval_s=5.0)
        _wait(lambda: sum(d["state"] == "online" for d in manager.inventory.list()) == agents, 120)
        engine = manager.rollouts
        rollouts = []
        for r in range(runs):
            version = f"2.{r}.0"
            ref = kit.publish_model(version)
            t0 = time.monotonic()
            wall0 = time.time()
            cid = engine.start(ref)
            t_all = _wait(lambda v=version: all(kit.agents[d].installer.current().version == v for d in ids), 600)
            _wait(lambda c=cid: engine.status(c)["state"] == "succeeded", 60)
            st = engine.status(cid)
            rollouts.append({
                "version": version, "waves": st["waves"], "seconds_to_all_on_new_model": round(t_all - t0, 3),
                "device_done_s": sorted(round(d["finished_at"] - wall0, 3) for d in st["devices"]),
            })
            print(f"rollout {version}: {agents} agents on the new model after {t_all - t0:.2f} s "
                  f"(waves {st['waves']})", flush=True)
        rollbacks = []
        for r in range(runs):
            ref = kit.publish_model(f"3.{r}.0", corrupt_xml=True)
            t0 = time.monotonic()
            cid = engine.start(ref)
            t_rb = _wait(lambda c=cid: engine.status(c)["counts"].get("rolled_back", 0) == 1, 120)
            t_abort = _wait(lambda c=cid: engine.status(c)["state"] == "aborted", 120)
            canary = next(d for d in engine.status(cid)["devices"] if d["state"] == "rolled_back")
            assert kit.agents[canary["device_id"]].installer.current().version == f"2.{runs - 1}.0"
            rollbacks.append({"seconds_to_rolled_back": round(t_rb - t0, 3),
                              "seconds_to_campaign_aborted": round(t_abort - t0, 3), "error": canary["error"]})
            print(f"rollback: canary rolled back {t_rb - t0:.2f} s after start, campaign aborted after "
                  f"{t_abort - t0:.2f} s", flush=True)
        t0 = time.monotonic()
        versions = {d: manager.shadows.set_desired(d, {"jpeg_quality": 77}).version for d in ids}
        t_cfg = _wait(lambda: all(manager.shadows.get(d)["applied_version"] == v for d, v in versions.items()), 120)
    finally:
        kit.close()
        shutil.rmtree(root, ignore_errors=True)
    rollout_s = [r["seconds_to_all_on_new_model"] for r in rollouts]
    rollback_s = [r["seconds_to_rolled_back"] for r in rollbacks]
    result = {
        "name": "bench-fleet",
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": {"cpus": len(os.sched_getaffinity(0)), "python": sys.version.split()[0]},
        "setup": {"agents": agents, "runs": runs, "health_check": "ir-parse (OpenVINO read_model, no inference)",
                  "waves": "5 % canary, x2 growth, no soak", "manager_tick_s": 0.1, "transport": "MQTT over TLS "
                  "(mosquitto 2.0), artifacts over HTTP with Range, ed25519 + sha256 verified on every device"},
        "rollout": rollouts,
        "rollback": rollbacks,
        "config_apply_all_s": round(t_cfg - t0, 3),
        "summary": {
            "rollout_median_s": round(statistics.median(rollout_s), 3),
            "rollback_median_s": round(statistics.median(rollback_s), 3),
            "abort_median_s": round(statistics.median(r["seconds_to_campaign_aborted"] for r in rollbacks), 3),
            "config_apply_all_s": round(t_cfg - t0, 3),
            "peer": {"name": "Mender client default UpdatePollIntervalSeconds (documented, not measured)",
                     "seconds": MENDER_DEFAULT_POLL_S},
        },
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench-fleet.json").write_text(json.dumps(result, indent=2) + "\n")
    chart(result, out_dir / "bench-fleet.png")
    return result


def chart(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    n = result["setup"]["agents"]
    for r in result["rollout"]:
        xs = r["device_done_s"]
        ax1.step([0, *xs], [0, *[(i + 1) / n * 100 for i in range(len(xs))]], where="post",
                 label=f"{r['version']} ({r['seconds_to_all_on_new_model']:.1f} s)")
    ax1.set_xlabel("seconds after `rollout start`")
    ax1.set_ylabel("% of fleet on the new model")
    ax1.set_title(f"{n} agents, waves {result['rollout'][0]['waves']}")
    ax1.legend()
    s = result["summary"]
    labels = ["reidfleet:\nwhole fleet\nupdated", "reidfleet:\nbad model\nrolled back",
              "reidfleet:\nconfig on\nall devices", "Mender default:\ndevice notices\na deployment\n(documented)"]
    values = [s["rollout_median_s"], s["rollback_median_s"], s["config_apply_all_s"], s["peer"]["seconds"]]
    bars = ax2.bar(labels, values, color=["tab:green", "tab:green", "tab:green", "tab:gray"])
    ax2.set_yscale("log")
    ax2.set_ylabel("seconds (log)")
    ax2.bar_label(bars, [f"{v:.2f} s" if v < 100 else f"up to {v:.0f} s" for v in values])
    ax2.set_title("median over runs (lower is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fleet_rollout", description=__doc__.split("\n\n")[0])
    p.add_argument("--agents", type=int, default=20)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--assets", help="folder with models/ (default: shared assets, env REIDFLEET_ASSETS)")
    p.add_argument("--out", type=Path, default=Path("results"))
    a = p.parse_args(argv)
    if a.assets:
        os.environ["REIDFLEET_ASSETS"] = a.assets
    setup_logging("bench-fleet", "WARNING", json_lines=False)
    r = run(a.agents, a.runs, a.out)
    s = r["summary"]
    print(f"RESULT bench-fleet agents={a.agents} rollout_s={s['rollout_median_s']} "
          f"rollback_s={s['rollback_median_s']} abort_s={s['abort_median_s']} config_s={s['config_apply_all_s']} "
          f"peer_mender_poll_s={MENDER_DEFAULT_POLL_S:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
