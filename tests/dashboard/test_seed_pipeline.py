"""Slow: the real pipeline (appliance processes on a shared video -> tansu -> ReidConsumer) seeds the
stores, and the dashboard shows exactly what the server stored. Run with `just test-slow`."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from tests.dashboard.conftest import write_config

APP = str(Path(__file__).resolve().parents[2] / "dashboard" / "app.py")


@pytest.mark.slow
@pytest.mark.integration
def test_pipeline_seed_feeds_the_dashboard(tmp_path: Path, assets: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dashboard.seed import seed_from_pipeline
    from dashboard.vectors import LocalCollectionReader

    url = f"sqlite:///{tmp_path / 'analytics.db'}"
    video = "videos/PETS09-S2L1_frames0001-0300.mp4"
    result = seed_from_pipeline(url, str(tmp_path / "qdrant"), videos=[(video, "shop-01", "entrance")],
                                assets=str(assets), work_dir=tmp_path / "work")
    assert result["frames"] == 300 and result["dead_letters"] == 0  # every frame of the video, none rejected
    db = sqlite3.connect(tmp_path / "analytics.db")
    people = db.execute("SELECT COUNT(DISTINCT global_id) FROM tracks WHERE global_id IS NOT NULL").fetchone()[0]
    assert 5 <= people <= 40  # PETS09 frames 1-300 show 10 people; the server merges or splits a few
    cols = sorted(p.name for p in (tmp_path / "qdrant" / "collection").iterdir())
    assert len(cols) == 1 and LocalCollectionReader(tmp_path / "qdrant", cols[0]).count() > 0

    monkeypatch.setenv("TEST_DASH_MANAGER_PW", "x")
    monkeypatch.setenv("TEST_DASH_ADMIN_PW", "y")
    monkeypatch.setenv("REIDFLEET_DASHBOARD_CONFIG", str(write_config(tmp_path / "dash.yaml", store_url=url)))
    at = AppTest.from_file(APP, default_timeout=90)
    at.session_state["user"], at.session_state["role"] = "mia", "manager"
    at.run()
    at.switch_page("pages/analytics.py").run()
    assert not at.exception, at.exception
    shown = {m.label: m.value for m in at.metric}
    stored = db.execute("SELECT COUNT(DISTINCT COALESCE(i.merged_into, t.global_id, t.track_uid)) FROM tracks t "
                        "LEFT JOIN identities i ON i.global_id = t.global_id").fetchone()[0]
    assert shown["Unique visitors"] == str(stored)
