"""Stores for the dashboard tests, written through the server's and the fleet manager's own APIs.

``tiny_store``: a hand-made shop hour whose every number is worked out in the comments, so tests
assert exact values. ``week_store``: a realistic week from ``dashboard.seed``. ``fleet_db``: three
appliances and a rollout written by ``fleet.inventory`` / ``fleet.rollout``. Times are relative to
yesterday 17:30 UTC so the dashboard's own retention (30 days, wall clock) never touches them.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

US = 1_000_000
NOW = (datetime.now(UTC) - timedelta(days=1)).replace(hour=17, minute=30, second=0, microsecond=0)
NOW_US = int(NOW.timestamp() * US)
NS = uuid.UUID("0b5e55ed-0000-4000-8000-000000000001")


def at(hh: int, mm: int, ss: int = 0, days_ago: int = 0) -> int:
    t = NOW.replace(hour=hh, minute=mm, second=ss) - timedelta(days=days_ago)
    return int(t.timestamp() * US)


def gid(name: str) -> str:
    return str(uuid.uuid5(NS, name))


@dataclass(frozen=True)
class TinyTrack:
    name: str
    camera: tuple[str, str]
    start_us: int
    end_us: int
    person: str | None  # None = not identified yet
    ended: bool
    male_probability: float | None = None


ENTRANCE, AISLE, CHECKOUT = ("dev1", "entrance"), ("dev1", "aisle"), ("dev2", "checkout")

# Today (the day of NOW, 17:30):
#   A: entrance 17:00-17:02, aisle 17:02:30-17:10, checkout 17:12-now (open)   -> present at checkout
#   B: entrance 17:29:50-now (open)                                              -> present at entrance
#   u1: aisle 17:29:55-now, not identified yet                                   -> present at aisle
# Yesterday: C entrance 17:05-17:20 (female), D aisle 17:40-17:50 (no gender).
# => in view now 3 (1 per camera); visitors today 3; this hour 3 vs 1 in 17:00-17:30 yesterday (C only);
#    moves entrance->aisle 1, aisle->checkout 1; visits A 30 min, B 10 s, u1 5 s, C 15 min, D 10 min;
#    gender among identified people (A 0.5, B 0.9, C 0.1, D None): female 1, male 1, unknown 2.
TINY_TRACKS = (
    TinyTrack("a1", ENTRANCE, at(17, 0), at(17, 2), "A", True, 0.5),
    TinyTrack("a2", AISLE, at(17, 2, 30), at(17, 10), "A", True, 0.5),
    TinyTrack("a3", CHECKOUT, at(17, 12), NOW_US, "A", False, 0.5),
    TinyTrack("b1", ENTRANCE, at(17, 29, 50), NOW_US, "B", False, 0.9),
    TinyTrack("u1", AISLE, at(17, 29, 55), NOW_US, None, False, None),
    TinyTrack("c1", ENTRANCE, at(17, 5, days_ago=1), at(17, 20, days_ago=1), "C", True, 0.1),
    TinyTrack("d1", AISLE, at(17, 40, days_ago=1), at(17, 50, days_ago=1), "D", True, None),
)


def write_tracks(url: str, tracks: tuple[TinyTrack, ...] | list[TinyTrack], camera_last_us: int,
                 bucket_s: int = 10) -> None:
    """Write tracks, their 10-s sightings, identities and cameras with ``server.store``'s write path."""
    from server.store import AnalyticsStore, BatchWrite

    store = AnalyticsStore(url)
    batch = BatchWrite()
    for i, t in enumerate(tracks):
        uid = str(uuid.uuid5(NS, t.name))
        g = gid(t.person) if t.person else None
        batch.tracks[uid] = {
            "track_uid": uid, "device_id": t.camera[0], "camera_id": t.camera[1], "track_id": i + 1,
            "global_id": g, "first_seen_us": t.start_us, "last_seen_us": t.end_us, "first_frame_index": 0,
            "last_frame_index": 10, "n_crops": 1 if g else 0, "male_probability": t.male_probability,
            "match_similarity": None, "is_new_identity": False, "ended": t.ended}
        if g:
            batch.assignments[uid] = g
            batch.merge_row(batch.identities, g, {
                "global_id": g, "embedder_id": "test", "first_seen_us": t.start_us, "last_seen_us": t.end_us,
                "first_device_id": t.camera[0], "first_camera_id": t.camera[1], "founding_track_uid": uid,
                "male_probability": t.male_probability, "n_tracks": 1})
        b = t.start_us // (bucket_s * US) * (bucket_s * US)
        while b <= t.end_us:
            batch.sightings[(uid, b)] = {"track_uid": uid, "bucket_start_us": b, "device_id": t.camera[0],
                                         "camera_id": t.camera[1], "global_id": g,
                                         "first_seen_us": max(b, t.start_us),
                                         "last_seen_us": min(b + bucket_s * US - 1, t.end_us)}
            b += bucket_s * US
        cam = batch.cameras.setdefault(t.camera, {
            "device_id": t.camera[0], "camera_id": t.camera[1], "frame_width": 1280, "frame_height": 720,
            "first_frame_at_us": t.start_us, "last_frame_at_us": camera_last_us, "last_frame_index": 100})
        cam["first_frame_at_us"] = min(cam["first_frame_at_us"], t.start_us)
    store.write(batch)
    store.close()


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = f"sqlite:///{tmp_path_factory.mktemp('tiny') / 'analytics.db'}"
    write_tracks(url, TINY_TRACKS, NOW_US)
    return url


