"""The gallery's durable copy lives in SQL (one transaction with the analytics rows); Qdrant is an
asynchronous mirror reconciled from it. Also the per-batch SQL paths that replaced per-track queries."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa

from server.config import QdrantLocalSettings
from server.store import AnalyticsStore, BatchWrite, prototype_row, transitions
from server.vectors.base import Prototype, build_vectors
from server.vectors.memory import CachedVectorStore
from server.vectors.mirror import MirrorProcess, QdrantMirror
from server.vectors.qdrant import QdrantVectorStore

DIM = 16
MODEL = "m1"


def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def pid(i: int) -> str:
    return f"00000000-0000-0000-0000-{i:012d}"


def source(store: AnalyticsStore):
    return (Prototype(p, g, v, pl) for p, g, v, pl, _ in store.load_prototypes(MODEL))


def qdrant_state(path: Path) -> dict[str, tuple[str, int]]:
    q = QdrantVectorStore(QdrantLocalSettings(path=str(path)), dim=DIM, model_id=MODEL)
    try:
        return {p.point_id: (p.global_id, p.payload["rev"]) for p in q.scroll()}
    finally:
        q.close()


@pytest.mark.parametrize("mirror_process", [True, False], ids=["mirror-process", "mirror-thread"])
def test_sql_is_the_gallery_and_qdrant_mirror_catches_up_after_a_crash(tmp_path: Path, mirror_process: bool) -> None:
    rng = np.random.default_rng(0)
    v = unit(rng, 12)
    store = AnalyticsStore(f"sqlite:///{tmp_path / 'a.db'}")
    batch = BatchWrite()
    for i in range(10):
        batch.prototypes[pid(i)] = prototype_row(pid(i), f"g{i % 4}", MODEL, v[i], {"rev": 100 + i}, 100 + i)
    batch.prototypes[pid(99)] = prototype_row(pid(99), "other", "another-model", v[0], {"rev": 1}, 1)
    store.write(batch)
    cfg = QdrantLocalSettings(path=str(tmp_path / "q"), mirror_process=mirror_process)

    gallery = build_vectors(cfg, DIM, MODEL, source=source(store))
    assert isinstance(gallery, CachedVectorStore) and gallery.count() == 10, "loaded from SQL, one model only"
    assert isinstance(gallery.mirror, MirrorProcess if mirror_process else QdrantMirror)
    hit = gallery.search(v[5], 1, 4)[0]
    assert (hit.global_id, hit.point_id) == ("g1", pid(5)) and hit.score > 0.999
    assert gallery.mirror is not None and gallery.mirror.drain(60), "the mirror writes what SQL holds"
    gallery.close()
    assert qdrant_state(tmp_path / "q") == {pid(i): (f"g{i % 4}", 100 + i) for i in range(10)}

    # A run commits a batch to SQL and dies before its mirror write: one new point, one changed, one deleted.
    crash = BatchWrite()
    crash.prototypes[pid(10)] = prototype_row(pid(10), "g9", MODEL, v[10], {"rev": 500}, 500)
    crash.prototypes[pid(3)] = prototype_row(pid(3), "g9", MODEL, v[11], {"rev": 501}, 501)
    crash.prototypes[pid(0)] = None
    crash.drop_identities.add("g2")  # pids 2 and 6
    store.write(crash)
    again = build_vectors(cfg, DIM, MODEL, source=source(store))
    assert again.mirror is not None and again.mirror.drain(60)
    want = {pid(i): (f"g{i % 4}", 100 + i) for i in (1, 4, 5, 7, 8, 9)}
    want |= {pid(10): ("g9", 500), pid(3): ("g9", 501)}
    assert {p.point_id: (p.global_id, p.payload["rev"]) for p in again.scroll()} == want
    again.close()
    assert qdrant_state(tmp_path / "q") == want, "restart reconciles the mirror to the SQL copy"
    store.close()


def test_a_qdrant_only_gallery_is_adopted_not_deleted(tmp_path: Path) -> None:
    """Galleries written before SQL held prototypes: the cache takes Qdrant's points for SQL to store."""
    rng = np.random.default_rng(1)
    v = unit(rng, 5)
    q = QdrantVectorStore(QdrantLocalSettings(path=str(tmp_path / "q")), dim=DIM, model_id=MODEL)
    q.upsert([Prototype(pid(i), f"g{i}", v[i], {"last_seen_us": i}) for i in range(5)])
    q.close()
    store = AnalyticsStore(f"sqlite:///{tmp_path / 'a.db'}")
    gallery = build_vectors(QdrantLocalSettings(path=str(tmp_path / "q")), DIM, MODEL, source=source(store))
    assert isinstance(gallery, CachedVectorStore)
    assert sorted(p.point_id for p in gallery.imported) == [pid(i) for i in range(5)]
    assert gallery.mirror is not None and gallery.mirror.drain(30)
    gallery.close()
    assert len(qdrant_state_loose(tmp_path / "q")) == 5, "nothing was deleted from Qdrant"
    store.close()


