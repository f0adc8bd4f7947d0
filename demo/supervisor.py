"""Start a set of services as child processes, wait until each is healthy, stop them in reverse.

The demo uses it so one command brings the whole system up and Ctrl-C takes it down cleanly:
each child gets SIGTERM (then SIGKILL after a grace period), in the reverse order of start, so
producers flush before the broker goes away. A Ctrl-C while a service is still starting ends the wait
at once, and a second Ctrl-C during the stop kills every child (:meth:`Supervisor.kill_all`) instead of
leaving them running: each child leads its own process group, so the terminal's signal never reaches
them by itself.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass
class ServiceSpec:
    name: str
    cmd: Sequence[str]
    health_url: str | None = None  # polled until 200
    ready: Callable[[], bool] | None = None  # or a custom readiness check
    env: dict[str, str] = field(default_factory=dict)
    ready_timeout_s: float = 60.0


@dataclass
class Running:
    spec: ServiceSpec
    proc: subprocess.Popen[bytes]
    log_path: Path


def http_ok(url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return bool(r.status == 200)
    except OSError:
        return False


class Interrupted(RuntimeError):
    """A stop was asked for while a service was starting."""


class Supervisor:
    def __init__(self, log_dir: Path, stopping: Callable[[], bool] = lambda: False) -> None:
        self.log_dir = log_dir
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.running: list[Running] = []
        self._stopping = stopping

    def start(self, spec: ServiceSpec) -> Running:
        log_path = self.log_dir / f"{spec.name}.log"
        fh = open(log_path, "ab")  # noqa: SIM115 - the child owns it
        env = {**os.environ, **spec.env}
        proc = subprocess.Popen(list(spec.cmd), stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        fh.close()
        run = Running(spec, proc, log_path)
        self.running.append(run)
        deadline = time.monotonic() + spec.ready_timeout_s
        while time.monotonic() < deadline:
            if self._stopping():
                raise Interrupted(f"stopped while {spec.name} was starting")
            if proc.poll() is not None:
                raise RuntimeError(f"{spec.name} exited with {proc.returncode}; last log lines:\n{tail(log_path)}")
            if (spec.health_url is None and spec.ready is None) or (
                (spec.health_url and http_ok(spec.health_url)) or (spec.ready and spec.ready())
            ):
                log.info("%s ready (pid %d, log %s)", spec.name, proc.pid, log_path)
                return run
            time.sleep(0.3)
        raise TimeoutError(f"{spec.name} not ready within {spec.ready_timeout_s}s; see {log_path}:\n{tail(log_path)}")

    def dead(self) -> list[Running]:
        return [r for r in self.running if r.proc.poll() is not None]

    def stop_all(self, grace_s: float = 15.0) -> None:
        for run in reversed(self.running):
            if run.proc.poll() is None:
                log.info("stopping %s", run.spec.name)
                os.killpg(run.proc.pid, signal.SIGTERM)
                try:
                    run.proc.wait(grace_s)
                except subprocess.TimeoutExpired:
                    log.warning("%s did not stop in %.0fs: killing", run.spec.name, grace_s)
                    os.killpg(run.proc.pid, signal.SIGKILL)
                    run.proc.wait(5)
        self.running.clear()

    def kill_all(self) -> None:
        """SIGKILL every child's process group now (safe inside a signal handler: no waiting, no poll, which
        could contend for a ``wait`` the interrupted main thread holds; a group already gone is skipped)."""
        for run in reversed(self.running):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(run.proc.pid, signal.SIGKILL)


def tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"
