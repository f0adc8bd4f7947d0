"""The vector-store contract the identity matcher codes against, and how a config picks a backend.

A *prototype* is one track's fused, unit-length appearance vector; an identity owns a small bank of
them. Point ids are the track uids, so writing the same track again (redelivery after a crash)
overwrites the same point instead of adding one. ``search`` returns the best prototype per identity,
so the matcher ranks identities, not crops.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class Prototype:
    point_id: str  # uuid string: the track uid that produced the vector
    global_id: str
    vector: np.ndarray  # (dim,) float32, unit length
    payload: dict[str, Any] = field(default_factory=dict)


class Neighbour(NamedTuple):
    """A tuple, not a dataclass: searches make thousands per batch and a frozen dataclass is ~5x slower
    to build."""

    global_id: str
    point_id: str
    score: float  # cosine similarity


# What batched searches return: (global_id, point_id, score), a Neighbour or a plain tuple in that order
# (building thousands of NamedTuples per batch costs more than the search): unpack, do not use attributes.
Hit = tuple[str, str, float]


def best_per_identity(hits: Iterable[Neighbour], limit: int) -> list[Neighbour]:
    """Hits sorted best first → the best hit of each of the first ``limit`` identities."""
    out: list[Neighbour] = []
    seen: set[str] = set()
    for h in hits:
        if h.global_id in seen:
            continue
        seen.add(h.global_id)
        out.append(h)
        if len(out) == limit:
            break
    return out


@runtime_checkable
class VectorStore(Protocol):
    dim: int

    def upsert(self, protos: Sequence[Prototype]) -> None: ...

    def search(self, query: np.ndarray, limit: int, bank_size: int) -> list[Neighbour]:
        """Best-scoring prototype of each of the ``limit`` nearest identities, best first.

        ``bank_size`` (the most prototypes one identity can hold) lets a backend fetch enough points
        to be sure of ``limit`` distinct identities.
        """
        ...

    def search_many(self, queries: np.ndarray, limit: int, bank_size: int,
                    min_score: float = -2.0) -> list[Sequence[Hit]]:
        """:meth:`search` for each row of ``queries`` (m, dim), in one round trip or one matrix product,
        leaving out points that score below ``min_score``; hits as :data:`Hit` tuples (a query's answer may be
        built as it is read: iterate it, or index it to have it whole)."""
        ...

    def delete_points(self, point_ids: Sequence[str]) -> None: ...

    def delete_identities(self, global_ids: Sequence[str]) -> None: ...

    def retrieve(self, point_ids: Sequence[str]) -> dict[str, Prototype]: ...

    def scroll(self) -> Iterator[Prototype]: ...

    def count(self) -> int: ...

    def flush(self) -> None:
        """Hand over every change so far (after the SQL commit that made them durable)."""
        ...

    def take_changes(self) -> dict[str, Prototype | None]:
        """The changes since the last call that still have to reach a mirror ({} for a store that writes
        through itself); the consumer takes them with a batch and submits them once that batch committed."""
        ...

    def submit_changes(self, changes: dict[str, Prototype | None]) -> None:
        """Hand ``changes`` (from :meth:`take_changes`) to the mirror."""
        ...

    def close(self) -> None: ...


VECTOR_STORES: dict[str, str] = {
    "memory": "server.vectors.memory:MemoryVectorStore",
    "qdrant_local": "server.vectors.qdrant:QdrantVectorStore",
    "qdrant_server": "server.vectors.qdrant:QdrantVectorStore",
}


def build_vectors(cfg: Any, dim: int, model_id: str, source: Iterable[Prototype] | None = None) -> VectorStore:
    """Build the configured store.

    ``source`` is the durable copy of the gallery (the analytics store's ``prototypes`` rows). With it,
    ``memory`` is an exact in-memory gallery loaded from SQL, and a Qdrant backend with ``cache`` set
    becomes an asynchronous mirror behind that in-memory gallery (server/vectors/memory.py).
    """
    from server.vectors.memory import CachedVectorStore

    if cfg.type not in VECTOR_STORES:
        raise ValueError(f"unknown vector store {cfg.type!r}; known: {', '.join(sorted(VECTOR_STORES))}")
    if cfg.type == "memory" and source is not None:
        return CachedVectorStore(None, source, dim=dim)
    max_pending = getattr(cfg, "mirror_max_pending", 50_000)
    if getattr(cfg, "cache", False) and getattr(cfg, "mirror_process", False):
        from server.vectors.mirror import MirrorProcess

        # The Qdrant client lives only in the mirror's process (local mode allows one process per folder).
        return CachedVectorStore(None, source, max_pending=max_pending,
                                 remote=MirrorProcess(cfg, dim=dim, model_id=model_id, max_pending=max_pending))
    module_name, _, cls_name = VECTOR_STORES[cfg.type].partition(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    store: VectorStore = cls(cfg, dim=dim, model_id=model_id)
    if getattr(cfg, "cache", False):
        store = CachedVectorStore(store, source, max_pending=max_pending)
    return store


def collection_name(cfg: Any, model_id: str) -> str:
    """Each embedder model gets its own collection: vectors of different models are not comparable."""
    if getattr(cfg, "collection", None):
        return str(cfg.collection)
    return "reid_" + "".join(ch if ch.isalnum() or ch in "_-" else "_" for ch in model_id)