def qdrant_state_loose(path: Path) -> set[str]:
    q = QdrantVectorStore(QdrantLocalSettings(path=str(path)), dim=DIM, model_id=MODEL)
    try:
        return {p.point_id for p in q.scroll()}
    finally:
        q.close()


def test_memory_type_is_exact_search_over_the_sql_copy(tmp_path: Path) -> None:
    from server.config import MemorySettings

    rng = np.random.default_rng(2)
    v = unit(rng, 3)
    store = AnalyticsStore(f"sqlite:///{tmp_path / 'a.db'}")
    b = BatchWrite()
    for i in range(3):
        b.prototypes[pid(i)] = prototype_row(pid(i), f"g{i}", MODEL, v[i], {"rev": 1}, 1)
    store.write(b)
    mem = build_vectors(MemorySettings(), DIM, MODEL, source=source(store))
    assert mem.count() == 3 and mem.search(v[2], 1, 1)[0].global_id == "g2"
    np.testing.assert_array_equal(mem.retrieve([pid(1)])[pid(1)].vector, v[1])
    store.close()


def track_row(uid: str, cam: str, tid: int, first: int, last: int, gid: str | None, ended: bool = False) -> dict:
    return {"track_uid": uid, "device_id": "d-" + cam, "camera_id": cam, "track_id": tid, "global_id": gid,
            "first_seen_us": first, "last_seen_us": last, "first_frame_index": 0, "last_frame_index": 1,
            "n_crops": 1, "male_probability": None, "match_similarity": None, "is_new_identity": False,
            "ended": ended}


def test_prefetched_tracks_answer_exactly_what_per_track_queries_answer(tmp_path: Path) -> None:
    store = AnalyticsStore(f"sqlite:///{tmp_path / 'a.db'}")
    rnd = random.Random(3)
    b = BatchWrite()
    n = 0
    for cam, tid in itertools.product(("a", "b"), range(4)):
        t = 0
        for _ in range(rnd.randint(0, 3)):  # local ids reused after restarts
            first = t + rnd.randint(0, 50)
            last = first + rnd.randint(0, 40)
            b.tracks[f"u{n}"] = track_row(f"u{n}", cam, tid, first, last, None, ended=rnd.random() < 0.5)
            n += 1
            t = last
    store.write(b)
    keys = [("d-" + cam, cam, tid) for cam, tid in itertools.product(("a", "b", "c"), range(5))]
    fetched = store.find_tracks(keys)
    from server.store import pick_track

    checked = 0
    for key in keys:
        for at in range(0, 200, 3):
            for gap in (0, 10, 30):
                want = store.find_track(*key, at, gap)
                got = pick_track(fetched[key], at, gap)
                assert (want and want["track_uid"]) == (got and got["track_uid"]), (key, at, gap)
                checked += want is not None
    assert checked > 50
    store.close()


