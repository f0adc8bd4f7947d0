"""The embedder in a process of its own, behind the same interface (``batch.embed_process``).

Why: on a GPU box the consumer's matcher, SQL writer and the embedder's host side (nvJPEG calls, tensor
bookkeeping per crop, kernel launches) all need one interpreter's GIL. Measured on an H100 in one process:
the embedding stage ran at ~2.9k crops/s beside the matcher against ~19k/s alone. A child process owns the
CUDA context and the model; the consumer sends it a batch's JPEG bytes (or decoded crops) through a pipe
and waits for the vectors with the GIL released, so the matcher keeps the interpreter to itself.

With ``batch.remote_intake`` the children take the raw edge-frame messages instead of crops and decode, check
and embed them (:func:`server.intake.intake`), so the consumer's interpreter does not decode Avro either.

The child is started with ``spawn`` (CUDA cannot be forked), builds the embedder from the same config,
and answers one request at a time, in order. Errors come back by kind: a crop the model cannot take
raises :class:`~server.embed.preprocess.CropError` here as there (the consumer redoes that batch on its
CPU path); a dead child raises :class:`EmbedderProcessDied` and is started afresh on the next call.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import pickle
import re
import socket
import struct
import threading
from collections.abc import Iterable, Sequence
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from schemas.codec import AvroCodec
from server.embed.preprocess import CropError
from server.intake import IntakeBatch, NonFiniteEmbedding, intake

log = logging.getLogger(__name__)

START_TIMEOUT_S = 600.0  # model load and CUDA initialisation on a cold box


class EmbedderProcessDied(RuntimeError):
    """The embedder's child process exited or stopped answering; the batch is redelivered."""


def _serve(conn: Connection, cfg: Any, assets: str | None) -> None:
    """Child: build the embedder, report its identity, then answer requests until the pipe closes."""
    from common.service import set_os_name
    from server.embed.base import build_embedder

    set_os_name(mp.current_process().name.replace("reidfleet-embedder", "reid-embed"))

    try:
        emb = build_embedder(cfg, assets=assets)
        conn.send(("ready", {"model_id": emb.model_id, "dim": emb.dim,
                             "decodes_jpegs": bool(getattr(emb, "decodes_jpegs", False))}))
    except Exception as exc:  # a bad config or weights: the parent raises it with the message
        conn.send(("error", (type(exc).__name__, str(exc))))
        return
    codec: AvroCodec | None = None
    while True:
        try:
            op, payload, extra = conn.recv()
        except (EOFError, OSError):
            return
        try:
            if op == "intake":
                codec = codec or AvroCodec("edge_frame")
                out = intake(emb, codec, payload, *extra)
            else:
                out = emb.embed_jpegs(payload) if op == "jpegs" else emb.embed(payload)  # type: ignore[attr-defined]
            conn.send(("ok", out))
        except NonFiniteEmbedding as exc:
            conn.send(("nonfinite", str(exc)))
        except CropError as exc:
            conn.send(("crop", str(exc)))
        except Exception as exc:
            conn.send(("error", (type(exc).__name__, str(exc))))


_CROP_INDEX = re.compile(r"^crop (\d+)")
MIN_PART = 256  # crops per worker below which a batch is not split (a part's fixed cost is ~1 ms)
MIN_INTAKE_PART = 64  # messages per worker below which an intake batch is not split


