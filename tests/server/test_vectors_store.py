"""Vector stores (numpy, Qdrant local, the cache over it) and the analytics store's idempotent upserts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from server.config import QdrantLocalSettings
from server.store import AnalyticsStore, BatchWrite, sightings
from server.vectors.base import Prototype, build_vectors
from server.vectors.memory import MemoryVectorStore


def unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    v = rng.standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_search_ranks_identities_by_their_best_prototype() -> None:
    rng = np.random.default_rng(1)
    v = unit(rng, 50, 32)
    mem = MemoryVectorStore(dim=32, capacity=4)  # forces growth
    # identity "a" owns rows 0-2, every other row is its own identity
    mem.upsert([Prototype(f"p{i}", "a" if i < 3 else f"g{i}", v[i]) for i in range(50)])
    hits = mem.search(v[1], limit=5, bank_size=3)
    assert hits[0].global_id == "a" and hits[0].point_id == "p1" and abs(hits[0].score - 1.0) < 1e-5
    assert len({h.global_id for h in hits}) == 5
    mem.delete_identities(["a"])
    assert mem.count() == 47 and all(h.global_id != "a" for h in mem.search(v[1], 5, 3))
    assert mem.retrieve(["p10"])["p10"].global_id == "g10"


def test_cache_over_qdrant_local_flushes_and_reloads(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    v = unit(rng, 20, 16)
    cfg = QdrantLocalSettings(path=str(tmp_path / "q"))
    store = build_vectors(cfg, 16, "m1")
    store.upsert([Prototype(f"00000000-0000-0000-0000-{i:012d}", f"g{i % 5}", v[i], {"last_seen_us": i})
                  for i in range(20)])
    store.delete_identities(["g0"])
    store.flush()
    store.close()
    again = build_vectors(cfg, 16, "m1")  # the durable copy has exactly what the cache had
    assert again.count() == 16
    assert {p.global_id for p in again.scroll()} == {"g1", "g2", "g3", "g4"}
    best = again.search(v[7], 1, 4)[0]
    assert best.global_id == "g2" and best.score > 0.999
    again.close()


def test_qdrant_local_compacts_deleted_points_and_keeps_the_live_ones(tmp_path: Path) -> None:
    """qdrant-client's local mode only masks deleted points; ours reopens it once most slots are dead."""
    from server.vectors.qdrant import QdrantVectorStore

    rng = np.random.default_rng(3)
    v = unit(rng, 300, 16)
    store = QdrantVectorStore(QdrantLocalSettings(path=str(tmp_path / "q")), dim=16, model_id="m1")
    store.compact_min_deleted = 100
    ids = [f"00000000-0000-0000-0000-{i:012d}" for i in range(300)]
    store.upsert([Prototype(ids[i], f"g{i}", v[i], {"rev": 1}) for i in range(300)])
    store.delete_points(ids[:140])  # under half of the slots: masked only
    assert store.local_slots() == (300, 140) and store.compactions == 0
    store.delete_identities([f"g{i}" for i in range(140, 200)])  # 200 of 300 dead: reopened
    assert store.compactions == 1
    assert store.local_slots() == (100, 0)
    assert store.count() == 100
    hit = store.search(v[250], 1, 1)[0]
    assert hit.global_id == "g250" and hit.point_id == ids[250] and hit.score > 0.999
    assert store.retrieve([ids[10], ids[299]]).keys() == {ids[299]}
    store.upsert([Prototype(ids[0], "g0", v[0], {"rev": 2})])  # still writable after the reopen
    assert store.count() == 101
    store.close()


