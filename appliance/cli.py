"""``python -m appliance``: run one camera's loop, or check a config file.

With no config at all it runs on the shared sample video into a Kafka broker on 127.0.0.1:9092
(start one with ``just broker``), so a newcomer sees messages flow with one command.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
from pathlib import Path

from common.configfile import ConfigError, dump_yaml

log = logging.getLogger("appliance")

EPILOG = """\
examples:
  python -m appliance run                                   # sample video -> Kafka on 127.0.0.1:9092
  python -m appliance run --config /etc/reidfleet/appliance.yaml
  python -m appliance run --set source.url=rtsp://cam1/stream --set device_id=shop1-door
  python -m appliance run --set source.url=0                # first USB camera
  python -m appliance check-config --config appliance.yaml  # list every problem with its key path
  python -m appliance print-config --set sending.mode=full  # the effective config as YAML

config keys (YAML sections; any key can be given with --set a.b=value):
  device_id, camera_id      who is sending (the Kafka key is the device id)
  source.*                  url (file, rtsp://..., /dev/videoN, index), loop, realtime, reconnect_*
  detector.*                model_dir (OpenVINO IR), conf_threshold, iou_threshold, threads, ...
  tracker.*                 ByteTrack thresholds and lost-track buffer
  sending.*                 mode (track|full), crop/frame JPEG quality, best-shot rules, full_frame_fps
  kafka.*                   bootstrap, topic, extra producer properties, flush timeout
  spool.*                   dir, max_bytes, segment_bytes, fsync policy (outage buffer on disk)
  http.*                    host/port of /healthz and /metrics
See docs/appliance.md for every key, the metrics and how the spool behaves.
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m appliance",
        description="reidfleet edge appliance: camera -> person detection (OpenVINO YOLO11n) -> tracking "
        "(ByteTrack) -> best-shot crops -> Avro -> Kafka, with an on-disk spool for broker outages.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--config", "-c", type=Path, help="YAML config file (default: built-in defaults)")
        sp.add_argument(
            "--set", "-s", action="append", default=[], metavar="KEY=VALUE",
            help="override one key, e.g. --set source.url=rtsp://... (repeatable; applied after the file)",
        )

    run = sub.add_parser("run", help="run the real-time loop until the video ends or SIGTERM/SIGINT")
    common(run)
    run.add_argument("--log-level", default=None, help="DEBUG, INFO (default), WARNING")
    run.add_argument(
        "--bundle", type=Path, default=None,
        help="device bundle from `fleet device add` (bundle.json): joins the fleet over MQTT (status, "
        "telemetry, live config, signed OTA model updates). Its device id, Kafka address and camera URL "
        "override the config file; --set still wins.",
    )
    run.add_argument(
        "--data-dir", type=Path, default=Path("var/appliance"),
        help="writable folder for model slots, OTA journal and agent state (default var/appliance)",
    )
    run.add_argument(
        "--probe-image", type=Path, default=None,
        help="image with people for the OTA health check (default: none -> the model must parse and "
        "keep its FPS floor; with an image it must also find the people in it)",
    )
    chk = sub.add_parser("check-config", help="validate a config; print each problem with its key path")
    common(chk)
    show = sub.add_parser("print-config", help="print the effective config (defaults + file + --set) as YAML")
    common(show)
    return p


def _load(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from appliance.config import load

    return load(args.config, args.set)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if getattr(args, "bundle", None):
            args.set = _bundle_overrides(args.bundle) + args.set
        cfg = _load(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.command == "check-config":
        print(f"config ok ({args.config or 'defaults'}): device {cfg.device_id}, camera {cfg.camera_id}, "
              f"source {cfg.source.url}, kafka {cfg.kafka.bootstrap} topic {cfg.kafka.topic}")
        return 0
    if args.command == "print-config":
        print(dump_yaml(cfg), end="")
        return 0
    return _run(cfg, args.log_level, args.bundle, args.data_dir, args.probe_image)


def _bundle_overrides(path: Path) -> list[str]:
    """The bundle's identity and endpoints as ``--set`` items (so the same validation applies)."""
    from appliance.agent import load_bundle

    try:
        bundle = load_bundle(path)
    except Exception as exc:
        raise ConfigError(str(path), [f"device bundle unusable: {exc}"]) from None
    sets = [f"device_id={bundle.device_id}", f"kafka.bootstrap={bundle.kafka.bootstrap}"]
    if bundle.camera_url:
        sets.append(f"source.url={bundle.camera_url}")
    return sets


def _run(cfg, log_level: str | None, bundle_path: Path | None = None,  # type: ignore[no-untyped-def]
         data_dir: Path = Path("var/appliance"), probe_image: Path | None = None) -> int:
    from appliance.detect.base import ModelLoadError
    from appliance.pipeline import Pipeline
    from appliance.publish import SpoolError
    from appliance.source import SourceError
    from common.logs import setup_logging
    from common.service import StopSignal

    setup_logging("appliance", log_level)
    stop = StopSignal()
    agent = installer = None
    if bundle_path is not None:
        # OTA owns the model: recover an interrupted update, seed slot-a from the shipped model on
        # first boot, then load whatever `current` points at.
        from appliance.agent import FleetAgent, load_bundle
        from appliance.ota import DetectorHealthCheck, IrParseCheck, OtaInstaller

        bundle = load_bundle(bundle_path)
        checker = DetectorHealthCheck(probe_image) if probe_image else IrParseCheck()
        installer = OtaInstaller(data_dir, bundle.fleet_public_key_pem, checker)
        installer.recover()
        installer.seed(Path(cfg.detector.model_dir))
        cfg = cfg.model_copy(update={"detector": cfg.detector.model_copy(
            update={"model_dir": installer.current_dir()})})
        agent = FleetAgent(bundle, None, installer, data_dir)  # type: ignore[arg-type]
    pipeline = Pipeline(cfg, stop.event)
    code = 0
    try:
        pipeline.start()
        if agent is not None and installer is not None:
            agent.control = installer.control = pipeline
            agent.start()
        pipeline.run()
    except (SourceError, ModelLoadError, SpoolError, ValueError, OSError) as exc:
        log.error("appliance stopped: %s", exc)
        print(f"error: {exc}", file=sys.stderr)
        code = 1
    finally:
        if agent is not None:
            agent.stop()  # retained "offline" before the loop goes away
        stopper = threading.Thread(target=pipeline.close, name="shutdown", daemon=True)
        stopper.start()
        stopper.join()
        log.info("stopped", extra={"telemetry": json.dumps(pipeline.telemetry(), default=str)})
    return code


if __name__ == "__main__":
    sys.exit(main())
