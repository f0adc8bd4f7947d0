"""Every read (and the retention delete) the dashboard makes on the server's analytics store.

No Streamlit import, so each function is unit tested against a real store. The SQL follows the
tables the server documents in docs/server.md (``identities``, ``tracks``, ``sightings``,
``transitions``, ``cameras``; times are integer microseconds since the epoch, UTC) and runs on
SQLite and PostgreSQL alike through SQLAlchemy. Heavy aggregation (distinct people per hour over
10-second sightings) happens in SQL; the small per-track tables are shaped in pandas.

A *person* is a resolved global id (following ``identities.merged_into`` one step, which is all
the server creates), or ``track:<uid>`` for a track the server has not identified yet, so a person
whose first crop is still pending still counts as present.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pandas as pd
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError, ProgrammingError, SQLAlchemyError

log = logging.getLogger(__name__)

US = 1_000_000
HOUR_US = 3600 * US
DAY_US = 24 * HOUR_US
PRESENT_WINDOW_S = 15.0  # a track seen within this many seconds counts as "in view now"
VISIT_GAP_S = 30 * 60.0  # the same person seen again after this gap starts a new visit
TRANSITION_MAX_GAP_S = 15 * 60.0  # longer gaps between cameras are two visits, not a path
REQUIRED_TABLES = ("identities", "tracks", "sightings", "transitions", "cameras")
GENDER_THRESHOLD = 0.5
GENDER_MIN_CONFIDENCE = 0.65  # below |p - 0.5| + 0.5 the estimate is shown as "unknown"


class StoreUnavailable(RuntimeError):
    """The analytics store cannot be read; the message says what to check."""


# --- connection --------------------------------------------------------------------------------

def sqlite_path(url: str) -> Path | None:
    if not url.startswith("sqlite:///") or url.startswith("sqlite:///:memory:"):
        return None
    return Path(url.removeprefix("sqlite:///").split("?", 1)[0]).expanduser()


def open_store(url: str) -> Engine:
    """An engine on the server's store, after checking it exists and has the server's tables.

    Never creates a database: a typo in the path must say so, not show an empty dashboard.
    """
    path = sqlite_path(url)
    if path is not None and not path.exists():
        raise StoreUnavailable(
            f"No analytics store at {path.resolve()}. Start the server (`python -m server run`) so it creates "
            f"it, or set store_url in the dashboard config to the server's store.url.")
    try:
        engine = sa.create_engine(url, future=True, pool_pre_ping=True)
        if engine.dialect.name == "sqlite":
            sa.event.listen(engine, "connect", _sqlite_reader_pragmas)
        names = set(sa.inspect(engine).get_table_names())
    except (SQLAlchemyError, ModuleNotFoundError) as exc:
        raise StoreUnavailable(f"Cannot open the analytics store {safe_url(url)}: {exc}") from exc
    missing = [t for t in REQUIRED_TABLES if t not in names]
    if missing:
        engine.dispose()
        raise StoreUnavailable(
            f"The analytics store {safe_url(url)} has no {', '.join(missing)} table(s): it is not a reidfleet "
            f"server store, or the server has not started on it yet.")
    return engine


def _sqlite_reader_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA busy_timeout=10000")  # wait for the server's write transaction instead of failing
    cur.close()


def safe_url(url: str) -> str:
    """The URL without a password, for messages."""
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1]


def _read(engine: Engine, sql: str, params: dict[str, Any] | None = None,
          expanding: Sequence[str] = ()) -> pd.DataFrame:
    stmt = sa.text(sql)
    if expanding:
        stmt = stmt.bindparams(*[sa.bindparam(name, expanding=True) for name in expanding])
    try:
        with engine.connect() as conn:
            result = conn.execute(stmt, params or {})
            return pd.DataFrame(result.fetchall(), columns=list(result.keys()))
    except (OperationalError, ProgrammingError) as exc:
        raise StoreUnavailable(f"The analytics store did not answer: {exc.orig}") from exc


def _camera_filter(column: str, cameras: Sequence[str] | None, params: dict[str, Any]) -> tuple[str, list[str]]:
    if cameras is None:
        return "", []
    params["cams"] = list(cameras) or ["\x00none"]  # an empty selection matches nothing, not everything
    return f" AND {column} IN :cams", ["cams"]


PERSON_SQL = "COALESCE(i.merged_into, {t}.global_id, 'track:' || {t}.track_uid)"


# --- time helpers ------------------------------------------------------------------------------

def to_us(dt: datetime) -> int:
    return int(dt.timestamp() * US)


def local_day_bounds(day: date, tz: str) -> tuple[int, int]:
    """[start, end) of a local calendar day in epoch microseconds (DST days are 23 or 25 h)."""
    zone = ZoneInfo(tz)
    start = datetime.combine(day, datetime.min.time(), zone)
    end = datetime.combine(day + timedelta(days=1), datetime.min.time(), zone)
    return to_us(start), to_us(end)


def local_time(us: pd.Series, tz: str) -> pd.Series:
    return pd.to_datetime(us.astype("int64"), unit="us", utc=True).dt.tz_convert(tz)


# --- reads -------------------------------------------------------------------------------------

def cameras(engine: Engine) -> pd.DataFrame:
    """Every camera the server has seen: device_id, camera_id, frame size, first/last frame time."""
    return _read(engine, "SELECT device_id, camera_id, frame_width, frame_height, first_frame_at_us, "
                 "last_frame_at_us, last_frame_index FROM cameras ORDER BY camera_id, device_id")


def data_span(engine: Engine) -> tuple[int | None, int | None]:
    df = _read(engine, "SELECT MIN(first_seen_us) AS lo, MAX(last_seen_us) AS hi FROM tracks")
    lo, hi = df.iloc[0]["lo"], df.iloc[0]["hi"]
    return (None if pd.isna(lo) else int(lo)), (None if pd.isna(hi) else int(hi))


def tracks_between(engine: Engine, start_us: int, end_us: int, cameras: Sequence[str] | None = None) -> pd.DataFrame:
    """Tracks overlapping [start, end), with their resolved person key and the identity's gender estimate."""
    params: dict[str, Any] = {"start": start_us, "end": end_us}
    cam_sql, exp = _camera_filter("t.camera_id", cameras, params)
    return _read(engine, f"""
        SELECT t.track_uid, t.device_id, t.camera_id, t.track_id, t.first_seen_us, t.last_seen_us, t.ended,
               t.n_crops, t.match_similarity, {PERSON_SQL.format(t='t')} AS person,
               COALESCE(i.merged_into, t.global_id) AS global_id,
               COALESCE(j.male_probability, i.male_probability, t.male_probability) AS male_probability
        FROM tracks t
        LEFT JOIN identities i ON i.global_id = t.global_id
        LEFT JOIN identities j ON j.global_id = i.merged_into
        WHERE t.last_seen_us >= :start AND t.first_seen_us < :end{cam_sql}
        ORDER BY t.first_seen_us""", params, exp)


