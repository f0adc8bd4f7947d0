"""Garbage on reid_input, between real frames, into a real server process: every bad message is
dead-lettered with its reason and its bytes, and the good ones come out exactly as if the garbage had
never been there (same stores as a clean run on the good frames alone)."""

from __future__ import annotations

import copy
import math
import random
import time
from pathlib import Path
from typing import Any

import pytest

from common.kafka import ensure_topics
from schemas.codec import AvroCodec
from schemas.topics import TopicSpec
from server.consume import ReidConsumer
from tests.server.conftest import Market, produce, server_config
from tests.server.test_consume import run_until, track_frames
from tests.server.test_crash import snapshot
from tests.system.kit import TopicReader, first_occurrence, frames_by_device, server, wait_for

pytestmark = pytest.mark.integration
EDGE = AvroCodec("edge_frame")
OUT = AvroCodec("reid_output")


def absurd(good: dict[str, Any], jpeg: bytes) -> list[tuple[str, dict[str, Any]]]:
    """Valid Avro, absurd content: (expected error_type, record)."""
    def m(**kw: Any) -> dict[str, Any]:
        r = copy.deepcopy(good)
        r.update(kw)
        return r

    det = good["detections"][0]
    crop = {"track_id": det["track_id"], "jpeg": jpeg, "x1": det["x1"], "y1": det["y1"], "x2": det["x2"],
            "y2": det["y2"], "score": 0.9, "quality": 0.5, "reason": "NEW_TRACK"}
    now_us = time.time_ns() // 1000
    return [
        ("invalid_field", m(frame_width=0)),
        ("invalid_field", m(frame_height=10**6)),
        ("invalid_field", m(frame_index=-5)),
        ("invalid_field", m(device_id="")),
        ("invalid_field", m(camera_id="c" * 1000)),
        ("invalid_timestamp", m(captured_at_us=0)),
        ("invalid_timestamp", m(captured_at_us=now_us + 10 * 365 * 86400 * 10**6)),
        ("invalid_box", m(detections=[{**det, "x1": math.inf}])),
        ("invalid_box", m(detections=[{**det, "x2": det["x1"] - 10}])),
        ("invalid_box", m(detections=[{**det, "x2": 1e9}])),
        ("invalid_field", m(detections=[{**det, "score": 7.0}])),
        ("invalid_field", m(detections=[{**det, "score": math.nan}])),
        ("invalid_field", m(detections=[{**det, "class_id": 10**6}])),
        ("invalid_field", m(detections=[{**det, "track_id": -99}])),
        ("invalid_field", m(detections=[det, det])),
        ("too_large", m(detections=[{**det, "track_id": i} for i in range(2_001)])),
        ("bad_jpeg", m(crops=[{**crop, "jpeg": b"\xff\xd8\xff\xe0 not really a jpeg"}])),
        ("bad_jpeg", m(crops=[{**crop, "jpeg": b""}])),
        ("bad_jpeg", m(crops=[{**crop, "jpeg": jpeg[: len(jpeg) // 3]}])),
        ("invalid_field", m(crops=[{**crop, "quality": math.nan}])),
        ("invalid_field", m(crops=[{**crop, "track_id": -1}])),
        ("invalid_field", m(ended_track_ids=[-3])),
    ]


def test_garbage_is_dead_lettered_and_disturbs_nothing(kafka_bootstrap: str, unique_topic_prefix: str,
                                                       market: Market, tmp_path: Path) -> None:
    rng = random.Random(7)
    t0 = (time.time_ns() // 1000) - 300_000_000
    good = (track_frames("dev-1", "cam-a", t0, {1: market.crops("0001", 0), 2: market.crops("0004", 0)})
            + track_frames("dev-2", "cam-b", t0 + 20_000_000, {5: market.crops("0001", 1),
                                                                6: market.crops("0005", 1)}))
    good_bytes = [EDGE.encode(f) for f in good]
    jpeg = next(c["jpeg"] for f in good for c in f["crops"])
    bad: list[tuple[str | None, bytes]] = []
    for n in (0, 1, 2, 9, 10, 64, 1000, 50_000):
        junk = bytes(rng.getrandbits(8) for _ in range(n))
        bad.append((None, junk if junk[:2] != b"\xc3\x01" else b"x" + junk))
    bad.append(("unknown_schema", b"\xc3\x01" + bytes(8) + b"\x02ab"))
    bad.append(("unknown_schema", OUT.encode({"device_id": "d", "camera_id": "c", "frame_index": 1,
                                               "captured_at_us": t0, "processed_at_us": t0, "embedder_id": "x",
                                               "people": []})))
    full = good_bytes[0]
    for cut in sorted({3, 10, 11, 20, len(full) // 2, len(full) - 2, len(full) - 1}):
        bad.append(("corrupt_payload", full[:cut]))
    bad.append(("corrupt_payload", full + b"\x00\x00trailing"))
    bad += [(et, EDGE.encode(r)) for et, r in absurd(good[0], jpeg)]

    # good frames in order, garbage sprinkled between them (one partition: one total order)
    stream: list[tuple[bytes, bytes, str | None, bool]] = [(f["device_id"].encode(), v, None, True)
                                                           for f, v in zip(good, good_bytes, strict=True)]
    for et, v in bad:
        stream.insert(rng.randrange(len(stream) + 1), (b"dev-x", v, et, False))
    topics = {k: unique_topic_prefix + k for k in ("reid_input", "reid_output", "reid_dlq")}
    ensure_topics(kafka_bootstrap, [TopicSpec(t, 1, 1) for t in topics.values()])
    produce(kafka_bootstrap, topics["reid_input"], [(k, v) for k, v, _e, _g in stream])

    srv = server(tmp_path, "server", kafka_bootstrap, topics, unique_topic_prefix + "g", gender={"mode": "off"})
    dlq = TopicReader(kafka_bootstrap, topics["reid_dlq"], unique_topic_prefix + "dlq", "dead_letter")
    out = TopicReader(kafka_bootstrap, topics["reid_output"], unique_topic_prefix + "out", "reid_output")
    try:
        wait_for(lambda: len(dlq.items) >= len(bad) and len(out.items) >= len(good), 240,
                 f"{len(bad)} dead letters and {len(good)} results")
        time.sleep(1)
        assert srv.alive() and srv.health()["ok"], srv.tail()
        assert srv.metric("reidfleet_server_messages_total", 'outcome="dlq"') == len(bad)
        assert srv.metric("reidfleet_server_messages_total", 'outcome="ok"') == len(good)
    finally:
        dlq.stop()
        out.stop()
        srv.stop(60)

    letters = {d["source_offset"]: d for d in dlq.values}
    expected = {off: (e, v) for off, (_k, v, e, g) in enumerate(stream) if not g}
    assert set(letters) == set(expected), "exactly the garbage is dead-lettered"
    codec_types = {"not_avro", "unknown_schema", "corrupt_payload"}
    for off, (et, value) in expected.items():
        d = letters[off]
        assert d["value"] == value and d["key"] == b"dev-x", "kept byte for byte"
        assert d["reason"] and d["source_topic"] == topics["reid_input"] and d["consumer"]
        assert d["error_type"] == et if et else d["error_type"] in codec_types, (et, d["error_type"], d["reason"])
    got = frames_by_device(out.values)
    assert {d: first_occurrence(v) for d, v in got.items()} == {"dev-1": list(range(9)), "dev-2": list(range(9))}

    # nothing else disturbed: the same stores as a clean server on the good frames alone
    clean_topics = {k: unique_topic_prefix + "clean_" + k for k in ("reid_input", "reid_output", "reid_dlq")}
    ensure_topics(kafka_bootstrap, [TopicSpec(t, 1, 1) for t in clean_topics.values()])
    produce(kafka_bootstrap, clean_topics["reid_input"], [(f["device_id"].encode(), v)
                                                          for f, v in zip(good, good_bytes, strict=True)])
    (tmp_path / "clean").mkdir()
    consumer = ReidConsumer(server_config(kafka_bootstrap, clean_topics, tmp_path / "clean", gender={"mode": "off"},
                                          batch={"max_crops": 16, "max_wait_ms": 30}))
    run_until(consumer, lambda: consumer.metrics.messages.labels("ok")._value.get() >= len(good))
    assert snapshot(srv.store_url) == snapshot(consumer.cfg.store.url)  # type: ignore[attr-defined]
