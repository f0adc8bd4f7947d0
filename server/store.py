"""Analytics store: identities, tracks, sightings, transitions and cameras in SQLite (WAL) or PostgreSQL.

SQLAlchemy Core, one schema for both dialects. Every write is an upsert keyed by a deterministic id
(track uid, (track uid, time bucket), ...) and merges with min/max, so replaying a batch after a
crash writes the same rows again instead of adding new ones. One batch of the consumer is one
transaction: the Kafka offsets are stored only after it commits. Times are integer microseconds
since the Unix epoch, UTC, like the Avro ``*_us`` fields. docs/server.md documents the tables and
the dashboard queries.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

log = logging.getLogger(__name__)

metadata = sa.MetaData()

identities = sa.Table(
    "identities", metadata,
    sa.Column("global_id", sa.String(36), primary_key=True, comment="uuid5 of the founding track uid"),
    sa.Column("embedder_id", sa.String(128), nullable=False),
    sa.Column("first_seen_us", sa.BigInteger, nullable=False),
    sa.Column("last_seen_us", sa.BigInteger, nullable=False),
    sa.Column("first_device_id", sa.String(128), nullable=False),
    sa.Column("first_camera_id", sa.String(128), nullable=False),
    sa.Column("founding_track_uid", sa.String(36), nullable=False),
    sa.Column("male_probability", sa.Float, nullable=True, comment="mean over the identity's tracks"),
    sa.Column("n_tracks", sa.Integer, nullable=False, server_default="1"),
    sa.Column("merged_into", sa.String(36), nullable=True, comment="set when a provisional identity was merged"),
    sa.Column("expired_at_us", sa.BigInteger, nullable=True, comment="left the matching gallery (retention)"),
)
sa.Index("ix_identities_last_seen", identities.c.last_seen_us)

tracks = sa.Table(
    "tracks", metadata,
    sa.Column("track_uid", sa.String(36), primary_key=True, comment="uuid5(device, camera, track_id, start)"),
    sa.Column("device_id", sa.String(128), nullable=False),
    sa.Column("camera_id", sa.String(128), nullable=False),
    sa.Column("track_id", sa.BigInteger, nullable=False, comment="appliance-local ByteTrack id"),
    sa.Column("global_id", sa.String(36), nullable=True, comment="NULL until the track has a usable crop"),
    sa.Column("first_seen_us", sa.BigInteger, nullable=False),
    sa.Column("last_seen_us", sa.BigInteger, nullable=False),
    sa.Column("first_frame_index", sa.BigInteger, nullable=False),
    sa.Column("last_frame_index", sa.BigInteger, nullable=False),
    sa.Column("n_crops", sa.Integer, nullable=False, server_default="0"),
    sa.Column("male_probability", sa.Float, nullable=True),
    sa.Column("match_similarity", sa.Float, nullable=True, comment="score that joined it to its identity"),
    sa.Column("is_new_identity", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("ended", sa.Boolean, nullable=False, server_default=sa.false()),
)
sa.Index("ix_tracks_local", tracks.c.device_id, tracks.c.camera_id, tracks.c.track_id, tracks.c.first_seen_us)
sa.Index("ix_tracks_global", tracks.c.global_id, tracks.c.first_seen_us)
# The transition query's "identity's latest earlier track": newest last_seen first, no sort, no scan of all
# of a busy identity's tracks. It carries first_seen_us and track_uid, the columns the query filters on, so
# walking past the identity's newer tracks reads the index only, not a table row per track.
sa.Index("ix_tracks_global_recent", tracks.c.global_id, tracks.c.last_seen_us, tracks.c.first_seen_us,
         tracks.c.track_uid)
sa.Index("ix_tracks_last_seen", tracks.c.last_seen_us)

sightings = sa.Table(
    "sightings", metadata,
    sa.Column("track_uid", sa.String(36), primary_key=True),
    sa.Column("bucket_start_us", sa.BigInteger, primary_key=True, comment="floor(t / bucket) * bucket"),
    sa.Column("device_id", sa.String(128), nullable=False),
    sa.Column("camera_id", sa.String(128), nullable=False),
    sa.Column("global_id", sa.String(36), nullable=True),
    sa.Column("first_seen_us", sa.BigInteger, nullable=False),
    sa.Column("last_seen_us", sa.BigInteger, nullable=False),
)
sa.Index("ix_sightings_camera_time", sightings.c.camera_id, sightings.c.bucket_start_us)
sa.Index("ix_sightings_time", sightings.c.bucket_start_us)
sa.Index("ix_sightings_global", sightings.c.global_id, sightings.c.bucket_start_us)

transitions = sa.Table(
    "transitions", metadata,
    sa.Column("to_track_uid", sa.String(36), primary_key=True),
    sa.Column("global_id", sa.String(36), nullable=False),
    sa.Column("from_track_uid", sa.String(36), nullable=False),
    sa.Column("from_device_id", sa.String(128), nullable=False),
    sa.Column("from_camera_id", sa.String(128), nullable=False),
    sa.Column("left_at_us", sa.BigInteger, nullable=False),
    sa.Column("to_device_id", sa.String(128), nullable=False),
    sa.Column("to_camera_id", sa.String(128), nullable=False),
    sa.Column("entered_at_us", sa.BigInteger, nullable=False),
)
sa.Index("ix_transitions_time", transitions.c.entered_at_us)

prototypes = sa.Table(
    "prototypes", metadata,
    sa.Column("point_id", sa.String(36), primary_key=True, comment="the track uid whose fused vector this is"),
    sa.Column("global_id", sa.String(36), nullable=False),
    sa.Column("embedder_id", sa.String(128), nullable=False, comment="vectors of different models never mix"),
    sa.Column("vector", sa.LargeBinary, nullable=False, comment="float32 little-endian, unit length"),
    sa.Column("payload", sa.Text, nullable=False, comment="JSON: the Qdrant payload"),
    sa.Column("rev", sa.BigInteger, nullable=False, comment="write time (us); the Qdrant mirror carries it too"),
)
sa.Index("ix_prototypes_model_identity", prototypes.c.embedder_id, prototypes.c.global_id)

cameras = sa.Table(
    "cameras", metadata,
    sa.Column("device_id", sa.String(128), primary_key=True),
    sa.Column("camera_id", sa.String(128), primary_key=True),
    sa.Column("frame_width", sa.Integer, nullable=False),
    sa.Column("frame_height", sa.Integer, nullable=False),
    sa.Column("first_frame_at_us", sa.BigInteger, nullable=False),
    sa.Column("last_frame_at_us", sa.BigInteger, nullable=False),
    sa.Column("last_frame_index", sa.BigInteger, nullable=False),
)


@dataclass
class BatchWrite:
    """Everything one consumer batch changes; applied in one transaction by :meth:`AnalyticsStore.write`."""

    cameras: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    tracks: dict[str, dict[str, Any]] = field(default_factory=dict)
    identities: dict[str, dict[str, Any]] = field(default_factory=dict)
    sightings: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)
    assignments: dict[str, str] = field(default_factory=dict)  # track_uid -> global_id (new or changed)
    merges: dict[str, str] = field(default_factory=dict)  # provisional global_id -> surviving global_id
    expired: dict[str, int] = field(default_factory=dict)  # global_id -> expired_at_us
    # point id -> prototype row (``prototype_row``) or None (delete): the durable copy of the gallery
    prototypes: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    drop_identities: set[str] = field(default_factory=set)  # delete every prototype of these identities
    # Tracks first seen in this batch: no stored sightings yet, so an assignment needs no UPDATE of them (the
    # batch's own sightings already carry the final id).
    fresh_tracks: set[str] = field(default_factory=set)

    def add_sighting(self, track_uid: str, bucket_start_us: int, device_id: str, camera_id: str,
                     global_id: str | None, at_us: int) -> None:
        """One box of a track: :meth:`merge_row` on ``sightings`` without building a row per box (this runs
        for every person box of every frame)."""
        key = (track_uid, bucket_start_us)
        row = self.sightings.get(key)
        if row is None:
            self.sightings[key] = {"track_uid": track_uid, "bucket_start_us": bucket_start_us,
                                   "device_id": device_id, "camera_id": camera_id, "global_id": global_id,
                                   "first_seen_us": at_us, "last_seen_us": at_us}
            return
        row["first_seen_us"] = min(row["first_seen_us"], at_us)
        row["last_seen_us"] = max(row["last_seen_us"], at_us)
        if global_id is not None:
            row["global_id"] = global_id

    def merge_row(self, table: dict[Any, dict[str, Any]], key: Any, row: dict[str, Any]) -> None:
        """Fold a row into the batch with the same min/max rules the database applies."""
        old = table.get(key)
        if old is None:
            table[key] = dict(row)
            return
        for k, v in row.items():
            if v is None:
                continue
            if k.startswith("first_") and old.get(k) is not None:
                old[k] = min(old[k], v)
            elif (k.startswith("last_") or k in ("n_crops", "n_tracks")) and old.get(k) is not None:
                old[k] = max(old[k], v)
            elif k == "ended":
                old[k] = bool(old.get(k)) or bool(v)
            else:
                old[k] = v


class AnalyticsStore:
    def __init__(self, url: str, *, create: bool = True) -> None:
        if url.startswith("sqlite:///") and not url.startswith("sqlite:///:memory:"):
            Path(url.removeprefix("sqlite:///")).expanduser().parent.mkdir(parents=True, exist_ok=True)
        self.url = url
        self.engine: Engine = sa.create_engine(url, future=True, pool_pre_ping=True)
        self.dialect = self.engine.dialect.name
        self._compiled: dict[tuple[Any, ...], tuple[str, tuple[str, ...] | None]] = {}
        if self.dialect == "sqlite":
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
        if create:
            metadata.create_all(self.engine)
            # create_all skips the indexes of tables that already exist: a store written by an older version
            # gets the indexes added since, and loses the one replaced.
            for table in metadata.sorted_tables:
                for index in table.indexes:
                    index.create(self.engine, checkfirst=True)
            with self.engine.begin() as conn:
                conn.execute(sa.text("DROP INDEX IF EXISTS ix_tracks_global_last"))
        log.info("analytics store ready", extra={"dialect": self.dialect})

    # --- dialect helpers -------------------------------------------------------------------
    def _insert(self, table: sa.Table) -> Any:
        if self.dialect == "sqlite":
            from sqlalchemy.dialects.sqlite import insert
        else:
            from sqlalchemy.dialects.postgresql import insert
        return insert(table)

    def _least(self, a: Any, b: Any) -> Any:
        return sa.func.min(a, b) if self.dialect == "sqlite" else sa.func.least(a, b)

    def _greatest(self, a: Any, b: Any) -> Any:
        return sa.func.max(a, b) if self.dialect == "sqlite" else sa.func.greatest(a, b)

    def _upsert(self, conn: Connection, table: sa.Table, rows: Sequence[dict[str, Any]],
                keys: Sequence[str], rules: dict[str, str]) -> None:
        """Insert rows; on key conflict merge column by column: min, max, coalesce (new wins if not NULL),
        or, (boolean OR), new (overwrite). One executemany at the driver: the statement is compiled once per
        table and column set, and rows go to the driver as they are (SQLAlchemy's per-row parameter handling
        was about a third of a batch's commit time)."""
        if not rows:
            return
        cols = tuple(rows[0])
        key = (table.name, cols, tuple(keys), tuple(rules.items()))
        compiled = self._compiled.get(key)
        if compiled is None:
            compiled = self._compiled[key] = self._compile_upsert(table, cols, keys, rules)
        sql, order = compiled
        params: Any = [tuple(r[c] for c in order) for r in rows] if order is not None else list(rows)
        conn.exec_driver_sql(sql, params)

    def _compile_upsert(self, table: sa.Table, cols: Sequence[str], keys: Sequence[str], rules: dict[str, str]
                        ) -> tuple[str, tuple[str, ...] | None]:
        stmt = self._insert(table).values({c: sa.bindparam(c) for c in cols})
        ex = stmt.excluded
        set_: dict[str, Any] = {}
        for col, rule in rules.items():
            old, new = table.c[col], ex[col]
            if rule == "min":
                set_[col] = self._least(old, new)
            elif rule == "max":
                set_[col] = self._greatest(old, new)
            elif rule == "coalesce":
                set_[col] = sa.func.coalesce(new, old)
            elif rule == "or":
                set_[col] = sa.or_(old, new)
            elif rule == "new":
                set_[col] = new
            else:  # pragma: no cover - programming error
                raise ValueError(rule)
        compiled = stmt.on_conflict_do_update(index_elements=list(keys), set_=set_).compile(dialect=self.engine.dialect)
        return str(compiled), (tuple(compiled.positiontup or ()) if compiled.positional else None)

    # --- writes ---------------------------------------------------------------------------
    def write(self, batch: BatchWrite) -> None:
        """Apply one consumer batch in one transaction: multi-row upserts and executemany statements, a
        fixed number of round trips per batch whatever its size (no per-track SELECT)."""
        with self.engine.begin() as conn:
            self._upsert(conn, cameras, list(batch.cameras.values()), ["device_id", "camera_id"], {
                "frame_width": "new", "frame_height": "new", "first_frame_at_us": "min",
                "last_frame_at_us": "max", "last_frame_index": "max"})
            self._upsert(conn, identities, list(batch.identities.values()), ["global_id"], {
                "first_seen_us": "min", "last_seen_us": "max", "male_probability": "coalesce", "n_tracks": "max"})
            self._upsert(conn, tracks, list(batch.tracks.values()), ["track_uid"], {
                "global_id": "coalesce", "first_seen_us": "min", "last_seen_us": "max",
                "first_frame_index": "min", "last_frame_index": "max", "n_crops": "max",
                "male_probability": "coalesce", "match_similarity": "coalesce", "is_new_identity": "new",
                "ended": "or"})
            self._upsert(conn, sightings, list(batch.sightings.values()), ["track_uid", "bucket_start_us"], {
                "global_id": "coalesce", "first_seen_us": "min", "last_seen_us": "max"})
            relabel = [{"uid": u, "gid": g} for u, g in batch.assignments.items() if u not in batch.fresh_tracks]
            if relabel:
                conn.execute(sa.update(sightings).where(sightings.c.track_uid == sa.bindparam("uid"))
                             .values(global_id=sa.bindparam("gid")), relabel)
            if batch.assignments:
                self._record_transitions(conn, list(batch.assignments))
            if batch.merges:
                conn.execute(sa.update(identities).where(identities.c.global_id == sa.bindparam("old"))
                             .values(merged_into=sa.bindparam("new")),
                             [{"old": o, "new": n} for o, n in batch.merges.items()])
                for chunk in _chunks(list(batch.merges)):
                    conn.execute(sa.delete(transitions).where(transitions.c.global_id.in_(chunk)))
            if batch.expired:
                conn.execute(sa.update(identities).where(identities.c.global_id == sa.bindparam("gid"))
                             .values(expired_at_us=sa.bindparam("at")),
                             [{"gid": g, "at": at} for g, at in batch.expired.items()])
            self._write_prototypes(conn, batch)

    def _write_prototypes(self, conn: Connection, batch: BatchWrite) -> None:
        for chunk in _chunks(sorted(batch.drop_identities)):
            conn.execute(sa.delete(prototypes).where(prototypes.c.global_id.in_(chunk)))
        doomed = [pid for pid, row in batch.prototypes.items() if row is None]
        for chunk in _chunks(doomed):
            conn.execute(sa.delete(prototypes).where(prototypes.c.point_id.in_(chunk)))
        self._upsert(conn, prototypes, [_stored_prototype(r) for r in batch.prototypes.values() if r is not None],
                     ["point_id"], {
            "global_id": "new", "embedder_id": "new", "vector": "new", "payload": "new", "rev": "new"})

    def _record_transitions(self, conn: Connection, track_uids: list[str]) -> None:
        """For each newly assigned track: if its identity's previous track (latest last_seen among the
        identity's other tracks that started no later) was on another camera, that is a transition.
        One set-based DELETE and INSERT ... SELECT per chunk instead of four statements per track."""
        me, prev = tracks.alias("me"), tracks.alias("prev")
        p = tracks.alias("p")
        latest = (sa.select(p.c.track_uid)
                  # "+ 0" keeps the planner off (global_id, first_seen_us): that index reads every earlier
                  # track of the identity and sorts them (measured 80 us an assignment at ~200 tracks an
                  # identity, growing with it), where ix_tracks_global_recent stops at the first hit.
                  .where(p.c.global_id == me.c.global_id, p.c.track_uid != me.c.track_uid,
                         p.c.first_seen_us + 0 <= me.c.first_seen_us)
                  .order_by(p.c.last_seen_us.desc()).limit(1).scalar_subquery())
        cols = ["to_track_uid", "global_id", "from_track_uid", "from_device_id", "from_camera_id", "left_at_us",
                "to_device_id", "to_camera_id", "entered_at_us"]
        for chunk in _chunks(track_uids):
            conn.execute(sa.delete(transitions).where(transitions.c.to_track_uid.in_(chunk)))
            sel = (sa.select(me.c.track_uid, me.c.global_id, prev.c.track_uid, prev.c.device_id, prev.c.camera_id,
                             prev.c.last_seen_us, me.c.device_id, me.c.camera_id, me.c.first_seen_us)
                   .select_from(me.join(prev, prev.c.track_uid == latest))
                   .where(me.c.track_uid.in_(chunk), me.c.global_id.is_not(None),
                          sa.or_(prev.c.device_id != me.c.device_id, prev.c.camera_id != me.c.camera_id)))
            conn.execute(sa.insert(transitions).from_select(cols, sel))

    # --- reads the consumer needs ---------------------------------------------------------
    def find_track(self, device_id: str, camera_id: str, track_id: int, at_us: int, gap_us: int
                   ) -> dict[str, Any] | None:
        """The stored track this (device, camera, local id) at ``at_us`` continues, if any.

        It continues a track that started no later than ``at_us`` and was last seen within ``gap_us``
        before it (or later: a replay revisits frames that were already stored), unless that track ended
        before ``at_us``.
        """
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(tracks).where(tracks.c.device_id == device_id, tracks.c.camera_id == camera_id,
                                        tracks.c.track_id == track_id, tracks.c.first_seen_us <= at_us,
                                        tracks.c.last_seen_us >= at_us - gap_us)
                .order_by(tracks.c.first_seen_us.desc()).limit(1)).mappings().first()
        return pick_track([dict(row)] if row is not None else [], at_us, gap_us)

    def find_tracks(self, keys: Sequence[tuple[str, str, int]]) -> dict[tuple[str, str, int], list[dict[str, Any]]]:
        """Every stored track of these (device, camera, local id) keys, newest first: a few queries per batch
        (per camera, chunked), so the matcher resolves each unknown key in memory with :func:`pick_track`.
        The statement goes to the driver as plain SQL: SQLAlchemy's rendering of a 1,000-key IN list was most
        of the cost of a batch's lookup (~30 ms a batch of new tracks, on the matcher's thread)."""
        out: dict[tuple[str, str, int], list[dict[str, Any]]] = {k: [] for k in keys}
        by_camera: dict[tuple[str, str], list[int]] = {}
        for dev, cam, tid in out:
            by_camera.setdefault((dev, cam), []).append(int(tid))
        mark = {"qmark": "?", "format": "%s", "pyformat": "%s"}.get(self.engine.dialect.paramstyle)
        cols = [c.name for c in tracks.columns]
        with self.engine.connect() as conn:
            for (dev, cam), tids in by_camera.items():
                for chunk in _chunks(tids, 500):
                    if mark is None:  # pragma: no cover - a driver with another parameter style
                        res: Any = conn.execute(sa.select(*tracks.columns).where(
                            tracks.c.device_id == dev, tracks.c.camera_id == cam, tracks.c.track_id.in_(chunk)))
                    else:
                        res = conn.exec_driver_sql(
                            f"SELECT {', '.join(cols)} FROM tracks WHERE device_id = {mark} AND camera_id = {mark} "
                            f"AND track_id IN ({', '.join([mark] * len(chunk))})", (dev, cam, *chunk))
                    for r in res:
                        row = dict(zip(cols, r, strict=True))
                        row["is_new_identity"], row["ended"] = bool(row["is_new_identity"]), bool(row["ended"])
                        out[(dev, cam, int(row["track_id"]))].append(row)
        for rows in out.values():
            if len(rows) > 1:
                rows.sort(key=lambda r: -r["first_seen_us"])
        return out

    def load_prototypes(self, embedder_id: str) -> Iterator[tuple[str, str, np.ndarray, dict[str, Any], int]]:
        """(point id, global id, vector, payload, rev) of every stored prototype of one embedder model."""
        with self.engine.connect() as conn:
            res = conn.execution_options(yield_per=4096).execute(
                sa.select(prototypes.c.point_id, prototypes.c.global_id, prototypes.c.vector, prototypes.c.payload,
                          prototypes.c.rev).where(prototypes.c.embedder_id == embedder_id))
            for pid, gid, vec, payload, rev in res:
                yield pid, gid, np.frombuffer(vec, dtype="<f4").copy(), json.loads(payload), int(rev)

    def live_identities(self) -> list[dict[str, Any]]:
        """Identities still in the matching gallery (not merged, not expired)."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(identities).where(identities.c.merged_into.is_(None),
                                                            identities.c.expired_at_us.is_(None))).mappings()
            return [dict(r) for r in rows]

    def identity_tracks(self, global_id: str, limit: int) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(tracks).where(tracks.c.global_id == global_id)
                                .order_by(tracks.c.last_seen_us.desc()).limit(limit)).mappings()
            return [dict(r) for r in rows]

    def count(self, table: str) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(metadata.tables[table])).scalar_one())

    def close(self) -> None:
        self.engine.dispose()


def pick_track(rows: Sequence[dict[str, Any]], at_us: int, gap_us: int) -> dict[str, Any] | None:
    """:meth:`AnalyticsStore.find_track` over rows already fetched (newest ``first_seen_us`` first)."""
    for row in rows:
        if row["first_seen_us"] <= at_us and row["last_seen_us"] >= at_us - gap_us:
            return None if (row["ended"] and row["last_seen_us"] < at_us) else row
    return None


def prototype_row(point_id: str, global_id: str, embedder_id: str, vector: np.ndarray, payload: dict[str, Any],
                  rev: int) -> dict[str, Any]:
    """A ``prototypes`` row as the batch holds it: the vector and payload are serialised by the writer
    (:func:`_stored_prototype`), on the commit thread or process, not on the matcher's."""
    return {"point_id": point_id, "global_id": global_id, "embedder_id": embedder_id, "vector": vector,
            "payload": payload, "rev": int(rev)}


def _stored_prototype(row: dict[str, Any]) -> dict[str, Any]:
    return {**row, "vector": np.ascontiguousarray(row["vector"], dtype="<f4").tobytes(),
            "payload": json.dumps(row["payload"])}


def _chunks(items: list[Any], n: int = 500) -> Iterator[list[Any]]:
    """Keep IN lists well under SQLite's bound-parameter limit."""
    for i in range(0, len(items), n):
        yield items[i:i + n]


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    """WAL: one writer and many readers (the dashboard) across processes; NORMAL sync is durable at
    checkpoints and loses at most the last transactions on power loss, never corrupts."""
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()