def presence_now(engine: Engine, now_us: int, window_s: float = PRESENT_WINDOW_S) -> pd.DataFrame:
    """People in view per camera at ``now_us``: tracks that span it, or are still open and were seen
    within ``window_s`` before it (the server updates an open track only as frames arrive).

    Every known camera gets a row (0 when empty), so an idle camera is visible as idle.
    """
    params = {"since": now_us - int(window_s * US), "now": now_us}
    people = _read(engine, f"""
        SELECT t.camera_id, COUNT(DISTINCT {PERSON_SQL.format(t='t')}) AS people
        FROM tracks t LEFT JOIN identities i ON i.global_id = t.global_id
        WHERE t.first_seen_us <= :now AND (t.last_seen_us >= :now OR (NOT t.ended AND t.last_seen_us >= :since))
        GROUP BY t.camera_id""", params)
    cams = cameras(engine)[["camera_id"]].drop_duplicates()
    out = cams.merge(people, on="camera_id", how="outer").fillna({"people": 0})
    out["people"] = out["people"].astype(int)
    return out.sort_values("camera_id").reset_index(drop=True)


def unique_people(engine: Engine, start_us: int, end_us: int, cameras: Sequence[str] | None = None) -> int:
    params: dict[str, Any] = {"start": start_us, "end": end_us}
    cam_sql, exp = _camera_filter("t.camera_id", cameras, params)
    df = _read(engine, f"""
        SELECT COUNT(DISTINCT {PERSON_SQL.format(t='t')}) AS n
        FROM tracks t LEFT JOIN identities i ON i.global_id = t.global_id
        WHERE t.last_seen_us >= :start AND t.first_seen_us < :end{cam_sql}""", params, exp)
    return int(df.iloc[0]["n"] or 0)


