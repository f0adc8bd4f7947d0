"""``python -m fleet``: manage appliances from one admin machine.

Every command works on one fleet home directory (``--home``, env ``REIDFLEET_FLEET_HOME``,
default ``./var/fleet``). Admin intent (devices, desired config, campaigns) is written to the
fleet database; the manager daemon (``serve``) delivers it over MQTT and records what devices
report. Tables for people, ``--json`` for scripts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from common.configfile import ConfigError
from common.logs import setup_logging
from fleet.home import FleetConfig, FleetHome

EPILOG = """\
first steps:
  python -m fleet keys generate                 # ed25519 signing key (private key stays here, 0600)
  python -m fleet broker run &                  # mosquitto with TLS, per-device passwords, ACL
  python -m fleet serve &                       # the manager daemon (inventory, config, rollouts)
  python -m fleet device add shop1-cam1         # credentials + bundle for the installer
  python -m fleet devices                       # who is online, what they run
  python -m fleet config set shop1-cam1 sending.frame_jpeg_quality=70
  python -m fleet model publish path/to/model_dir      # sign + store (the dir needs manifest.json)
  python -m fleet rollout start yolo11n_coco_int8_640:2.0.0 --all
  python -m fleet rollout status
docs: docs/fleet.md
"""


def _print(data: Any, as_json: bool, table: Any = None) -> None:
    if as_json or table is None:
        print(json.dumps(data, indent=2, default=str))
        return
    from rich.console import Console

    Console().print(table)


def _ago(ts: float | None) -> str:
    if not ts:
        return "-"
    s = max(0.0, time.time() - ts)
    return f"{s:.0f}s ago" if s < 120 else f"{s / 60:.0f}m ago" if s < 7200 else f"{s / 3600:.1f}h ago"


def _table(title: str, columns: list[str]) -> Any:
    from rich.table import Table

    t = Table(title=title, title_justify="left")
    for i, c in enumerate(columns):
        t.add_column(c, no_wrap=i == 0)  # never cut a device or campaign id
    return t


def _open(home: FleetHome) -> tuple[Any, Any, Any, Any]:
    from fleet.db import FleetDB
    from fleet.inventory import Inventory
    from fleet.rollout import RolloutEngine
    from fleet.shadow import Shadows

    db = FleetDB(home.db_path)
    inv = Inventory(db)

    def no_publish(_device_id: str, _job: Any) -> None:  # only the daemon publishes
        raise RuntimeError("the CLI does not publish")

    return db, inv, Shadows(db), RolloutEngine(db, inv, no_publish)


# --- commands ----------------------------------------------------------------------------------------


def cmd_keys_generate(home: FleetHome, a: argparse.Namespace) -> int:
    from common.signing import generate_keypair

    generate_keypair(home.private_key, home.public_key, overwrite=a.force)
    data = {"private_key": str(home.private_key), "public_key": str(home.public_key)}
    if a.json:
        _print(data, True)
    else:
        print(f"private key: {home.private_key} (mode 0600; keep it on this machine, back it up offline)")
        print(f"public key:  {home.public_key} (goes into every device bundle)")
    return 0


def cmd_init(home: FleetHome, a: argparse.Namespace) -> int:
    cfg = home.config()
    updates = {k: v for k, v in (("mqtt_host", a.mqtt_host), ("mqtt_port", a.mqtt_port),
                                 ("kafka_bootstrap", a.kafka), ("artifact_base_url", a.artifact_url)) if v is not None}
    if a.cert_name:
        updates["mqtt_cert_names"] = a.cert_name
    cfg = FleetConfig.model_validate({**cfg.model_dump(), **updates})
    home.write_config(cfg)
    _print(cfg.model_dump(), a.json) if a.json else print(f"{home.config_path}:\n{yaml.safe_dump(cfg.model_dump())}")
    return 0


def cmd_broker_run(home: FleetHome, a: argparse.Namespace) -> int:
    from common.service import StopSignal
    from fleet.broker import MosquittoBroker

    cfg = home.config()
    names = tuple(dict.fromkeys(["localhost", "127.0.0.1", cfg.mqtt_host, *cfg.mqtt_cert_names]))
    broker = MosquittoBroker(home.broker.root, host=cfg.mqtt_bind, port=a.port or cfg.mqtt_port, hostnames=names)
    stop = StopSignal()
    with broker:
        print(f"mosquitto on {broker.host}:{broker.port} (TLS, CA {home.broker.ca_crt}); Ctrl-C stops", flush=True)
        while not stop.wait(1.0):
            if not broker.running():
                print(f"mosquitto exited; see {home.broker.log}", file=sys.stderr)
                return 1
    return 0


def cmd_serve(home: FleetHome, a: argparse.Namespace) -> int:
    from common.metrics import HealthServer
    from common.service import StopSignal
    from fleet.artifacts import ArtifactServer
    from fleet.broker import ensure_manager_account
    from fleet.manager import FleetManager

    cfg = home.config()
    if not home.broker.ca_crt.is_file():
        raise SystemExit(f"no broker CA in {home.broker.root}: start the broker once (`python -m fleet broker run`)")
    password = ensure_manager_account(home.broker)
    stop = StopSignal()
    manager = FleetManager(home.db_path, mqtt_host=a.mqtt_host or "127.0.0.1", mqtt_port=a.mqtt_port or cfg.mqtt_port,
                           ca_cert=home.broker.ca_crt, password=password, tick_s=cfg.tick_s)
    artifacts = None if a.no_artifacts else ArtifactServer(home.artifacts, cfg.artifact_bind, cfg.artifact_port)
    health = HealthServer(manager.registry, manager.health, port=cfg.health_port if a.health_port is None
                          else a.health_port)
    with health:
        if artifacts:
            artifacts.start()
        manager.start()
        print(f"fleet manager running (health http://127.0.0.1:{health.port}/healthz); Ctrl-C stops", flush=True)
        try:
            stop.wait()
        finally:
            manager.stop()
            if artifacts:
                artifacts.stop()
    return 0


def cmd_device_add(home: FleetHome, a: argparse.Namespace) -> int:
    from fleet.provision import add_device

    bundle, tar_path = add_device(home, a.device_id, group=a.group, camera_url=a.camera_url,
                                  out_dir=Path(a.out) if a.out else None)
    data = {"device_id": bundle.device_id, "group": bundle.group, "bundle": str(tar_path),
            "bundle_json": str(tar_path.with_name(bundle.device_id) / "bundle.json"),
            "mqtt": f"{bundle.mqtt.host}:{bundle.mqtt.port}"}
    if a.json:
        _print(data, True)
    else:
        print(f"device {bundle.device_id} (group {bundle.group}) registered; broker {data['mqtt']}")
        print(f"bundle: {tar_path}  (holds the device password: copy it to the box, then delete it here)")
    return 0


def cmd_device_remove(home: FleetHome, a: argparse.Namespace) -> int:
    from fleet.provision import remove_device

    ok = remove_device(home, a.device_id)
    print(json.dumps({"device_id": a.device_id, "revoked": ok}) if a.json else
          (f"{a.device_id} revoked" if ok else f"{a.device_id} was not registered"))
    return 0 if ok else 1


def cmd_devices(home: FleetHome, a: argparse.Namespace) -> int:
    db, inv, shadows, _ = _open(home)
    cfg = home.config()
    rows = inv.list(group=a.group)
    for r in rows:
        sh = shadows.get(r["device_id"])
        r["config"] = {"desired": sh["desired_version"], "applied": sh["applied_version"],
                       "status": sh["reported_status"], "in_sync": sh["in_sync"]}
        if r["state"] == "online" and r["last_seen"] and time.time() - r["last_seen"] > cfg.stale_after_s:
            r["state"] = "stale"
    db.close()
    t = _table(f"{len(rows)} devices", ["device", "group", "state", "last seen", "model", "config", "health",
                                         "fps", "cpu %"])
    for r in rows:
        tel = r["telemetry"]
        fps = tel.get("pipeline", {}).get("fps")
        cpu = tel.get("system", {}).get("cpu_percent")
        cfg_txt = f"v{r['config']['applied']}" + ("" if r["config"]["in_sync"] else f" (wants v{r['config']['desired']}"
                                                  f"{', rejected' if r['config']['status'] == 'rejected' else ''})")
        state = {"online": "[green]online[/]", "offline": "[red]offline[/]", "stale": "[yellow]stale[/]"}.get(
            r["state"], r["state"])
        t.add_row(r["device_id"], r["group"], state, _ago(r["last_seen"]),
                  f"{r['model_id']} {r['model_version']}".strip() or "-", cfg_txt, r["health"] or "-",
                  "-" if fps is None else f"{fps:.1f}", "-" if cpu is None else f"{cpu:.0f}")
    _print(rows, a.json, t)
    return 0


def cmd_device_show(home: FleetHome, a: argparse.Namespace) -> int:
    db, inv, shadows, _ = _open(home)
    dev = inv.get(a.device_id)
    if dev is None:
        print(f"no device {a.device_id!r}", file=sys.stderr)
        return 1
    dev["shadow"] = shadows.get(a.device_id)
    db.close()
    _print(dev, True)
    return 0


def _parse_assignments(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError("config set", [f"{item!r}: expected KEY.PATH=VALUE (value parsed as YAML)"])
        key, raw = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(raw) if raw else ""
    return out


def cmd_config_set(home: FleetHome, a: argparse.Namespace) -> int:
    db, inv, shadows, _ = _open(home)
    changes = _parse_assignments(a.assignments)
    if a.all or a.group:
        targets = [d["device_id"] for d in inv.list(group=a.group)]
    elif a.device:
        if not inv.exists(a.device):
            print(f"no device {a.device!r} (see `python -m fleet devices`)", file=sys.stderr)
            return 1
        targets = [a.device]
    else:
        print("name a device, --group GROUP or --all", file=sys.stderr)
        return 2
    versions = {d: shadows.set_desired(d, changes, replace=a.replace).version for d in targets}
    result: dict[str, Any] = {d: {"desired_version": v, "status": "queued"} for d, v in versions.items()}
    if a.wait:
        deadline = time.monotonic() + a.wait
        while time.monotonic() < deadline:
            for d, v in versions.items():
                sh = shadows.get(d)
                if sh["reported_version"] >= v and sh["reported_status"]:
                    result[d] = {"desired_version": v, "status": sh["reported_status"], "error": sh["reported_error"],
                                 "problems": sh["reported_problems"]}
            if all(r["status"] != "queued" for r in result.values()):
                break
            time.sleep(0.2)
    db.close()
    t = _table("desired config", ["device", "version", "status", "problems"])
    for d, r in result.items():
        t.add_row(d, str(r["desired_version"]), r["status"], "; ".join(r.get("problems", [])) or r.get("error", ""))
    _print(result, a.json, t)
    if not a.wait and not a.json:
        print("queued: the manager (`python -m fleet serve`) publishes it; add --wait 30 to see the devices' answer")
    return 1 if any(r["status"] == "rejected" for r in result.values()) else 0


def cmd_config_show(home: FleetHome, a: argparse.Namespace) -> int:
    db, _inv, shadows, _ = _open(home)
    sh = shadows.get(a.device)
    db.close()
    _print(sh, True)
    return 0


def cmd_model_publish(home: FleetHome, a: argparse.Namespace) -> int:
    from fleet.artifacts import publish

    ref = publish(Path(a.model_dir), home.artifacts, home.private_key, overwrite=a.force)
    data = ref.model_dump()
    if a.json:
        _print(data, True)
    else:
        print(f"published {ref.model_id}:{ref.version} ({ref.size_bytes} bytes, sha256 {ref.sha256[:16]}..., signed)")
        print(f"roll it out: python -m fleet rollout start {ref.model_id}:{ref.version} --all")
    return 0


def cmd_models(home: FleetHome, a: argparse.Namespace) -> int:
    from fleet.artifacts import list_artifacts

    refs = [r.model_dump() for r in list_artifacts(home.artifacts)]
    t = _table("published models", ["model", "version", "bytes", "sha256"])
    for r in refs:
        t.add_row(r["model_id"], r["version"], str(r["size_bytes"]), r["sha256"][:16])
    _print(refs, a.json, t)
    return 0


def cmd_rollout_start(home: FleetHome, a: argparse.Namespace) -> int:
    from fleet.artifacts import artifact_path, get_artifact
    from schemas.mqtt import HealthCheckSpec

    model_id, _, version = a.model.partition(":")
    if not version:
        print("name the model as MODEL_ID:VERSION (see `python -m fleet models`)", file=sys.stderr)
        return 2
    if not (a.all or a.group or a.device):
        print("choose the target: --all, --group GROUP or --device ID (repeatable)", file=sys.stderr)
        return 2
    ref = get_artifact(home.artifacts, model_id, version)
    ref = ref.model_copy(update={"url": home.config().artifact_url() + artifact_path(model_id, version)})
    db, _inv, _sh, engine = _open(home)
    cid = engine.start(ref, group=a.group, devices=a.device, canary_percent=a.canary_percent, growth=a.growth,
                       max_failure_percent=a.max_failure_percent, device_timeout_s=a.device_timeout,
                       soak_s=a.soak, health=HealthCheckSpec(duration_s=a.health_seconds, min_fps=a.min_fps,
                                                             min_people=a.min_people))
    status = engine.status(cid)
    db.close()
    if a.json:
        _print(status, True)
    else:
        print(f"campaign {cid}: {model_id}:{version} to {sum(status['waves'])} devices in waves {status['waves']}")
        print(f"follow it: python -m fleet rollout status {cid}")
    return 0


def cmd_rollout_status(home: FleetHome, a: argparse.Namespace) -> int:
    db, _inv, _sh, engine = _open(home)
    camps = engine.list() if a.all else [engine.status(a.campaign_id)]
    db.close()
    if a.json:
        _print(camps if a.all else camps[0], True)
        return 0
    from rich.console import Console

    console = Console()
    for c in camps:
        art = c["artifact"]
        counts = ", ".join(f"{k} {v}" for k, v in sorted(c["counts"].items()))
        console.print(f"[bold]{c['campaign_id']}[/] {art['model_id']}:{art['version']} -> {c['target']}: "
                      f"[bold]{c['state']}[/], wave {c['current_wave'] + 1}/{len(c['waves'])} {c['waves']}; {counts}")
        if c["reason"]:
            console.print(f"  {c['reason']}")
        if not a.all:
            t = _table("", ["device", "wave", "state", "step", "previous", "error"])
            for d in c["devices"]:
                t.add_row(d["device_id"], str(d["wave"] + 1), d["state"], d["step"],
                          f"{d['previous_model_id']} {d['previous_version']}".strip(), d["error"][:80])
            console.print(t)
    return 0


def cmd_rollout_action(home: FleetHome, a: argparse.Namespace) -> int:
    db, _inv, _sh, engine = _open(home)
    getattr(engine, a.action)(a.campaign_id)
    state = engine.status(a.campaign_id)["state"]
    db.close()
    print(json.dumps({"campaign_id": a.campaign_id, "state": state}) if a.json else f"{a.campaign_id}: {state}")
    return 0


# --- parser ------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(add_help=False)
    top.add_argument("--home", help="fleet home directory (env REIDFLEET_FLEET_HOME, default ./var/fleet)")
    top.add_argument("--json", action="store_true", help="machine-readable output")
    # the same options after the command; SUPPRESS keeps a value given before the command
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--home", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")
    p = argparse.ArgumentParser(prog="python -m fleet", parents=[top], epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="Manage reidfleet appliances: devices, live config and signed model "
                                            "rollouts over MQTT.")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    def add(name: str, help_: str, parent: Any = sub) -> argparse.ArgumentParser:
        return parent.add_parser(name, help=help_, description=help_, parents=[common])

    s = add("init", "write fleet.yaml: the endpoints devices are told about")
    s.add_argument("--mqtt-host", help="broker name/IP devices connect to")
    s.add_argument("--mqtt-port", type=int)
    s.add_argument("--cert-name", action="append", help="extra broker certificate name (repeatable)")
    s.add_argument("--kafka", help="Kafka bootstrap devices produce to")
    s.add_argument("--artifact-url", help="base URL devices download models from")
    s.set_defaults(fn=cmd_init)

    keys = add("keys", "artifact signing keys").add_subparsers(dest="sub", required=True, metavar="ACTION")
    s = add("generate", "create the fleet's ed25519 signing key pair", keys)
    s.add_argument("--force", action="store_true", help="replace an existing key (devices must get new bundles)")
    s.set_defaults(fn=cmd_keys_generate)

    broker = add("broker", "the MQTT broker").add_subparsers(dest="sub", required=True, metavar="ACTION")
    s = add("run", "run mosquitto with the generated TLS config, passwords and ACL (foreground)", broker)
    s.add_argument("--port", type=int, help="TLS port (default: fleet.yaml mqtt_port)")
    s.set_defaults(fn=cmd_broker_run)

    s = add("serve", "run the fleet manager daemon (inventory, config delivery, rollouts, artifact server)")
    s.add_argument("--mqtt-host", help="broker address to connect to (default 127.0.0.1)")
    s.add_argument("--mqtt-port", type=int)
    s.add_argument("--health-port", type=int, help="port of /healthz and /metrics (0 = any free)")
    s.add_argument("--no-artifacts", action="store_true", help="artifacts are served elsewhere (artifact_base_url)")
    s.set_defaults(fn=cmd_serve)

    device = add("device", "add, remove or show one device").add_subparsers(dest="sub", required=True,
                                                                             metavar="ACTION")
    s = add("add", "register a device: credentials + bundle for the installer (re-run to rotate)", device)
    s.add_argument("device_id", help="lowercase letters, digits, - and _ (also its MQTT username)")
    s.add_argument("--group", default="default", help="rollout group (e.g. a shop or a region)")
    s.add_argument("--camera-url", default="", help="camera RTSP/HTTP URL written into the bundle")
    s.add_argument("--out", help="bundle directory (default <home>/bundles/<id>)")
    s.set_defaults(fn=cmd_device_add)
    s = add("remove", "revoke a device's broker login and hide it from the inventory", device)
    s.add_argument("device_id")
    s.set_defaults(fn=cmd_device_remove)
    s = add("show", "everything known about one device (JSON)", device)
    s.add_argument("device_id")
    s.set_defaults(fn=cmd_device_show)

    s = add("devices", "list devices: online/offline, last seen, model, config version, health")
    s.add_argument("--group")
    s.set_defaults(fn=cmd_devices)

    config = add("config", "desired settings (delivered by `serve`, answered by the device)").add_subparsers(
        dest="sub", required=True, metavar="ACTION")
    s = add("set", "change settings: KEY.PATH=VALUE ... (merged into the last desired config)", config)
    s.add_argument("device", nargs="?", help="device id (or use --group/--all)")
    s.add_argument("assignments", nargs="+", metavar="KEY=VALUE")
    s.add_argument("--group")
    s.add_argument("--all", action="store_true")
    s.add_argument("--replace", action="store_true", help="replace the whole desired mapping instead of merging")
    s.add_argument("--wait", type=float, default=0.0, metavar="S", help="wait up to S seconds for the answers")
    s.set_defaults(fn=cmd_config_set)
    s = add("show", "desired vs reported config of one device (JSON)", config)
    s.add_argument("device")
    s.set_defaults(fn=cmd_config_show)

    model = add("model", "model artifacts").add_subparsers(dest="sub", required=True, metavar="ACTION")
    s = add("publish", "verify a model dir against its manifest.json, pack, sign and store it", model)
    s.add_argument("model_dir")
    s.add_argument("--force", action="store_true", help="replace an already published version")
    s.set_defaults(fn=cmd_model_publish)
    add("models", "list published model artifacts").set_defaults(fn=cmd_models)

    rollout = add("rollout", "phased model rollouts").add_subparsers(dest="sub", required=True, metavar="ACTION")
    s = add("start", "start a campaign: canary wave, then growing waves while healthy", rollout)
    s.add_argument("model", help="MODEL_ID:VERSION (see `models`)")
    s.add_argument("--all", action="store_true", help="every registered device")
    s.add_argument("--group", help="only this group")
    s.add_argument("--device", action="append", help="only these devices (repeatable)")
    s.add_argument("--canary-percent", type=float, default=5.0, help="first wave size in %% (min 1 device)")
    s.add_argument("--growth", type=float, default=2.0, help="each wave this many times the previous")
    s.add_argument("--max-failure-percent", type=float, default=10.0,
                   help="abort and roll back when more than this %% of finished devices failed")
    s.add_argument("--device-timeout", type=float, default=900.0, help="seconds before a silent device counts failed")
    s.add_argument("--soak", type=float, default=0.0, help="seconds a finished wave must stay healthy before the next")
    s.add_argument("--health-seconds", type=float, default=5.0, help="device health check: seconds at the FPS floor")
    s.add_argument("--min-fps", type=float, default=0.0, help="device health check: FPS floor on the probe image")
    s.add_argument("--min-people", type=int, default=1, help="device health check: people to find in the probe")
    s.set_defaults(fn=cmd_rollout_start)
    s = add("status", "progress of a campaign (default: the latest)", rollout)
    s.add_argument("campaign_id", nargs="?")
    s.add_argument("--all", action="store_true", help="every campaign, one line each")
    s.set_defaults(fn=cmd_rollout_status)
    for action, help_ in (("pause", "send no further waves (running jobs finish)"), ("resume", "continue"),
                          ("abort", "stop and revert the devices this campaign updated")):
        s = add(action, help_, rollout)
        s.add_argument("campaign_id")
        s.set_defaults(fn=cmd_rollout_action, action=action)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    daemon = args.cmd in ("serve", "broker")  # daemons log JSON lines; one-shot commands log text
    setup_logging("fleet", json_lines=None if daemon else False)
    home = FleetHome.resolve(args.home)
    try:
        return int(args.fn(home, args) or 0)
    except (ConfigError, FileExistsError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
