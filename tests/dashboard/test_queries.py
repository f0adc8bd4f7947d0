"""dashboard.queries against stores written by the server's own write path (numbers worked out in conftest)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pandas as pd
import pytest

from dashboard import queries
from tests.dashboard.conftest import (
    AISLE,
    ENTRANCE,
    NOW,
    NOW_US,
    US,
    TinyTrack,
    at,
    gid,
    write_tracks,
)


@pytest.fixture(scope="module")
def tiny(tiny_store: str):
    engine = queries.open_store(tiny_store)
    yield engine
    engine.dispose()


def test_presence_now_counts_open_tracks_per_camera(tiny) -> None:
    p = queries.presence_now(tiny, NOW_US).set_index("camera_id")["people"].to_dict()
    assert p == {"aisle": 1, "checkout": 1, "entrance": 1}
    # At 17:01 only A's first track (17:00-17:02, ended since) spanned the moment.
    earlier = queries.presence_now(tiny, at(17, 1)).set_index("camera_id")["people"].to_dict()
    assert earlier == {"aisle": 0, "checkout": 0, "entrance": 1}


def test_visitors_today_and_this_hour_vs_yesterday(tiny) -> None:
    start, _ = queries.local_day_bounds(NOW.date(), "UTC")
    assert queries.unique_people(tiny, start, NOW_US + 1) == 3  # A, B and the unidentified track
    cmp = queries.footfall_vs_yesterday(tiny, NOW_US, "UTC")
    assert (cmp.this_hour, cmp.same_hour_yesterday) == (3, 1)  # D came at 17:40 yesterday: later in the hour
    assert cmp.change_pct == pytest.approx(200.0)


def test_hourly_people_from_sightings(tiny) -> None:
    start, _ = queries.local_day_bounds(NOW.date(), "UTC")
    h = queries.hourly_people(tiny, start - 24 * 3600 * US, NOW_US + 1, "UTC")
    got = {(str(r.day), r.hour): r.visitors for r in h.itertuples()}
    yesterday = str((NOW - pd.Timedelta(days=1)).date())
    assert got == {(yesterday, 17): 2, (str(NOW.date()), 17): 3}
    only_aisle = queries.hourly_people(tiny, start, NOW_US + 1, "UTC", cameras=["aisle"])
    assert only_aisle["visitors"].tolist() == [2]  # A (17:02-17:10) and u1
    assert queries.hourly_people(tiny, start, NOW_US + 1, "UTC", cameras=[]).empty
    both = queries.today_and_yesterday_by_hour(tiny, NOW_US, "UTC")
    assert sorted(map(tuple, both.values.tolist())) == [(17, "today", 3), (17, "yesterday", 2)]


def test_hours_follow_the_local_time_zone(tiny) -> None:
    h = queries.hourly_people(tiny, NOW_US - 3600 * US, NOW_US + 1, "Asia/Tokyo")  # UTC+9, no DST
    assert h["hour"].tolist() == [(17 + 9) % 24]


def test_visits_dwell_and_transitions(tiny) -> None:
    tracks = queries.tracks_between(tiny, at(0, 0, days_ago=1), NOW_US + 1)
    v = queries.visits(tracks).set_index("person")
    assert v.loc[gid("A"), "dwell_s"] == pytest.approx(30 * 60)
    assert v.loc[gid("A"), "cameras"] == "entrance → aisle → checkout"
    assert v.loc[gid("B"), "dwell_s"] == pytest.approx(10)
    assert v.loc[gid("C"), "dwell_s"] == pytest.approx(15 * 60)
    assert v.loc[gid("D"), "dwell_s"] == pytest.approx(10 * 60)
    assert len(v) == 5  # A, B, C, D and the unidentified track
    x = queries.transition_counts(tiny, at(0, 0, days_ago=1), NOW_US + 1)
    assert sorted(map(tuple, x[["source", "target", "people"]].values.tolist())) == [
        ("aisle", "checkout", 1), ("entrance", "aisle", 1)]
    assert queries.transition_counts(tiny, at(0, 0), NOW_US + 1, cameras=["entrance", "checkout"]).empty


def test_gender_split_and_filter(tiny) -> None:
    tracks = queries.tracks_between(tiny, at(0, 0, days_ago=1), NOW_US + 1)
    g = queries.gender_split(tracks).set_index("gender")["people"].to_dict()
    assert g == {"female": 1, "male": 1, "unknown": 2}
    assert set(queries.filter_gender(tracks, "male")["person"]) == {gid("B")}
    assert set(queries.filter_gender(tracks, "female")["person"]) == {gid("C")}
    with pytest.raises(ValueError, match="unknown gender filter"):
        queries.filter_gender(tracks, "robot")


def test_people_table_and_sightings(tiny) -> None:
    tracks = queries.tracks_between(tiny, at(17, 0), NOW_US + 1)
    people = queries.people_table(tracks, "UTC").set_index("person")
    assert people.loc[gid("A"), "cameras"] == "entrance, aisle, checkout"
    assert people.loc[gid("A"), "tracks"] == 3
    s = queries.identity_sightings(tiny, [gid("A")], "UTC")
    assert s["camera_id"].tolist() == ["checkout", "aisle", "entrance"]  # newest first
    assert s["seconds"].tolist() == [18 * 60.0, 450.0, 120.0]


def test_open_store_errors_say_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(queries.StoreUnavailable, match=r"No analytics store at .*Start the server"):
        queries.open_store(f"sqlite:///{tmp_path / 'missing.db'}")
    other = tmp_path / "other.db"
    sqlite3.connect(other).execute("CREATE TABLE x (a INT)").connection.commit()
    with pytest.raises(queries.StoreUnavailable, match="has no identities, tracks"):
        queries.open_store(f"sqlite:///{other}")
    assert not (tmp_path / "missing.db").exists()  # never created by a read


def test_purge_before_keeps_regulars(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    old, recent = NOW_US - 40 * 24 * 3600 * US, NOW_US - 3600 * US
    write_tracks(url, [
        TinyTrack("old-only", ENTRANCE, old, old + 60 * US, "gone", True),
        TinyTrack("regular-old", ENTRANCE, old, old + 60 * US, "regular", True),
        TinyTrack("regular-new", AISLE, recent, recent + 60 * US, "regular", True),
    ], NOW_US)
    engine = queries.open_store(url)
    report = queries.purge_before(engine, NOW_US - 30 * 24 * 3600 * US)
    assert (report.tracks, report.identities, report.identity_ids) == (2, 1, (gid("gone"),))
    assert report.sightings == 14  # two 60-s tracks starting on a 10-s boundary: 7 buckets each
    left = queries.tracks_between(engine, 0, NOW_US + 1)
    assert left["person"].tolist() == [gid("regular")]
    assert queries.identities_info(engine, [gid("gone"), gid("regular")])["global_id"].tolist() == [gid("regular")]
    assert queries.transition_counts(engine, 0, NOW_US + 1).empty  # 40 days between cameras is no path
    engine.dispose()


def test_fleet_devices_and_rollout(fleet_db: Path) -> None:
    import time

    now = int(time.time() * US)
    d = queries.fleet_devices(fleet_db, now, offline_after_s=120).set_index("device_id")
    assert d.loc["cam-a", "state"] == "online" and d.loc["cam-a", "health"] == "ok"
    assert d.loc["cam-b", "state"] == "offline"
    assert d.loc["cam-c", "health"] == "degraded"
    assert d.loc["cam-a", "telemetry"]["pipeline"]["fps"] == pytest.approx(14.2)
    later = queries.fleet_devices(fleet_db, now + 10 * 60 * US, offline_after_s=120).set_index("device_id")
    assert later.loc["cam-a", "state"] == "offline"  # silent for 10 min: no last will needed to see it
    camps = queries.fleet_campaigns(fleet_db)
    assert len(camps) == 1
    row = camps.iloc[0]
    assert row["model"] == "yolo11n@v2" and row["devices"] == 3 and sum(row["waves"]) == 3
    with pytest.raises(queries.FleetUnavailable, match="no fleet database"):
        queries.fleet_devices(fleet_db.parent / "nope.db", now, 120)
