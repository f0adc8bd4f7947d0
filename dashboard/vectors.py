"""Read the server's identity vectors for search-by-example, without ever locking them.

First choice: the analytics store's ``prototypes`` table, the server's durable copy of the gallery
(written in the same transaction as the batch; Qdrant is its mirror): plain SQL, no lock, no pickle.
Otherwise, Qdrant local mode lets one process hold a folder (an exclusive file lock): if the dashboard opened
it with ``QdrantClient(path=...)`` the server could not start, and while the server runs the
dashboard could not open it. So for local mode the dashboard reads the collection's own SQLite
file (``collection/<name>/storage.sqlite``, qdrant-client's persistence format: one pickled
``PointStruct`` per row, newest row wins) through a read-only connection, and searches the few
thousand prototypes of a shop exactly with numpy. With a Qdrant server (``url``) it asks the server.

The pickles are the server's own data in the server's folder (the same trust as the SQLite store);
nothing from users is unpickled. No Streamlit import.
"""

from __future__ import annotations

import os
import pickle
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dashboard.config import QdrantConfig


class VectorsUnavailable(RuntimeError):
    """The identity vectors cannot be read; the message says what to check."""


@dataclass(frozen=True)
class Match:
    global_id: str
    score: float  # cosine similarity of the best prototype of this identity
    point_id: str


def collection_for(cfg: QdrantConfig, model_id: str) -> str:
    """The server's naming rule (``server.vectors.base.collection_name``): reid_<model id> unless set."""
    if cfg.collection:
        return cfg.collection
    return "reid_" + "".join(ch if ch.isalnum() or ch in "_-" else "_" for ch in model_id)


class LocalCollectionReader:
    """Exact search over a local-mode collection, reloaded when its file changes."""

    def __init__(self, root: str | Path, collection: str) -> None:
        self.path = Path(root) / "collection" / collection / "storage.sqlite"
        self.collection = collection
        self._stamp: tuple[float, int] | None = None
        self._ids: list[str] = []
        self._gids: list[str] = []
        self._matrix = np.zeros((0, 0), np.float32)

    def _load(self) -> None:
        if not self.path.exists():
            raise VectorsUnavailable(
                f"no identity vectors at {self.path}: the server has not stored any identity with this embedder "
                f"yet, or qdrant.path / qdrant.collection in the dashboard config differ from the server's")
        st = self.path.stat()
        wal = self.path.with_name(self.path.name + "-wal")
        stamp = (max(st.st_mtime, wal.stat().st_mtime if wal.exists() else 0.0), st.st_size)
        if stamp == self._stamp:
            return
        try:
            conn = sqlite3.connect(f"file:{self.path.resolve()}?mode=ro", uri=True, timeout=10)
            try:
                rows = conn.execute("SELECT rowid, point FROM points ORDER BY rowid DESC").fetchall()
            finally:
                conn.close()
        except sqlite3.Error as exc:
            raise VectorsUnavailable(f"cannot read {self.path}: {exc}") from exc
        seen: set[str] = set()
        ids, gids, vecs = [], [], []
        for _rowid, blob in rows:
            point = pickle.loads(blob)  # the server's own local-mode storage (see module doc)
            pid = str(point.id)
            if pid in seen:
                continue
            seen.add(pid)
            vec = point.vector
            if isinstance(vec, dict):  # named vectors: the server uses one unnamed vector
                vec = next(iter(vec.values()))
            payload = point.payload or {}
            if "global_id" not in payload:
                continue
            ids.append(pid)
            gids.append(str(payload["global_id"]))
            vecs.append(np.asarray(vec, dtype=np.float32))
        matrix = np.stack(vecs) if vecs else np.zeros((0, 0), np.float32)
        if len(matrix):
            matrix /= np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)
        self._ids, self._gids, self._matrix, self._stamp = ids, gids, matrix, stamp

    def count(self) -> int:
        self._load()
        return len(self._ids)

    def search(self, query: np.ndarray, limit: int) -> list[Match]:
        self._load()
        return _best_per_identity(self._ids, self._gids, self._matrix, query, limit,
                                  f"collection {self.collection!r}")


