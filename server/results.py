"""``reid_output`` messages: one per edge frame, the frame's tracked boxes with their global ids.

Key = device id (like the input), so a device's results stay ordered on one partition. The codec is
the shared one from ``schemas``; the record layout is schemas/avro/reid_output.avsc.
"""

from __future__ import annotations

from typing import Any

from schemas.codec import AvroCodec

_CODEC: AvroCodec | None = None


def codec() -> AvroCodec:
    global _CODEC
    if _CODEC is None:
        _CODEC = AvroCodec("reid_output")
    return _CODEC


def person(track_id: int, xyxy: tuple[float, float, float, float], global_id: str | None, similarity: float,
           is_new_identity: bool, male_probability: float | None) -> dict[str, Any]:
    x1, y1, x2, y2 = xyxy
    return {"track_id": int(track_id), "global_id": global_id, "similarity": float(similarity),
            "is_new_identity": bool(is_new_identity),
            "male_probability": None if male_probability is None else float(male_probability),
            "x1": float(x1), "y1": float(y1), "x2": float(x2), "y2": float(y2)}


def reid_result(frame: dict[str, Any], people: list[dict[str, Any]], embedder_id: str,
                processed_at_us: int) -> dict[str, Any]:
    return {"device_id": frame["device_id"], "camera_id": frame["camera_id"], "frame_index": frame["frame_index"],
            "captured_at_us": frame["captured_at_us"], "processed_at_us": processed_at_us,
            "embedder_id": embedder_id, "people": people}


def encode(record: dict[str, Any]) -> bytes:
    return codec().encode(record)
