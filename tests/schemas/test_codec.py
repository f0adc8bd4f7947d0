"""Codec round trips, corrupt-input errors and schema evolution in both directions."""

from __future__ import annotations

import copy
import json

import fastavro
import pytest

from schemas.codec import (
    AVRO_DIR,
    AvroCodec,
    CorruptPayloadError,
    NotAvroError,
    SchemaSet,
    UnknownSchemaError,
    fingerprint,
)


def edge_record(**over: object) -> dict:
    rec = {
        "device_id": "dev-1", "camera_id": "cam-a", "frame_index": 42,
        "captured_at_us": 1_700_000_000_000_000, "sent_at_us": 1_700_000_000_010_000,
        "frame_width": 1920, "frame_height": 1080, "model_id": "yolo11n_coco_int8_640",
        "model_version": "fedac70f",
        "detections": [{"x1": 1.5, "y1": 2.0, "x2": 100.0, "y2": 300.0, "score": 0.9, "class_id": 0,
                        "track_id": 7}],
        "crops": [{"track_id": 7, "jpeg": b"\xff\xd8jpegbytes\xff\xd9", "x1": 1.5, "y1": 2.0,
                   "x2": 100.0, "y2": 300.0, "score": 0.9, "quality": 0.8, "reason": "NEW_TRACK"}],
        "ended_track_ids": [3], "frame_jpeg": None, "dropped_frames": 0,
    }
    rec.update(over)
    return rec


def test_single_object_header_is_avro_spec() -> None:
    codec = AvroCodec("edge_frame")
    data = codec.encode(edge_record())
    assert data[:2] == b"\xc3\x01"
    assert data[2:10] == fingerprint(codec.writer)
    # Avro spec test vector: CRC-64-AVRO of "null" is 7195948357588979594, little-endian on the wire.
    assert fingerprint(fastavro.parse_schema("null")) == (7195948357588979594).to_bytes(8, "little")


@pytest.mark.parametrize("name", ["edge_frame", "reid_output", "dead_letter"])
def test_every_schema_parses_and_is_known(name: str) -> None:
    assert name in SchemaSet.from_dir().current


def test_round_trip_edge_frame() -> None:
    codec = AvroCodec("edge_frame")
    rec = edge_record(frame_jpeg=b"\xff\xd8full")
    out = codec.decode(codec.encode(rec))
    assert out["crops"][0]["jpeg"] == rec["crops"][0]["jpeg"]
    assert out["detections"][0]["track_id"] == 7
    assert out["frame_jpeg"] == b"\xff\xd8full"
    assert out["detections"][0]["x1"] == pytest.approx(1.5)


def test_corrupt_inputs_raise_codec_errors() -> None:
    codec = AvroCodec("edge_frame")
    data = codec.encode(edge_record())
    with pytest.raises(NotAvroError):
        codec.decode(b"hello world")
    with pytest.raises(NotAvroError):
        codec.decode(b"")
    with pytest.raises(CorruptPayloadError):
        codec.decode(data[:-5])
    with pytest.raises(CorruptPayloadError):
        codec.decode(data + b"\x00\x00")
    with pytest.raises(UnknownSchemaError):
        codec.decode(b"\xc3\x01" + b"\x00" * 8 + data[10:])
    # A valid message of another type is refused by name, not misread.
    dl = AvroCodec("dead_letter")
    with pytest.raises(UnknownSchemaError, match="DeadLetter"):
        codec.decode(dl.encode({"source_topic": "x", "source_partition": 0, "source_offset": 1,
                                "key": None, "value": None, "reason": "r", "error_type": "e",
                                "consumer": "c", "failed_at_us": 0}))


def _old_schema() -> dict:
    """edge_frame as a v1 writer: without the fields added later with defaults."""
    raw = json.loads((AVRO_DIR / "edge_frame.avsc").read_text())
    old = copy.deepcopy(raw)
    old["fields"] = [f for f in old["fields"] if f["name"] not in ("ended_track_ids", "dropped_frames")]
    return fastavro.parse_schema(old)


def test_old_writer_new_reader() -> None:
    old = _old_schema()
    new_set = SchemaSet.from_dir().with_schema(old)
    writer = AvroCodec("edge_frame", schemas=new_set, writer=old)
    rec = edge_record()
    del rec["ended_track_ids"], rec["dropped_frames"]
    out = AvroCodec("edge_frame", schemas=new_set).decode(writer.encode(rec))
    assert out["ended_track_ids"] == [] and out["dropped_frames"] == 0  # defaults fill the gap
    assert out["frame_index"] == 42


def test_new_writer_old_reader() -> None:
    old = _old_schema()
    schemas = SchemaSet.from_dir()  # the old consumer learns the new writer schema (history/registry)
    old_reader = AvroCodec("edge_frame", schemas=schemas, reader=old)
    out = old_reader.decode(AvroCodec("edge_frame").encode(edge_record(dropped_frames=5)))
    assert "dropped_frames" not in out and "ended_track_ids" not in out
    assert out["crops"][0]["track_id"] == 7


def test_confluent_wire_format() -> None:
    codec = AvroCodec("edge_frame", confluent_ids={17: SchemaSet.from_dir().current["edge_frame"]})
    body = codec.encode(edge_record())[10:]
    assert codec.decode(b"\x00" + (17).to_bytes(4, "big") + body)["camera_id"] == "cam-a"
    with pytest.raises(UnknownSchemaError):
        codec.decode(b"\x00" + (18).to_bytes(4, "big") + body)
