"""Search-by-example readers: the store's prototypes (server's durable gallery) and a locked local Qdrant
collection, both filled through the server's own APIs with real embeddings of Market-1501 crops."""

from __future__ import annotations

import uuid
from pathlib import Path

import cv2
import pytest

from dashboard import queries
from dashboard.config import QdrantConfig
from dashboard.vectors import LocalCollectionReader, StorePrototypeReader, VectorsUnavailable, open_reader
from tests.dashboard.conftest import ENTRANCE, NOW_US, US, TinyTrack, gid, write_tracks

PEOPLE = {"A": "0001", "B": "0003", "C": "0004"}


@pytest.fixture(scope="module")
def embedded(assets: Path):
    from server.embed import build_embedder

    emb = build_embedder({"type": "intel_reid", "model": "0277"}, assets=str(assets))
    root = assets / "data" / "market1501_subset"
    rows = []
    for name, pid in PEOPLE.items():
        for p in sorted((root / "bounding_box_test").glob(f"{pid}_*.jpg"))[:3]:
            rows.append((str(uuid.uuid5(uuid.NAMESPACE_URL, p.name)), gid(name),
                         emb.embed([cv2.imread(str(p))])[0]))
    query = emb.embed([cv2.imread(str(root / "query" / "0004_c3s3_065619_02.jpg"))])[0]
    return emb, rows, query


def test_store_prototypes_search_and_retention(tmp_path: Path, embedded) -> None:
    from server.store import AnalyticsStore, BatchWrite, prototype_row

    emb, rows, query = embedded
    url = f"sqlite:///{tmp_path / 'a.db'}"
    old = NOW_US - 40 * 24 * 3600 * US
    write_tracks(url, [TinyTrack("a", ENTRANCE, NOW_US - 60 * US, NOW_US, "A", True),
                       TinyTrack("b", ENTRANCE, NOW_US - 60 * US, NOW_US, "B", True),
                       TinyTrack("c", ENTRANCE, old, old + 60 * US, "C", True)], NOW_US)
    store = AnalyticsStore(url)
    batch = BatchWrite()
    for pid, g, vec in rows:
        batch.prototypes[pid] = prototype_row(pid, g, emb.model_id, vec, {}, 1)
    store.write(batch)
    store.close()
    engine = queries.open_store(url)
    reader = open_reader(QdrantConfig(path=str(tmp_path / "no-qdrant")), emb.model_id, engine)
    assert isinstance(reader, StorePrototypeReader) and reader.count() == 9
    matches = reader.search(query, 3)
    assert matches[0].global_id == gid("C")  # Market 0004 from another camera
    assert len({m.global_id for m in matches}) == 3  # one row per identity
    with pytest.raises(VectorsUnavailable, match=r"search\.embedder must be the server's embedder"):
        reader.search(query[:100], 3)
    report = queries.purge_before(engine, NOW_US - 30 * 24 * 3600 * US)  # C's only visit was 40 days ago
    assert report.identity_ids == (gid("C"),)
    assert reader.count() == 6 and gid("C") not in {m.global_id for m in reader.search(query, 3)}
    # A model the store has no prototypes for falls back to Qdrant, which says what is missing.
    other = open_reader(QdrantConfig(path=str(tmp_path / "no-qdrant")), "other_model", engine)
    with pytest.raises(VectorsUnavailable, match="no identity vectors at"):
        other.search(query, 3)
    engine.dispose()


def test_local_qdrant_is_read_while_the_server_holds_it(tmp_path: Path, embedded) -> None:
    from server.config import QdrantLocalSettings
    from server.vectors.base import Prototype
    from server.vectors.qdrant import QdrantVectorStore

    emb, rows, query = embedded
    held = QdrantVectorStore(QdrantLocalSettings(path=str(tmp_path / "q")), dim=emb.dim, model_id=emb.model_id)
    try:
        held.upsert([Prototype(pid, g, vec, {}) for pid, g, vec in rows])
        reader = open_reader(QdrantConfig(path=str(tmp_path / "q")), emb.model_id)
        assert isinstance(reader, LocalCollectionReader) and reader.count() == 9
        assert reader.search(query, 1)[0].global_id == gid("C")
        held.delete_identities([gid("C")])  # the server expires C: the reader sees it on its next search
        assert reader.count() == 6
    finally:
        held.close()
