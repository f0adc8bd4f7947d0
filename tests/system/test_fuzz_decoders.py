"""Fuzz the decoders the server runs on untrusted bytes: AvroCodec.decode, then check_frame, then
decode_crops. Whatever arrives, the only way out is a decoded frame or a CodecError/InvalidFrame (which
the consumer dead-letters); any other exception would be a crash of the consumer loop."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.codec import AvroCodec, CodecError
from server.config import ValidationSettings
from server.edge_records import Box, edge_frame, jpeg_bytes
from server.validate import InvalidFrame, check_frame, decode_crops, jpeg_size, undecoded_crops

EDGE = AvroCodec("edge_frame")
CFG = ValidationSettings()
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _person_jpeg() -> bytes:
    """A small image the test makes itself (gradient + noise), JPEG-encoded like an appliance crop."""
    rng = np.random.default_rng(3)
    img = (np.linspace(0, 255, 64 * 128 * 3).reshape(128, 64, 3) + rng.integers(0, 30, (128, 64, 3))) % 256
    return jpeg_bytes(img.astype(np.uint8))


JPEG = _person_jpeg()
NOW_US = time.time_ns() // 1000
VALID = EDGE.encode(edge_frame("dev-1", "cam-1", 3, NOW_US - 1_000_000,
                               [Box(1, (10, 20, 74, 148), crop_jpeg=JPEG), Box(2, (300, 40, 360, 200))],
                               ended_track_ids=[7]))


def server_path(data: bytes) -> str:
    """What the consumer does with one message value; returns the outcome class."""
    try:
        rec = EDGE.decode(data)
    except CodecError as exc:
        assert exc.error_type in {"not_avro", "unknown_schema", "corrupt_payload", "undecodable"}
        return "codec"
    try:
        check_frame(rec, CFG)
        undecoded_crops(rec, CFG)  # the GPU-decode path's header check
        decode_crops(rec, CFG)
    except InvalidFrame as exc:
        assert exc.error_type and exc.reason
        return "invalid"
    return "ok"


def test_valid_frame_passes() -> None:
    assert server_path(VALID) == "ok"


@FUZZ
@given(st.binary(max_size=4096))
def test_random_bytes(data: bytes) -> None:
    server_path(data)


@FUZZ
@given(st.binary(max_size=2048))
def test_random_body_behind_a_valid_header(body: bytes) -> None:
    server_path(VALID[:10] + body)


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), min_size=1, max_size=8),
       st.integers(0, len(VALID)), st.binary(max_size=16))
def test_mutated_valid_frame(flips: list[tuple[int, int]], cut: int, tail: bytes) -> None:
    data = bytearray(VALID)
    for pos, byte in flips:
        data[pos] = byte
    server_path(bytes(data[:cut]) + tail)
    server_path(bytes(data))


finite_or_not = st.floats(allow_nan=True, allow_infinity=True, width=32)
det = st.fixed_dictionaries({"x1": finite_or_not, "y1": finite_or_not, "x2": finite_or_not, "y2": finite_or_not,
                             "score": finite_or_not, "class_id": st.integers(-2**31, 2**31 - 1),
                             "track_id": st.integers(-2**63, 2**63 - 1)})
crop = st.fixed_dictionaries({"track_id": st.integers(-2**63, 2**63 - 1),
                              "jpeg": st.one_of(st.just(JPEG), st.binary(max_size=64),
                                                st.builds(lambda n: JPEG[:n], st.integers(0, len(JPEG)))),
                              "x1": finite_or_not, "y1": finite_or_not, "x2": finite_or_not, "y2": finite_or_not,
                              "score": finite_or_not, "quality": finite_or_not,
                              "reason": st.sampled_from(["NEW_TRACK", "IMPROVED", "REFRESH"])})
frame = st.fixed_dictionaries({
    "device_id": st.text(max_size=200), "camera_id": st.text(max_size=200),
    "frame_index": st.integers(-2**63, 2**63 - 1), "captured_at_us": st.integers(-2**63, 2**63 - 1),
    "sent_at_us": st.integers(-2**63, 2**63 - 1), "frame_width": st.integers(-2**31, 2**31 - 1),
    "frame_height": st.integers(-2**31, 2**31 - 1), "model_id": st.text(max_size=20),
    "model_version": st.text(max_size=20), "detections": st.lists(det, max_size=6),
    "crops": st.lists(crop, max_size=3), "ended_track_ids": st.lists(st.integers(-2**63, 2**63 - 1), max_size=4),
    "frame_jpeg": st.none() | st.binary(max_size=32), "dropped_frames": st.integers(-2**31, 2**31 - 1)})


@FUZZ
@given(frame)
def test_absurd_but_well_formed_frames(rec: dict[str, Any]) -> None:
    server_path(EDGE.encode(rec))


@FUZZ
@given(st.sampled_from([(10.0, 20.0, 74.0, 148.0), (0.0, 0.0, 1280.0, 720.0)]), st.integers(1, 5_000),
       st.integers(1, 5_000))
def test_plausible_frames_of_any_size(xyxy: tuple[float, float, float, float], w: int, h: int) -> None:
    rec = edge_frame("d", "c", 0, NOW_US, [Box(1, xyxy, crop_jpeg=JPEG)], frame_wh=(w, h))
    assert server_path(EDGE.encode(rec)) in {"ok", "invalid"}


def test_jpeg_size_reads_the_frame_header() -> None:
    assert jpeg_size(JPEG) == (64, 128)
    assert jpeg_size(b"") is None and jpeg_size(b"\x89PNG\r\n\x1a\n") is None


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(JPEG) - 1), st.integers(0, 255)), max_size=6),
       st.integers(0, len(JPEG)))
def test_jpeg_size_on_mutated_jpegs(flips: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(JPEG)
    for pos, byte in flips:
        data[pos] = byte
    size = jpeg_size(bytes(data[:cut]))
    assert size is None or (size[0] > 0 and size[1] > 0)
