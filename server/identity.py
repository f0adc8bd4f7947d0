"""Global identities per TRACK: fuse a track's crop embeddings, match the fused vector against the gallery.

Why per track: one query per new track (or per clearly better crop), never per frame, keeps the vector
store off the hot path, and a quality-weighted mean of several crops is a steadier descriptor than
any single crop.

Batches: the consumer resolves every detection of a batch to its track first (:meth:`track_for`),
folds each track's crops of the batch into it (:meth:`fold_crops`), then :meth:`match_batch` decides
the tracks in order of their first crop with ONE batched gallery search (a matrix product, not a
query per track). Decisions inside a batch still see each other: a track also compares against the
prototypes that earlier tracks of the same batch wrote (one small product of the batch's fused
vectors with themselves), so two cameras' views of a new person in one batch still get one id.

Determinism on redelivery (at-least-once Kafka): a track's uid is uuid5 of (device, camera, local id,
first capture time), a new identity's id is uuid5 of its founding track's uid, and a prototype's point
id is its track's uid. Before matching, a track looks for itself in the analytics store and then in
the vector store: if a crashed run already assigned it, it takes that id again instead of matching
afresh. So replaying a batch neither creates a second identity nor moves a track to another one.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from common.configfile import ConfigError
from server.config import GenderSettings, IdentitySettings
from server.embed.calibration import calibrated_threshold
from server.store import AnalyticsStore, BatchWrite, pick_track, prototype_row
from server.vectors.base import Neighbour, Prototype, VectorStore

log = logging.getLogger(__name__)

_NS = uuid.UUID("4f0d1c2e-8f5e-5a53-9a57-7265696466c7")  # fixed: ids must be the same in every process


_NS_BYTES = _NS.bytes


def _uuid5(name: str) -> str:
    """``str(uuid.uuid5(_NS, name))`` without the UUID object (a new track costs two of these; the stdlib's
    object and its ``__str__`` were three quarters of the time). tests/server/test_identity.py checks equality."""
    b = bytearray(hashlib.sha1(_NS_BYTES + name.encode()).digest()[:16])
    b[6] = (b[6] & 0x0F) | 0x50  # version 5
    b[8] = (b[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = b.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def track_uid_for(device_id: str, camera_id: str, track_id: int, first_seen_us: int) -> str:
    return _uuid5(f"track\x1f{device_id}\x1f{camera_id}\x1f{track_id}\x1f{first_seen_us}")


def identity_id_for(track_uid: str) -> str:
    return _uuid5(f"identity\x1f{track_uid}")


def _agreement(p_query: float, p_gallery: float, eps: float = 1e-3) -> float:
    """:func:`server.attributes.gender_agreement` for two scalars in plain floats (no numpy per candidate)."""
    same = p_query * p_gallery + (1.0 - p_query) * (1.0 - p_gallery)
    same = min(max(same, eps), 1.0 - eps)
    return math.log(same / (1.0 - same))


def _segment_sums(x: np.ndarray, starts: np.ndarray, lens: np.ndarray, max_steps: int = 32) -> np.ndarray:
    """Row sums of consecutive segments of ``x`` (segment ``i``: ``lens[i]`` rows from ``starts[i]``), added left
    to right: ``np.add.reduceat(x, starts, axis=0)`` to float32 rounding. Why: reduceat along rows runs a short
    inner loop per segment; a batch has ~1,000 segments of 1-4 crops, where adding the k-th row of every
    segment at once is ~3x faster (2,000 x 512 crops here: 9.4 against 2.9 ms). Long segments keep reduceat."""
    longest = int(lens.max()) if len(lens) else 0
    if longest > max_steps:
        return np.add.reduceat(x, starts, axis=0)
    out = x[starts]
    for k in range(1, longest):
        more = np.flatnonzero(lens > k)
        out[more] += x[starts[more] + k]
    return out


@dataclass
class TrackState:
    track_uid: str
    device_id: str
    camera_id: str
    track_id: int
    first_seen_us: int
    last_seen_us: int
    first_frame_index: int
    last_frame_index: int
    global_id: str | None = None
    similarity: float | None = None
    founded: bool = False  # this track created its identity
    emb_sum: np.ndarray | None = None
    weight: float = 0.0
    male_sum: float = 0.0
    male_weight: float = 0.0
    n_crops: int = 0
    ended: bool = False

    @property
    def camera(self) -> tuple[str, str]:
        return (self.device_id, self.camera_id)

    @property
    def male_probability(self) -> float | None:
        return self.male_sum / self.male_weight if self.male_weight > 0 else None


@dataclass
class IdentityState:
    global_id: str
    first_seen_us: int
    last_seen_us: int
    male_sum: float = 0.0
    male_n: int = 0
    n_tracks: int = 0
    prototypes: dict[str, int] = field(default_factory=dict)  # point id (track uid) -> last_seen_us
    # This identity's live tracks, and the tracks that ended in the current batch (a batch decides identities
    # after it has seen its tracks end, so those stay until the batch is decided: co-visibility is a question
    # of time overlap, not of being live now). Kept by camera, camera -> track uid -> (first_seen_us,
    # last_seen_us), because co-visibility only asks about the track's own camera and an identity seen by many
    # tracks at once would otherwise be scanned whole; ``active`` says which camera holds each uid.
    by_camera: dict[tuple[str, str], dict[str, tuple[int, int]]] = field(default_factory=dict)
    active: dict[str, tuple[str, str]] = field(default_factory=dict)

    def set_active(self, uid: str, camera: tuple[str, str], first_us: int, last_us: int) -> None:
        if self.active.get(uid, camera) != camera:
            self.drop_active(uid)
        self.active[uid] = camera
        self.by_camera.setdefault(camera, {})[uid] = (first_us, last_us)

    def drop_active(self, uid: str) -> None:
        camera = self.active.pop(uid, None)
        if camera is not None:
            per = self.by_camera[camera]
            del per[uid]
            if not per:
                del self.by_camera[camera]

    @property
    def male_probability(self) -> float | None:
        return self.male_sum / self.male_n if self.male_n else None


@dataclass(frozen=True)
class Assignment:
    global_id: str
    similarity: float
    is_new: bool


_ARGMAX_READS = 4  # pairs of a query read by repeated argmax before its row is sorted


class _BatchPoints:
    """The prototypes a batch writes as it decides its tracks in order, and each query's similar earlier
    tracks, from one (queries x tracks) cosine matrix computed for the whole batch. A query's pairs are read
    off its own row when it is decided, best first, among the earlier tracks whose prototype is live: the
    first few by one ``argmax`` each, the rest sorted only if the caller reads on. Why: deciding a track
    reads one or two pairs, and a partial sort of every row up front (~1,000 x 1,000 a batch) was this
    class's whole cost (18-23 ms a batch here against ~3 ms). Like the gallery search (which holds only live
    prototypes), a query keeps only its ``keep`` best live pairs, and none below ``floor``.

    ``gid_of[j]`` is the identity whose prototype track ``j`` wrote in this batch, or None while it has
    none: not decided yet, evicted from its identity's bank later in the batch, or merged away."""

    def __init__(self, tracks: list[TrackState], sims: np.ndarray | None = None, query_tracks: Sequence[int] = (),
                 floor: float = 0.0, keep: int = 1, gone_identities: set[str] | None = None) -> None:
        self.tracks = tracks
        self.pos = {t.track_uid: j for j, t in enumerate(tracks)}
        self.gid_of: list[str | None] = [None] * len(tracks)
        self.dropped = [False] * len(tracks)
        self._live = np.zeros(len(tracks), dtype=bool)  # gid_of[j] is not None, as a mask over a query's row
        self.n_decided = 0
        self.gone_identities = gone_identities if gone_identities is not None else set()
        self.stale = False  # identities changed under decided tracks (a merge): recompute before the next use
        self._sims = sims
        self._upto = list(query_tracks)  # query row -> its track's position: the earlier tracks are those before
        self._floor, self._keep = floor, max(1, keep)

    def _gid(self, j: int) -> str | None:
        gid = self.tracks[j].global_id
        return None if self.dropped[j] or gid in self.gone_identities else gid

    def _set(self, j: int, gid: str | None) -> None:
        self.gid_of[j] = gid
        self._live[j] = gid is not None

    def decided(self, j: int) -> None:
        """Track ``j`` has just written its prototype."""
        self.dropped[j] = False
        self._set(j, self._gid(j))
        self.n_decided = j + 1

    def drop(self, point_ids: Iterable[str]) -> None:
        for pid in point_ids:
            j = self.pos.get(pid)
            if j is not None and j < self.n_decided:
                self.dropped[j] = True
                self._set(j, None)

    def drop_identity(self, gid: str) -> None:
        """Every decided track's prototype of ``gid`` was deleted with the identity (merged away)."""
        for j in range(self.n_decided):
            if self.tracks[j].global_id == gid:
                self.dropped[j] = True
                self._set(j, None)

    def ranked(self, query: int) -> Iterator[tuple[str, float]]:
        """(identity, cosine) of the live prototypes the batch's earlier tracks wrote, for query row
        ``query``, best first; an identity may come more than once (its first is its best). Lazy: deciding a
        track usually reads one or two pairs."""
        if self.stale:
            for j in range(self.n_decided):
                self._set(j, self._gid(j))
            self.stale = False
        upto = self._upto[query] if self._sims is not None else 0
        if upto <= 0:
            return
        # The query's row over the earlier tracks, dead prototypes out (a copy: masked further as it is read).
        row = np.where(self._live[:upto], self._sims[query, :upto], -np.inf)  # type: ignore[index]
        floor, gid_of = self._floor, self.gid_of
        k = min(self._keep, upto)
        # The first few pairs one argmax each (the pair just given masked out): ~2 us a read against ~17 us for
        # a partial sort of the row.
        for _ in range(min(k, _ARGMAX_READS)):
            j = int(row.argmax())
            s = float(row[j])
            if s < floor:  # below the floor, or no live pair left (-inf)
                return
            row[j] = -np.inf
            yield gid_of[j], s  # type: ignore[misc]
        if k <= _ARGMAX_READS:
            return
        left = k - _ARGMAX_READS
        idx = np.argpartition(-row, left - 1)[:left] if left < upto else np.arange(upto)
        idx = idx[np.argsort(-row[idx], kind="stable")]
        for j, s in zip(idx.tolist(), row[idx].tolist(), strict=True):
            if s < floor:
                return
            yield gid_of[j], s  # type: ignore[misc]

    def best(self, query: int, limit: int) -> dict[str, float]:
        """Up to ``limit`` identities with their best cosine (:meth:`ranked`, each identity once)."""
        out: dict[str, float] = {}
        for gid, score in self.ranked(query):
            if gid not in out:
                out[gid] = score
                if len(out) >= limit:
                    break
        return out


