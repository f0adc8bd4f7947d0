"""Whole-system test kit: the real services as real processes (appliance, server, tansu, RTSP), on loopback.

Every process is started by the test, owned by it (by pid) and stopped in ``finally``; logs go to the
test's tmp dir so a failure shows what each process said.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from confluent_kafka import Consumer

from common.assets import REPO_ROOT, data_path
from common.kafka import consumer_config
from common.tansu import free_port
from schemas.codec import AvroCodec

PETS = data_path("videos", "PETS09-S2L1_frames0001-0300.mp4")
ONE_BY_ONE = data_path("videos", "one-by-one-person-detection.mp4")
RTSP_SERVER = Path(__file__).with_name("rtsp_server.py")
ENV = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "REIDFLEET_LOG_FORMAT": "text", "OMP_NUM_THREADS": "1"}


def wait_for(predicate: Callable[[], Any], timeout_s: float, what: str, poll_s: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


class Proc:
    """One service process with its log file; ``kill()`` is SIGKILL, ``stop()`` SIGTERM then wait."""

    def __init__(self, name: str, cmd: list[str], cwd: Path, log: Path, env: dict[str, str] | None = None,
                 http_port: int | None = None) -> None:
        self.name, self.cmd, self.cwd, self.log_path, self.http_port = name, cmd, cwd, log, http_port
        self.env = env or ENV
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> Proc:
        self.cwd.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.cmd, cwd=self.cwd, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout_s: float = 60) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def wait(self, timeout_s: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout_s)

    def tail(self, n: int = 3000) -> str:
        try:
            return f"--- {self.name} log ---\n" + self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return f"--- {self.name}: no log ---"

    def http(self, path: str) -> tuple[int, str]:
        """GET on the process's health server: (status, body); (0, error) when it does not answer."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=3) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(errors="replace")
        except OSError as exc:
            return 0, str(exc)

    def health(self) -> dict[str, Any]:
        code, body = self.http("/healthz")
        try:
            return {"_status": code, **json.loads(body)} if code else {"_status": 0, "error": body}
        except ValueError:
            return {"_status": code, "body": body}

    def metric(self, name: str, labels: str = "") -> float | None:
        code, body = self.http("/metrics")
        if code != 200:
            return None
        want = f"{name}{{{labels}}}" if labels else name
        for line in body.splitlines():
            if line.startswith(want + " "):
                return float(line.split()[-1])
        return None


def appliance(tmp: Path, name: str, bootstrap: str, topic: str, *sets: str) -> Proc:
    """``python -m appliance run`` as its own process; ``sets`` are ``--set`` overrides."""
    port = free_port()
    args = [f"kafka.bootstrap={bootstrap}", f"kafka.topic={topic}", f"spool.dir={tmp / name / 'spool'}",
            f"http.port={port}", f"device_id={name}", "camera_id=cam-1", "kafka.probe_interval_s=0.5",
            "detector.threads=1", *sets]
    cmd = [sys.executable, "-m", "appliance", "run"]
    for s in args:
        cmd += ["--set", s]
    # JSON logs: the final "stopped" line carries the appliance's telemetry (frames processed)
    return Proc(name, cmd, tmp / name, tmp / f"{name}.log", env={**ENV, "REIDFLEET_LOG_FORMAT": "json"},
                http_port=port)


