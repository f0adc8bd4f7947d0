"""Exact in-memory search over prototypes with numpy, alone or as a write-through cache over Qdrant.

Why: Qdrant local mode searches by brute force in Python and takes 0.5-3 s per query at 100k points
(DESIGN.md); one float32 matrix-vector product over the same 100k x 512 matrix takes a few ms. The
cache loads every point once at start, serves every search, and writes each change through to the
backing store, which stays the durable copy (and the shared one when several consumers run against
a Qdrant server without the cache).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from server.vectors.base import Hit, Neighbour, Prototype, VectorStore, best_per_identity
from server.vectors.mirror import MirrorDied, MirrorProcess, QdrantMirror, pid_rev

log = logging.getLogger(__name__)


def single_thread_blas() -> None:
    """One BLAS thread for this process: a single-query matrix-vector product gains little from threads
    but, on a busy box, waits for them; measured on 2 shared cores at 20k x 256: p95 12 ms with the
    default OpenBLAS threads, 3 ms with one. The embedders run their own thread pools, not BLAS."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - optional speed-up
        return
    threadpool_limits(1, user_api="blas")


_SIMS_CHUNK_FLOATS = 1 << 23  # 32 MB of float32 similarities per chunk of a batched search
_blas_ctl: Any = None


_MADDS_PER_BLAS_THREAD = 1 << 28  # a GEMM gets one BLAS thread per this many multiply-adds (~25-50 ms on one core)


