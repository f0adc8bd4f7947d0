"""The embedder in a process of its own, behind the same interface (``batch.embed_process``).

Why: on a GPU box the consumer's matcher, SQL writer and the embedder's host side (nvJPEG calls, tensor
bookkeeping per crop, kernel launches) all need one interpreter's GIL. Measured on an H100 in one process:
the embedding stage ran at ~2.9k crops/s beside the matcher against ~19k/s alone. A child process owns the
CUDA context and the model; the consumer sends it a batch's JPEG bytes (or decoded crops) through a pipe
and waits for the vectors with the GIL released, so the matcher keeps the interpreter to itself.

The child is started with ``spawn`` (CUDA cannot be forked), builds the embedder from the same config,
and answers one request at a time, in order. Errors come back by kind: a crop the model cannot take
raises :class:`~server.embed.preprocess.CropError` here as there (the consumer redoes that batch on its
CPU path); a dead child raises :class:`EmbedderProcessDied` and is started afresh on the next call.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import threading
from collections.abc import Sequence
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from server.embed.preprocess import CropError

log = logging.getLogger(__name__)

START_TIMEOUT_S = 600.0  # model load and CUDA initialisation on a cold box


class EmbedderProcessDied(RuntimeError):
    """The embedder's child process exited or stopped answering; the batch is redelivered."""


def _serve(conn: Connection, cfg: Any, assets: str | None) -> None:
    """Child: build the embedder, report its identity, then answer requests until the pipe closes."""
    from server.embed.base import build_embedder

    try:
        emb = build_embedder(cfg, assets=assets)
        conn.send(("ready", {"model_id": emb.model_id, "dim": emb.dim,
                             "decodes_jpegs": bool(getattr(emb, "decodes_jpegs", False))}))
    except Exception as exc:  # a bad config or weights: the parent raises it with the message
        conn.send(("error", (type(exc).__name__, str(exc))))
        return
    while True:
        try:
            op, payload = conn.recv()
        except (EOFError, OSError):
            return
        try:
            out = emb.embed_jpegs(payload) if op == "jpegs" else emb.embed(payload)  # type: ignore[attr-defined]
            conn.send(("ok", out))
        except CropError as exc:
            conn.send(("crop", str(exc)))
        except Exception as exc:
            conn.send(("error", (type(exc).__name__, str(exc))))


class RemoteEmbedder:
    """An :class:`~server.embed.base.Embedder` whose model runs in a child process (one call at a time)."""

    def __init__(self, cfg: Any, assets: str | None = None) -> None:
        self._cfg, self._assets = cfg, assets
        self._lock = threading.Lock()
        self._proc: Any = None
        self._conn: Connection | None = None
        info = self._start()
        self.model_id: str = info["model_id"]
        self.dim: int = info["dim"]
        self.decodes_jpegs: bool = info["decodes_jpegs"]

    def _start(self) -> dict[str, Any]:
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_serve, args=(child, self._cfg, self._assets), name="reidfleet-embedder",
                           daemon=True)
        proc.start()
        child.close()
        if not parent.poll(START_TIMEOUT_S):
            proc.kill()
            raise EmbedderProcessDied(f"embedder process did not start within {START_TIMEOUT_S:.0f} s")
        try:
            kind, payload = parent.recv()
        except (EOFError, OSError) as exc:
            raise EmbedderProcessDied(f"embedder process exited while starting (exit code {proc.exitcode})") from exc
        if kind != "ready":
            proc.join(5)
            raise RuntimeError(f"embedder process could not start: {payload[0]}: {payload[1]}")
        self._proc, self._conn = proc, parent
        log.info("embedder process ready", extra={"pid": proc.pid, **payload})
        return payload

    def _call(self, op: str, payload: Any) -> np.ndarray:
        with self._lock:
            if self._conn is None or not self._proc.is_alive():
                self._restart()
            assert self._conn is not None
            try:
                self._conn.send((op, payload))
                kind, out = self._conn.recv()  # blocks in C, GIL released
            except (EOFError, OSError) as exc:  # the child is gone (a payload that does not pickle is raised as is)
                code = self._proc.exitcode if self._proc is not None else None
                self._conn = None
                raise EmbedderProcessDied(f"embedder process died (exit code {code}): {exc}") from exc
        if kind == "ok":
            return out
        if kind == "crop":
            raise CropError(out)
        raise RuntimeError(f"embedder process failed: {out[0]}: {out[1]}")

    def _restart(self) -> None:
        log.warning("embedder process gone, starting a new one",
                    extra={"exit_code": self._proc.exitcode if self._proc is not None else None})
        self.close()
        self._start()

    def embed(self, crops_bgr: Sequence[np.ndarray]) -> np.ndarray:
        if not len(crops_bgr):
            return np.zeros((0, self.dim), np.float32)
        return self._call("crops", list(crops_bgr))

    def embed_jpegs(self, jpegs: Sequence[bytes]) -> np.ndarray:
        if not len(jpegs):
            return np.zeros((0, self.dim), np.float32)
        return self._call("jpegs", list(jpegs))

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._proc is not None:
            self._proc.join(10)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join(5)
            self._proc = None