def settings_for_model(cfg: IdentitySettings, embedder_id: str) -> IdentitySettings:
    """``cfg`` with ``match_threshold`` filled in from the embedder's calibration when it is not set; a model
    that was never calibrated needs an explicit threshold (a guessed one silently merges or splits people)."""
    if cfg.match_threshold is not None:
        return cfg
    threshold = calibrated_threshold(embedder_id)
    if threshold is None:
        raise ConfigError("server config", [
            f"identity.match_threshold: no calibrated threshold for embedder model {embedder_id!r}; set one "
            "(docs/server.md, 'Match threshold', says how to measure it)"])
    return cfg.model_copy(update={"match_threshold": threshold})


class IdentityMatcher:
    """Owns track and identity state of one consumer process; writes go into the caller's BatchWrite."""

    def __init__(self, cfg: IdentitySettings, gender: GenderSettings, vectors: VectorStore,
                 store: AnalyticsStore, embedder_id: str) -> None:
        cfg = settings_for_model(cfg, embedder_id)
        assert cfg.match_threshold is not None
        self.cfg = cfg
        self.threshold: float = cfg.match_threshold
        self.gender = gender
        self.vectors = vectors
        self.store = store
        self.embedder_id = embedder_id
        self.tracks: dict[tuple[str, str, int], TrackState] = {}
        self.identities: dict[str, IdentityState] = {}
        self._gap_us = int(cfg.track_resume_gap_s * 1e6)
        self._co_gap_us = int(cfg.co_visible_gap_s * 1e6)
        self._last_expiry_us = 0
        self._stored: dict[tuple[str, str, int], list[dict[str, Any]]] = {}  # this batch's prefetched rows
        # Rows change many times per batch (every detection moves last_seen); they are built once, at
        # the end of the batch, by write_rows().
        self._dirty_tracks: dict[str, TrackState] = {}
        self._dirty_identities: dict[str, IdentityState] = {}
        self._ended: list[TrackState] = []  # tracks ended in the current batch
        self._gone_points: set[str] = set()  # prototypes deleted during the current match_batch
        self._gone_identities: set[str] = set()
        self._inside = _BatchPoints([])  # the current match_batch's own prototypes
        # The vector store writes of the current match_batch, point id -> final state (None: delete), applied
        # in one upsert and one delete at its end. Nothing reads the store between: the batch's own points
        # are searched in ``_inside``, and its gallery search ran before the first decision.
        self._vector_writes: dict[str, Prototype | None] = {}
        self.stats = {"matched": 0, "new": 0, "merged": 0, "resumed": 0, "expired": 0, "queries": 0}
        for row in store.live_identities():
            self.identities[row["global_id"]] = IdentityState(
                row["global_id"], row["first_seen_us"], row["last_seen_us"],
                male_sum=row["male_probability"] or 0.0, male_n=1 if row["male_probability"] is not None else 0,
                n_tracks=row["n_tracks"])
        for proto in vectors.scroll():
            ident = self.identities.get(proto.global_id)
            if ident is not None:
                ident.prototypes[proto.point_id] = int(proto.payload.get("last_seen_us", ident.last_seen_us))

    # --- tracks ----------------------------------------------------------------------------
    def prefetch(self, keys: Iterable[tuple[str, str, int]]) -> None:
        """Fetch, in one query, the stored rows of every (device, camera, local id) of a batch that is not
        in memory, so resolving them costs no per-track SELECT. The store does not change during a batch
        (it is written once at its end), so these rows answer exactly what per-track queries would."""
        unknown = {k for k in keys if k not in self.tracks}
        self._stored = self.store.find_tracks(sorted(unknown)) if unknown else {}

    def _find_stored(self, key: tuple[str, str, int], at_us: int) -> dict[str, Any] | None:
        rows = self._stored.get(key)
        if rows is not None:
            return pick_track(rows, at_us, self._gap_us)
        return self.store.find_track(key[0], key[1], key[2], at_us, self._gap_us)

    def track_for(self, device_id: str, camera_id: str, track_id: int, at_us: int, frame_index: int,
                  batch: BatchWrite) -> TrackState:
        """The track this detection belongs to: in memory, else resumed from the store, else new."""
        key = (device_id, camera_id, track_id)
        t = self.tracks.get(key)
        if t is not None and (t.first_seen_us <= at_us <= t.last_seen_us
                              or (not t.ended and at_us - t.last_seen_us <= self._gap_us and at_us >= t.first_seen_us)):
            self._observe(t, at_us, frame_index, batch)
            return t
        row = self._find_stored(key, at_us)
        if row is not None:
            t = TrackState(row["track_uid"], device_id, camera_id, track_id, row["first_seen_us"],
                           row["last_seen_us"], row["first_frame_index"], row["last_frame_index"],
                           global_id=row["global_id"], similarity=row["match_similarity"],
                           founded=bool(row["is_new_identity"]), n_crops=row["n_crops"], ended=bool(row["ended"]))
            if row["male_probability"] is not None:
                t.male_sum, t.male_weight = float(row["male_probability"]), 1.0
            own = self.vectors.retrieve([t.track_uid]).get(t.track_uid)
            if own is not None:  # continue fusing from the stored prototype
                t.emb_sum, t.weight = own.vector.astype(np.float32) * 1.0, 1.0
            self.stats["resumed"] += 1
        else:
            uid = track_uid_for(device_id, camera_id, track_id, at_us)
            t = TrackState(uid, device_id, camera_id, track_id, at_us, at_us, frame_index, frame_index)
            batch.fresh_tracks.add(uid)
        self.tracks[key] = t
        self._observe(t, at_us, frame_index, batch)
        return t

    def _observe(self, t: TrackState, at_us: int, frame_index: int, batch: BatchWrite) -> None:
        t.first_seen_us = min(t.first_seen_us, at_us)
        t.last_seen_us = max(t.last_seen_us, at_us)
        t.first_frame_index = min(t.first_frame_index, frame_index)
        t.last_frame_index = max(t.last_frame_index, frame_index)
        if t.global_id is not None:
            ident = self._identity(t.global_id, at_us)
            ident.last_seen_us = max(ident.last_seen_us, at_us)
            ident.set_active(t.track_uid, t.camera, t.first_seen_us, t.last_seen_us)
            if t.track_uid in ident.prototypes:
                ident.prototypes[t.track_uid] = max(ident.prototypes[t.track_uid], at_us)
            self._write_identity(ident, batch)
        self._write_track(t, batch)

    def end_track(self, device_id: str, camera_id: str, track_id: int, at_us: int, batch: BatchWrite) -> None:
        t = self.tracks.pop((device_id, camera_id, track_id), None)
        if t is None:
            row = self._find_stored((device_id, camera_id, track_id), at_us)
            if row is None:
                return
            batch.tracks[row["track_uid"]] = {**row, "ended": True}
            return
        t.ended = True  # its entry in its identity's ``active`` stays until the batch is decided
        self._ended.append(t)
        self._write_track(t, batch)

    # --- crops ---------------------------------------------------------------------------
    def add_crops(self, t: TrackState, embeddings: np.ndarray, male_probabilities: np.ndarray | None,
                  qualities: np.ndarray) -> None:
        """Fold crops of one track into its quality-weighted sums (no matching yet)."""
        self.fold_crops([t], np.zeros(len(qualities), np.int64), embeddings, male_probabilities, qualities)

    def fold_crops(self, tracks: Sequence[TrackState], owner: np.ndarray, embeddings: np.ndarray,
                   male_probabilities: np.ndarray | None, qualities: np.ndarray) -> None:
        """Fold a batch's crops into their tracks' quality-weighted sums, crop ``j`` into ``tracks[owner[j]]``:
        one sort and one segmented sum for the whole batch instead of a few numpy calls per track."""
        if not len(owner):
            return
        w = np.maximum(np.asarray(qualities, dtype=np.float32).reshape(-1), 0.05)
        order = np.argsort(owner, kind="stable")
        own = np.asarray(owner)[order]
        starts = np.flatnonzero(np.r_[True, own[1:] != own[:-1]])
        emb = np.asarray(embeddings, dtype=np.float32).reshape(len(w), -1)
        lens = np.diff(np.r_[starts, len(own)])
        sums = _segment_sums(emb[order] * w[order, None], starts, lens)
        wsums = np.add.reduceat(w[order], starts).tolist()
        counts = lens.tolist()
        msums = None
        if male_probabilities is not None:
            m = np.asarray(male_probabilities, dtype=np.float32).reshape(-1)
            msums = np.add.reduceat((w * m)[order], starts).tolist()
        for k, ti in enumerate(own[starts].tolist()):
            t = tracks[ti]
            # a copy, not a view: a long-lived track must not keep its whole batch's array alive
            t.emb_sum = sums[k].copy() if t.emb_sum is None else t.emb_sum + sums[k]
            t.weight += wsums[k]
            t.n_crops += counts[k]
            if msums is not None:
                t.male_sum += msums[k]
                t.male_weight += wsums[k]

    def match_batch(self, tracks: list[TrackState], at_us: int, batch: BatchWrite) -> list[Assignment]:
        """Assign (or re-match) every track that got crops in this batch, in the given order, and refresh
        their prototypes. ``at_us`` is the batch's latest capture time (identity bookkeeping only)."""
        if not tracks:
            return []
        sums = np.stack([t.emb_sum for t in tracks]).astype(np.float32)  # type: ignore[misc]
        fused = sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)
        own = self.vectors.retrieve([t.track_uid for t in tracks if t.global_id is None])
        may_query = [i for i, t in enumerate(tracks)
                     if (t.global_id is None and t.track_uid not in own)
                     or (t.global_id is not None and t.founded and self.cfg.rematch_new_identities)]
        slot = {i: r for r, i in enumerate(may_query)}
        c, bank = self.cfg.candidates, self.cfg.prototypes_per_identity
        floor = self._score_floor()
        pre = self.vectors.search_many(fused[may_query], c, bank, floor) if may_query else []
        self.stats["queries"] += len(may_query)
        self._gone_points, self._gone_identities = set(), set()
        self._vector_writes = {}
        # The batch's own points: every query's cosine to every track of the batch, kept where it could matter.
        self._inside = _BatchPoints(tracks, fused[may_query] @ fused.T if may_query else None, may_query, floor,
                                    c * bank, self._gone_identities)
        written: set[str] = set()  # point ids the batch has rewritten so far (tracks[:i])
        out: list[Assignment] = []
        for i, t in enumerate(tracks):
            r = slot.get(i)

            def candidates(r: int | None = r) -> Iterator[tuple[str, float]]:
                assert r is not None
                return self._merge_candidates(pre[r], r, written)

            if t.global_id is None:
                a = self._assign(t, own.get(t.track_uid), candidates, at_us, batch)
            elif r is not None and t.founded and self._identity(t.global_id, at_us).n_tracks <= 1:
                a = self._rematch(t, candidates, at_us, batch)
            else:
                a = Assignment(t.global_id, t.similarity or 0.0, t.founded)
            self._put_prototype(t, fused[i], at_us, batch)
            written.add(t.track_uid)
            self._inside.decided(i)
            self._write_track(t, batch)
            out.append(a)
        self._apply_vector_writes()
        return out

    def _apply_vector_writes(self) -> None:
        writes, self._vector_writes = self._vector_writes, {}
        doomed = [pid for pid, p in writes.items() if p is None]
        if doomed:
            self.vectors.delete_points(doomed)
        self.vectors.upsert([p for p in writes.values() if p is not None])

    def _merge_candidates(self, gallery: list[Neighbour], query: int, written: set[str]
                          ) -> Iterator[tuple[str, float]]:
        """The ``candidates`` best identities by cosine, best first: the gallery as it was before the batch
        (minus points the batch rewrote or deleted) merged with the prototypes the batch's earlier tracks
        wrote. Both are sorted best first, so this is a lazy merge: the caller usually stops at the first
        acceptable candidate, and building and sorting the whole list per track cost ~30 us a track."""
        seen: set[str] = set()
        limit = self.cfg.candidates
        for gid, score in self._best_first(gallery, query, written):
            if gid not in seen:
                seen.add(gid)
                yield gid, score
                if len(seen) >= limit:
                    return

    def _best_first(self, gallery: list[Neighbour], query: int, written: set[str]) -> Iterator[tuple[str, float]]:
        """The two sources of :meth:`_merge_candidates` merged, best first (an identity may repeat)."""
        gone_p, gone_i = self._gone_points, self._gone_identities
        inside = self._inside.ranked(query)
        nxt = next(inside, None)
        for gid, pid, score in gallery:  # (global_id, point_id, score): Neighbours or the plain tuples of a batch
            if pid in written or pid in gone_p or gid in gone_i:
                continue
            while nxt is not None and nxt[1] >= score:  # ties: the batch's own point first
                yield nxt
                nxt = next(inside, None)
            yield gid, score
        if nxt is not None:
            yield nxt
            yield from inside

    def _score_floor(self) -> float:
        """The lowest cosine that could still reach ``match_threshold``: lower candidates can never be
        chosen, so searches leave them out (the soft gender term can add at most ``soft_weight`` times
        the largest log-odds agreement)."""
        bonus = self.gender.soft_weight * _agreement(1.0, 1.0) if self.gender.mode == "soft" else 0.0
        return self.threshold - bonus

    def _assign(self, t: TrackState, own: Prototype | None, candidates: Callable[[], Iterable[tuple[str, float]]],
                at_us: int, batch: BatchWrite) -> Assignment:
        if own is not None:  # redelivery: this track was already assigned by a run that did not commit
            gid, sim, new = own.global_id, float(own.payload.get("similarity", 1.0)), \
                own.global_id == identity_id_for(t.track_uid)
            self.stats["resumed"] += 1
        else:
            best = self._best_candidate(t, candidates(), exclude=None)
            if best is not None and best[1] >= self.threshold:
                gid, sim, new = best[0], best[1], False
                self.stats["matched"] += 1
            else:
                gid, sim, new = identity_id_for(t.track_uid), 0.0, True
                self.stats["new"] += 1
        self._join(t, gid, sim, new, at_us, batch)
        return Assignment(gid, sim, new)

    def _rematch(self, t: TrackState, candidates: Callable[[], Iterable[tuple[str, float]]], at_us: int,
                 batch: BatchWrite) -> Assignment:
        """A track alone in the identity it founded: does its better view now match someone known?"""
        assert t.global_id is not None
        best = self._best_candidate(t, candidates(), exclude=t.global_id)
        if best is None or best[1] < self.threshold:
            return Assignment(t.global_id, t.similarity or 0.0, True)
        old = t.global_id
        old_ident = self.identities.pop(old, None)
        self.vectors.delete_identities([old])
        for pid, p in self._vector_writes.items():  # and the points this batch was about to write for it
            if p is not None and p.global_id == old:
                self._vector_writes[pid] = None
        self._gone_identities.add(old)
        self._inside.drop_identity(old)
        self._inside.stale = True
        self._drop_prototypes(old, batch)
        batch.merges[old] = best[0]
        batch.identities.pop(old, None)
        self._dirty_identities.pop(old, None)
        t.global_id = None
        t.founded = False
        self._join(t, best[0], best[1], False, at_us, batch)
        self.stats["merged"] += 1
        if old_ident is not None:  # carry the provisional identity's other live tracks over (none expected)
            for uid in old_ident.active:
                for other in self.tracks.values():
                    if other.track_uid == uid and other is not t:
                        other.global_id = best[0]
                        batch.assignments[uid] = best[0]
                        self._inside.stale = True
        log.debug("merged provisional identity", extra={"from": old, "into": best[0], "similarity": best[1]})
        return Assignment(best[0], best[1], False)

    def _best_candidate(self, t: TrackState, neigh: Iterable[tuple[str, float]], exclude: str | None,
                        ) -> tuple[str, float] | None:
        """The highest-scoring acceptable candidate. ``neigh`` is best first, so without the soft gender term
        (the only thing that reorders it) the first acceptable one wins and the rest are never checked; with
        it, co-visibility (the costly test) is only asked of a candidate that would beat the best so far."""
        p_track = t.male_probability
        gender = self.gender.mode if p_track is not None else "off"
        c = self.gender.filter_confidence
        best: tuple[str, float] | None = None
        for gid, score in neigh:
            if gid == exclude:
                continue
            ident = self.identities.get(gid)
            p_id = ident.male_probability if ident is not None else None
            if p_id is not None and gender == "filter":
                if (p_track >= c and p_id <= 1 - c) or (p_track <= 1 - c and p_id >= c):  # type: ignore[operator]
                    continue
            elif p_id is not None and gender == "soft":
                score += self.gender.soft_weight * _agreement(p_track, p_id)  # type: ignore[arg-type]
            if best is not None and score <= best[1]:
                continue
            if ident is not None and self.cfg.exclude_co_visible and self._co_visible(ident, t):
                continue
            best = (gid, score)
            if gender != "soft":
                break
        return best

    def _co_visible(self, ident: IdentityState, t: TrackState) -> bool:
        """Is another track of this identity on the same camera during this track's lifetime?"""
        gap = self._co_gap_us
        lo, hi = t.first_seen_us - gap, t.last_seen_us + gap
        for uid, (first_us, last_us) in ident.by_camera.get(t.camera, {}).items():
            if last_us >= lo and first_us <= hi and uid != t.track_uid:
                return True
        return False

    def _join(self, t: TrackState, gid: str, sim: float, new: bool, at_us: int, batch: BatchWrite) -> None:
        t.global_id, t.similarity, t.founded = gid, sim, new
        ident = self.identities.get(gid)
        if ident is None:
            ident = self._identity(gid, at_us)
            ident.first_seen_us = min(ident.first_seen_us, t.first_seen_us)
        ident.n_tracks += 1
        if t.male_probability is not None:
            ident.male_sum += t.male_probability
            ident.male_n += 1
        ident.last_seen_us = max(ident.last_seen_us, t.last_seen_us)
        ident.set_active(t.track_uid, t.camera, t.first_seen_us, t.last_seen_us)
        batch.assignments[t.track_uid] = gid
        if new:
            batch.identities[gid] = {
                "global_id": gid, "embedder_id": self.embedder_id, "first_seen_us": t.first_seen_us,
                "last_seen_us": t.last_seen_us, "first_device_id": t.device_id, "first_camera_id": t.camera_id,
                "founding_track_uid": t.track_uid, "male_probability": ident.male_probability,
                "n_tracks": ident.n_tracks}
        self._write_identity(ident, batch)

    def _identity(self, gid: str, at_us: int) -> IdentityState:
        ident = self.identities.get(gid)
        if ident is None:
            ident = IdentityState(gid, at_us, at_us)
            self.identities[gid] = ident
        return ident

    def _put_prototype(self, t: TrackState, fused: np.ndarray, at_us: int, batch: BatchWrite) -> None:
        assert t.global_id is not None
        ident = self._identity(t.global_id, at_us)
        ident.prototypes[t.track_uid] = t.last_seen_us
        doomed: list[str] = []
        while len(ident.prototypes) > self.cfg.prototypes_per_identity:
            oldest = min((p for p in ident.prototypes if p != t.track_uid), key=ident.prototypes.__getitem__)
            del ident.prototypes[oldest]
            doomed.append(oldest)
        if doomed:
            for pid in doomed:
                self._vector_writes[pid] = None
            self._gone_points.update(doomed)
            self._inside.drop(doomed)
            for pid in doomed:
                batch.prototypes[pid] = None
        payload = {
            "male_probability": ident.male_probability, "cameras": sorted({c[1] for c in ident.by_camera}
                                                                           | {t.camera_id}),
            "first_seen_us": ident.first_seen_us, "last_seen_us": t.last_seen_us,
            "sightings": ident.n_tracks, "similarity": t.similarity or 0.0, "device_id": t.device_id,
            "rev": time.time_ns() // 1000}
        self._vector_writes[t.track_uid] = Prototype(t.track_uid, t.global_id, fused, payload)
        # The durable copy, in the batch's own transaction (the Qdrant mirror follows after the commit).
        batch.prototypes[t.track_uid] = prototype_row(t.track_uid, t.global_id, self.embedder_id, fused, payload,
                                                      payload["rev"])

    def _drop_prototypes(self, gid: str, batch: BatchWrite) -> None:
        """All prototypes of an identity leave the durable copy too, including any this batch wrote."""
        batch.drop_identities.add(gid)
        for pid, row in list(batch.prototypes.items()):
            if row is not None and row["global_id"] == gid:
                batch.prototypes[pid] = None

    # --- rows ------------------------------------------------------------------------------
    def _write_track(self, t: TrackState, _batch: BatchWrite) -> None:
        self._dirty_tracks[t.track_uid] = t

    def _write_identity(self, ident: IdentityState, _batch: BatchWrite) -> None:
        self._dirty_identities[ident.global_id] = ident

    def write_rows(self, batch: BatchWrite) -> None:
        """Build the batch's track and identity rows once, from their final state, and close the batch's
        bookkeeping (call after the batch's last track_for/match_batch/end_track)."""
        for t in self._dirty_tracks.values():
            batch.tracks[t.track_uid] = {
                "track_uid": t.track_uid, "device_id": t.device_id, "camera_id": t.camera_id,
                "track_id": t.track_id, "global_id": t.global_id, "first_seen_us": t.first_seen_us,
                "last_seen_us": t.last_seen_us, "first_frame_index": t.first_frame_index,
                "last_frame_index": t.last_frame_index, "n_crops": t.n_crops, "male_probability": t.male_probability,
                "match_similarity": t.similarity, "is_new_identity": t.founded, "ended": t.ended}
        for ident in self._dirty_identities.values():
            row = batch.identities.get(ident.global_id)
            if row is None:
                # Existing identity: only the mergeable columns matter (the insert branch never fires);
                # still give every NOT NULL column a value so the statement is valid.
                row = {"global_id": ident.global_id, "embedder_id": self.embedder_id,
                       "first_seen_us": ident.first_seen_us, "first_device_id": "", "first_camera_id": "",
                       "founding_track_uid": ""}
                batch.identities[ident.global_id] = row
            row.update(last_seen_us=ident.last_seen_us, male_probability=ident.male_probability,
                       n_tracks=ident.n_tracks)
        self._dirty_tracks.clear()
        self._dirty_identities.clear()
        for t in self._ended:  # decided: ended tracks leave the co-visibility bookkeeping
            ident = self.identities.get(t.global_id) if t.global_id is not None else None
            if ident is not None:
                ident.drop_active(t.track_uid)
        self._ended.clear()

    # --- housekeeping ----------------------------------------------------------------------
    def expire(self, now_us: int, batch: BatchWrite) -> list[str]:
        """Drop identities unseen for ``retention_s`` (event time) from the gallery; forget stale tracks."""
        if now_us - self._last_expiry_us < int(self.cfg.expiry_interval_s * 1e6):
            return []
        self._last_expiry_us = now_us
        cutoff = now_us - int(self.cfg.retention_s * 1e6)
        old = now_us - self._gap_us
        for ident in self.identities.values():  # forget tracks long over (live ones are seen, so recent)
            for uid in [u for per in ident.by_camera.values() for u, (_f, last_us) in per.items() if last_us < old]:
                ident.drop_active(uid)
        doomed = [gid for gid, ident in self.identities.items() if ident.last_seen_us < cutoff and not ident.active]
        if doomed:
            self.vectors.delete_identities(doomed)
            for gid in doomed:
                del self.identities[gid]
                self._drop_prototypes(gid, batch)
                batch.expired[gid] = now_us
            self.stats["expired"] += len(doomed)
        for k in [k for k, t in self.tracks.items() if t.last_seen_us < old]:
            del self.tracks[k]
        return doomed

    def gallery_size(self) -> int:
        return len(self.identities)

    def live_tracks(self) -> Iterable[TrackState]:
        return self.tracks.values()