def hourly_people(engine: Engine, start_us: int, end_us: int, tz: str,
                  cameras: Sequence[str] | None = None) -> pd.DataFrame:
    """Distinct people seen per hour, from the 10-second sightings: columns hour_start (local), day, hour, visitors.

    Hours are grouped in SQL on UTC hour boundaries, which are local hour boundaries in every zone
    with a whole-hour offset (the few half-hour zones get hours starting at :30).
    """
    params: dict[str, Any] = {"start": start_us, "end": end_us}
    cam_sql, exp = _camera_filter("s.camera_id", cameras, params)
    # The hour length is a literal: PostgreSQL rejects GROUP BY on an expression with its own bind parameter.
    df = _read(engine, f"""
        SELECT (s.bucket_start_us / {HOUR_US}) AS hour_index, COUNT(DISTINCT {PERSON_SQL.format(t='s')}) AS visitors
        FROM sightings s LEFT JOIN identities i ON i.global_id = s.global_id
        WHERE s.bucket_start_us >= :start AND s.bucket_start_us < :end{cam_sql}
        GROUP BY (s.bucket_start_us / {HOUR_US}) ORDER BY hour_index""", params, exp)
    if df.empty:
        return pd.DataFrame({"hour_start": pd.Series(dtype=f"datetime64[us, {tz}]"), "day": [], "hour": [],
                             "visitors": []})
    df["hour_start"] = local_time(df["hour_index"].astype("int64") * HOUR_US, tz)
    df["day"] = df["hour_start"].dt.date
    df["hour"] = df["hour_start"].dt.hour
    df["visitors"] = df["visitors"].astype(int)
    return df[["hour_start", "day", "hour", "visitors"]]


@dataclass(frozen=True)
class FootfallCompare:
    """This hour so far against the same stretch of the same hour yesterday."""

    hour_start_us: int
    now_us: int
    this_hour: int
    same_hour_yesterday: int

    @property
    def change_pct(self) -> float | None:
        if self.same_hour_yesterday == 0:
            return None
        return 100.0 * (self.this_hour - self.same_hour_yesterday) / self.same_hour_yesterday


def footfall_vs_yesterday(engine: Engine, now_us: int, tz: str) -> FootfallCompare:
    zone = ZoneInfo(tz)
    now = datetime.fromtimestamp(now_us / US, zone)
    hour_start = now.replace(minute=0, second=0, microsecond=0)
    y_start = hour_start - timedelta(days=1)
    y_now = now - timedelta(days=1)
    return FootfallCompare(to_us(hour_start), now_us, unique_people(engine, to_us(hour_start), now_us + 1),
                           unique_people(engine, to_us(y_start), to_us(y_now) + 1))


def today_and_yesterday_by_hour(engine: Engine, now_us: int, tz: str,
                                cameras: Sequence[str] | None = None) -> pd.DataFrame:
    """Columns hour, day_label ('today'/'yesterday'), visitors; today only up to now."""
    today = datetime.fromtimestamp(now_us / US, ZoneInfo(tz)).date()
    y0, _ = local_day_bounds(today - timedelta(days=1), tz)
    df = hourly_people(engine, y0, now_us + 1, tz, cameras)
    df["day_label"] = ["today" if d == today else "yesterday" for d in df["day"]]
    return df[["hour", "day_label", "visitors"]].reset_index(drop=True)


