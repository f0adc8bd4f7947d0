"""``python -m server``: run the Re-ID consumer, or check a config file without starting anything."""

from __future__ import annotations

import argparse
import logging
import sys
from contextlib import ExitStack

from common.configfile import ConfigError, dump_yaml, load_config
from common.logs import setup_logging
from common.metrics import HealthServer
from common.service import StopSignal
from server.config import ServerConfig

log = logging.getLogger("server")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m server",
        description="reidfleet Re-ID server: consumes edge frames from Kafka (reid_input), embeds person crops, "
        "matches tracks to global identities (Qdrant), writes analytics (SQLite/PostgreSQL) and results "
        "(reid_output). Defaults: broker 127.0.0.1:9092, Qdrant local and SQLite under ./var/server.")
    sub = p.add_subparsers(dest="command", required=True)
    for name, text in (("run", "run the consumer until SIGTERM/SIGINT"),
                       ("check-config", "validate a config and print it with every default filled in")):
        s = sub.add_parser(name, help=text, description=text)
        s.add_argument("--config", "-c", help="YAML config file (default: built-in embedded defaults)")
        s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                       help="override one setting, e.g. --set kafka.bootstrap=10.0.0.5:9092 (repeatable)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        cfg = load_config(ServerConfig, args.config, args.overrides)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    if args.command == "check-config":
        print(dump_yaml(cfg), end="")
        if cfg.identity.match_threshold is None:
            from server.embed.calibration import CALIBRATED

            measured = ", ".join(f"{k} {v.threshold:.2f}" for k, v in CALIBRATED.items())
            print(f"identity.match_threshold null: the embedder's measured threshold applies ({measured})",
                  file=sys.stderr)
        print("config ok", file=sys.stderr)
        return 0
    setup_logging("server", cfg.log_level)
    stop = StopSignal()
    from server.consume import ReidConsumer, run_forever

    with ExitStack() as stack:
        try:
            consumer = ReidConsumer(cfg, stop=stop)
        except (FileNotFoundError, ValueError) as exc:
            log.error("cannot start: %s", exc)
            return 1
        current = consumer  # health follows the consumer that run_forever restarts after a failed delivery

        def follow(c: ReidConsumer) -> None:
            nonlocal current
            current = c

        health = HealthServer(consumer.registry, lambda: current.health(), cfg.health.host, cfg.health.port)
        stack.enter_context(health)
        log.info("server running", extra={"embedder": consumer.embedder.model_id, "health_port": health.port,
                                          "bootstrap": cfg.kafka.bootstrap})
        run_forever(cfg, stop, on_ready=follow, consumer=consumer)
    log.info("server stopped", extra={"reason": stop.reason})
    return 0
