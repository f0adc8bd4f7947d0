"""The matcher's in-batch candidates: the batch-wide pair search must answer what a per-track scan answers."""

from __future__ import annotations

import numpy as np

from server.identity import TrackState, _BatchPoints


def _track(j: int, gid: str | None) -> TrackState:
    t = TrackState(f"t{j}", "d", "c", j, 0, 0, 0, 0)
    t.global_id = gid
    return t


def _reference(sims: np.ndarray, upto: int, live: list[str | None], floor: float, keep: int, limit: int
               ) -> dict[str, float]:
    """The per-track scan it replaced: the query's ``keep`` best earlier tracks whose prototype is live, those
    at or above the floor, best score per identity, the ``limit`` best identities."""
    earlier = sorted((j for j in range(upto) if live[j] is not None), key=lambda j: -sims[j])[:keep]
    best: dict[str, float] = {}
    for j in earlier:
        gid = live[j]
        if gid is not None and sims[j] >= floor and sims[j] > best.get(gid, -2.0):
            best[gid] = float(sims[j])
    return dict(sorted(best.items(), key=lambda kv: -kv[1])[:limit])


def _reference_pairs(sims: np.ndarray, upto: int, live: list[str | None], floor: float, keep: int
                     ) -> list[tuple[str, float]]:
    """The (identity, cosine) pairs of the query's ``keep`` best earlier live tracks, best first."""
    earlier = sorted((j for j in range(upto) if live[j] is not None), key=lambda j: -sims[j])[:keep]
    return [(g, float(sims[j])) for j in earlier if (g := live[j]) is not None and sims[j] >= floor]


def test_batch_pairs_equal_a_scan_per_track_through_evictions_and_merges() -> None:
    """Each query reads up to ``limit`` identities: past its best pair (argmax) into the pairs sorted on demand."""
    rng = np.random.default_rng(11)
    n, floor, keep, limit = 120, 0.1, 12, 4
    gids = [f"g{int(k)}" for k in rng.integers(0, 15, n)]
    tracks = [_track(j, gids[j]) for j in range(n)]
    queries = sorted(rng.choice(n, 70, replace=False).tolist())
    sims = rng.uniform(-0.5, 1.0, (len(queries), n)).astype(np.float32)
    gone: set[str] = set()
    pts = _BatchPoints(tracks, sims, queries, floor, keep, gone)
    live: list[str | None] = [None] * n
    checked = 0
    slot = {q: r for r, q in enumerate(queries)}
    for i in range(n):
        r = slot.get(i)
        if r is not None:
            got = pts.best(r, limit)
            want = _reference(sims[r], i, live, floor, keep, limit)
            assert got == want, (i, got, want)
            assert list(pts.ranked(r)) == _reference_pairs(sims[r], i, live, floor, keep), "every pair once"
            assert list(got.values()) == sorted(got.values(), reverse=True), "best first"
            checked += bool(want)
        pts.decided(i)
        live[i] = gids[i]
        if i % 9 == 4:  # a bank overflow evicts an earlier track's prototype
            victim = int(rng.integers(0, i + 1))
            pts.drop([f"t{victim}"])
            live[victim] = None
        if i == 60:  # a provisional identity merged into another: its prototypes are deleted
            old = gids[10]
            pts.drop_identity(old)
            gone.add(old)
            live = [None if g == old else g for g in live]
            for t in tracks[61:]:
                if t.global_id == old:
                    t.global_id = "merged"
            gids = [t.global_id for t in tracks]  # type: ignore[misc]
            pts.stale = True
    assert checked > 40


def test_a_track_rewritten_after_its_eviction_is_a_candidate_again() -> None:
    tracks = [_track(0, "a"), _track(1, "b")]
    sims = np.array([[0.0, 0.0], [0.9, 0.0]], dtype=np.float32)  # query rows for tracks 0 and 1
    pts = _BatchPoints(tracks, sims, [0, 1], 0.5, 8)
    pts.drop(["t0"])  # not decided yet: nothing to drop
    pts.decided(0)
    assert pts.best(1, 4) == {"a": 0.8999999761581421}
    pts.drop(["t0"])
    assert pts.best(1, 4) == {}
    pts.decided(0)
    assert pts.best(1, 4) == {"a": 0.8999999761581421}


def _eager_merge(inside: dict[str, float], gallery: list[tuple[str, str, float]], skip_points: set[str],
                 skip_identities: set[str], limit: int) -> list[tuple[str, float]]:
    """The eager merge the lazy one replaced: in-batch best per identity, gallery hits folded in, sorted."""
    best = dict(inside)
    for gid, pid, score in gallery:
        if pid in skip_points or gid in skip_identities:
            continue
        if score > best.get(gid, -2.0):
            best[gid] = score
    return sorted(best.items(), key=lambda kv: -kv[1])[:limit]


