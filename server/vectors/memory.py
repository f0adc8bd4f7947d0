"""Exact in-memory search over prototypes with numpy, alone or as a write-through cache over Qdrant.

Why: Qdrant local mode searches by brute force in Python and takes 0.5-3 s per query at 100k points
(DESIGN.md); one float32 matrix-vector product over the same 100k x 512 matrix takes a few ms. The
cache loads every point once at start, serves every search, and writes each change through to the
backing store, which stays the durable copy (and the shared one when several consumers run against
a Qdrant server without the cache).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from server.vectors.base import Neighbour, Prototype, VectorStore


def single_thread_blas() -> None:
    """One BLAS thread for this process: a single-query matrix-vector product gains little from threads
    but, on a busy box, waits for them; measured on 2 shared cores at 20k x 256: p95 12 ms with the
    default OpenBLAS threads, 3 ms with one. The embedders run their own thread pools, not BLAS."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - optional speed-up
        return
    threadpool_limits(1, user_api="blas")


class MemoryVectorStore:
    """Rows in a growable float32 matrix; deletes swap the last row into the hole (O(1))."""

    def __init__(self, cfg: Any = None, *, dim: int, model_id: str = "", capacity: int = 1024) -> None:
        single_thread_blas()
        self.dim = dim
        self._mat = np.zeros((capacity, dim), dtype=np.float32)
        self._n = 0
        self._row_of: dict[str, int] = {}
        self._point_ids: list[str] = []
        self._gids: list[str] = []
        self._payloads: list[dict[str, Any]] = []

    def _grow(self) -> None:
        bigger = np.zeros((max(1024, 2 * len(self._mat)), self.dim), dtype=np.float32)
        bigger[: self._n] = self._mat[: self._n]
        self._mat = bigger

    def upsert(self, protos: Sequence[Prototype]) -> None:
        for p in protos:
            vec = np.asarray(p.vector, dtype=np.float32).reshape(-1)
            if vec.shape[0] != self.dim:
                raise ValueError(f"prototype {p.point_id}: dim {vec.shape[0]} != store dim {self.dim}")
            row = self._row_of.get(p.point_id)
            if row is None:
                if self._n == len(self._mat):
                    self._grow()
                row = self._n
                self._n += 1
                self._row_of[p.point_id] = row
                self._point_ids.append(p.point_id)
                self._gids.append(p.global_id)
                self._payloads.append(dict(p.payload))
            else:
                self._gids[row] = p.global_id
                self._payloads[row] = dict(p.payload)
            self._mat[row] = vec

    def search(self, query: np.ndarray, limit: int, bank_size: int) -> list[Neighbour]:
        if self._n == 0:
            return []
        sims = self._mat[: self._n] @ np.asarray(query, dtype=np.float32).reshape(-1)
        k = min(self._n, max(1, limit * bank_size))
        top = np.argpartition(-sims, k - 1)[:k] if k < self._n else np.arange(self._n)
        top = top[np.argsort(-sims[top], kind="stable")]
        out: list[Neighbour] = []
        seen: set[str] = set()
        for row in top.tolist():
            gid = self._gids[row]
            if gid in seen:
                continue
            seen.add(gid)
            out.append(Neighbour(gid, self._point_ids[row], float(sims[row])))
            if len(out) == limit:
                break
        return out

    def _remove_row(self, row: int) -> None:
        last = self._n - 1
        pid = self._point_ids[row]
        if row != last:
            self._mat[row] = self._mat[last]
            self._point_ids[row] = self._point_ids[last]
            self._gids[row] = self._gids[last]
            self._payloads[row] = self._payloads[last]
            self._row_of[self._point_ids[row]] = row
        self._point_ids.pop()
        self._gids.pop()
        self._payloads.pop()
        del self._row_of[pid]
        self._n -= 1

    def delete_points(self, point_ids: Sequence[str]) -> None:
        for pid in point_ids:
            row = self._row_of.get(pid)
            if row is not None:
                self._remove_row(row)

    def point_ids_of(self, global_ids: Sequence[str]) -> list[str]:
        doomed = set(global_ids)
        return [pid for pid, gid in zip(self._point_ids, self._gids, strict=True) if gid in doomed]

    def delete_identities(self, global_ids: Sequence[str]) -> None:
        self.delete_points(self.point_ids_of(global_ids))

    def retrieve(self, point_ids: Sequence[str]) -> dict[str, Prototype]:
        out = {}
        for pid in point_ids:
            row = self._row_of.get(pid)
            if row is not None:
                out[pid] = Prototype(pid, self._gids[row], self._mat[row].copy(), dict(self._payloads[row]))
        return out

    def scroll(self) -> Iterator[Prototype]:
        for row in range(self._n):
            yield Prototype(self._point_ids[row], self._gids[row], self._mat[row].copy(), dict(self._payloads[row]))

    def count(self) -> int:
        return self._n

    def flush(self) -> None:
        return None

    def close(self) -> None:
        return None


class CachedVectorStore:
    """Searches in memory; changes reach ``inner`` (the durable store) in one go at :meth:`flush`.

    The consumer flushes once per batch, before the analytics transaction commits and before offsets
    are stored, so a crash loses nothing that redelivery would not rewrite; one upsert call per batch
    instead of one per crop keeps Qdrant local mode's slow writes (~10 ms each) off the per-crop path.
    """

    def __init__(self, inner: VectorStore) -> None:
        self.inner = inner
        self.dim = inner.dim
        self.mem = MemoryVectorStore(dim=inner.dim, capacity=max(1024, inner.count() + 1024))
        self._pending: dict[str, Prototype | None] = {}  # point id -> final state (None = delete)
        batch: list[Prototype] = []
        for p in inner.scroll():
            batch.append(p)
            if len(batch) >= 4096:
                self.mem.upsert(batch)
                batch = []
        self.mem.upsert(batch)

    def upsert(self, protos: Sequence[Prototype]) -> None:
        self.mem.upsert(protos)
        for p in protos:
            self._pending[p.point_id] = p

    def search(self, query: np.ndarray, limit: int, bank_size: int) -> list[Neighbour]:
        return self.mem.search(query, limit, bank_size)

    def delete_points(self, point_ids: Sequence[str]) -> None:
        self.mem.delete_points(point_ids)
        for pid in point_ids:
            self._pending[pid] = None

    def delete_identities(self, global_ids: Sequence[str]) -> None:
        pids = self.mem.point_ids_of(global_ids)
        self.mem.delete_points(pids)
        for pid in pids:
            self._pending[pid] = None
        # Points written before this process started are in inner only by id; delete by identity too.
        self.inner.delete_identities(global_ids)

    def flush(self) -> None:
        if not self._pending:
            return
        deletes = [pid for pid, p in self._pending.items() if p is None]
        upserts = [p for p in self._pending.values() if p is not None]
        self.inner.delete_points(deletes)
        self.inner.upsert(upserts)
        self._pending.clear()

    def retrieve(self, point_ids: Sequence[str]) -> dict[str, Prototype]:
        return self.mem.retrieve(point_ids)

    def scroll(self) -> Iterator[Prototype]:
        return self.mem.scroll()

    def count(self) -> int:
        return self.mem.count()

    def close(self) -> None:
        self.flush()
        self.inner.close()
