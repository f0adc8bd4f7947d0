"""Qdrant backend: local mode (``QdrantClient(path=...)``, the embedded default) or a Qdrant server URL.

Payload per prototype: ``global_id``, ``male_probability``, ``cameras``, ``first_seen_us``,
``last_seen_us``, ``sightings``; indexed (server mode honours the indexes, local mode ignores them) so
production can filter candidates by gender or recency, and expiry can delete by identity.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from server.vectors.base import Hit, Neighbour, Prototype, best_per_identity, collection_name

log = logging.getLogger(__name__)

_INDEXES = {
    "global_id": "keyword",
    "cameras": "keyword",
    "male_probability": "float",
    "last_seen_us": "integer",
}


class QdrantVectorStore:
    def __init__(self, cfg: Any, *, dim: int, model_id: str) -> None:
        from qdrant_client import QdrantClient, models

        self._models = models
        self.dim = dim
        self.collection = collection_name(cfg, model_id)
        self._local_path: str | None = None
        self.compactions = 0
        self.compact_min_deleted = 4096  # local mode: reopen once this many (and most) slots are deleted
        if cfg.type == "qdrant_local":
            Path(cfg.path).mkdir(parents=True, exist_ok=True)
            self._local_path = str(cfg.path)
            self.client = QdrantClient(path=cfg.path)
            where = f"local:{cfg.path}"
        else:
            api_key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
            if cfg.api_key_env and not api_key:
                raise ValueError(f"vectors.api_key_env names {cfg.api_key_env}, which is not set")
            self.client = QdrantClient(url=cfg.url, api_key=api_key, timeout=int(cfg.timeout_s))
            where = cfg.url
        if self.client.collection_exists(self.collection):
            info = self.client.get_collection(self.collection)
            have = info.config.params.vectors.size  # type: ignore[union-attr]
            if have != dim:
                raise ValueError(f"Qdrant collection {self.collection!r} at {where} holds {have}-d vectors but the "
                                 f"embedder makes {dim}-d ones: set vectors.collection to a new name")
        else:
            self.client.create_collection(
                self.collection, vectors_config=models.VectorParams(size=dim, distance=models.Distance.COSINE))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # local mode warns that it ignores payload indexes
                for field_name, schema in _INDEXES.items():
                    self.client.create_payload_index(self.collection, field_name, field_schema=schema)
        log.info("vector store ready", extra={"collection": self.collection, "where": where,
                                              "points": self.count()})

    def upsert(self, protos: Sequence[Prototype]) -> None:
        if not protos:
            return
        m = self._models
        points = [m.PointStruct(id=p.point_id, vector=np.asarray(p.vector, dtype=np.float32).tolist(),
                                payload={**p.payload, "global_id": p.global_id}) for p in protos]
        self.client.upsert(self.collection, points=points, wait=True)

    def search(self, query: np.ndarray, limit: int, bank_size: int) -> list[Neighbour]:
        return self.search_many(np.asarray(query, dtype=np.float32).reshape(1, -1), limit, bank_size)[0]

    def search_many(self, queries: np.ndarray, limit: int, bank_size: int,
                    min_score: float = -2.0) -> list[Sequence[Hit]]:
        m = self._models
        q = np.asarray(queries, dtype=np.float32).reshape(-1, self.dim)
        if len(q) == 0:
            return []
        threshold = min_score if min_score > -1.0 else None
        reqs = [m.QueryRequest(query=row.tolist(), limit=max(1, limit * bank_size), with_payload=["global_id"],
                               score_threshold=threshold) for row in q]
        out: list[Sequence[Hit]] = []
        for s in range(0, len(reqs), 256):  # bounded request size for a server
            for res in self.client.query_batch_points(self.collection, requests=reqs[s:s + 256]):
                out.append(best_per_identity((Neighbour(str(pt.payload["global_id"]), str(pt.id),  # type: ignore[index]
                                                        float(pt.score)) for pt in res.points), limit))
        return out

    def delete_points(self, point_ids: Sequence[str]) -> None:
        if point_ids:
            self.client.delete(self.collection, points_selector=self._models.PointIdsList(points=list(point_ids)))
            self._maybe_compact()

    def delete_identities(self, global_ids: Sequence[str]) -> None:
        if not global_ids:
            return
        m = self._models
        flt = m.Filter(must=[m.FieldCondition(key="global_id", match=m.MatchAny(any=list(global_ids)))])
        self.client.delete(self.collection, points_selector=m.FilterSelector(filter=flt))
        self._maybe_compact()

    def local_slots(self) -> tuple[int, int] | None:
        """Local mode only: (slots, deleted slots) of the in-process collection, else None.

        Why: qdrant-client's local mode never frees a deleted point; it only masks it. Its vectors, payload
        and id stay in memory and every search still scans them, so a long-running server whose gallery
        turns over (tracks replace prototypes, identities expire) grows without bound and slows down (the
        session-2 soak: +374 MB in 16 minutes). Reads the pinned qdrant-client's private collection."""
        if self._local_path is None:
            return None
        coll = getattr(getattr(self.client, "_client", None), "collections", {}).get(self.collection)
        if coll is None or not hasattr(coll, "deleted") or not hasattr(coll, "ids_inv"):
            return None
        return len(coll.ids_inv), int(np.count_nonzero(coll.deleted))

    def _maybe_compact(self) -> None:
        """Reopen the local store once most of its slots are deleted: it reloads only the live points from
        its own persistence, so memory and search cost follow the live gallery, not its history."""
        slots = self.local_slots()
        if slots is None:
            return
        total, deleted = slots
        if deleted < self.compact_min_deleted or deleted * 2 < total:
            return
        from qdrant_client import QdrantClient

        self.client.close()
        self.client = QdrantClient(path=self._local_path)
        self.compactions += 1
        log.info("qdrant local store compacted", extra={"slots_before": total, "deleted": deleted,
                                                        "live": total - deleted})

    def _proto(self, rec: Any) -> Prototype:
        payload = dict(rec.payload or {})
        gid = str(payload.pop("global_id"))
        return Prototype(str(rec.id), gid, np.asarray(rec.vector, dtype=np.float32), payload)

    def retrieve(self, point_ids: Sequence[str]) -> dict[str, Prototype]:
        if not point_ids:
            return {}
        recs = self.client.retrieve(self.collection, ids=list(point_ids), with_vectors=True, with_payload=True)
        return {str(r.id): self._proto(r) for r in recs}

    def scroll(self) -> Iterator[Prototype]:
        offset = None
        while True:
            recs, offset = self.client.scroll(self.collection, limit=2048, offset=offset, with_vectors=True,
                                              with_payload=True)
            for r in recs:
                yield self._proto(r)
            if offset is None:
                return

    def revisions(self) -> dict[str, Any]:
        """point id -> payload ``rev`` of every point, without vectors (the mirror's reconcile at start)."""
        out: dict[str, Any] = {}
        offset = None
        while True:
            recs, offset = self.client.scroll(self.collection, limit=4096, offset=offset, with_vectors=False,
                                              with_payload=["rev"])
            for r in recs:
                out[str(r.id)] = (r.payload or {}).get("rev")
            if offset is None:
                return out

    def count(self) -> int:
        return int(self.client.count(self.collection, exact=True).count)

    def flush(self) -> None:
        return None  # every call above already waited for Qdrant

    def take_changes(self) -> dict[str, Prototype | None]:
        return {}  # written through: nothing to mirror

    def submit_changes(self, changes: dict[str, Prototype | None]) -> None:
        return None

    def close(self) -> None:
        self.client.close()