def test_store_upserts_are_idempotent_and_merge_min_max(tmp_path: Path) -> None:
    store = AnalyticsStore(f"sqlite:///{tmp_path / 'a.db'}")

    def batch(first: int, last: int, gid: str | None) -> BatchWrite:
        b = BatchWrite()
        b.tracks["t1"] = {"track_uid": "t1", "device_id": "d", "camera_id": "c", "track_id": 1, "global_id": gid,
                          "first_seen_us": first, "last_seen_us": last, "first_frame_index": 0,
                          "last_frame_index": 3, "n_crops": 1, "male_probability": None, "match_similarity": None,
                          "is_new_identity": False, "ended": False}
        b.sightings[("t1", 0)] = {"track_uid": "t1", "bucket_start_us": 0, "device_id": "d", "camera_id": "c",
                                  "global_id": gid, "first_seen_us": first, "last_seen_us": last}
        return b

    store.write(batch(100, 200, None))
    store.write(batch(150, 300, "g"))
    store.write(batch(150, 300, "g"))  # redelivery
    store.write(batch(120, 180, None))  # an older frame replayed later must not erase anything
    with store.engine.connect() as c:
        rows = c.execute(sa.select(sightings)).mappings().all()
    assert len(rows) == 1 and (rows[0]["first_seen_us"], rows[0]["last_seen_us"], rows[0]["global_id"]) == (
        100, 300, "g")
    assert store.find_track("d", "c", 1, 250, 10_000_000)["track_uid"] == "t1"
    assert store.find_track("d", "c", 1, 50, 10_000_000) is None  # before the track started
    store.close()


def test_upserts_compile_for_postgresql() -> None:
    """The PostgreSQL dialect path (no server here): the same statements must compile with LEAST/GREATEST."""
    store = AnalyticsStore("sqlite://")
    store.dialect = "postgresql"
    stmt = store._insert(sightings)
    stmt = stmt.on_conflict_do_update(index_elements=["track_uid", "bucket_start_us"], set_={
        "first_seen_us": store._least(sightings.c.first_seen_us, stmt.excluded.first_seen_us)})
    sql = str(stmt.compile(dialect=postgresql.dialect()))
    assert "ON CONFLICT (track_uid, bucket_start_us) DO UPDATE" in sql and "least(" in sql.lower()


def test_batched_search_equals_one_query_at_a_time_through_moves_and_deletes() -> None:
    """search_many keeps each identity's best row with numpy (identity codes per row); it must give exactly
    what the per-query path gives, including after points move between identities and rows are deleted
    (the delete swaps the last row into the hole)."""
    rng = np.random.default_rng(7)
    dim = 16
    mem = MemoryVectorStore(dim=dim, capacity=8)
    v = unit(rng, 600, dim)
    mem.upsert([Prototype(f"p{i}", f"g{i % 97}", v[i]) for i in range(600)])
    mem.upsert([Prototype(f"p{i}", f"g{i % 13}", v[i]) for i in range(0, 600, 7)])  # moved to other identities
    mem.delete_points([f"p{i}" for i in range(0, 600, 5)])
    mem.delete_identities(["g3", "g50"])
    q = unit(rng, 40, dim)
    # floors passing few rows take the sparse path (pairs above the floor sorted), with and without truncation
    # to limit x bank rows; a floor passing more than a sixteenth of the rows takes the dense partial sort
    for limit, bank, floor in ((5, 3, -2.0), (16, 8, 0.2), (200, 8, -2.0), (3, 2, 0.35), (5, 3, 0.5), (2, 2, 0.5),
                              (4, 2, 0.0), (16, 8, 0.6)):
        got = mem.search_many(q, limit, bank, floor)
        for i in range(len(q)):
            want = [h for h in mem.search(q[i], limit, bank) if h.score >= floor]
            assert [(g, p) for g, p, _s in got[i]] == [(h.global_id, h.point_id) for h in want]
            np.testing.assert_allclose([s for _g, _p, s in got[i]], [h.score for h in want], atol=1e-5)
            assert all(g not in ("g3", "g50") for g, _p, _s in got[i])


