"""The real thing: ``python -m dashboard run`` on a loopback port, driven by headless Debian Chromium.

Signs in, opens every page through the sidebar (client-side, so the session stays logged in), waits
for content that only a finished page has (numbers, chart canvases, camera pictures — not the grey
skeleton), asserts on text and saves a screenshot per page under results/screenshots/.
The shop week is seeded relative to the wall clock in a time zone where it is shop hours now, and
a synthetic camera scene (drawn here, no dataset imagery) is streamed to a real tansu broker for Live.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.dashboard.conftest import write_config

REPO = Path(__file__).resolve().parents[2]
SHOTS = REPO / "results" / "screenshots"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian chromium not installed "
                                 "(apt-packages.txt; ./just installs it)")]


def shop_zone() -> str:
    """An Etc/GMT zone where it is 17:xx now (the evening peak), so the seeded shop is open and busy."""
    hour = datetime.now(UTC).hour
    offset = max(-12, min(14, 17 - hour))
    return "UTC" if offset == 0 else f"Etc/GMT{'-' if offset > 0 else '+'}{abs(offset)}"


PEOPLE = [((120, 90, 210, 330), (60, 90, 200)), ((300, 110, 380, 340), (160, 120, 40)),
          ((470, 80, 560, 335), (70, 150, 70))]


def synthetic_scene(t: float) -> tuple[np.ndarray, list[tuple[float, float, float, float]]]:
    """A shop floor with three stylised people (head, body, legs) that sway a little with time."""
    img = np.zeros((360, 640, 3), np.uint8)
    img[:] = (205, 210, 215)
    img[250:] = (150, 160, 170)
    for x in range(0, 640, 160):  # shelves
        cv2.rectangle(img, (x + 10, 30), (x + 140, 240), (90, 110, 140), -1)
        for y in range(50, 240, 40):
            cv2.line(img, (x + 10, y), (x + 140, y), (60, 70, 90), 3)
    boxes = []
    for i, ((x1, y1, x2, y2), colour) in enumerate(PEOPLE):
        dx = int(12 * np.sin(t / 2 + i))
        x1, x2 = x1 + dx, x2 + dx
        w, h = x2 - x1, y2 - y1
        cx = (x1 + x2) // 2
        cv2.circle(img, (cx, y1 + h // 9), h // 10, (150, 180, 225), -1)  # face
        cv2.circle(img, (cx - 8, y1 + h // 10), 4, (30, 30, 30), -1)
        cv2.circle(img, (cx + 8, y1 + h // 10), 4, (30, 30, 30), -1)
        cv2.rectangle(img, (x1 + w // 6, y1 + h // 5), (x2 - w // 6, y1 + 3 * h // 5), colour, -1)
        cv2.rectangle(img, (x1 + w // 4, y1 + 3 * h // 5), (cx - 3, y2), (50, 50, 60), -1)
        cv2.rectangle(img, (cx + 3, y1 + 3 * h // 5), (x2 - w // 4, y2), (50, 50, 60), -1)
        boxes.append((float(x1), float(y1), float(x2), float(y2)))
    return img, boxes


def stream_scene(bootstrap: str, stop: threading.Event, topics: tuple[str, str]) -> None:
    """An appliance and a server in miniature: an EdgeFrame with a full frame and its ReidResult each second."""
    from confluent_kafka import Producer

    from schemas.codec import AvroCodec

    producer = Producer({"bootstrap.servers": bootstrap, "message.max.bytes": 20_000_000})
    ef, rr = AvroCodec("edge_frame"), AvroCodec("reid_output")
    n = 0
    deadline = time.monotonic() + 300  # bounded even if the test hangs
    while not stop.is_set() and time.monotonic() < deadline:
        n += 1
        for cam in ("entrance", "checkout"):
            img, boxes = synthetic_scene(n + (0 if cam == "entrance" else 5))
            if cam == "checkout":
                img, boxes = cv2.flip(img, 1), [(640 - b[2], b[1], 640 - b[0], b[3]) for b in boxes][:2]
            now_us = int(time.time() * 1e6)
            ok, frame = cv2.imencode(".jpg", img)
            assert ok
            dets = [{"x1": b[0], "y1": b[1], "x2": b[2], "y2": b[3], "score": 0.9, "class_id": 0, "track_id": i + 1}
                    for i, b in enumerate(boxes)]
            msg = {"device_id": "shop-01", "camera_id": cam, "frame_index": n, "captured_at_us": now_us,
                   "sent_at_us": now_us, "frame_width": 640, "frame_height": 360, "model_id": "yolo11n",
                   "model_version": "v1", "detections": dets, "crops": [], "ended_track_ids": [],
                   "frame_jpeg": frame.tobytes(), "dropped_frames": 0}
            people = [{"track_id": d["track_id"], "global_id": f"{(0x3a7c91d2 + 7919 * d['track_id']):08x}-"
                       "0000-4000-8000-000000000000", "similarity": 0.8, "is_new_identity": False,
                       "male_probability": None, "x1": d["x1"], "y1": d["y1"], "x2": d["x2"], "y2": d["y2"]}
                      for d in dets]
            producer.produce(topics[0], ef.encode(msg), key=b"shop-01")
            producer.produce(topics[1], rr.encode({
                "device_id": "shop-01", "camera_id": cam, "frame_index": n, "captured_at_us": now_us,
                "processed_at_us": now_us, "embedder_id": "test", "people": people}), key=b"shop-01")
        producer.flush(5)
        stop.wait(1.0)


def keep_open_tracks_alive(url: str, stop: threading.Event) -> None:
    """What the running server does for people still in view: extend their open tracks and the cameras'
    last frame time to now, through the server's own store writes (upserts that keep the max)."""
    import sqlalchemy as sa

    from server.store import AnalyticsStore, BatchWrite, cameras, tracks

    store = AnalyticsStore(url, create=False)
    deadline = time.monotonic() + 300
    try:
        while not stop.is_set() and time.monotonic() < deadline:
            now_us = int(time.time() * 1e6)
            batch = BatchWrite()
            with store.engine.connect() as conn:
                for row in conn.execute(sa.select(tracks).where(tracks.c.ended.is_(False))).mappings():
                    batch.tracks[row["track_uid"]] = {**dict(row), "last_seen_us": now_us}
                for row in conn.execute(sa.select(cameras)).mappings():
                    batch.cameras[(row["device_id"], row["camera_id"])] = {**dict(row), "last_frame_at_us": now_us}
            store.write(batch)
            stop.wait(1.0)
    finally:
        store.close()


