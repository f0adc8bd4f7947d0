"""The Live page's data path: EdgeFrame + ReidResult records in, an annotated (blurred) picture out;
and the same through a real tansu broker and the Live page under AppTest."""

from __future__ import annotations

import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from dashboard.live_feed import LiveFeed, LiveState, render_camera
from schemas.codec import AvroCodec
from tests.dashboard.conftest import write_config

W, H = 640, 360
BOX = (200.0, 60.0, 300.0, 330.0)  # one person, head at the top of the box


def scene() -> np.ndarray:
    """A textured frame (fine noise shows whether a region was blurred) with a bright 'person' box."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (H, W, 3), dtype=np.uint8)
    x1, y1, x2, y2 = map(int, BOX)
    img[y1:y2, x1:x2] = rng.integers(120, 255, (y2 - y1, x2 - x1, 3), dtype=np.uint8)
    return img


def jpeg(img: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    return buf.tobytes()


def edge_frame(frame_index: int, *, full: bool, crop: bool, camera: str = "door", track_id: int = 7) -> dict:
    x1, y1, x2, y2 = BOX
    img = scene()
    now_us = int(time.time() * 1e6)
    return {
        "device_id": "dev-1", "camera_id": camera, "frame_index": frame_index, "captured_at_us": now_us,
        "sent_at_us": now_us, "frame_width": W, "frame_height": H, "model_id": "yolo11n", "model_version": "v1",
        "detections": [{"x1": x1, "y1": y1, "x2": x2, "y2": y2, "score": 0.9, "class_id": 0, "track_id": track_id}],
        "crops": [{"track_id": track_id, "jpeg": jpeg(img[int(y1):int(y2), int(x1):int(x2)]), "x1": x1, "y1": y1,
                   "x2": x2, "y2": y2, "score": 0.9, "quality": 0.8, "reason": "NEW_TRACK"}] if crop else [],
        "ended_track_ids": [], "frame_jpeg": jpeg(img) if full else None, "dropped_frames": 0,
    }


def reid_result(frame_index: int, global_id: str, camera: str = "door", track_id: int = 7) -> dict:
    x1, y1, x2, y2 = BOX
    return {"device_id": "dev-1", "camera_id": camera, "frame_index": frame_index,
            "captured_at_us": int(time.time() * 1e6), "processed_at_us": int(time.time() * 1e6),
            "embedder_id": "test", "people": [{"track_id": track_id, "global_id": global_id, "similarity": 0.8,
                                               "is_new_identity": False, "male_probability": None,
                                               "x1": x1, "y1": y1, "x2": x2, "y2": y2}]}


def head_sharpness(rgb: np.ndarray) -> float:
    x1, y1, x2, _ = map(int, BOX)
    head = cv2.cvtColor(rgb[y1 + 5:y1 + 50, x1 + 10:x2 - 10], cv2.COLOR_RGB2GRAY)
    return float(cv2.Laplacian(head, cv2.CV_64F).var())


def test_state_joins_global_ids_and_renders_blurred_frames() -> None:
    state = LiveState()
    state.apply_edge_frame(edge_frame(1, full=True, crop=True))
    state.apply_reid_result(reid_result(1, "1234abcd-0000-0000-0000-000000000000"))
    view = state.snapshot()["door"]
    assert view.tracks[7].global_id.startswith("1234abcd")
    sharp, caption = render_camera(view, blur=False)
    blurred, _ = render_camera(view, blur=True)
    assert sharp.shape == (H, W, 3) and caption.startswith("full frame 1")
    assert head_sharpness(blurred) < 0.2 * head_sharpness(sharp)  # the head band is smoothed
    legs = (slice(int(BOX[1]) + 150, int(BOX[3]) - 5), slice(int(BOX[0]) + 10, int(BOX[2]) - 10))
    assert np.array_equal(blurred[legs], sharp[legs])  # the rest of the person is untouched
    # The label "#1234abcd t7" is drawn above the box in the box's colour: pixels there changed.
    assert not np.array_equal(sharp[int(BOX[1]) - 12:int(BOX[1]), int(BOX[0]):int(BOX[0]) + 60],
                              cv2.cvtColor(scene(), cv2.COLOR_BGR2RGB)[int(BOX[1]) - 12:int(BOX[1]),
                                                                        int(BOX[0]):int(BOX[0]) + 60])


def test_crop_canvas_without_full_frames_and_track_end() -> None:
    state = LiveState()
    state.apply_edge_frame(edge_frame(1, full=False, crop=True))
    img, caption = render_camera(state.snapshot()["door"], blur=True)
    assert caption.startswith("crop view") and "1 people" in caption
    x1, y1, x2, y2 = map(int, BOX)
    assert img[y1 + 100:y2 - 10, x1 + 10:x2 - 10].mean() > 120  # the bright crop pasted into its box
    assert img[5:40, 5:150].mean() < 60  # background stays the dark canvas
    later = edge_frame(2, full=False, crop=False)
    later["ended_track_ids"] = [7]
    later["detections"] = []
    state.apply_edge_frame(later)
    assert state.snapshot()["door"].tracks == {}


@pytest.mark.integration
def test_feed_from_kafka_and_live_page(kafka_bootstrap: str, unique_topic_prefix: str,
                                       monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_store: str) -> None:
    from confluent_kafka import Producer
    from streamlit.testing.v1 import AppTest

    from common.kafka import ensure_topics
    from schemas.topics import TopicSpec

    t_in, t_out = unique_topic_prefix + "reid_input", unique_topic_prefix + "reid_output"
    ensure_topics(kafka_bootstrap, [TopicSpec(t_in, 2, 1), TopicSpec(t_out, 1, 1)])
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "message.max.bytes": 20_000_000})
    ef, rr = AvroCodec("edge_frame"), AvroCodec("reid_output")
    gid = "feedbeef-0000-4000-8000-000000000000"
    for cam in ("door", "till"):
        producer.produce(t_in, ef.encode(edge_frame(5, full=cam == "door", crop=True, camera=cam)), key=b"dev-1")
        producer.produce(t_out, rr.encode(reid_result(5, gid, camera=cam)), key=b"dev-1")
    producer.produce(t_in, b"not avro at all", key=b"dev-1")  # skipped and counted, the feed goes on
    assert producer.flush(15) == 0

    feed = LiveFeed(kafka_bootstrap, input_topic=t_in, output_topic=t_out, start="earliest").start()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            snap = feed.snapshot()
            if {"door", "till"} <= set(snap) and all(v.tracks.get(7) and v.tracks[7].global_id for v in snap.values()):
                break
            time.sleep(0.2)
        else:
            pytest.fail(f"feed did not deliver both cameras with ids: {feed.snapshot()} error={feed.error}")
        assert feed.state.errors == 1
        assert render_camera(snap["door"], blur=True)[1].startswith("full frame 5")
        assert render_camera(snap["till"], blur=True)[1].startswith("crop view")
    finally:
        feed.stop()

    # The page itself, fed by its own process-wide feed (lookback replays what was just produced).
    cfg = write_config(tmp_path / "dash.yaml", store_url=tiny_store,
                       live={"kafka_bootstrap": kafka_bootstrap, "input_topic": t_in, "output_topic": t_out,
                             "lookback_s": 600})
    monkeypatch.setenv("REIDFLEET_DASHBOARD_CONFIG", str(cfg))
    at = AppTest.from_file(str(Path(__file__).resolve().parents[2] / "dashboard" / "app.py"), default_timeout=60)
    at.session_state["user"], at.session_state["role"] = "mia", "manager"
    at.run()
    at.switch_page("pages/live.py").run()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(at.get("image")) < 2:
        time.sleep(0.5)
        at.run()
    import dashboard.ui

    dashboard.ui.live_feed.clear()  # stops the page's feed thread (on_release) before the broker goes
    assert not at.exception, at.exception
    assert [s.value for s in at.subheader] == ["door", "till"]
    image_captions = [c for img in at.get("image") for c in img.captions]
    assert image_captions[0].startswith("full frame 5") and image_captions[1].startswith("crop view")
    captions = [c.value for c in at.caption]
    assert any("Global ids in view: feedbeef" in c for c in captions)
    assert any("Heads are blurred" in c for c in captions)
