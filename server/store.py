"""Analytics store: identities, tracks, sightings, transitions and cameras in SQLite (WAL) or PostgreSQL.

SQLAlchemy Core, one schema for both dialects. Every write is an upsert keyed by a deterministic id
(track uid, (track uid, time bucket), ...) and merges with min/max, so replaying a batch after a
crash writes the same rows again instead of adding new ones. One batch of the consumer is one
transaction: the Kafka offsets are stored only after it commits. Times are integer microseconds
since the Unix epoch, UTC, like the Avro ``*_us`` fields. docs/server.md documents the tables and
the dashboard queries.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
        if self.dialect == "sqlite":
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
        if create:
            metadata.create_all(self.engine)
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
        or, (boolean OR), new (overwrite)."""
        if not rows:
            return
        stmt = self._insert(table)
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
        conn.execute(stmt.on_conflict_do_update(index_elements=list(keys), set_=set_), list(rows))

    # --- writes ---------------------------------------------------------------------------
    def write(self, batch: BatchWrite) -> None:
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
            for track_uid, gid in batch.assignments.items():
                conn.execute(sa.update(sightings).where(sightings.c.track_uid == track_uid).values(global_id=gid))
                self._record_transition(conn, track_uid, gid)
            for old, new in batch.merges.items():
                conn.execute(sa.update(identities).where(identities.c.global_id == old).values(merged_into=new))
                conn.execute(sa.delete(transitions).where(transitions.c.global_id == old))
            for gid, at_us in batch.expired.items():
                conn.execute(sa.update(identities).where(identities.c.global_id == gid)
                             .values(expired_at_us=at_us))

    def _record_transition(self, conn: Connection, track_uid: str, gid: str) -> None:
        """If the identity's previous track was on another camera, that is a transition into this track."""
        me = conn.execute(sa.select(tracks).where(tracks.c.track_uid == track_uid)).mappings().first()
        if me is None:
            return
        prev = conn.execute(
            sa.select(tracks).where(tracks.c.global_id == gid, tracks.c.track_uid != track_uid,
                                    tracks.c.first_seen_us <= me["first_seen_us"])
            .order_by(tracks.c.last_seen_us.desc()).limit(1)).mappings().first()
        conn.execute(sa.delete(transitions).where(transitions.c.to_track_uid == track_uid))
        if prev is None or (prev["device_id"], prev["camera_id"]) == (me["device_id"], me["camera_id"]):
            return
        conn.execute(sa.insert(transitions).values(
            to_track_uid=track_uid, global_id=gid, from_track_uid=prev["track_uid"],
            from_device_id=prev["device_id"], from_camera_id=prev["camera_id"], left_at_us=prev["last_seen_us"],
            to_device_id=me["device_id"], to_camera_id=me["camera_id"], entered_at_us=me["first_seen_us"]))

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
        if row is None or (row["ended"] and row["last_seen_us"] < at_us):
            return None
        return dict(row)

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


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    """WAL: one writer and many readers (the dashboard) across processes; NORMAL sync is durable at
    checkpoints and loses at most the last transactions on power loss, never corrupts."""
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()
