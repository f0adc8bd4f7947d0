"""The demo's supervisor on real child processes: escalation, interrupted start, and a second Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from common.assets import REPO_ROOT
from demo.supervisor import Interrupted, ServiceSpec, Supervisor

# A service that ignores SIGTERM (a hung shutdown) and starts a grandchild in its own process group.
STUBBORN = textwrap.dedent("""
    import signal, subprocess, sys, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    kid = subprocess.Popen([sys.executable, "-c", "import signal, time; "
                            "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
    open(sys.argv[1], "w").write(str(kid.pid))
    time.sleep(600)
""")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is gone for our purposes
        return f.read().split()[2] != "Z"


def _wait_gone(pids: list[int], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not any(_alive(p) for p in pids):
            return True
        time.sleep(0.05)
    return False


def _stubborn(tmp_path: Path, name: str = "stubborn") -> ServiceSpec:
    marker = tmp_path / f"{name}.pid"
    return ServiceSpec(name, [sys.executable, "-c", STUBBORN, str(marker)], ready=marker.exists)


def test_stop_all_kills_a_service_that_ignores_sigterm_with_its_group(tmp_path: Path) -> None:
    sup = Supervisor(tmp_path / "logs")
    run = sup.start(_stubborn(tmp_path))
    grandchild = int((tmp_path / "stubborn.pid").read_text())
    t = time.monotonic()
    sup.stop_all(grace_s=0.5)
    assert time.monotonic() - t < 8
    assert run.proc.returncode == -signal.SIGKILL
    assert _wait_gone([grandchild])


def test_a_stop_while_a_service_starts_ends_the_wait(tmp_path: Path) -> None:
    stopping = [False]
    sup = Supervisor(tmp_path / "logs", stopping=lambda: stopping[0])
    never = ServiceSpec("never-ready", [sys.executable, "-c", "import time; time.sleep(600)"],
                        ready=lambda: stopping.__setitem__(0, True) or False, ready_timeout_s=300)
    t = time.monotonic()
    with pytest.raises(Interrupted, match="never-ready"):
        sup.start(never)
    assert time.monotonic() - t < 5
    pid = sup.running[0].proc.pid
    sup.stop_all(grace_s=5)
    assert _wait_gone([pid])


def test_second_signal_during_the_stop_kills_every_child_and_exits(tmp_path: Path) -> None:
    """What the demo does: the first SIGTERM starts a clean stop that would wait out a hung service; the
    second exits at once, and no child (nor its own child) outlives the supervisor."""
    driver = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from common.service import StopSignal
        from demo.supervisor import ServiceSpec, Supervisor
        tmp = Path(sys.argv[1])
        stop = StopSignal()
        sup = Supervisor(tmp / "logs", stopping=stop.is_set)
        stop.on_force = sup.kill_all
        pids = []
        for name in ("a", "b"):
            marker = tmp / f"{{name}}.pid"
            run = sup.start(ServiceSpec(name, [sys.executable, "-c", {STUBBORN!r}, str(marker)], ready=marker.exists))
            pids += [run.proc.pid, int(marker.read_text())]
        (tmp / "pids").write_text(" ".join(map(str, pids)))
        stop.wait()
        (tmp / "stopping").write_text("1")
        sup.stop_all(grace_s=120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", driver, str(tmp_path)], cwd=REPO_ROOT,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "pids").exists() and time.monotonic() < deadline:
            assert proc.poll() is None, "driver died"
            time.sleep(0.05)
        pids = [int(p) for p in (tmp_path / "pids").read_text().split()]
        assert all(_alive(p) for p in pids)
        proc.send_signal(signal.SIGTERM)
        while not (tmp_path / "stopping").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # inside stop_all, waiting on the hung service
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 128 + signal.SIGTERM
        assert _wait_gone(pids), [p for p in pids if _alive(p)]
    finally:
        if proc.poll() is None:
            proc.kill()