@pytest.fixture
def running_dashboard(tmp_path: Path, kafka_bootstrap: str, unique_topic_prefix: str,
                      fleet_db: Path) -> Iterator[str]:
    from common.kafka import ensure_topics
    from common.tansu import free_port
    from dashboard.seed import seed_store
    from schemas.topics import TopicSpec

    zone = shop_zone()
    url = f"sqlite:///{tmp_path / 'analytics.db'}"
    seed_store(url, days=7, tz=zone, seed=5, scale=1.5)
    topics = (unique_topic_prefix + "reid_input", unique_topic_prefix + "reid_output")
    ensure_topics(kafka_bootstrap, [TopicSpec(topics[0], 2, 1), TopicSpec(topics[1], 1, 1)])
    cfg = write_config(tmp_path / "dash.yaml", store_url=url, timezone=zone, fleet_inventory=str(fleet_db),
                       alerts={"offline_after_s": 3600},
                       live={"kafka_bootstrap": kafka_bootstrap, "input_topic": topics[0],
                             "output_topic": topics[1], "refresh_s": 1.0, "lookback_s": 60})
    stop = threading.Event()
    streamer = threading.Thread(target=stream_scene, args=(kafka_bootstrap, stop, topics), daemon=True)
    streamer.start()
    keeper = threading.Thread(target=keep_open_tracks_alive, args=(url, stop), daemon=True)
    keeper.start()
    port = free_port()
    env = {**os.environ, "TEST_DASH_ADMIN_PW": "admin-secret", "TEST_DASH_MANAGER_PW": "manager-secret",
           "REIDFLEET_LOG_FORMAT": "text"}
    log = (tmp_path / "dashboard.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "dashboard", "run", "--config", str(cfg), "--port", str(port)],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "dashboard.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(base + "/_stcore/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.3)
        else:
            pytest.fail("dashboard did not answer /_stcore/health within 60 s")
        yield base
    finally:
        stop.set()
        os.killpg(proc.pid, signal.SIGTERM)  # its own session: Streamlit and anything it started
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        log.close()
        streamer.join(10)
        keeper.join(10)


CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def test_every_page_in_chromium(running_dashboard: str, tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, args=CHROME_FLAGS, headless=True,
            viewport={"width": 1400, "height": 1800})
        try:
            page = ctx.new_page()
            page.set_default_timeout(60_000)
            page.goto(running_dashboard + "/")
            page.get_by_role("textbox", name="User name").fill("boss")
            page.get_by_role("textbox", name="Password").fill("wrong")
            page.get_by_role("button", name="Sign in").click()
            expect(page.get_by_text("Wrong user name or password.")).to_be_visible(timeout=90_000)
            page.screenshot(path=str(SHOTS / "00-login.png"))
            page.get_by_role("textbox", name="Password").fill("admin-secret")
            page.get_by_role("button", name="Sign in").click()

            def visit(link: str | None, must_see: list[str], shot: str, ready_css: str | None = None) -> str:
                if link:
                    page.get_by_test_id("stSidebarNav").get_by_text(link, exact=True).click()
                for text in must_see:
                    expect(page.get_by_text(text, exact=False).first).to_be_visible(timeout=90_000)
                if ready_css:
                    page.locator(ready_css).first.wait_for(state="visible")
                page.wait_for_timeout(1500)  # let charts finish their first draw
                page.screenshot(path=str(SHOTS / shot), full_page=True)
                return page.inner_text("body")

            body = visit(None, ["People in view now", "Unique visitors today", "Visitors per hour"],
                         "01-overview.png", ".vega-embed canvas, .vega-embed svg")
            assert "No alerts" in body or "Alerts (" in body
            body = visit("Live", ["Global ids in view", "full frame"], "02-live.png",
                         "[data-testid='stImage'] img")
            assert "entrance" in body and "checkout" in body and "Heads are blurred" in body
            body = visit("Analytics", ["Unique visitors", "Camera-to-camera moves", "Export"], "03-analytics.png",
                         ".js-plotly-plot")
            assert "Median visit" in body
            body = visit("Search", ["people", "seen on"], "04-search.png", "[data-testid='stDataFrame']")
            body = visit("Fleet", ["Appliances", "Model rollouts", "yolo11n@v2"], "05-fleet.png",
                         "[data-testid='stDataFrame']")
            body = visit("Privacy & retention", ["Blur people's heads", "Retention runs"], "06-privacy.png")
            assert "Keep analytics data for (days)" in body
        finally:
            ctx.close()