def visits(tracks: pd.DataFrame, gap_s: float = VISIT_GAP_S) -> pd.DataFrame:
    """One row per visit: a person's tracks joined while the gap between them stays under ``gap_s``.

    Columns person, start_us, end_us, dwell_s, cameras (joined in order of arrival), n_tracks.
    """
    cols = ["person", "start_us", "end_us", "dwell_s", "cameras", "n_tracks"]
    if tracks.empty:
        return pd.DataFrame(columns=cols)
    out = []
    for person, grp in tracks.sort_values("first_seen_us").groupby("person", sort=False):
        cur: dict[str, Any] | None = None
        for row in grp.itertuples(index=False):
            if cur is not None and row.first_seen_us - cur["end_us"] <= gap_s * US:
                cur["end_us"] = max(cur["end_us"], int(row.last_seen_us))
                if cur["cameras"][-1] != row.camera_id:
                    cur["cameras"].append(row.camera_id)
                cur["n_tracks"] += 1
                continue
            if cur is not None:
                out.append(cur)
            cur = {"person": person, "start_us": int(row.first_seen_us), "end_us": int(row.last_seen_us),
                   "cameras": [row.camera_id], "n_tracks": 1}
        assert cur is not None
        out.append(cur)
    df = pd.DataFrame(out)
    df["dwell_s"] = (df["end_us"] - df["start_us"]) / US
    df["cameras"] = df["cameras"].map(" → ".join)
    return df[cols].sort_values("start_us").reset_index(drop=True)


def transition_counts(engine: Engine, start_us: int, end_us: int, cameras: Sequence[str] | None = None,
                      max_gap_s: float = TRANSITION_MAX_GAP_S) -> pd.DataFrame:
    """Camera-to-camera moves the server recorded: columns source, target, people (distinct), moves."""
    params: dict[str, Any] = {"start": start_us, "end": end_us, "gap": int(max_gap_s * US)}
    exp: list[str] = []
    cam_sql = ""
    if cameras is not None:
        params["cams"] = list(cameras) or ["\x00none"]
        cam_sql, exp = " AND x.from_camera_id IN :cams AND x.to_camera_id IN :cams", ["cams"]
    df = _read(engine, f"""
        SELECT x.from_camera_id AS source, x.to_camera_id AS target,
               COUNT(DISTINCT COALESCE(i.merged_into, x.global_id)) AS people, COUNT(*) AS moves
        FROM transitions x LEFT JOIN identities i ON i.global_id = x.global_id
        WHERE x.entered_at_us >= :start AND x.entered_at_us < :end
          AND x.entered_at_us - x.left_at_us <= :gap{cam_sql}
        GROUP BY x.from_camera_id, x.to_camera_id ORDER BY people DESC, source, target""", params, exp)
    for col in ("people", "moves"):
        df[col] = df[col].astype(int)
    return df


def gender_split(tracks: pd.DataFrame, min_confidence: float = GENDER_MIN_CONFIDENCE) -> pd.DataFrame:
    """Identified people by estimated gender: columns gender, people.

    An identity's probability is the server's mean over its tracks; estimates closer to 0.5 than
    ``min_confidence`` allows are 'unknown', because a single weak crop is often wrong.
    """
    ident = tracks[tracks["global_id"].notna()].drop_duplicates("person")
    p = ident["male_probability"].astype(float)
    label = pd.Series("unknown", index=ident.index)
    label[p >= min_confidence] = "male"
    label[p <= 1 - min_confidence] = "female"
    counts = label.value_counts()
    return pd.DataFrame({"gender": ["female", "male", "unknown"],
                         "people": [int(counts.get(g, 0)) for g in ("female", "male", "unknown")]})