class _Worker:
    """One child process and its pipe."""

    def __init__(self, cfg: Any, assets: str | None, index: int) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, cfg, assets), name=f"reidfleet-embedder-{index}",
                                daemon=True)
        self.proc.start()
        child.close()
        # The same socket as ``conn`` (a duplicate descriptor), for :meth:`recv`; None where the pipe is no socket.
        self._sock: socket.socket | None = None
        if hasattr(socket, "MSG_WAITALL") and hasattr(socket, "AF_UNIX"):
            try:
                self._sock = socket.fromfd(self.conn.fileno(), socket.AF_UNIX, socket.SOCK_STREAM)
            except OSError:
                self._sock = None

    def ready(self) -> dict[str, Any]:
        """Wait for the child's model to load: its identity, or raise why it could not start."""
        if not self.conn.poll(START_TIMEOUT_S):
            self.proc.kill()
            raise EmbedderProcessDied(f"embedder process did not start within {START_TIMEOUT_S:.0f} s")
        try:
            kind, payload = self.conn.recv()
        except (EOFError, OSError) as exc:
            raise EmbedderProcessDied(
                f"embedder process exited while starting (exit code {self.proc.exitcode})") from exc
        if kind != "ready":
            self.proc.join(5)
            raise RuntimeError(f"embedder process could not start: {payload[0]}: {payload[1]}")
        log.info("embedder process ready", extra={"pid": self.proc.pid, **payload})
        return payload

    def send(self, msg: Any) -> None:
        """``Connection.send`` in one system call: its framing (the child reads it with ``Connection.recv``) and
        the pickled body go out together (``sendmsg``, no copy). Why: ``Connection.send`` writes the header and
        the body separately for a large message, and each blocking write hands the GIL to the matcher's thread,
        which keeps it up to the switch interval before this thread gets it back."""
        if self._sock is None:
            self.conn.send(msg)
            return
        body = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
        n = len(body)
        header = struct.pack("!i", n) if n <= 0x7FFFFFFF else struct.pack("!iQ", -1, n)
        bufs = [memoryview(header), memoryview(body)]
        while bufs:
            sent = self._sock.sendmsg(bufs)  # a blocking stream socket takes it all unless a signal interrupts
            while sent and bufs:
                if sent >= len(bufs[0]):
                    sent -= len(bufs.pop(0))
                else:
                    bufs[0], sent = bufs[0][sent:], 0

    def recv(self) -> Any:
        """The child's next answer, as ``Connection.recv`` reads it, but its body in one blocking read.

        Why: ``Connection.recv`` reads a large message a socket buffer at a time (~200 KB), and each read gives the
        GIL away and waits to get it back while the matcher's thread holds it (up to the 5 ms switch interval). A
        batch's answer (its vectors and records, ~2 MB a worker) then took ~55 ms to come in beside a busy thread
        against ~4 ms alone; read with ``MSG_WAITALL`` it takes ~12 ms beside it (~1 ms alone)."""
        if self._sock is None:
            return self.conn.recv()
        size = struct.unpack("!i", self._read(4))[0]
        if size == -1:  # Connection's framing of a message over 2 GiB
            size = struct.unpack("!Q", self._read(8))[0]
        return pickle.loads(self._read(size))

    def _read(self, n: int) -> bytearray:
        buf = bytearray(n)
        view, got = memoryview(buf), 0
        while got < n:
            k = self._sock.recv_into(view[got:], n - got, socket.MSG_WAITALL)  # type: ignore[union-attr]
            if k == 0:
                raise EOFError("embedder process closed its pipe")
            got += k
        return buf

    def alive(self) -> bool:
        return self.proc.is_alive()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
        self.conn.close()
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)


