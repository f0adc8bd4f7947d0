"""Every dashboard page through streamlit.testing.v1.AppTest against seeded stores: the numbers shown
are the store's (worked out by hand for the tiny store, recomputed with plain SQL for the week)."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from dashboard import queries
from tests.dashboard.conftest import NOW, NOW_US, US, gid, write_config

APP = str(Path(__file__).resolve().parents[2] / "dashboard" / "app.py")
TIMEOUT = 90


@pytest.fixture(autouse=True)
def _passwords(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_DASH_ADMIN_PW", "admin-secret")
    monkeypatch.setenv("TEST_DASH_MANAGER_PW", "manager-secret")


def _app(monkeypatch: pytest.MonkeyPatch, config: Path, role: str | None = "manager",
         as_of_us: int | None = NOW_US) -> AppTest:
    monkeypatch.setenv("REIDFLEET_DASHBOARD_CONFIG", str(config))
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    if role:
        at.session_state["user"] = "boss" if role == "admin" else "mia"
        at.session_state["role"] = role
    if as_of_us:
        at.session_state["as_of_us"] = as_of_us
    return at.run()


def _metrics(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def _text(at: AppTest) -> str:
    parts = [e.value for kind in ("markdown", "caption", "info", "warning", "error", "success")
             for e in at.get(kind)]
    return "\n".join(str(p) for p in parts)


@pytest.fixture
def tiny_cfg(tmp_path: Path, tiny_store: str) -> Path:
    return write_config(tmp_path / "dash.yaml", store_url=tiny_store)


def test_login_roles_and_lockout(monkeypatch: pytest.MonkeyPatch, tiny_cfg: Path) -> None:
    at = _app(monkeypatch, tiny_cfg, role=None)
    assert [t.value for t in at.title] == ["reidfleet dashboard"]
    at.text_input[0].input("mia")
    at.text_input[1].input("wrong")
    at.button[0].click().run()
    assert "Wrong user name or password." in [e.value for e in at.error]
    at.text_input[1].input("manager-secret")
    at.button[0].click().run()
    assert not at.exception
    assert at.session_state["role"] == "manager"
    assert [t.value for t in at.title] == ["Overview"]
    with pytest.raises(ValueError, match="Known pages"):  # managers get no Fleet page at all
        at.switch_page("pages/fleet.py")
    # Three failures for a name lock it, even with the right password afterwards.
    locked = _app(monkeypatch, tiny_cfg, role=None)
    for pw in ("x", "y", "z", "admin-secret"):
        locked.text_input[0].input("boss")
        locked.text_input[1].input(pw)
        locked.button[0].click().run()
    assert any("Too many failed attempts" in e.value for e in locked.error)
    assert "user" not in locked.session_state


def test_overview_numbers_match_the_store(monkeypatch: pytest.MonkeyPatch, tiny_cfg: Path) -> None:
    at = _app(monkeypatch, tiny_cfg)
    assert not at.exception
    m = _metrics(at)
    assert m["People in view now"] == "3"
    assert m["Unique visitors today"] == "3"
    assert m["Visitors this hour (17:00–now)"] == "3"
    assert [x.delta for x in at.metric if x.label.startswith("Visitors this hour")] == ["+200% vs yesterday"]
    text = _text(at)
    assert "Same hour yesterday, same minutes: **1** visitors." in text
    assert "No alerts" in text
    assert "Appliance status not shown: no fleet database" in text
    people = at.dataframe[0].value.set_index("camera")["people now"].to_dict()
    assert people == {"aisle": 1, "checkout": 1, "entrance": 1}


def test_overview_alerts_when_cameras_go_silent(monkeypatch: pytest.MonkeyPatch, tiny_cfg: Path) -> None:
    at = _app(monkeypatch, tiny_cfg, as_of_us=NOW_US + 10 * 60 * US)  # ten minutes without any frame
    warnings = [w.value for w in at.warning]
    assert len(warnings) == 3
    assert all("sent nothing for 10 min" in w for w in warnings)
    assert _metrics(at)["People in view now"] == "0"


def test_analytics_week_matches_plain_sql(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, week_store: str) -> None:
    at = _app(monkeypatch, write_config(tmp_path / "dash.yaml", store_url=week_store))
    at.switch_page("pages/analytics.py").run()
    assert not at.exception, at.exception
    m = _metrics(at)
    db = sqlite3.connect(week_store.removeprefix("sqlite:///"))
    start, _ = queries.local_day_bounds(NOW.date() - timedelta(days=6), "UTC")
    _, end = queries.local_day_bounds(NOW.date(), "UTC")
    unique = db.execute("SELECT COUNT(DISTINCT COALESCE(global_id, track_uid)) FROM tracks "
                        "WHERE last_seen_us >= ? AND first_seen_us < ?", (start, end)).fetchone()[0]
    moves = db.execute("SELECT COUNT(*) FROM transitions WHERE entered_at_us >= ? AND entered_at_us < ? "
                       "AND entered_at_us - left_at_us <= ?", (start, end, 15 * 60 * US)).fetchone()[0]
    assert unique > 300
    assert m["Unique visitors"] == str(unique)
    assert m["Camera-to-camera moves"] == str(moves)
    titles = [json.loads(c.proto.spec).get("title") for c in at.get("vega_lite_chart")]
    assert titles == ["Visitors by day and hour", "How long visits last", "Visitors by gender (estimated)"]
    assert len(at.get("plotly_chart")) == 1  # Sankey
    assert len(at.get("download_button")) == 3
    # The heatmap's data adds up to the visitors per hour from plain SQL over the sightings.
    per_hour = db.execute("SELECT SUM(n) FROM (SELECT COUNT(DISTINCT COALESCE(global_id, track_uid)) AS n "
                          "FROM sightings WHERE bucket_start_us >= ? AND bucket_start_us < ? "
                          "GROUP BY bucket_start_us / 3600000000)", (start, end)).fetchone()[0]
    pivot = at.dataframe[-1].value
    assert int(pivot.to_numpy().sum()) == per_hour
    # Camera filter: only the checkout camera.
    at.multiselect(key="analytics_cams").set_value(["checkout"]).run()
    checkout = db.execute("SELECT COUNT(DISTINCT COALESCE(global_id, track_uid)) FROM tracks WHERE camera_id = "
                          "'checkout' AND last_seen_us >= ? AND first_seen_us < ?", (start, end)).fetchone()[0]
    assert _metrics(at)["Unique visitors"] == str(checkout)
    assert "No moves between cameras" in _text(at)


def test_analytics_empty_period_explains(monkeypatch: pytest.MonkeyPatch, tiny_cfg: Path) -> None:
    at = _app(monkeypatch, tiny_cfg, as_of_us=NOW_US + 60 * 24 * 3600 * US)  # two months later: nobody
    at.switch_page("pages/analytics.py").run()
    assert "Nobody was seen in this period." in _text(at)


def test_search_by_time_camera_gender(monkeypatch: pytest.MonkeyPatch, tiny_cfg: Path) -> None:
    at = _app(monkeypatch, tiny_cfg)
    at.switch_page("pages/search.py").run()
    assert not at.exception
    assert "**3 people** seen on" in _text(at)  # A, B and the unidentified track today
    at.selectbox(key="search_gender").set_value("male").run()
    assert "**1 people** seen on" in _text(at)
    assert at.dataframe[0].value["global_id"].tolist() == [gid("B")]
    at.selectbox(key="search_gender").set_value("any").run()
    at.multiselect(key="search_cams").set_value(["checkout"]).run()
    table = at.dataframe[0].value
    assert table["global_id"].tolist() == [gid("A")]
    sightings = at.dataframe[1].value
    assert sightings["camera_id"].tolist() == ["checkout", "aisle", "entrance"]


MARKET = {"A": "0001", "B": "0003", "C": "0004", "D": "0005"}


@pytest.fixture
def gallery(tmp_path: Path, assets: Path) -> Iterator[tuple[Path, Path]]:
    """A local Qdrant collection filled by the server's vector store with Market crops of A-D, held open
    (locked) for the whole test, as a running server would."""
    import uuid

    import cv2

    from server.config import QdrantLocalSettings
    from server.embed import build_embedder
    from server.vectors.base import Prototype
    from server.vectors.qdrant import QdrantVectorStore

    emb = build_embedder({"type": "intel_reid", "model": "0277"}, assets=str(assets))
    root = assets / "data" / "market1501_subset"
    store = QdrantVectorStore(QdrantLocalSettings(path=str(tmp_path / "qdrant")), dim=emb.dim,
                              model_id=emb.model_id)
    protos = []
    for name, pid in MARKET.items():
        for p in sorted((root / "bounding_box_test").glob(f"{pid}_*.jpg"))[:3]:
            vec = emb.embed([cv2.imread(str(p))])[0]
            protos.append(Prototype(str(uuid.uuid5(uuid.NAMESPACE_URL, p.name)), gid(name), vec, {}))
    store.upsert(protos)
    try:
        yield tmp_path / "qdrant", root / "query" / "0003_c4s6_015641_01.jpg"
    finally:
        store.close()


def test_search_by_example_image(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_store: str,
                                 gallery: tuple[Path, Path]) -> None:
    qdrant_path, query = gallery
    cfg = write_config(tmp_path / "dash.yaml", store_url=tiny_store, qdrant={"path": str(qdrant_path)},
                       search={"embedder": {"type": "intel_reid", "model": "0277"}, "top_k": 4})
    at = _app(monkeypatch, cfg)
    at.switch_page("pages/search.py").run()
    at.file_uploader(key="search_upload").upload(query.name, query.read_bytes(), "image/jpeg")
    at.run()
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    nearest = at.dataframe[-2].value
    assert nearest["global_id"].tolist()[0] == gid("B")  # Market id 0003, another camera
    assert len(nearest) == 4
    where = at.dataframe[-1].value
    assert set(where["global_id"]) == {gid(n) for n in "ABCD"}
    # Not an image: a clear error, nothing else.
    at.file_uploader(key="search_upload").set_value(("notes.jpg", b"hello", "image/jpeg")).run()
    assert any("is not a readable JPEG or PNG image" in e.value for e in at.error)


def test_fleet_page_for_admins(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_store: str,
                               fleet_db: Path) -> None:
    cfg = write_config(tmp_path / "dash.yaml", store_url=tiny_store, fleet_inventory=str(fleet_db))
    at = _app(monkeypatch, cfg, role="admin", as_of_us=None)  # inventory times are wall clock
    at.switch_page("pages/fleet.py").run()
    assert not at.exception, at.exception
    assert _metrics(at) == {"Appliances": "3", "Online": "2", "Offline": "1", "Unhealthy": "1"}
    table = at.dataframe[0].value.set_index("device")
    assert table.loc["cam-b", "status"] == "offline"
    assert table.loc["cam-c", "health"] == "degraded"
    assert table.loc["cam-a", "model version"] == "v1"
    assert "**yolo11n@v2** · running" in _text(at)
    # The Overview raises the offline appliance as an alert.
    at.switch_page("pages/overview.py").run()
    assert any("Appliance cam-b is offline" in w.value for w in at.warning)


def test_settings_privacy_and_retention(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from tests.dashboard.conftest import ENTRANCE, TinyTrack, write_tracks

    url = f"sqlite:///{tmp_path / 'r.db'}"
    write_tracks(url, [TinyTrack("old", ENTRANCE, NOW_US - 20 * 24 * 3600 * US, NOW_US - 20 * 24 * 3600 * US + US,
                                 "old", True),
                       TinyTrack("new", ENTRANCE, NOW_US - 3600 * US, NOW_US - 3000 * US, "new", True)], NOW_US)
    cfg = write_config(tmp_path / "dash.yaml", store_url=url)
    at = _app(monkeypatch, cfg, role="admin")
    at.switch_page("pages/settings.py").run()
    assert not at.exception, at.exception
    assert at.toggle[0].value is True  # blurring is on by default
    at.toggle[0].set_value(False)
    at.number_input[0].set_value(10)
    at.button[0].click().run()
    saved = json.loads((tmp_path / "settings.json").read_text())
    assert saved["blur_people"] is False and saved["retention_days"] == 10 and saved["changed_by"] == "boss"
    assert any("deleted 1 sightings, 1 tracks, 0 moves and 1 identities" in s.value for s in at.success), _text(at)
    assert "Last changed by boss" in _text(at) and at.toggle[0].value is False
    engine = queries.open_store(url)
    assert queries.tracks_between(engine, 0, NOW_US * 2)["person"].tolist() == [gid("new")]
    engine.dispose()
    # Managers cannot reach the settings page.
    mgr = _app(monkeypatch, cfg, role="manager")
    with pytest.raises(ValueError, match="Known pages"):
        mgr.switch_page("pages/settings.py")
    assert "blurring OFF" in "\n".join(c.value for c in mgr.sidebar.caption)