class ServerCollectionReader:
    """The same search against a Qdrant server (which has no lock problem)."""

    def __init__(self, cfg: QdrantConfig, collection: str) -> None:
        from qdrant_client import QdrantClient

        key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
        if cfg.api_key_env and not key:
            raise VectorsUnavailable(f"qdrant.api_key_env names {cfg.api_key_env}, which is not set")
        self.client = QdrantClient(url=cfg.url, api_key=key, timeout=10)
        self.collection = collection

    def count(self) -> int:
        try:
            return int(self.client.count(self.collection, exact=True).count)
        except Exception as exc:
            raise VectorsUnavailable(f"Qdrant collection {self.collection!r}: {exc}") from exc

    def search(self, query: np.ndarray, limit: int, bank_size: int = 8) -> list[Match]:
        try:
            res = self.client.query_points(self.collection, query=np.asarray(query, np.float32).tolist(),
                                           limit=limit * bank_size, with_payload=["global_id"])
        except Exception as exc:
            raise VectorsUnavailable(f"Qdrant search in {self.collection!r} failed: {exc}") from exc
        best: dict[str, Match] = {}
        for pt in res.points:
            gid = str((pt.payload or {}).get("global_id"))
            if gid not in best:
                best[gid] = Match(gid, float(pt.score), str(pt.id))
            if len(best) == limit:
                break
        return list(best.values())


def _best_per_identity(ids: list[str], gids: list[str], matrix: np.ndarray, query: np.ndarray, limit: int,
                       what: str) -> list[Match]:
    if not ids:
        return []
    q = np.asarray(query, dtype=np.float32).reshape(-1)
    if q.shape[0] != matrix.shape[1]:
        raise VectorsUnavailable(f"the query has {q.shape[0]} dimensions but {what} holds {matrix.shape[1]}-d "
                                 f"vectors: search.embedder must be the server's embedder")
    scores = matrix @ (q / max(float(np.linalg.norm(q)), 1e-12))
    best: dict[str, Match] = {}
    for i in np.argsort(-scores):
        if gids[i] not in best:
            best[gids[i]] = Match(gids[i], float(scores[i]), ids[i])
            if len(best) == limit:
                break
    return list(best.values())


class StorePrototypeReader:
    """Exact search over the store's ``prototypes`` rows of one embedder, reloaded when they change."""

    def __init__(self, engine: Any, embedder_id: str) -> None:
        self.engine = engine
        self.embedder_id = embedder_id
        self._stamp: tuple[int, int] | None = None
        self._ids: list[str] = []
        self._gids: list[str] = []
        self._matrix = np.zeros((0, 0), np.float32)

    def _load(self) -> None:
        import sqlalchemy as sa

        try:
            with self.engine.connect() as conn:
                n, rev = conn.execute(sa.text("SELECT COUNT(*), COALESCE(MAX(rev), 0) FROM prototypes "
                                              "WHERE embedder_id = :m"), {"m": self.embedder_id}).one()
                if (int(n), int(rev)) == self._stamp:
                    return
                rows = conn.execute(sa.text("SELECT point_id, global_id, vector FROM prototypes "
                                            "WHERE embedder_id = :m"), {"m": self.embedder_id}).fetchall()
        except sa.exc.SQLAlchemyError as exc:
            raise VectorsUnavailable(f"cannot read prototypes from the analytics store: {exc}") from exc
        vecs = [np.frombuffer(r[2], dtype="<f4") for r in rows]
        matrix = np.stack(vecs).astype(np.float32) if vecs else np.zeros((0, 0), np.float32)
        if len(matrix):
            matrix /= np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)
        self._ids, self._gids = [str(r[0]) for r in rows], [str(r[1]) for r in rows]
        self._matrix, self._stamp = matrix, (int(n), int(rev))

    def count(self) -> int:
        self._load()
        return len(self._ids)

    def search(self, query: np.ndarray, limit: int) -> list[Match]:
        self._load()
        return _best_per_identity(self._ids, self._gids, self._matrix, query, limit,
                                  f"the store's prototypes of {self.embedder_id}")


def store_has_prototypes(engine: Any, embedder_id: str) -> bool:
    import sqlalchemy as sa

    if "prototypes" not in sa.inspect(engine).get_table_names():
        return False
    with engine.connect() as conn:
        return conn.execute(sa.text("SELECT 1 FROM prototypes WHERE embedder_id = :m LIMIT 1"),
                            {"m": embedder_id}).first() is not None


def open_reader(cfg: QdrantConfig, model_id: str, engine: Any = None) -> Any:
    """The store's prototypes when it has them for this model, else Qdrant (server URL or local folder)."""
    name = collection_for(cfg, model_id)
    if engine is not None and store_has_prototypes(engine, model_id):
        return StorePrototypeReader(engine, model_id)
    if cfg.url:
        return ServerCollectionReader(cfg, name)
    if not cfg.path:
        raise VectorsUnavailable("set qdrant.path (local mode) or qdrant.url in the dashboard config")
    return LocalCollectionReader(cfg.path, name)