def blas_threads_for(madds: int, cpus: int) -> int:
    """BLAS threads worth waking for a product of ``madds`` multiply-adds: one per 2^28, at most ``cpus``.
    Why not every core: OpenBLAS's threads spin for a while after each product before they sleep, so on a box
    whose other cores run the embedder workers, the broker and the commit and mirror processes, a small product
    on 16 threads wakes 15 spinning threads beside them for little gain (not yet measured on a GPU box: see
    docs/server.md, session 13). The bench gallery's product (~2,000 x ~560 x 512, 0.6 G) gets 2 threads; a
    100k-prototype gallery still gets every core."""
    return max(1, min(cpus, madds // _MADDS_PER_BLAS_THREAD))


@contextlib.contextmanager
def _blas_threads(n_queries: int, n_rows: int, dim: int) -> Iterator[None]:
    """The threads :func:`blas_threads_for` gives a batched search of ``n_queries`` against ``n_rows``; one
    thread otherwise (see :func:`single_thread_blas`)."""
    global _blas_ctl
    from common.service import allowed_cpus

    threads = blas_threads_for(n_queries * n_rows * dim, allowed_cpus())
    if threads <= 1:
        yield
        return
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # pragma: no cover - optional speed-up
        yield
        return
    if _blas_ctl is None:
        _blas_ctl = ThreadpoolController()
    with _blas_ctl.limit(limits=threads, user_api="blas"):
        yield


class _LazyHits(Sequence[Hit]):
    """One query's :meth:`MemoryVectorStore.search_many` answer, read off its sorted best rows as it is iterated:
    each identity once (its best row), best first, at most ``limit``, none below ``floor``. The first rows
    (``rows``) are sorted up front; if they run out before ``limit`` identities, the query's best ``k`` rows are
    sorted from its similarity row (``sims``) and the walk goes on over them, skipping identities given already.
    Compares equal to the list it stands for."""

    __slots__ = ("_all", "_floor", "_gids", "_k", "_limit", "_pids", "_rows", "_scores", "_sims")

    def __init__(self, rows: np.ndarray, scores: np.ndarray, sims: np.ndarray | None, k: int, limit: int,
                 floor: float, gids: list[str], pids: list[str]) -> None:
        self._rows, self._scores, self._sims, self._k = rows, scores, sims, k
        self._limit, self._floor, self._gids, self._pids = limit, floor, gids, pids
        self._all: list[Hit] | None = None

    def __iter__(self) -> Iterator[Hit]:
        if self._all is not None:
            yield from self._all
            return
        seen: set[str] = set()
        gids, pids, floor, limit = self._gids, self._pids, self._floor, self._limit
        for rows, scores in self._tiers():
            for r, s in zip(rows, scores, strict=True):
                if s < floor:
                    return
                g = gids[r]
                if g in seen:  # a row of an identity given already (the second tier repeats the first's rows)
                    continue
                seen.add(g)
                yield g, pids[r], s
                if len(seen) >= limit:
                    return

    def _tiers(self) -> Iterator[tuple[list[int], list[float]]]:
        yield self._rows.tolist(), self._scores.tolist()
        row = self._sims
        if row is not None:  # only reached when the first rows held fewer than ``limit`` identities
            k = self._k
            idx = np.argpartition(-row, k - 1)[:k] if k < len(row) else np.arange(len(row))
            idx = idx[np.argsort(-row[idx], kind="stable")]
            yield idx.tolist(), row[idx].tolist()

    def _list(self) -> list[Hit]:
        if self._all is None:
            self._all = list(iter(self))
        return self._all

    def __len__(self) -> int:
        return len(self._list())

    def __getitem__(self, i: Any) -> Any:
        return self._list()[i]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and self._list() == list(other)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return repr(self._list())


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
        # Each row's identity as a small int (codes are never reused while the store lives), so a batched
        # search keeps the best row per identity with numpy instead of a Python loop over every candidate.
        self._code = np.zeros(capacity, dtype=np.int64)
        self._code_of: dict[str, int] = {}
        self._members: dict[str, int] = {}  # rows per identity: a code is dropped with its last row
        self._last_code = -1

    def _grow(self) -> None:
        bigger = np.zeros((max(1024, 2 * len(self._mat)), self.dim), dtype=np.float32)
        bigger[: self._n] = self._mat[: self._n]
        self._mat = bigger
        code = np.zeros(len(bigger), dtype=np.int64)
        code[: self._n] = self._code[: self._n]
        self._code = code

    def _set_identity(self, row: int, gid: str, old: str | None) -> None:
        if old == gid:
            return
        if old is not None:
            self._release(old)
        c = self._code_of.get(gid)
        if c is None:
            self._last_code += 1
            c = self._code_of[gid] = self._last_code
        self._members[gid] = self._members.get(gid, 0) + 1
        self._code[row] = c

    def _release(self, gid: str) -> None:
        left = self._members[gid] - 1
        if left:
            self._members[gid] = left
        else:
            del self._members[gid], self._code_of[gid]

    def upsert(self, protos: Sequence[Prototype]) -> None:
        """Rows are placed in Python, vectors written with one fancy-indexed copy: the matcher hands over a
        whole batch's prototypes at once (a row copy per call was ~10 % of its time)."""
        if not protos:
            return
        if len({p.point_id for p in protos}) != len(protos):  # the last write of a point wins, as in sequence
            protos = list({p.point_id: p for p in protos}.values())
        vecs = np.empty((len(protos), self.dim), dtype=np.float32)
        rows = np.empty(len(protos), dtype=np.int64)
        for i, p in enumerate(protos):
            vec = np.asarray(p.vector, dtype=np.float32).reshape(-1)
            if vec.shape[0] != self.dim:
                raise ValueError(f"prototype {p.point_id}: dim {vec.shape[0]} != store dim {self.dim}")
            vecs[i] = vec
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
                self._set_identity(row, p.global_id, None)
            else:
                self._set_identity(row, p.global_id, self._gids[row])
                self._gids[row] = p.global_id
                self._payloads[row] = dict(p.payload)
            rows[i] = row
        self._mat[rows] = vecs

    def search(self, query: np.ndarray, limit: int, bank_size: int) -> list[Neighbour]:
        if self._n == 0:
            return []
        sims = self._mat[: self._n] @ np.asarray(query, dtype=np.float32).reshape(-1)
        k = min(self._n, max(1, limit * bank_size))
        top = np.argpartition(-sims, k - 1)[:k] if k < self._n else np.arange(self._n)
        top = top[np.argsort(-sims[top], kind="stable")]
        return self._best_per_identity(top.tolist(), sims[top].tolist(), limit)

    def search_many(self, queries: np.ndarray, limit: int, bank_size: int,
                    min_score: float = -2.0) -> list[Sequence[Hit]]:
        """:meth:`search` for many queries at once: one matrix product per chunk of queries reads the
        gallery once instead of once per query (memory-bound matrix-vector products become a
        compute-bound GEMM), and BLAS may use every allowed core for it. Points scoring below
        ``min_score`` are left out (the matcher passes the lowest score that could still win)."""
        q = np.asarray(queries, dtype=np.float32).reshape(-1, self.dim)
        if self._n == 0 or len(q) == 0:
            return [[] for _ in range(len(q))]
        n = self._n
        k = min(n, max(1, limit * bank_size))
        mat = self._mat[:n]
        rows = max(1, _SIMS_CHUNK_FLOATS // n)
        out: list[Sequence[Hit]] = []
        with _blas_threads(len(q), n, self.dim):
            for s in range(0, len(q), rows):
                sims = q[s:s + rows] @ mat.T
                sparse = self._above_floor(sims, k, limit, min_score)
                if sparse is not None:
                    out.extend(sparse)
                    continue
                out.extend(self._dense_hits(sims, k, limit, bank_size, min_score))
        return out

    def _dense_hits(self, sims: np.ndarray, k: int, limit: int, bank_size: int, min_score: float
                    ) -> list[_LazyHits]:
        """Each query's answer when many rows pass the floor (more than :meth:`_above_floor` takes: a
        returning crowd on a model with high cosines): only the best ``2 x bank_size`` rows per query are
        sorted, and a query's identities are read off them as the caller asks (:class:`_LazyHits`). Why: the
        matcher reads one or two identities of most queries, while sorting ``limit x bank`` rows and keeping
        each identity's best for all of them cost ~25 ms per 1,000 queries here."""
        n = sims.shape[1]
        t = min(k, 2 * bank_size)
        if t < n:
            top = np.argpartition(-sims, t - 1, axis=1)[:, :t]
            tsims = np.take_along_axis(sims, top, axis=1)
        else:
            top, tsims = np.broadcast_to(np.arange(n), sims.shape), sims
        order = np.argsort(-tsims, axis=1, kind="stable")
        top = np.take_along_axis(top, order, axis=1)
        tsims = np.take_along_axis(tsims, order, axis=1)
        # A snapshot of the row -> identity / point maps: the answers stay right if the store changes later.
        gids, pids = list(self._gids), list(self._point_ids)
        more = t < min(k, n)
        return [_LazyHits(top[i], tsims[i], sims[i] if more else None, k, limit, min_score, gids, pids)
                for i in range(len(sims))]

    def _above_floor(self, sims: np.ndarray, k: int, limit: int, min_score: float) -> list[list[Hit]] | None:
        """The chunk's answer from only the (query, row) pairs at or above ``min_score``, or None when too
        many pass for that to pay. With the matcher's floor (the match threshold) a query passes a few dozen
        of the gallery's rows, so sorting those pairs replaces a partial sort of every row of every query."""
        if min_score <= -1.0:
            return None
        hit = sims >= min_score
        n_pairs = int(np.count_nonzero(hit))
        # Sorting the passing pairs costs ~200 ns a pair here, the dense path's partial sort ~12-19 ns a row: past
        # a sixteenth of the rows passing, the dense path is cheaper (the H200 bench's stream, ~500 rows with
        # 50-75 passing per query: 13-19 ms a batch here against 7-13 ms dense, reads included).
        if n_pairs > min(k, sims.shape[1] // 16) * len(sims):
            return None
        query, rows = np.nonzero(hit)
        scores = sims[query, rows]
        order = np.lexsort((-scores, query))  # by query, best first (stable: ties keep row order)
        query, rows, scores = query[order], rows[order], scores[order]
        starts = np.searchsorted(query, np.arange(len(sims)))
        keep = np.arange(n_pairs) - starts[query] < k  # a query's k best rows, as the dense path takes
        return self._best_hits(query[keep], rows[keep], scores[keep], len(sims), limit)

    def _best_hits(self, query: np.ndarray, rows: np.ndarray, scores: np.ndarray, q: int, limit: int
                   ) -> list[list[Hit]]:
        """(query, row, score) triples sorted by query then best first → each query's ``limit`` best
        identities, by their best row."""
        keys = query * (self._last_code + 1) + self._code[rows]
        _, first = np.unique(keys, return_index=True)
        pos = np.sort(first)  # best row of each (query, identity), in query order then score order
        query, rows, scores = query[pos], rows[pos], scores[pos]
        starts = np.searchsorted(query, np.arange(q))
        rank = np.arange(len(pos)) - starts[query]
        top = rank < limit
        query, flat_rows, flat_sims = query[top], rows[top].tolist(), scores[top].tolist()
        g, p = self._gids, self._point_ids
        # Plain (global_id, point_id, score) tuples: Neighbour's own constructor was ~10 % of a batch's host
        # time at 16 hits x 1000 queries. Callers unpack them (the Neighbour field order).
        hits: list[Hit] = list(zip([g[r] for r in flat_rows], [p[r] for r in flat_rows], flat_sims, strict=True))
        bounds = np.searchsorted(query, np.arange(q + 1)).tolist()
        return [hits[bounds[i]:bounds[i + 1]] for i in range(q)]

    def _best_per_identity(self, rows: list[int], sims: list[float], limit: int) -> list[Neighbour]:
        return best_per_identity((Neighbour(self._gids[r], self._point_ids[r], sim)
                                  for r, sim in zip(rows, sims, strict=True)), limit)

    def _remove_row(self, row: int) -> None:
        last = self._n - 1
        pid = self._point_ids[row]
        self._release(self._gids[row])
        if row != last:
            self._mat[row] = self._mat[last]
            self._code[row] = self._code[last]
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
        doomed = {row for pid in point_ids if (row := self._row_of.get(pid)) is not None}
        if len(doomed) <= 4:
            for row in sorted(doomed, reverse=True):  # highest first: a swap never moves a doomed row
                self._remove_row(row)
            return
        # Many at once (a batch's evicted prototypes): the live rows past the new end fill the holes below
        # it, the vectors and codes in one copy each.
        n = self._n - len(doomed)
        holes = sorted(r for r in doomed if r < n)
        movers = [r for r in range(n, self._n) if r not in doomed]
        for r in doomed:
            self._release(self._gids[r])
            del self._row_of[self._point_ids[r]]
        if holes:
            self._mat[holes] = self._mat[movers]
            self._code[holes] = self._code[movers]
            for h, m in zip(holes, movers, strict=True):
                pid = self._point_ids[m]
                self._point_ids[h], self._gids[h], self._payloads[h] = pid, self._gids[m], self._payloads[m]
                self._row_of[pid] = h
        del self._point_ids[n:], self._gids[n:], self._payloads[n:]
        self._n = n

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

    def take_changes(self) -> dict[str, Prototype | None]:
        return {}  # nothing to mirror

    def submit_changes(self, changes: dict[str, Prototype | None]) -> None:
        return None

    def close(self) -> None:
        return None


class CachedVectorStore:
    """Searches in memory; the analytics store (SQL) is the durable copy, Qdrant an asynchronous mirror.

    Why: Qdrant local mode persists every point with its own SQLite commit (~8 ms a point measured here),
    so writing it on the consumer's critical path capped the whole consumer at ~130 crops/s. The
    matcher now writes each prototype into the analytics store's ``prototypes`` table in the batch's own
    transaction (server/store.py), the consumer stores offsets only after that commits, and this cache
    hands the batch's changes to the mirror afterwards (server/vectors/mirror.py): a thread writing to
    ``inner``, or a child process owning the Qdrant store (``remote``). A crash loses nothing: at start the
    cache loads from SQL and the mirror is reconciled against it (``rev`` per point).

    With neither (vectors.type ``memory``): exact in-memory search over the SQL copy, no Qdrant.
    """

    def __init__(self, inner: VectorStore | None, source: Iterable[Prototype] | None = None, *,
                 dim: int | None = None, max_pending: int = 50_000, remote: MirrorProcess | None = None) -> None:
        self.inner = inner
        # The Qdrant side read at start (load, reconcile): the store itself, or the mirror process owning it.
        self._qdrant: Any = inner if inner is not None else remote
        self.dim = self._qdrant.dim if self._qdrant is not None else int(dim or 0)
        self.mem = MemoryVectorStore(dim=self.dim, capacity=1024)
        self._pending: dict[str, Prototype | None] = {}  # point id -> final state (None = delete)
        self.imported: list[Prototype] = []  # points found only in Qdrant (pre-SQL galleries): to write to SQL
        self._load(source)
        self.mirror: QdrantMirror | MirrorProcess | None = None
        if inner is not None:
            self.mirror = QdrantMirror(inner, max_pending=max_pending)
            self.mirror.submit(self._reconcile_diff())
            self.mirror.start()
        elif remote is not None:
            self.mirror = remote
            remote.submit(self._reconcile_diff())

    def _load(self, source: Iterable[Prototype] | None) -> None:
        batch: list[Prototype] = []
        for p in source or ():
            batch.append(p)
            if len(batch) >= 4096:
                self.mem.upsert(batch)
                batch = []
        self.mem.upsert(batch)
        if self.mem.count() == 0 and self._qdrant is not None and self._qdrant.count():
            # A gallery written before SQL held the prototypes: adopt Qdrant's copy (the caller writes it to SQL).
            self.imported = list(self._qdrant.scroll())
            self.mem.upsert(self.imported)

    def _reconcile_diff(self) -> dict[str, Prototype | None]:
        """What the mirror must change to equal the SQL copy: points it lacks or holds at another rev,
        and points SQL no longer has (a crash between a commit and the mirror write, or a lost mirror)."""
        assert self._qdrant is not None
        if self.imported:
            return {}
        revisions = getattr(self._qdrant, "revisions", None)
        have: dict[str, Any] = revisions() if revisions is not None else {
            p.point_id: p.payload.get("rev") for p in self._qdrant.scroll()}
        diff: dict[str, Prototype | None] = {pid: None for pid in have if pid not in self.mem._row_of}
        for p in self.mem.scroll():
            if pid_rev(p) != have.get(p.point_id, -1):
                diff[p.point_id] = p
        if diff:
            log.info("vector mirror behind the SQL copy", extra={"points": len(diff)})
        return diff

    def upsert(self, protos: Sequence[Prototype]) -> None:
        self.mem.upsert(protos)
        for p in protos:
            self._pending[p.point_id] = p

    def search(self, query: np.ndarray, limit: int, bank_size: int) -> list[Neighbour]:
        return self.mem.search(query, limit, bank_size)

    def search_many(self, queries: np.ndarray, limit: int, bank_size: int,
                    min_score: float = -2.0) -> list[Sequence[Hit]]:
        return self.mem.search_many(queries, limit, bank_size, min_score)

    def delete_points(self, point_ids: Sequence[str]) -> None:
        self.mem.delete_points(point_ids)
        for pid in point_ids:
            self._pending[pid] = None

    def delete_identities(self, global_ids: Sequence[str]) -> None:
        # Every point is in memory (loaded from SQL at start), so deleting by id covers the identity.
        self.delete_points(self.mem.point_ids_of(global_ids))

    def flush(self) -> None:
        """Hand this batch's changes to the mirror. Call only after the SQL transaction holding them
        committed: the mirror may then lag, never lead. Blocks while the mirror is ``max_pending`` behind."""
        self.submit_changes(self.take_changes())

    def take_changes(self) -> dict[str, Prototype | None]:
        """The changes since the last call (a pipelined consumer takes them with its batch and submits them
        from its commit thread once that batch's SQL transaction committed)."""
        changes, self._pending = self._pending, {}
        return changes

    def submit_changes(self, changes: dict[str, Prototype | None]) -> None:
        if changes and self.mirror is not None:
            self.mirror.submit(changes)

    def retrieve(self, point_ids: Sequence[str]) -> dict[str, Prototype]:
        return self.mem.retrieve(point_ids)

    def scroll(self) -> Iterator[Prototype]:
        return self.mem.scroll()

    def count(self) -> int:
        return self.mem.count()

    def mirror_lag(self) -> int:
        return self.mirror.lag() if self.mirror is not None else 0

    def close(self, drain_timeout_s: float = 30.0) -> None:
        try:
            self.flush()
        except MirrorDied as exc:  # its changes are in SQL: the next start reconciles them into Qdrant
            log.warning("vector mirror gone at close: %s", exc)
        if self.mirror is not None:
            self.mirror.close(drain_timeout_s)
        if self.inner is not None:
            self.inner.close()