def people_table(tracks: pd.DataFrame, tz: str) -> pd.DataFrame:
    """One row per person for search results: first/last seen (local), cameras, tracks, gender estimate."""
    cols = ["person", "global_id", "first_seen", "last_seen", "cameras", "tracks", "male_probability"]
    if tracks.empty:
        return pd.DataFrame(columns=cols)
    g = tracks.sort_values("first_seen_us").groupby("person", sort=False)
    df = pd.DataFrame({
        "global_id": g["global_id"].first(),
        "first_seen_us": g["first_seen_us"].min(),
        "last_seen_us": g["last_seen_us"].max(),
        "cameras": g["camera_id"].agg(lambda s: ", ".join(dict.fromkeys(s))),
        "tracks": g["track_uid"].count(),
        "male_probability": g["male_probability"].first(),
    }).reset_index()
    df["first_seen"] = local_time(df["first_seen_us"], tz).dt.strftime("%Y-%m-%d %H:%M:%S")
    df["last_seen"] = local_time(df["last_seen_us"], tz).dt.strftime("%Y-%m-%d %H:%M:%S")
    return df.sort_values("last_seen_us", ascending=False)[cols].reset_index(drop=True)


def filter_gender(tracks: pd.DataFrame, gender: str, min_confidence: float = GENDER_MIN_CONFIDENCE) -> pd.DataFrame:
    """Keep tracks of people estimated as ``gender`` ('any', 'female', 'male', 'unknown')."""
    if gender == "any":
        return tracks
    p = tracks["male_probability"].astype(float)
    if gender == "male":
        return tracks[p >= min_confidence]
    if gender == "female":
        return tracks[p <= 1 - min_confidence]
    if gender == "unknown":
        return tracks[p.isna() | ((p > 1 - min_confidence) & (p < min_confidence))]
    raise ValueError(f"unknown gender filter {gender!r}; use any, female, male or unknown")


def identity_sightings(engine: Engine, global_ids: Sequence[str], tz: str, limit: int = 500) -> pd.DataFrame:
    """Where and when the given identities were seen (one row per track, newest first)."""
    if not global_ids:
        return pd.DataFrame(columns=["global_id", "camera_id", "device_id", "from", "to", "seconds", "similarity"])
    df = _read(engine, """
        SELECT COALESCE(i.merged_into, t.global_id) AS global_id, t.camera_id, t.device_id, t.first_seen_us,
               t.last_seen_us, t.match_similarity AS similarity
        FROM tracks t LEFT JOIN identities i ON i.global_id = t.global_id
        WHERE t.global_id IN :gids OR i.merged_into IN :gids
        ORDER BY t.last_seen_us DESC LIMIT :limit""", {"gids": list(global_ids), "limit": limit}, ["gids"])
    if df.empty:
        return pd.DataFrame(columns=["global_id", "camera_id", "device_id", "from", "to", "seconds", "similarity"])
    df["from"] = local_time(df["first_seen_us"], tz).dt.strftime("%Y-%m-%d %H:%M:%S")
    df["to"] = local_time(df["last_seen_us"], tz).dt.strftime("%H:%M:%S")
    df["seconds"] = ((df["last_seen_us"] - df["first_seen_us"]) / US).round(1)
    return df[["global_id", "camera_id", "device_id", "from", "to", "seconds", "similarity"]]


def identities_info(engine: Engine, global_ids: Sequence[str]) -> pd.DataFrame:
    if not global_ids:
        return pd.DataFrame(columns=["global_id", "first_seen_us", "last_seen_us", "male_probability", "n_tracks"])
    return _read(engine, """
        SELECT global_id, first_seen_us, last_seen_us, male_probability, n_tracks, merged_into
        FROM identities WHERE global_id IN :gids""", {"gids": list(global_ids)}, ["gids"])


