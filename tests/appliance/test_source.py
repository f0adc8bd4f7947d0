"""Frame sources: files, bad inputs, and a real live HTTP stream (ffmpeg) for latest-wins and reconnects."""

from __future__ import annotations

import itertools
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from appliance.config import SourceConfig
from appliance.source import SourceError, VideoSource, classify
from common.assets import data_path
from common.tansu import free_port

PETS = data_path("videos", "PETS09-S2L1_frames0001-0300.mp4")


def test_classify() -> None:
    assert classify("rtsp://user:pw@cam/stream") == "stream"
    assert classify("0") == "usb" and classify("/dev/video2") == "usb"
    assert classify("/data/clip.mp4") == "file"


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="video file not found"):
        VideoSource(SourceConfig(url=str(tmp_path / "nope.mp4")), "c").start()


def test_garbage_file_renamed_mp4(tmp_path: Path) -> None:
    bad = tmp_path / "garbage.mp4"
    bad.write_bytes(b"\x00\x01not a video at all" * 5000)
    src = VideoSource(SourceConfig(url=str(bad)), "c")
    with pytest.raises(SourceError, match=r"not a video|no decodable"):
        src.start()
    assert src.state == "failed" and src.last_error


def test_unreachable_rtsp_fails_fast_or_keeps_retrying() -> None:
    t0 = time.monotonic()
    cfg = SourceConfig(url="rtsp://127.0.0.1:1/x", open_timeout_s=1, read_timeout_s=1, reconnect_max_attempts=0)
    with pytest.raises(SourceError, match=r"cannot open rtsp://127\.0\.0\.1:1/x"):
        VideoSource(cfg, "c").start()
    assert time.monotonic() - t0 < 10
    retrying = VideoSource(cfg.model_copy(update={"reconnect_max_attempts": None, "reconnect_initial_s": 0.1}), "c")
    retrying.start()
    try:
        time.sleep(0.5)
        assert retrying.state == "reconnecting" and "cannot open" in (retrying.last_error or "")
    finally:
        retrying.close()
    limited = VideoSource(cfg.model_copy(update={"reconnect_max_attempts": 2, "reconnect_initial_s": 0.05}), "c")
    limited.start()
    with pytest.raises(SourceError, match="giving up after 2 attempts"):
        list(limited.frames())
    limited.close()


def test_file_all_frames_in_order_and_loop() -> None:
    with VideoSource(SourceConfig(url=str(PETS)), "pets") as src:
        idx = [f.frame_index for f in src.frames()]
        assert src.state == "eof" and src.fps == pytest.approx(7.0) and src.resolution_wh == (768, 576)
    assert idx == list(range(300))
    with VideoSource(SourceConfig(url=str(PETS), loop=True), "pets") as src:
        frames = src.frames()
        idx = [next(frames).frame_index for _ in range(330)]
    assert idx == list(range(330))


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg (apt-packages.txt) not installed")
def test_live_stream_latest_wins_and_reconnects() -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/live.ts"

    def serve() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            ["ffmpeg", "-loglevel", "error", "-re", "-stream_loop", "-1", "-i", str(PETS), "-c", "copy",
             "-f", "mpegts", "-listen", "1", url],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )

    server = serve()
    cfg = SourceConfig(url=url, open_timeout_s=5, read_timeout_s=2, reconnect_initial_s=0.2, reconnect_max_s=1)
    src = VideoSource(cfg, "live")
    try:
        time.sleep(0.5)
        src.start()
        frames = src.frames()
        got = []
        for _ in range(6):
            got.append(next(frames))
            time.sleep(0.6)  # a slow consumer: ~4 frames arrive per pull at 7 FPS
        assert sum(f.dropped_before for f in got[1:]) >= 8
        for a, b in itertools.pairwise(got):  # index gaps are exactly the reported drops
            assert b.frame_index - a.frame_index == b.dropped_before + 1
        server.terminate()
        server.wait(5)
        deadline = time.monotonic() + 15
        while src.state != "reconnecting" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert src.state == "reconnecting" and src.last_error
        server = serve()
        deadline = time.monotonic() + 20
        while src.reconnects < 1 or src.state != "ok":
            assert time.monotonic() < deadline, (src.state, src.last_error)
            time.sleep(0.1)
        after = next(frames)
        assert after.frame_index > got[-1].frame_index
    finally:
        src.close()
        server.kill()
        server.wait(5)