@pytest.fixture(scope="session")
def week_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    from dashboard.seed import seed_store

    url = f"sqlite:///{tmp_path_factory.mktemp('week') / 'analytics.db'}"
    seed_store(url, days=7, now_us=NOW_US, tz="UTC", seed=11)
    return url


@pytest.fixture(scope="session")
def fleet_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """cam-a online + healthy, cam-b offline (last will), cam-c online but health 'degraded'; one rollout."""
    from fleet.db import FleetDB
    from fleet.inventory import Inventory
    from fleet.rollout import RolloutEngine
    from schemas.mqtt import ArtifactRef, DeviceStatus, Telemetry

    path = tmp_path_factory.mktemp("fleet") / "fleet.db"
    db = FleetDB(path)
    inv = Inventory(db)
    for dev in ("cam-a", "cam-b", "cam-c"):
        inv.add(dev, "shop")
    inv.on_status("cam-a", DeviceStatus(state="online", agent_version="0.1.0", model_id="yolo11n",
                                        model_version="v1"))
    inv.on_status("cam-b", DeviceStatus(state="offline", reason="last will"))
    inv.on_status("cam-c", DeviceStatus(state="online", agent_version="0.1.0", model_id="yolo11n",
                                        model_version="v1"))
    common: dict[str, Any] = {"ts": time.time(), "uptime_s": 600.0, "model_id": "yolo11n", "model_version": "v1",
                              "model_slot": "a", "config_version": 3}
    inv.on_telemetry("cam-a", Telemetry(health="ok", pipeline={"fps": 14.2}, **common))
    inv.on_telemetry("cam-c", Telemetry(health="degraded", health_detail="camera reconnecting",
                                        pipeline={"fps": 3.1}, **common))
    sent: list[Any] = []
    engine = RolloutEngine(db, inv, lambda device, job: sent.append((device, job)))
    art = ArtifactRef(model_id="yolo11n", version="v2", sha256="0" * 64, size_bytes=123, signature="c2ln",
                      url="http://127.0.0.1:1/a.tar")
    engine.start(art, group="shop")
    db.close()
    return path


def write_config(path: Path, **values: Any) -> Path:
    cfg: dict[str, Any] = {
        "settings_path": str(path.parent / "settings.json"),
        "fleet_inventory": str(path.parent / "no-fleet.db"),
        "live": {"kafka_bootstrap": None},
        "auth": {"users": {"boss": {"role": "admin", "password_env": "TEST_DASH_ADMIN_PW"},
                           "mia": {"role": "manager", "password_env": "TEST_DASH_MANAGER_PW"}},
                 "max_failures": 3, "lockout_s": 60},
    }
    for key, value in values.items():
        cfg[key] = value
    path.write_text(yaml.safe_dump(cfg))
    return path