def freshness(engine: Engine, now_us: int) -> dict[str, Any]:
    """How far behind the store is: newest sighting per camera and its age in seconds."""
    df = _read(engine, "SELECT camera_id, device_id, last_frame_at_us FROM cameras")
    if df.empty:
        return {"newest_us": None, "age_s": None, "per_camera": df}
    df["age_s"] = (now_us - df["last_frame_at_us"].astype("int64")) / US
    newest = int(df["last_frame_at_us"].max())
    return {"newest_us": newest, "age_s": (now_us - newest) / US, "per_camera": df}


# --- retention ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class PurgeReport:
    cutoff_us: int
    sightings: int
    transitions: int
    tracks: int
    identities: int
    identity_ids: tuple[str, ...]


def purge_before(engine: Engine, cutoff_us: int) -> PurgeReport:
    """Delete everything last seen before ``cutoff_us`` in one transaction (retention enforcement).

    An identity goes only when none of its tracks is left, so a regular customer seen again
    yesterday keeps their id while their old visits are removed. Returns the deleted identity ids
    so the caller can delete their vectors from Qdrant as well.
    """
    p = {"cutoff": cutoff_us}
    try:
        with engine.begin() as conn:
            n_s = conn.execute(sa.text("DELETE FROM sightings WHERE last_seen_us < :cutoff"), p).rowcount
            n_x = conn.execute(sa.text("DELETE FROM transitions WHERE entered_at_us < :cutoff"), p).rowcount
            n_t = conn.execute(sa.text("DELETE FROM tracks WHERE last_seen_us < :cutoff"), p).rowcount
            gone = [r[0] for r in conn.execute(sa.text(
                "SELECT i.global_id FROM identities i WHERE i.last_seen_us < :cutoff AND NOT EXISTS "
                "(SELECT 1 FROM tracks t WHERE t.global_id = i.global_id) AND NOT EXISTS "
                "(SELECT 1 FROM identities k WHERE k.merged_into = i.global_id AND k.last_seen_us >= :cutoff)"),
                p).fetchall()]
            has_prototypes = "prototypes" in sa.inspect(conn).get_table_names()
            for i in range(0, len(gone), 500):
                chunk = {"gids": gone[i:i + 500]}
                conn.execute(sa.text("DELETE FROM identities WHERE global_id IN :gids")
                             .bindparams(sa.bindparam("gids", expanding=True)), chunk)
                if has_prototypes:  # the server's durable copy of the appearance vectors goes with them
                    conn.execute(sa.text("DELETE FROM prototypes WHERE global_id IN :gids")
                                 .bindparams(sa.bindparam("gids", expanding=True)), chunk)
    except (OperationalError, ProgrammingError) as exc:
        raise StoreUnavailable(f"Retention could not delete from the analytics store: {exc.orig}") from exc
    return PurgeReport(cutoff_us, n_s, n_x, n_t, len(gone), tuple(gone))


# --- fleet inventory ---------------------------------------------------------------------------

class FleetUnavailable(RuntimeError):
    """The fleet manager's inventory cannot be read; the message says what to check."""


def _fleet_conn(path: str | Path) -> sqlite3.Connection:
    """Read-only connection to the fleet manager's SQLite file (never created or written here)."""
    p = Path(path)
    if not p.exists():
        raise FleetUnavailable(f"no fleet database at {p.resolve()} (start the fleet manager with `python -m fleet "
                               f"serve`, or set fleet_inventory in the dashboard config to its fleet.db)")
    try:
        conn = sqlite3.connect(f"file:{p.resolve()}?mode=ro", uri=True, timeout=10)
        conn.execute("PRAGMA busy_timeout=10000")
    except sqlite3.Error as exc:
        raise FleetUnavailable(f"cannot open the fleet database {p}: {exc}") from exc
    return conn


def _fleet_read(path: str | Path, sql: str, args: tuple[Any, ...] = ()) -> pd.DataFrame:
    conn = _fleet_conn(path)
    try:
        cur = conn.execute(sql, args)
        return pd.DataFrame(cur.fetchall(), columns=[c[0] for c in cur.description])
    except sqlite3.Error as exc:
        raise FleetUnavailable(f"the fleet database {path} cannot be read ({exc}): is it a fleet.db?") from exc
    finally:
        conn.close()