def test_transitions_are_written_set_based_and_dropped_on_merge(tmp_path: Path) -> None:
    store = AnalyticsStore(f"sqlite:///{tmp_path / 'a.db'}")
    b = BatchWrite()
    b.tracks["t1"] = track_row("t1", "a", 1, 0, 100, "g")
    b.tracks["t2"] = track_row("t2", "b", 1, 150, 200, "g")  # a -> b
    b.tracks["t3"] = track_row("t3", "b", 2, 250, 300, "g")  # b -> b: no transition
    b.tracks["t4"] = track_row("t4", "c", 1, 120, 130, "h")  # alone in its identity
    b.assignments = {"t1": "g", "t2": "g", "t3": "g", "t4": "h"}
    store.write(b)
    store.write(b)  # redelivery: same rows
    with store.engine.connect() as c:
        rows = c.execute(sa.select(transitions.c.to_track_uid, transitions.c.from_track_uid,
                                   transitions.c.from_camera_id, transitions.c.to_camera_id,
                                   transitions.c.left_at_us, transitions.c.entered_at_us)).all()
    assert [tuple(r) for r in rows] == [("t2", "t1", "a", "b", 100, 150)]
    m = BatchWrite()
    m.merges["g"] = "h"
    store.write(m)
    with store.engine.connect() as c:
        assert c.execute(sa.select(sa.func.count()).select_from(transitions)).scalar() == 0
        assert c.execute(sa.text("select merged_into from identities")).all() == []  # g had no identity row
    store.close()


def test_a_store_from_an_older_version_gets_the_new_indexes(tmp_path: Path) -> None:
    """create_all leaves existing tables' indexes alone: the store adds what is missing and drops the replaced
    transitions index, so an upgraded server runs the transitions query on the covering index."""
    url = f"sqlite:///{tmp_path / 'a.db'}"
    AnalyticsStore(url).close()
    eng = sa.create_engine(url)
    with eng.begin() as c:  # as an older version left it
        c.execute(sa.text("DROP INDEX ix_tracks_global_recent"))
        c.execute(sa.text("CREATE INDEX ix_tracks_global_last ON tracks (global_id, last_seen_us)"))
    store = AnalyticsStore(url)
    names = {ix["name"] for ix in sa.inspect(store.engine).get_indexes("tracks")}
    assert "ix_tracks_global_recent" in names and "ix_tracks_global_last" not in names
    with store.engine.connect() as c:  # and the transitions lookup walks it
        plan = " ".join(str(r[-1]) for r in c.execute(sa.text(
            "EXPLAIN QUERY PLAN SELECT p.track_uid FROM tracks p WHERE p.global_id = 'g' AND p.track_uid != 'x' "
            "AND p.first_seen_us + 0 <= 5 ORDER BY p.last_seen_us DESC LIMIT 1")))
    assert "COVERING INDEX ix_tracks_global_recent" in plan, plan
    store.close()
    eng.dispose()


def test_mirror_process_outlives_a_ctrl_c_and_drains_on_close(tmp_path: Path) -> None:
    """A terminal's Ctrl-C reaches the consumer's whole process group; the mirror child ignores it so the
    consumer can drain it on close instead of losing its queue mid-write."""
    import os
    import signal
    import time

    from server.vectors.mirror import MirrorProcess

    rng = np.random.default_rng(4)
    v = unit(rng, 3)
    m = MirrorProcess(QdrantLocalSettings(path=str(tmp_path / "q")), dim=DIM, model_id=MODEL)
    os.kill(m.pid, signal.SIGINT)  # type: ignore[arg-type]
    time.sleep(0.5)
    assert m.is_alive()
    m.submit({pid(i): Prototype(pid(i), f"g{i}", v[i], {"rev": 7}) for i in range(3)})
    assert m.drain(30) and m.lag() == 0 and m.written == 3
    m.close(10)
    assert not m.is_alive()
    assert qdrant_state(tmp_path / "q") == {pid(i): (f"g{i}", 7) for i in range(3)}


@pytest.mark.parametrize("mirror_process", [True, False], ids=["mirror-process", "mirror-thread"])
def test_a_collection_of_another_size_is_refused_with_the_fix(tmp_path: Path, mirror_process: bool) -> None:
    """Vectors of another model size would poison the mirror: the store refuses to open and says which
    setting to change, the same way whether Qdrant is opened here or in the mirror's process."""
    q = QdrantVectorStore(QdrantLocalSettings(path=str(tmp_path / "q")), dim=DIM, model_id=MODEL)
    q.close()
    cfg = QdrantLocalSettings(path=str(tmp_path / "q"), mirror_process=mirror_process)
    with pytest.raises(ValueError, match=r"holds 16-d vectors but the embedder makes 8-d ones: set vectors.collection"):
        build_vectors(cfg, 8, MODEL, source=iter(()))
    assert len(qdrant_state_loose(tmp_path / "q")) == 0, "the folder is usable again (no process holds it)"