def server(tmp: Path, name: str, bootstrap: str, topics: dict[str, str], group: str, **over: Any) -> Proc:
    """``python -m server run`` with its own stores under ``tmp/name``; returns the process."""
    from tests.server.conftest import server_config

    d = tmp / name
    d.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cfg = server_config(bootstrap, topics, d, kafka={"group_id": group}, health={"port": port},
                        **{"batch": {"max_crops": 16, "max_wait_ms": 30, "decode_threads": 1}, **over})
    (d / "server.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    cmd = [sys.executable, "-m", "server", "run", "--config", str(d / "server.yaml")]
    proc = Proc(name, cmd, d, tmp / f"{name}.log", http_port=port)
    proc.store_url = cfg.store.url  # type: ignore[attr-defined]
    return proc


def rtsp_server(tmp: Path, port: int) -> Proc:
    """A live RTSP camera (GStreamer's RTSP server, Debian packages, run by the system Python)."""
    return Proc("rtsp", ["/usr/bin/python3", str(RTSP_SERVER), "--port", str(port)], tmp, tmp / "rtsp.log",
                env={k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")})


class TopicReader:
    """Reads a topic from the beginning on a thread; keeps (key, value, partition, offset) in arrival order."""

    def __init__(self, bootstrap: str, topic: str, group: str, codec: str | None = None) -> None:
        self.codec = AvroCodec(codec) if codec else None
        self.items: list[tuple[bytes | None, Any, int, int]] = []
        self._stop = threading.Event()
        self._c = Consumer(consumer_config(bootstrap, group, "system-test-reader",
                                           **{"enable.auto.offset.store": True}))
        self._c.subscribe([topic])
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                m = self._c.poll(0.2)
                if m is None or m.error():
                    continue
                v = self.codec.decode(m.value()) if self.codec else m.value()
                self.items.append((m.key(), v, m.partition(), m.offset()))
        finally:
            self._c.close()

    @property
    def values(self) -> list[Any]:
        return [v for _k, v, _p, _o in self.items]

    def stop(self) -> None:
        self._stop.set()
        self._t.join(15)


def frames_by_device(records: list[dict[str, Any]]) -> dict[str, list[int]]:
    """frame_index sequences per device, in arrival order."""
    out: dict[str, list[int]] = {}
    for r in records:
        out.setdefault(r["device_id"], []).append(r["frame_index"])
    return out


def first_occurrence(seq: list[int]) -> list[int]:
    """Arrival order with redeliveries removed (a replayed batch repeats frames it already delivered)."""
    seen: set[int] = set()
    return [x for x in seq if not (x in seen or seen.add(x))]  # type: ignore[func-returns-value]


class DurableKafka:
    """tansu on ``s3://`` storage against a local ``moto_server``: topics, data and group offsets survive a
    broker kill, so an outage test can check end to end that nothing is lost (memory storage forgets all)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.s3_port, self.port = free_port(), free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        moto = Path(sys.executable).with_name("moto_server")
        self.moto = Proc("moto", [str(moto), "-H", "127.0.0.1", "-p", str(self.s3_port)], tmp, tmp / "moto.log")
        self.env = {**ENV, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                    "AWS_DEFAULT_REGION": "eu-west-1", "AWS_ENDPOINT": f"http://127.0.0.1:{self.s3_port}",
                    "AWS_ALLOW_HTTP": "true"}
        wait_for(self._make_bucket, 30, "moto_server")
        self.broker: Proc | None = None
        self.start()

    def _make_bucket(self) -> bool:
        import boto3
        import botocore.exceptions

        s3 = boto3.client("s3", endpoint_url=self.env["AWS_ENDPOINT"], aws_access_key_id="test",
                          aws_secret_access_key="test", region_name="eu-west-1")
        try:
            s3.create_bucket(Bucket="tansu", CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
            return True
        except (botocore.exceptions.EndpointConnectionError, botocore.exceptions.ConnectionClosedError):
            return False

    def start(self) -> None:
        import socket

        from common.tansu import tansu_binary

        url = f"tcp://{self.bootstrap}"
        self.broker = Proc("tansu", [tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url",
                                     url, "--storage-engine", "s3://tansu/"], self.tmp, self.tmp / "tansu.log",
                           env=self.env)

        def listening() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return True
            except OSError:
                return False

        wait_for(listening, 20, "tansu to listen", poll_s=0.05)

    def kill(self) -> None:
        if self.broker is not None:
            self.broker.kill()

    def close(self) -> None:
        if self.broker is not None:
            self.broker.stop(10)
        self.moto.stop(10)


def frames_processed(proc: Proc) -> int | None:
    """The appliance's own count of frames it processed, from its final ``stopped`` log line."""
    import re

    found = re.findall(r'\\?"frames_processed\\?": (\d+)', proc.log_path.read_text(errors="replace"))
    return int(found[-1]) if found else None