def fleet_devices(path: str | Path, now_us: int, offline_after_s: float) -> pd.DataFrame:
    """Devices from the fleet manager's inventory (table ``devices``), with the state the dashboard shows.

    ``state`` is the inventory's own (online/offline/never), except that an 'online' device not heard
    from for ``offline_after_s`` shows as 'offline' too: a device that lost power cannot say so, and
    its last will may not have fired yet. Revoked devices are left out.
    """
    df = _fleet_read(path, """
        SELECT device_id, grp AS device_group, state AS reported_state, state_reason, last_seen, agent_version,
               model_id, model_version, model_slot, config_version, health, health_detail, telemetry
        FROM devices WHERE revoked = 0 ORDER BY device_id""")
    now_s = now_us / US
    df["last_seen_age_s"] = [None if pd.isna(v) else now_s - float(v) for v in df["last_seen"]]
    stale = (df["reported_state"] == "online") & df["last_seen_age_s"].astype(float).gt(offline_after_s)
    df["state"] = df["reported_state"].where(~stale, "offline")
    df["telemetry"] = [_json_or_empty(t) for t in df["telemetry"]]
    return df


def _json_or_empty(text: str | None) -> dict[str, Any]:
    try:
        value = json.loads(text or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


CAMPAIGN_DONE_STATES = ("succeeded", "failed", "rolled_back", "timed_out", "skipped", "reverted", "revert_failed")


def fleet_campaigns(path: str | Path, limit: int = 10) -> pd.DataFrame:
    """Newest rollout campaigns (tables ``campaigns`` and ``campaign_devices`` of the fleet manager) with progress.

    Columns: campaign_id, state, model (id@version), target, waves (planned sizes), current_wave, devices,
    one column per device state, done (devices in a final state), progress (0–1), created_at, reason.
    An inventory without campaign tables (no rollout ever started) gives an empty frame.
    """
    tables = set(_fleet_read(path, "SELECT name FROM sqlite_master WHERE type='table'")["name"])
    if not {"campaigns", "campaign_devices"} <= tables:
        return pd.DataFrame(columns=["campaign_id", "state", "model", "progress"])
    camps = _fleet_read(path, """
        SELECT campaign_id, state, target, artifact, waves, current_wave, created_at, updated_at, finished_at, reason
        FROM campaigns ORDER BY created_at DESC LIMIT ?""", (limit,))
    if camps.empty:
        return pd.DataFrame(columns=["campaign_id", "state", "model", "progress"])
    ids = camps["campaign_id"].tolist()
    counts = _fleet_read(path, f"""
        SELECT campaign_id, state, COUNT(*) AS n FROM campaign_devices
        WHERE campaign_id IN ({",".join("?" * len(ids))}) GROUP BY campaign_id, state""", tuple(ids))
    wide = counts.pivot_table(index="campaign_id", columns="state", values="n", fill_value=0, aggfunc="sum")
    camps = camps.merge(wide, left_on="campaign_id", right_index=True, how="left")
    states = [c for c in wide.columns]
    camps[states] = camps[states].fillna(0).astype(int)
    camps["devices"] = camps[states].sum(axis=1) if states else 0
    done_cols = [c for c in states if c in CAMPAIGN_DONE_STATES]
    camps["done"] = camps[done_cols].sum(axis=1) if done_cols else 0
    camps["progress"] = [d / n if n else 0.0 for d, n in zip(camps["done"], camps["devices"], strict=True)]
    arts = [_json_or_empty(a) for a in camps["artifact"]]
    camps["model"] = [f"{a.get('model_id', '?')}@{a.get('version', '?')}" for a in arts]
    camps["waves"] = [_json_list(w) for w in camps["waves"]]
    return camps.drop(columns=["artifact"])


def _json_list(text: str | None) -> list[Any]:
    try:
        value = json.loads(text or "[]")
    except ValueError:
        return []
    return value if isinstance(value, list) else []
