"""A camera that dies and comes back: the appliance process keeps running, reports the outage in its
health/telemetry (/healthz ``source: reconnecting`` + ``degraded``, then ``source_reconnects``) and resumes by itself.

- RTSP: a real RTSP server (GStreamer, tests/system/rtsp_server.py) is killed and started again on the
  same port; frame indexes keep counting (a gap, no restart of the numbering), nothing else changes.
- File: a looping file source whose file disappears (a NAS share gone, a clip being replaced): at the
  next rewind the source waits for it instead of failing, and plays it again once it is back.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from common.kafka import ensure_topics
from common.tansu import free_port
from schemas.topics import TopicSpec
from tests.system.kit import PETS, TopicReader, appliance, frames_by_device, rtsp_server, wait_for

pytestmark = pytest.mark.integration

LIVE = ["source.open_timeout_s=2", "source.read_timeout_s=2", "source.reconnect_initial_s=0.2",
        "source.reconnect_max_s=1"]


def frames(app) -> float:  # type: ignore[no-untyped-def]
    return app.metric("reidfleet_appliance_frames_processed_total") or 0.0


def outage_seen(app) -> dict:  # type: ignore[no-untyped-def]
    h = app.health()
    # NB reidfleet_appliance_source_up is only refreshed per processed frame, so it cannot show an
    # outage (no frames then); /healthz reads the source state live.
    ok = h.get("_status") == 200 and h.get("ok") and h.get("source") == "reconnecting"
    return h if ok else {}


@pytest.mark.skipif(not Path("/usr/bin/python3").exists(), reason="needs the system python3 with python3-gi")
def test_rtsp_camera_dies_and_comes_back(kafka_bootstrap: str, unique_topic_prefix: str, tmp_path: Path) -> None:
    topic = unique_topic_prefix + "reid_input"
    ensure_topics(kafka_bootstrap, [TopicSpec(topic, 1, 1)])
    port = free_port()
    cam = rtsp_server(tmp_path, port)
    app = appliance(tmp_path, "rtsp-dev", kafka_bootstrap, topic, f"source.url=rtsp://127.0.0.1:{port}/cam", *LIVE)
    try:
        wait_for(lambda: frames(app) >= 10, 90, "frames from the RTSP camera")
        cam.kill()  # the camera dies without a goodbye
        died = time.monotonic()
        h = wait_for(lambda: outage_seen(app), 30, "the outage in /healthz and source_up")
        assert any("source" in d for d in h["degraded"]), h
        stalled = frames(app)
        time.sleep(5)
        assert app.alive(), app.tail()
        assert frames(app) <= stalled + 1, "no frames while the camera is gone"
        cam.start()
        wait_for(lambda: frames(app) >= stalled + 10, 60, "frames again after the camera came back")
        back = time.monotonic() - died
        h = app.health()
        assert h["ok"] and h["source"] == "ok", h
        assert (app.metric("reidfleet_appliance_source_reconnects") or 0) >= 1
        assert app.alive() and app.stop(60) == 0, app.tail()
    finally:
        app.stop(30)
        cam.stop(10)
    reader = TopicReader(kafka_bootstrap, topic, unique_topic_prefix + "r", "edge_frame")
    wait_for(lambda: len(reader.items) >= stalled + 10, 60, "messages read back")
    time.sleep(1)
    reader.stop()
    seq = frames_by_device(reader.values)["rtsp-dev"]
    assert seq == sorted(set(seq)), "frame indexes strictly increase across the outage"
    assert back < 60


def test_file_source_removed_and_restored(kafka_bootstrap: str, unique_topic_prefix: str, tmp_path: Path) -> None:
    topic = unique_topic_prefix + "reid_input"
    ensure_topics(kafka_bootstrap, [TopicSpec(topic, 1, 1)])
    clip = tmp_path / "clip.mp4"  # a 2 s clip made here from the shared video (never stored in the repo)
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-i", str(PETS), "-t", "2", "-c", "copy", str(clip)],
                   check=True, timeout=60)
    app = appliance(tmp_path, "file-dev", kafka_bootstrap, topic, f"source.url={clip}", "source.loop=true",
                    "source.realtime=true", *LIVE)
    try:
        wait_for(lambda: frames(app) >= 10, 90, "frames from the file")
        aside = tmp_path / "aside.mp4"
        shutil.move(clip, aside)  # the file disappears
        h = wait_for(lambda: outage_seen(app), 30, "the missing file in /healthz")
        assert "not found" in (app.http("/healthz")[1] + str(h)) or h["source"] == "reconnecting"
        stalled = frames(app)
        time.sleep(3)
        assert app.alive(), app.tail()
        shutil.move(aside, clip)  # ... and comes back
        wait_for(lambda: frames(app) >= stalled + 10, 60, "frames again after the file came back")
        assert app.health()["source"] == "ok"
        assert app.stop(60) == 0, app.tail()
    finally:
        app.stop(30)