class RemoteEmbedder:
    """An :class:`~server.embed.base.Embedder` whose model runs in ``workers`` child processes.

    With several workers a large batch is cut into contiguous parts, one per worker, embedded at the same time
    and put back in order. Why: each worker's nvJPEG batch decode does its entropy decoding on one CPU thread
    (measured on an H200: ~11k crops/s for decode + network in one process against ~28k/s for the network on
    decoded crops), so more workers decode in parallel on the box's other cores; the GPU runs their kernels
    side by side. Calls are still one at a time."""

    def __init__(self, cfg: Any, assets: str | None = None, workers: int = 1, min_part: int = MIN_PART) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self._cfg, self._assets, self._min_part = cfg, assets, max(1, min_part)
        self._lock = threading.Lock()
        self._workers: list[_Worker | None] = [None] * workers
        info = self._start_all(range(workers))
        self.model_id: str = info["model_id"]
        self.dim: int = info["dim"]
        self.decodes_jpegs: bool = info["decodes_jpegs"]

    def _start_all(self, slots: Iterable[int]) -> dict[str, Any]:
        """Start workers in these slots at once (their model loads overlap), then wait for each."""
        started = {i: _Worker(self._cfg, self._assets, i) for i in slots}
        info: dict[str, Any] = {}
        try:
            for i, w in started.items():
                info = w.ready()
                self._workers[i] = w
        except BaseException:
            for w in started.values():
                w.proc.kill()
            raise
        return info

    def _call(self, op: str, payload: Sequence[Any], extra: Any = None, min_part: int | None = None) -> list[Any]:
        """Each worker's answer for its contiguous part of ``payload``, in order."""
        with self._lock:
            dead = [i for i, w in enumerate(self._workers) if w is None or not w.alive()]
            if dead:
                self._restart(dead)
            n_parts = max(1, min(len(self._workers), len(payload) // (min_part or self._min_part)))
            bounds = [len(payload) * k // n_parts for k in range(n_parts + 1)]
            used = self._workers[:n_parts]
            sent = []
            for w, lo, hi in zip(used, bounds, bounds[1:], strict=False):
                assert w is not None
                try:
                    w.send((op, list(payload[lo:hi]), extra))
                    sent.append((w, lo))
                except (EOFError, OSError) as exc:
                    self._died(w, exc, sent)
            replies = []
            for w, lo in sent:  # every sent part is answered before anything is raised: the pipes stay in step
                try:
                    replies.append((w.recv(), lo))  # blocks in C, GIL released
                except (EOFError, OSError) as exc:  # the child is gone (a payload that does not pickle raises as is)
                    self._died(w, exc, sent[len(replies) + 1:])
        out: list[Any] = []
        for (kind, res), lo in replies:
            if kind == "nonfinite":
                raise NonFiniteEmbedding(res)
            if kind == "crop":
                raise CropError(_CROP_INDEX.sub(lambda m, lo=lo: f"crop {int(m.group(1)) + lo}", res))
            if kind != "ok":
                raise RuntimeError(f"embedder process failed: {res[0]}: {res[1]}")
            out.append(res)
        return out

    def _vectors(self, op: str, payload: Sequence[Any]) -> np.ndarray:
        out = self._call(op, payload)
        return out[0] if len(out) == 1 else np.concatenate(out)

    def _died(self, w: _Worker, exc: BaseException, others: Sequence[tuple[_Worker, int]]) -> None:
        """A worker is gone mid-call: drain the other workers' answers, then fail this batch (redelivered)."""
        for other, _lo in others:
            if other is not w:
                with contextlib.suppress(EOFError, OSError):
                    other.recv()
        i = self._workers.index(w)
        self._workers[i] = None
        code = w.proc.exitcode
        w.close()
        raise EmbedderProcessDied(f"embedder process died (exit code {code}): {exc}") from exc

    def _restart(self, slots: list[int]) -> None:
        for i in slots:
            w = self._workers[i]
            log.warning("embedder process gone, starting a new one",
                        extra={"exit_code": w.proc.exitcode if w is not None else None, "worker": i})
            if w is not None:
                w.close()
            self._workers[i] = None
        self._start_all(slots)

    def embed(self, crops_bgr: Sequence[np.ndarray]) -> np.ndarray:
        if not len(crops_bgr):
            return np.zeros((0, self.dim), np.float32)
        return self._vectors("crops", crops_bgr)

    def embed_jpegs(self, jpegs: Sequence[bytes]) -> np.ndarray:
        if not len(jpegs):
            return np.zeros((0, self.dim), np.float32)
        return self._vectors("jpegs", jpegs)

    def intake(self, values: Sequence[bytes | None], validation: Any, min_quality: float) -> IntakeBatch:
        """Raw edge-frame messages decoded, checked and their crops embedded in the workers
        (:func:`server.intake.intake`), a contiguous part each; the parts' answers in message order."""
        if not len(values):
            return IntakeBatch.join([], self.dim)
        return IntakeBatch.join(self._call("intake", values, (validation, min_quality), MIN_INTAKE_PART), self.dim)

    @property
    def pid(self) -> int | None:
        """The first worker's process id (None once closed)."""
        w = self._workers[0] if self._workers else None
        return w.proc.pid if w is not None else None

    @property
    def pids(self) -> list[int | None]:
        return [w.proc.pid if w is not None else None for w in self._workers]

    def close(self) -> None:
        for i, w in enumerate(self._workers):
            if w is not None:
                w.close()
                self._workers[i] = None