def test_lazy_candidate_merge_equals_the_eager_sorted_merge() -> None:
    from types import SimpleNamespace

    from server.identity import IdentityMatcher

    rng = np.random.default_rng(5)
    for trial in range(40):
        n, limit = 60, int(rng.integers(1, 8))
        gids = [f"g{int(k)}" for k in rng.integers(0, 12, n)]
        tracks = [_track(j, gids[j]) for j in range(n)]
        sims = rng.uniform(0.0, 1.0, (1, n)).astype(np.float32)
        pts = _BatchPoints(tracks, sims, [n - 1], 0.3, 40)
        for j in range(n - 1):
            pts.decided(j)
        # The gallery before the batch: best point per identity, best first (what search_many returns).
        scores = sorted(rng.uniform(0.0, 1.0, 10).tolist(), reverse=True)
        ids = rng.permutation(12)[:10]
        gallery = [(f"g{int(k)}", f"p{i}", s) for i, (k, s) in enumerate(zip(ids, scores, strict=True))]
        written = {f"p{i}" for i in rng.choice(10, 2, replace=False)}
        gone_p = {f"p{int(rng.integers(0, 10))}"}
        gone_i = {f"g{int(rng.integers(0, 12))}"}
        pts.gone_identities = gone_i
        matcher = SimpleNamespace(_gone_points=gone_p, _gone_identities=gone_i, _inside=pts,
                                  cfg=SimpleNamespace(candidates=limit))
        matcher._best_first = lambda *a, m=matcher: IdentityMatcher._best_first(m, *a)  # type: ignore[arg-type]
        got = list(IdentityMatcher._merge_candidates(matcher, gallery, 0, written))  # type: ignore[arg-type]
        want = _eager_merge(pts.best(0, limit), gallery, written | gone_p, gone_i, limit)
        assert [g for g, _ in got] == [g for g, _ in want], trial
        assert np.allclose([s for _, s in got], [s for _, s in want])


def test_ids_are_the_standard_uuid5() -> None:
    """Ids are stored and shared between processes and versions: the fast path must be exactly uuid5."""
    import uuid

    from server.identity import _NS, identity_id_for, track_uid_for

    for dev, cam, tid, at in [("dev-1", "cam-0", 0, 0), ("ünï", "çam\x1f", -5, 1_700_000_000_123_456),
                              ("d", "c", 2**40, 7)]:
        uid = track_uid_for(dev, cam, tid, at)
        assert uid == str(uuid.uuid5(_NS, f"track\x1f{dev}\x1f{cam}\x1f{tid}\x1f{at}"))
        assert identity_id_for(uid) == str(uuid.uuid5(_NS, f"identity\x1f{uid}"))


def test_folding_a_batch_at_once_equals_folding_track_by_track() -> None:
    from server.identity import IdentityMatcher

    rng = np.random.default_rng(3)
    n, dim = 50, 16
    owner = rng.integers(0, 7, n)
    embs = rng.standard_normal((n, dim)).astype(np.float32)
    males = rng.uniform(0, 1, n).astype(np.float32)
    quals = rng.uniform(0, 1, n).astype(np.float32)
    quals[:5] = 0.0  # weight floor
    once = [_track(j, None) for j in range(7)]
    each = [_track(j, None) for j in range(7)]
    once[2].emb_sum, once[2].weight, each[2].emb_sum, each[2].weight = np.ones(dim, np.float32), 1.0, \
        np.ones(dim, np.float32), 1.0  # a track resumed with a stored prototype
    IdentityMatcher.fold_crops(None, once, owner, embs, males, quals)  # type: ignore[arg-type]
    for k, t in enumerate(each):
        rows = np.flatnonzero(owner == k)
        w = np.maximum(quals[rows], 0.05)
        s = w @ embs[rows]
        t.emb_sum = s if t.emb_sum is None else t.emb_sum + s
        t.weight += float(w.sum())
        t.n_crops += len(rows)
        t.male_sum += float(w @ males[rows])
        t.male_weight += float(w.sum())
    for a, b in zip(once, each, strict=True):
        np.testing.assert_allclose(a.emb_sum, b.emb_sum, rtol=1e-5)
        assert (a.n_crops, round(a.weight, 4), round(a.male_sum, 4)) == (b.n_crops, round(b.weight, 4),
                                                                         round(b.male_sum, 4))


def test_segment_sums_equal_reduceat() -> None:
    """The fold's row sums per track equal numpy's reduceat to float32 rounding (it adds a segment's rows left
    to right; reduceat may pair them), for short segments (the fast path) and long ones (reduceat itself)."""
    from server.identity import _segment_sums

    rng = np.random.default_rng(5)
    for lens in (rng.integers(1, 5, 700), np.array([1]), rng.integers(1, 80, 40), np.array([3, 1, 33, 2])):
        x = rng.standard_normal((int(lens.sum()), 64)).astype(np.float32)
        starts = np.r_[0, np.cumsum(lens)[:-1]]
        got = _segment_sums(x, starts, lens)
        assert got.dtype == np.float32 and got.shape == (len(lens), 64)
        np.testing.assert_allclose(got, np.add.reduceat(x, starts, axis=0), rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(got[lens <= 2], np.add.reduceat(x, starts, axis=0)[lens <= 2])
