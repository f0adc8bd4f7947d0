"""Process lifecycle: one stop event for SIGTERM/SIGINT, a second signal exits at once.

Loops wait on ``stop.wait(timeout)`` instead of sleeping so shutdown is prompt; resources join
an ``ExitStack`` so teardown runs in reverse order (source, queues, flush, close, offline).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType

log = logging.getLogger(__name__)


class StopSignal:
    """Wraps a ``threading.Event``; installs handlers only in the main thread.

    The first SIGTERM/SIGINT asks for a clean stop; a second one exits at once, after ``on_force`` (a
    process that started children uses it to kill them, or they would outlive it and keep its ports).
    """

    def __init__(self, install_handlers: bool = True, on_force: Callable[[], None] | None = None) -> None:
        self.event = threading.Event()
        self.reason = ""
        self.on_force = on_force
        if install_handlers and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._handle)
            signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.event.is_set():
            log.warning("second %s: exiting now", name)
            if self.on_force is not None:
                try:
                    self.on_force()
                except Exception:  # exiting regardless; say why the cleanup failed
                    log.exception("cleanup before exiting failed")
            os._exit(128 + signum)
        log.info("%s received: stopping", name)
        self.set(name)

    def set(self, reason: str = "requested") -> None:
        self.reason = reason
        self.event.set()

    def is_set(self) -> bool:
        return self.event.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self.event.wait(timeout)


def set_os_name(name: str) -> None:
    """Name the calling thread in the OS (``ps``, ``top -H``, /proc/*/comm; 15 bytes at most) on Linux.

    Why: every child the server spawns runs ``python -c "from multiprocessing.spawn import ..."`` and every
    thread shows as ``python3``, so an operator (or ``benchmarks/cpu_sampler.py``) could not tell the embedder
    workers from the commit and mirror processes, nor the matcher from the prepare thread. A no-op elsewhere."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(15, name.encode()[:15] + b"\0", 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):  # pragma: no cover - no libc prctl: names are cosmetic
        pass


def allowed_cpus() -> int:
    """CPUs this process may run on: affinity mask and cgroup v2/v1 CPU quota, whichever is lower.

    ``os.cpu_count()`` reports the host's cores even inside a container or under ``taskset``;
    sizing OpenVINO threads or worker pools from it oversubscribes a constrained box.
    """
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        n = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        n = min(n, max(1, int(quota + 0.999)))
    return max(1, n)


def _cgroup_quota() -> float | None:
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            q, period = f.read().split()[:2]
            if q != "max":
                return int(q) / int(period)
    except (OSError, ValueError):
        pass
    try:
        with open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us") as f:
            q = int(f.read())
        with open("/sys/fs/cgroup/cpu/cpu.cfs_period_us") as f:
            period = int(f.read())
        if q > 0:
            return q / period
    except (OSError, ValueError):
        pass
    return None
