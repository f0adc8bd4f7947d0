"""``python -m demo`` (``./just demo``): the whole system on one machine with embedded defaults.

Brings up, in order: the Kafka-protocol broker (tansu), mosquitto with generated TLS credentials,
the fleet manager, two appliances on two different sample videos (each registered through the real
provisioning path, ``fleet device add``), the Re-ID server and the dashboard. Prints the dashboard
URL and what to look at; Ctrl-C stops everything in reverse order.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common.assets import REPO_ROOT, data_path, require
from common.logs import setup_logging
from common.service import StopSignal
from common.tansu import free_port
from demo.supervisor import Interrupted, ServiceSpec, Supervisor, tail

log = logging.getLogger("demo")

CAMERAS = (
    ("shop-door", "door", "one-by-one-person-detection.mp4"),
    ("shop-floor", "floor", "PETS09-S2L1_frames0001-0300.mp4"),
)


def _py(*args: str) -> list[str]:
    return [sys.executable, *args]


def _run(cmd: list[str], env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[1:4])} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return proc.stdout


def _kafka_ready(bootstrap: str) -> bool:
    from confluent_kafka.admin import AdminClient

    if not _port_open(int(bootstrap.rsplit(":", 1)[1])):
        return False
    try:
        topics = AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=1).topics
    except Exception:
        return False
    return "reid_input" in topics


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="just demo",
        description="Run reidfleet end to end on this machine: broker, MQTT + fleet manager, two appliances on "
        "sample videos, the Re-ID server and the dashboard. State goes to --state (wiped at start unless "
        "--keep). Ctrl-C stops everything.",
    )
    p.add_argument("--state", type=Path, default=REPO_ROOT / "var" / "demo", help="working folder (default var/demo)")
    p.add_argument("--keep", action="store_true", help="keep state from the previous run")
    p.add_argument("--dashboard-port", type=int, default=8501)
    p.add_argument("--no-fleet", action="store_true", help="skip mosquitto and the fleet manager")
    p.add_argument("--duration", type=float, default=0.0, help="stop by itself after N seconds (0 = until Ctrl-C)")
    a = p.parse_args(argv)
    setup_logging("demo", json_lines=False)
    stop = StopSignal()

    videos = [require(data_path("videos", v), f"sample video {v}") for _, _, v in CAMERAS]
    state: Path = a.state
    if state.exists() and not a.keep:
        shutil.rmtree(state)
    state.mkdir(parents=True, exist_ok=True)
    sup = Supervisor(state / "logs", stopping=stop.is_set)
    stop.on_force = sup.kill_all  # a second Ctrl-C during the stop: no child outlives the demo
    kafka_port, mqtt_port = free_port(), free_port()
    bootstrap = f"127.0.0.1:{kafka_port}"
    fleet_home = state / "fleet"
    server_dir = state / "server"
    fleet_env = {"REIDFLEET_FLEET_HOME": str(fleet_home)}
    password = os.environ.get("REIDFLEET_DEMO_PASSWORD") or secrets.token_urlsafe(9)
    started = time.monotonic()
    try:
        print("==> Kafka-protocol broker (tansu)", flush=True)
        sup.start(ServiceSpec("kafka", _py("-m", "common.tansu", "--port", str(kafka_port)),
                              ready=lambda: _kafka_ready(bootstrap)))

        bundles: dict[str, Path] = {}
        if not a.no_fleet:
            print("==> fleet: signing key, mosquitto (TLS, per-device passwords, ACL), manager", flush=True)
            _run(_py("-m", "fleet", "init", "--mqtt-host", "127.0.0.1", "--mqtt-port", str(mqtt_port),
                     "--kafka", bootstrap), fleet_env)
            _run(_py("-m", "fleet", "keys", "generate"), fleet_env)
            for device_id, _, video in CAMERAS:
                _run(_py("-m", "fleet", "device", "add", device_id, "--group", "demo-shop",
                         "--camera-url", str(data_path("videos", video))), fleet_env)
                bundles[device_id] = fleet_home / "bundles" / device_id
            sup.start(ServiceSpec("mosquitto", _py("-m", "fleet", "broker", "run"), env=fleet_env,
                                  ready=lambda: _port_open(mqtt_port)))
            manager_port = free_port()
            sup.start(ServiceSpec("fleet-manager", _py("-m", "fleet", "serve", "--health-port", str(manager_port)),
                                  env=fleet_env, health_url=f"http://127.0.0.1:{manager_port}/healthz"))

        print("==> Re-ID server", flush=True)
        server_port = free_port()
        sup.start(ServiceSpec(
            "server",
            _py("-m", "server", "run",
                "--set", f"kafka.bootstrap={bootstrap}",
                "--set", "vectors.type=qdrant_local", "--set", f"vectors.path={server_dir / 'qdrant'}",
                "--set", f"store.url=sqlite:///{server_dir / 'analytics.db'}",
                "--set", f"health.port={server_port}"),
            health_url=f"http://127.0.0.1:{server_port}/healthz", ready_timeout_s=180))

        appliance_ports = {}
        for (device_id, camera_id, _), video in zip(CAMERAS, videos, strict=True):
            print(f"==> appliance {device_id} on {video.name}", flush=True)
            port = free_port()
            appliance_ports[device_id] = port
            cmd = _py("-m", "appliance", "run",
                      "--set", f"device_id={device_id}", "--set", f"camera_id={camera_id}",
                      "--set", f"source.url={video}", "--set", "source.loop=true", "--set", "source.realtime=true",
                      "--set", f"kafka.bootstrap={bootstrap}",
                      "--set", f"spool.dir={state / 'appliances' / device_id / 'spool'}",
                      "--set", f"http.port={port}",
                      "--set", "sending.full_frame_fps=1.0")
            if device_id in bundles:
                cmd += ["--bundle", str(bundles[device_id] / "bundle.json"),
                        "--data-dir", str(state / "appliances" / device_id)]
            sup.start(ServiceSpec(f"appliance-{device_id}", cmd, health_url=f"http://127.0.0.1:{port}/healthz",
                                  ready_timeout_s=120))

        print("==> dashboard", flush=True)
        dash_env = {"REIDFLEET_DASHBOARD_ADMIN_PASSWORD": password,
                    "REIDFLEET_DASHBOARD_MANAGER_PASSWORD": password}
        sup.start(ServiceSpec(
            "dashboard",
            _py("-m", "dashboard", "run", "--port", str(a.dashboard_port),
                "--set", f"store_url=sqlite:///{server_dir / 'analytics.db'}",
                "--set", f"fleet_inventory={fleet_home / 'fleet.db'}",
                "--set", f"settings_path={state / 'dashboard' / 'settings.json'}",
                "--set", f"qdrant.path={server_dir / 'qdrant'}",
                "--set", f"live.kafka_bootstrap={bootstrap}",
                "--set", f"server_health_url=http://127.0.0.1:{server_port}/healthz"),
            env=dash_env, health_url=f"http://127.0.0.1:{a.dashboard_port}/_stcore/health", ready_timeout_s=90))

        summary = {
            "dashboard": f"http://127.0.0.1:{a.dashboard_port}",
            "login": {"users": ["admin", "manager"], "password": password},
            "kafka": bootstrap,
            "mqtt": f"127.0.0.1:{mqtt_port} (TLS)" if not a.no_fleet else None,
            "server_metrics": f"http://127.0.0.1:{server_port}/metrics",
            "appliances": {d: f"http://127.0.0.1:{p}/healthz" for d, p in appliance_ports.items()},
            "logs": str(sup.log_dir),
        }
        (state / "demo.json").write_text(json.dumps(summary, indent=2))
        print(_what_to_look_at(summary, time.monotonic() - started, fleet_home), flush=True)

        while not stop.wait(2.0):
            dead = sup.dead()
            if dead:
                for r in dead:
                    print(f"!! {r.spec.name} exited ({r.proc.returncode}); last lines of {r.log_path}:\n"
                          f"{tail(r.log_path)}", file=sys.stderr)
                return 1
            if a.duration and time.monotonic() - started > a.duration:
                break
        return 0
    except Interrupted:
        return 0
    except (RuntimeError, TimeoutError, FileNotFoundError) as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
    finally:
        print("==> stopping everything", flush=True)
        sup.stop_all()


def _port_open(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _what_to_look_at(s: dict, took_s: float, fleet_home: Path) -> str:
    return f"""
reidfleet demo is up ({took_s:.0f} s).

  Dashboard   {s['dashboard']}   (user admin or manager, password {s['login']['password']})
  Kafka       {s['kafka']}        MQTT {s['mqtt']}
  Logs        {s['logs']}

What to look at:
  - Overview: people on each camera now and unique visitors today (two appliances replay sample videos).
  - Live: the latest frame per camera with boxes and global ids (faces blurred by default).
  - Analytics: footfall by hour, dwell times, cross-camera transitions.
  - Fleet (admin): both appliances online with model version and health; try
      REIDFLEET_FLEET_HOME={fleet_home} .venv/bin/python -m fleet devices
      REIDFLEET_FLEET_HOME={fleet_home} .venv/bin/python -m fleet config set shop-door sending.crop_jpeg_quality=70
  - Metrics: {s['server_metrics']} and each appliance's /metrics.

Ctrl-C stops everything.
"""


if __name__ == "__main__":
    sys.exit(main())
