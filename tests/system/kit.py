"""Whole-system test kit: the real services as real processes (appliance, server, tansu, RTSP), on loopback.

Every process is started by the test, owned by it (by pid) and stopped in ``finally``; logs go to the
test's tmp dir so a failure shows what each process said.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
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


class CutProxy:
    """A TCP relay on a loopback port whose :meth:`cut` drops every connection (RST) and stops listening,
    and :meth:`restore` listens again on the same port: to clients, exactly a broker that died and came
    back (connection reset, then refused), while the broker behind it keeps its log, its producer state and
    the group's offsets, as a real Kafka cluster does across a network partition or a restart."""

    def __init__(self, target_port: int, port: int = 0) -> None:
        self.target = ("127.0.0.1", target_port)
        self.port = port or free_port()
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self.restore()

    def restore(self) -> None:
        ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("127.0.0.1", self.port))
        ls.listen(64)
        self._listener = ls
        threading.Thread(target=self._accept, args=(ls,), daemon=True, name="cut-proxy").start()

    def _accept(self, ls: socket.socket) -> None:
        while True:
            try:
                client, _ = ls.accept()
            except OSError:
                return  # cut
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._conns.update((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                self._close(s)

    def _close(self, s: socket.socket) -> None:
        with self._lock:
            self._conns.discard(s)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST, not FIN
            s.close()
        except OSError:
            pass

    def cut(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with self._lock:
            conns = list(self._conns)
        for s in conns:
            self._close(s)


class CutKafka:
    """An embedded tansu behind a :class:`CutProxy`: ``kill()`` cuts every client off, ``start()`` lets them
    back. Used for the broker-outage tests (same interface as :class:`DurableKafka`)."""

    def __init__(self, tmp: Path) -> None:
        from common.tansu import EmbeddedKafka

        proxy_port = free_port()
        self.broker = EmbeddedKafka(log_file=tmp / "tansu.log", advertised_port=proxy_port).start()
        self.proxy = CutProxy(self.broker.port, proxy_port)
        self.bootstrap = f"127.0.0.1:{proxy_port}"

    def kill(self) -> None:
        self.proxy.cut()

    def start(self) -> None:
        self.proxy.restore()

    def close(self) -> None:
        self.proxy.cut()
        self.broker.stop()


def frames_processed(proc: Proc) -> int | None:
    """The appliance's own count of frames it processed, from its final ``stopped`` log line."""
    import re

    found = re.findall(r'\\?"frames_processed\\?": (\d+)', proc.log_path.read_text(errors="replace"))
    return int(found[-1]) if found else None
