"""The Qdrant mirror behind the in-memory gallery (server/vectors/memory.py): a writer thread, or that thread
in a child process of its own (``vectors.<type>.mirror_process``, the default).

Why a process: qdrant-client's local mode is pure Python (point structs, its own pickling, a SQLite commit
per chunk), and so is much of the client's server path. In the consumer's process the mirror thread took
the GIL from the matcher at every chunk: on an H200 box the whole consumer ran at 7.3k crops/s with the
thread against 8.3k/s with no mirror at all (one run, same stream). The child owns the Qdrant client; the
consumer only pickles each committed batch's changes into a pipe.

Either way the contract is the same: changes arrive only after the SQL transaction holding them committed
(the mirror may lag, never lead), changes to one point collapse, and the queue is bounded (the consumer
waits once the mirror is ``max_pending`` points behind instead of growing memory without end).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import multiprocessing as mp
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from common.service import set_os_name
from server.vectors.base import Prototype, VectorStore

log = logging.getLogger(__name__)

START_TIMEOUT_S = 120.0
_OUTBOX = 8  # batches of changes queued for the sender thread before submit waits


class MirrorDied(RuntimeError):
    """The mirror's child process is gone: changes it had queued may be lost, so the consumer starts afresh
    (a new consumer reconciles Qdrant with the SQL copy at start, see :class:`CachedVectorStore`)."""


def pid_rev(p: Prototype) -> Any:
    return p.payload.get("rev", -2)


class QdrantMirror(threading.Thread):
    """One writer thread that applies coalesced prototype changes to Qdrant in chunks.

    Changes to the same point collapse (a track's NEW and IMPROVED prototypes become one write). The
    queue is bounded: past ``max_pending`` points, :meth:`submit` blocks, which slows the consumer to
    Qdrant's write speed instead of growing memory without end. A failed write is retried (older
    state never overwrites a newer one queued meanwhile). ``on_progress`` (if given) is called with the
    lag after every chunk."""

    def __init__(self, inner: VectorStore, *, max_pending: int = 50_000, chunk: int = 256,
                 on_progress: Callable[[QdrantMirror], None] | None = None) -> None:
        super().__init__(name="vector-mirror", daemon=True)
        self.inner = inner
        self.max_pending = max_pending
        self.chunk = chunk
        self.on_progress = on_progress
        self._pending: dict[str, Prototype | None] = {}
        self._cv = threading.Condition()
        self._closing = False
        self._busy = 0
        self.written = 0
        self.errors = 0

    def submit(self, changes: dict[str, Prototype | None]) -> None:
        with self._cv:
            self._pending.update(changes)
            self._cv.notify_all()
            while len(self._pending) > self.max_pending and not self._closing and self.is_alive():
                self._cv.wait(0.5)

    def lag(self) -> int:
        with self._cv:
            return len(self._pending) + self._busy

    def run(self) -> None:
        while True:
            with self._cv:
                while not self._pending and not self._closing:
                    self._cv.wait(1.0)
                if self._closing:  # close() drained what it could; the rest is reconciled at the next start
                    return
                keys = list(itertools.islice(self._pending, self.chunk))
                work = {k: self._pending.pop(k) for k in keys}
                self._busy = len(work)
            try:
                deletes = [pid for pid, p in work.items() if p is None]
                self.inner.delete_points(deletes)
                self.inner.upsert([p for p in work.values() if p is not None])
                self.written += len(work)
            except Exception as exc:  # keep the mirror alive: SQL holds the truth, the write is retried
                self.errors += 1
                log.warning("vector mirror write failed, retrying: %s", exc)
                with self._cv:
                    for k, v in work.items():
                        self._pending.setdefault(k, v)  # a newer state queued meanwhile wins
                if self._closing:
                    return
                time.sleep(min(5.0, 0.2 * self.errors))
            finally:
                with self._cv:  # an RLock: on_progress may read lag(); a drain wakes only after it ran
                    self._busy = 0
                    if self.on_progress is not None:
                        self.on_progress(self)
                    self._cv.notify_all()

    def drain(self, timeout_s: float) -> bool:
        """Wait until every submitted change is in Qdrant (tests, shutdown)."""
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while (self._pending or self._busy) and time.monotonic() < deadline and self.is_alive():
                self._cv.wait(0.1)
            return not (self._pending or self._busy)

    def close(self, timeout_s: float) -> None:
        if not self.drain(timeout_s):
            log.warning("vector mirror not drained at close; it is rebuilt from SQL at the next start",
                        extra={"points": self.lag()})
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        self.join(timeout_s)


# Shared counters of a mirror process (one int64 array, written by the child, read by the consumer).
_RECEIVED, _LAG, _WRITTEN, _ERRORS = range(4)


Columns = tuple[list[str], list[str], list[str], np.ndarray, list[dict[str, Any]]]


def _to_columns(changes: dict[str, Prototype | None], dim: int) -> Columns:
    """A batch's changes as (deleted ids, ids, identities, one vector matrix, payloads). Why: pickling a
    thousand Prototypes, each with its own small array, cost the consumer ~5.5 ms a batch here against ~1 ms
    for the columns (the H200 box's hand-off grew by ~0.3 s per 60k crops the first way)."""
    deleted = [pid for pid, p in changes.items() if p is None]
    live = [p for p in changes.values() if p is not None]
    vectors = np.stack([np.asarray(p.vector, dtype=np.float32) for p in live]) if live else \
        np.zeros((0, dim), np.float32)
    return deleted, [p.point_id for p in live], [p.global_id for p in live], vectors, [p.payload for p in live]


def _from_columns(cols: Columns) -> dict[str, Prototype | None]:
    deleted, ids, gids, vectors, payloads = cols
    out: dict[str, Prototype | None] = dict.fromkeys(deleted)
    for i, (pid, gid, payload) in enumerate(zip(ids, gids, payloads, strict=True)):
        out[pid] = Prototype(pid, gid, vectors[i], payload)
    return out


def _serve(conn: Connection, cfg: Any, dim: int, model_id: str, max_pending: int, counters: Any,
           log_level: int) -> None:
    """Child: open the Qdrant store, report what it holds, then mirror submitted changes until told to close
    (or until the consumer is gone: then what is queued gets a few seconds to be written)."""
    from common.logs import setup_logging
    from server.vectors.qdrant import QdrantVectorStore

    set_os_name("reid-mirror")
    # A Ctrl-C reaches the whole process group: the consumer handles it and closes this process after a
    # drain, so the mirror does not die mid-queue (it still exits on SIGTERM, on "close" or when the pipe ends).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    setup_logging("reidfleet-server-mirror", logging.getLevelName(log_level))
    try:
        inner = QdrantVectorStore(cfg, dim=dim, model_id=model_id)
        revisions = inner.revisions()
    except Exception as exc:  # a bad URL, a locked folder, a collection of another size: the consumer raises it
        conn.send(("error", type(exc).__name__, str(exc)))
        return

    def progress(m: QdrantMirror) -> None:
        counters[_LAG], counters[_WRITTEN], counters[_ERRORS] = m.lag(), m.written, m.errors

    mirror = QdrantMirror(inner, max_pending=max_pending, on_progress=progress)
    conn.send(("ready", {"dim": inner.dim, "revisions": revisions}))
    try:
        while True:
            try:
                op, arg = conn.recv()
            except (EOFError, OSError):
                op, arg = "close", 10.0  # the consumer died: write what is queued, briefly
            if op == "scroll":  # only before the first change (the writer thread is not running yet)
                conn.send(list(inner.scroll()))
                continue
            if not mirror.is_alive() and op in ("submit", "drain"):
                mirror.start()
            if op == "submit":
                changes = _from_columns(arg)
                mirror.submit(changes)
                counters[_RECEIVED] += len(changes)
                counters[_LAG] = mirror.lag()
            elif op == "drain":
                conn.send(mirror.drain(arg) if mirror.is_alive() else True)
            elif op == "close":
                if mirror.is_alive():
                    mirror.close(arg)  # logs what it could not write in time
                with contextlib.suppress(OSError, EOFError):
                    conn.send(True)
                return
    finally:
        inner.close()


class MirrorProcess:
    """:class:`QdrantMirror` in a child process, with the calls :class:`CachedVectorStore` makes of a mirror and
    of the Qdrant store behind it (``dim``, ``revisions``, ``count``, ``scroll``). Calls may come from several
    threads (the consumer's and a benchmark's drain): one pipe, one lock for requests.

    Changes go through a sender thread, in order: :meth:`submit` only queues them (up to ``_OUTBOX`` batches
    before it waits). Why: a batch's changes are ~2 MB and the pipe holds far less, so a direct send waits
    until the child has read them all, and the child reads between its own Qdrant writes (its interpreter
    is busy with them). On the H200 the consumer's hand-off grew by ~0.2 s per 60k crops when the mirror
    moved here with direct sends; the sender thread came after the last GPU run, so its effect there is not
    measured (on this 2-core box the hand-off is within noise either way)."""

    def __init__(self, cfg: Any, *, dim: int, model_id: str, max_pending: int = 50_000) -> None:
        ctx = mp.get_context("spawn")
        self._counters = ctx.Array("q", 4, lock=False)
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, name="reidfleet-vector-mirror", daemon=True, args=(
            child, cfg, dim, model_id, max_pending, self._counters,
            logging.getLogger().getEffectiveLevel()))
        self._proc.start()
        child.close()
        self._lock = threading.Lock()
        self._sent = 0
        self._closed = False
        if not self._conn.poll(START_TIMEOUT_S):
            self._proc.kill()
            raise RuntimeError(f"vector mirror process did not start within {START_TIMEOUT_S:.0f} s")
        try:
            msg = self._conn.recv()
        except (EOFError, OSError) as exc:
            raise RuntimeError(f"vector mirror process exited while starting (exit code {self._proc.exitcode})"
                               ) from exc
        if msg[0] != "ready":
            self._proc.join(5)
            raise ValueError(f"vector store could not open: {msg[1]}: {msg[2]}")
        self.dim: int = msg[1]["dim"]
        self._revisions: dict[str, Any] = msg[1]["revisions"]
        self._outbox: queue.Queue[tuple[str, Any] | None] = queue.Queue(maxsize=_OUTBOX)
        self._send_error: BaseException | None = None
        self._sender = threading.Thread(target=self._send_loop, name="vector-mirror-send", daemon=True)
        self._sender.start()
        log.info("vector mirror process ready", extra={"pid": self._proc.pid, "points": len(self._revisions)})

    def _send_loop(self) -> None:
        set_os_name("reid-mirror-tx")
        while True:
            item = self._outbox.get()
            try:
                if item is None:
                    return
                if self._send_error is None:
                    op, arg = item
                    self._conn.send((op, _to_columns(arg, self.dim)) if op == "submit" else item)
            except (OSError, EOFError) as exc:  # the child is gone: the next submit or request raises
                self._send_error = exc
            finally:
                self._outbox.task_done()

    def _gone(self) -> MirrorDied | None:
        if self._send_error is not None or not self._proc.is_alive():
            return MirrorDied(f"vector mirror process gone (exit code {self._proc.exitcode})"
                              + (f": {self._send_error}" if self._send_error is not None else ""))
        return None

    # --- the Qdrant side, as read at start ------------------------------------------------------------
    def revisions(self) -> dict[str, Any]:
        """point id -> ``rev`` of what Qdrant held when the process started (before any change was sent)."""
        return self._revisions

    def count(self) -> int:
        return len(self._revisions)

    def scroll(self) -> Iterator[Prototype]:
        """Every point Qdrant holds; only before the first :meth:`submit` (a legacy gallery's import)."""
        return iter(self._ask(("scroll", None), START_TIMEOUT_S))

    # --- the mirror -------------------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self._proc.pid

    @property
    def written(self) -> int:
        return int(self._counters[_WRITTEN])

    @property
    def errors(self) -> int:
        return int(self._counters[_ERRORS])

    def is_alive(self) -> bool:
        return self._proc.is_alive()

    def submit(self, changes: dict[str, Prototype | None]) -> None:
        """Queue committed changes (the caller must not change the dict afterwards); waits while ``_OUTBOX``
        batches are queued, or (the pipe full) while the mirror is ``max_pending`` behind."""
        if not changes:
            return
        if (dead := self._gone()) is not None:
            raise dead
        self._outbox.put(("submit", changes))
        self._sent += len(changes)

    def lag(self) -> int:
        """Points not yet in Qdrant: in the pipe, queued or being written."""
        c = self._counters
        return max(0, self._sent - int(c[_RECEIVED])) + int(c[_LAG])

    def drain(self, timeout_s: float) -> bool:
        """Wait until every submitted change is in Qdrant (tests, benchmarks)."""
        try:
            return bool(self._ask(("drain", timeout_s), timeout_s + 10))
        except MirrorDied:
            return False

    def _ask(self, request: tuple[str, Any], timeout_s: float) -> Any:
        """Send a request after everything queued before it, and wait for its answer."""
        with self._lock:
            if self._send_error is None:
                self._outbox.put(request)
                self._outbox.join()
            if (dead := self._gone()) is not None and not self._conn.poll(0):
                raise dead
            try:
                if not self._conn.poll(timeout_s):
                    raise MirrorDied(f"vector mirror process did not answer {request[0]!r} in {timeout_s:.0f} s")
                return self._conn.recv()
            except (OSError, EOFError) as exc:
                raise MirrorDied(f"vector mirror process gone (exit code {self._proc.exitcode}): {exc}") from exc

    def close(self, timeout_s: float) -> None:
        """Drain for up to ``timeout_s``, then stop; what is left is reconciled from SQL at the next start."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(MirrorDied):
            self._ask(("close", timeout_s), timeout_s + 10)
        self._outbox.put(None)
        self._sender.join(10)
        self._proc.join(10)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)
        self._conn.close()
