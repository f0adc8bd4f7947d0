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
    return _run(cfg, args.log_level)


def _run(cfg, log_level: str | None) -> int:  # type: ignore[no-untyped-def]
    from appliance.detect.base import ModelLoadError
    from appliance.pipeline import Pipeline
    from appliance.publish import SpoolError
    from appliance.source import SourceError
    from common.logs import setup_logging
    from common.service import StopSignal

    setup_logging("appliance", log_level)
    stop = StopSignal()
    pipeline = Pipeline(cfg, stop.event)
    code = 0
    try:
        pipeline.start()
        pipeline.run()
    except (SourceError, ModelLoadError, SpoolError, ValueError, OSError) as exc:
        log.error("appliance stopped: %s", exc)
        print(f"error: {exc}", file=sys.stderr)
        code = 1
    finally:
        stopper = threading.Thread(target=pipeline.close, name="shutdown", daemon=True)
        stopper.start()
        stopper.join()
        log.info("stopped", extra={"telemetry": json.dumps(pipeline.telemetry(), default=str)})
    return code


if __name__ == "__main__":
    sys.exit(main())