def test_batched_writes_equal_one_at_a_time() -> None:
    """upsert and delete_points take a batch in one vectorised pass (holes filled from the end, rows placed
    then copied at once); the store must hold exactly what point-by-point writes leave, and search the same."""
    rng = np.random.default_rng(11)
    dim = 8
    v, w = unit(rng, 400, dim), unit(rng, 401, dim)  # distinct vectors: no ties in the searches
    one, many = MemoryVectorStore(dim=dim, capacity=4), MemoryVectorStore(dim=dim, capacity=4)
    first = [Prototype(f"p{i}", f"g{i % 31}", v[i], {"i": i}) for i in range(300)]
    for p in first:
        one.upsert([p])
    many.upsert(first)
    # Overwrites (some moving identity), new points, and a point written twice in one call: the last wins.
    again = [Prototype(f"p{i}", f"g{i % 7}", w[i], {"i": -i}) for i in range(0, 400, 3)]
    again.append(Prototype("p3", "g5", w[400], {"i": "last"}))
    for p in again:
        one.upsert([p])
    many.upsert(again)
    doomed = [f"p{i}" for i in range(0, 400, 4)] + ["absent", "p0"]
    for pid in doomed:
        one.delete_points([pid])
    many.delete_points(doomed)
    many.delete_points(["p1", "p2"])  # the small-batch path
    one.delete_points(["p1", "p2"])

    def content(m: MemoryVectorStore) -> dict[str, tuple[str, list[float], dict[str, object]]]:
        return {p.point_id: (p.global_id, p.vector.round(6).tolist(), p.payload) for p in m.scroll()}

    assert content(many) == content(one)
    assert many.count() == one.count() == len(content(one))
    assert content(many)["p3"][2] == {"i": "last"}
    q = unit(rng, 20, dim)
    for a, b in zip(many.search_many(q, 6, 4), one.search_many(q, 6, 4), strict=True):
        assert {g for g, _p, _s in a} == {g for g, _p, _s in b}
        np.testing.assert_allclose(sorted(s for *_x, s in a), sorted(s for *_x, s in b), atol=1e-6)
    assert sorted(many._members) == sorted(one._members)


def test_a_batched_search_wakes_blas_threads_by_the_size_of_its_product() -> None:
    """One BLAS thread per 2^28 multiply-adds, at most every allowed core: the bench gallery's product (~2,000 x
    ~560 x 512) gets 2, a 100k-prototype gallery every core, a small batch one; each search runs with that limit
    and the process is back on one thread afterwards."""
    from threadpoolctl import threadpool_info

    from common.service import allowed_cpus
    from server.vectors import memory

    assert memory.blas_threads_for(2_000 * 560 * 512, 16) == 2
    assert memory.blas_threads_for(1_000 * 100_000 * 512, 16) == 16
    assert memory.blas_threads_for(40 * 500 * 512, 16) == 1
    assert memory.blas_threads_for(1 << 40, 3) == 3

    def blas_threads() -> set[int]:
        return {p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"}

    store = MemoryVectorStore(dim=512, capacity=4096)
    rng = np.random.default_rng(1)
    vecs = rng.standard_normal((3_000, 512)).astype(np.float32)
    store.upsert([Prototype(f"p{i}", f"g{i % 300}", v / np.linalg.norm(v)) for i, v in enumerate(vecs)])
    seen: list[set[int]] = []
    inner = memory._blas_threads

    def spy(n_queries: int, n_rows: int, dim: int):  # type: ignore[no-untyped-def]
        cm = inner(n_queries, n_rows, dim)

        class Probe:
            def __enter__(self) -> None:
                cm.__enter__()
                seen.append(blas_threads())

            def __exit__(self, *exc: object) -> None:
                cm.__exit__(*exc)

        return Probe()

    memory._blas_threads = spy
    try:
        store.search_many(vecs[:64], 16, 8)  # 64 x 3,000 x 512 = 0.1 G: one thread
        store.search_many(np.repeat(vecs, 2, axis=0), 16, 8)  # 6,000 x 3,000 x 512 = 9.2 G: 34, capped
    finally:
        memory._blas_threads = inner
    if blas_threads():  # a numpy built without a BLAS threadpoolctl can see has nothing to limit
        assert seen == [{1}, {min(34, allowed_cpus())}]
        assert blas_threads() == {1}
