"""The durable half of a batch in a child process (``batch.commit_process``).

Why: after the embedder moved out (server/embed/remote.py), an H200 box spent per 20k crops 3.5 s matching
and 2.9 s in the SQL commit, on two threads of one interpreter that take turns holding the GIL. Here the
commit (the analytics transaction, then reid_output and dead letters, delivered) runs in its own process
while the consumer matches the next batches. The contract is the thread's: the batches in flight (up to
``batch.commit_queue``) are committed strictly in order and none after a failed one; the consumer hands the
Qdrant mirror a batch's changes and stores its offsets only after this process said the batch is durable. A
failed delivery comes back as :class:`~server.sink.DeliveryFailed` (the batch is redelivered), a dead writer
as well, and the next consumer starts a fresh writer.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from typing import Any

from server.sink import DeliveryFailed, Record, Result
from server.store import BatchWrite

log = logging.getLogger(__name__)

START_TIMEOUT_S = 120.0


def _serve(conn: Connection, cfg_json: dict[str, Any], stop: Any, waiting: Any, log_level: int) -> None:
    from common.logs import setup_logging
    from common.service import set_os_name
    from server.config import ServerConfig
    from server.sink import ResultSink
    from server.store import AnalyticsStore

    set_os_name("reid-commit")
    setup_logging("reidfleet-server-writer", logging.getLevelName(log_level))
    cfg = ServerConfig.model_validate(cfg_json)
    try:
        store = AnalyticsStore(cfg.store.url)
        sink = ResultSink(cfg.kafka, stopped=stop.is_set,
                          on_wait=lambda since: setattr(waiting, "value", since if since is not None else 0.0))
    except Exception as exc:
        conn.send(("error", type(exc).__name__, str(exc)))
        return
    conn.send(("ready",))
    # Once a batch fails, the batches queued behind it are answered without being committed: their rows may
    # build on the failed one's (an identity it created, a track it opened), and the consumer replays them all.
    failed: str | None = None
    try:
        while True:
            try:
                job = conn.recv()
            except (EOFError, OSError):
                return
            if job is None:
                return
            if failed is not None:
                conn.send(("skipped", failed))
                continue
            batch, outputs, dead = job
            try:
                t0 = time.perf_counter()
                store.write(batch)
                t1 = time.perf_counter()
                sink.deliver(outputs, dead)
                conn.send(("ok", t1 - t0, time.perf_counter() - t1))
            except DeliveryFailed as exc:
                failed = f"DeliveryFailed: {exc}"[:300]
                conn.send(("failed", str(exc)))
            except Exception as exc:  # an SQL error: the batch is not durable, the consumer replays it
                log.exception("commit failed")
                failed = f"{type(exc).__name__}: {exc}"[:300]
                conn.send(("error", type(exc).__name__, str(exc)))
    finally:
        sink.close()
        store.close()


class CommitProcess:
    """One child process committing batches in order: each ``submit`` is answered by one ``result``, in order;
    several batches may be submitted before the first result is read."""

    def __init__(self, cfg: Any) -> None:
        ctx = mp.get_context("spawn")
        self._stop = ctx.Event()
        self._waiting = ctx.Value("d", 0.0, lock=False)
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, name="reidfleet-commit", daemon=True, args=(
            child, cfg.model_dump(mode="json"), self._stop, self._waiting, logging.getLogger().getEffectiveLevel()))
        self._proc.start()
        child.close()
        if not self._conn.poll(START_TIMEOUT_S):
            self._proc.kill()
            raise RuntimeError(f"commit process did not start within {START_TIMEOUT_S:.0f} s")
        msg = self._conn.recv()
        if msg[0] != "ready":
            self._proc.join(5)
            raise RuntimeError(f"commit process could not start: {msg[1]}: {msg[2]}")
        self._outstanding = 0  # batches submitted and not yet answered
        log.info("commit process ready", extra={"pid": self._proc.pid})

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    @property
    def waiting_since(self) -> float | None:
        """When the batch being committed started waiting for the broker (None: not waiting)."""
        v = float(self._waiting.value)
        return v or None

    def submit(self, batch: BatchWrite, outputs: Sequence[Result], dead: Sequence[Record]) -> None:
        try:
            self._conn.send((batch, list(outputs), list(dead)))
        except (OSError, EOFError) as exc:
            raise DeliveryFailed(f"commit process gone (exit code {self._proc.exitcode}): {exc}") from exc
        self._outstanding += 1

    @property
    def outstanding(self) -> int:
        """Batches submitted and not yet answered."""
        return self._outstanding

    def ready(self) -> bool:
        """Whether the oldest batch in flight has been answered (``result`` will not block)."""
        return self._outstanding > 0 and self._conn.poll(0)

    def result(self, stopped: Any) -> tuple[float, float]:
        """Wait for the oldest batch in flight: (SQL seconds, produce seconds), or raise. While ``stopped()`` the
        writer is told to give up waiting for the broker (the batch is then redelivered)."""
        assert self._outstanding > 0, "nothing submitted"
        while not self._conn.poll(0.5):
            if stopped():
                self._stop.set()
            if not self._proc.is_alive() and not self._conn.poll(0):
                self._outstanding = 0
                raise DeliveryFailed(f"commit process died (exit code {self._proc.exitcode})")
        try:
            msg = self._conn.recv()
        except (EOFError, OSError) as exc:
            self._outstanding = 0
            raise DeliveryFailed(f"commit process died (exit code {self._proc.exitcode})") from exc
        self._outstanding -= 1
        if msg[0] == "ok":
            return msg[1], msg[2]
        if msg[0] == "failed":
            raise DeliveryFailed(msg[1])
        if msg[0] == "skipped":
            raise DeliveryFailed(f"not committed: an earlier batch failed ({msg[1]})")
        raise RuntimeError(f"commit failed in the commit process: {msg[1]}: {msg[2]}")

    def close(self) -> None:
        """Stop after the batch in flight (a batch never answered is simply redelivered)."""
        self._stop.set()
        with contextlib.suppress(OSError, EOFError):
            self._conn.send(None)
        self._proc.join(20)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)
        self._conn.close()
