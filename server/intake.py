"""A batch of raw edge-frame messages made ready for matching: each decoded and checked, its crops embedded.

Runs in the embedder's worker processes (``batch.embed_process`` with ``batch.remote_intake`` and gender off:
:meth:`server.embed.remote.RemoteEmbedder.intake`); the consumer's in-process path uses the same pieces.
Why there: Avro decoding and the frame checks cost ~40 us a message of the consumer's one interpreter, which
the matcher needs (on an H200 box they were ~15 % of the consumer thread at 8k crops/s), and the crops' JPEG
bytes were sent on to the embedder process anyway. A worker takes the raw message values instead and sends
back, per message, its record without the JPEG bytes (unpickled in a few microseconds) or why it is refused,
and the vectors of the crops it embedded.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from schemas.codec import AvroCodec, CodecError
from server.config import ValidationSettings
from server.embed.preprocess import CropError
from server.validate import InvalidFrame, check_frame, decode_crops, undecoded_crops

Refusal = tuple[str, str]  # (error_type, reason): the message goes to the dead-letter topic


class NonFiniteEmbedding(CropError):
    """The embedder returned NaN or infinite values: a fault of the model or device, never of the crops."""


def check_finite(embs: np.ndarray) -> None:
    """A vector with NaN or inf would match nothing and poison the gallery and its durable copy: refuse it."""
    if len(embs) and not np.isfinite(embs).all():
        bad = np.flatnonzero(~np.isfinite(embs).all(axis=1))
        raise NonFiniteEmbedding(f"embedder returned non-finite vectors for {len(bad)} of {len(embs)} crops "
                                 f"(first: crop {int(bad[0])})")


def parse_frame(codec: AvroCodec, value: bytes | None, validation: ValidationSettings) -> dict[str, Any] | Refusal:
    """One message's record, checked (:func:`server.validate.check_frame`), or why it is refused."""
    try:
        rec = codec.decode(value or b"")
        check_frame(rec, validation)
        return rec
    except CodecError as exc:
        return exc.error_type, str(exc)
    except InvalidFrame as exc:
        return exc.error_type, exc.reason


def embeddable(rec: dict[str, Any], min_quality: float) -> list[dict[str, Any]]:
    """The crops of a record good enough to embed, in order (the intake and the consumer agree on this)."""
    return [c for c in rec["crops"] if c["quality"] >= min_quality]


@dataclass
class IntakeBatch:
    """What :func:`intake` makes of a batch of messages."""

    records: list[dict[str, Any] | Refusal]  # per message; a record's crops keep every field but their JPEG bytes
    embs: np.ndarray  # one row per embeddable crop of the records, in message then crop order
    fallback: bool  # the GPU decoder refused a crop: the batch was redone with CPU decoding
    parse_s: float  # Avro decoding, checks and JPEG headers
    embed_s: float  # decoding the pixels (CPU path) and the model

    @staticmethod
    def join(parts: Sequence[IntakeBatch], dim: int) -> IntakeBatch:
        """Consecutive parts (one per worker) as one batch; the slowest part's times."""
        if not parts:
            return IntakeBatch([], np.zeros((0, dim), np.float32), False, 0.0, 0.0)
        if len(parts) == 1:
            return parts[0]
        return IntakeBatch([r for p in parts for r in p.records], np.concatenate([p.embs for p in parts]),
                           any(p.fallback for p in parts), max(p.parse_s for p in parts),
                           max(p.embed_s for p in parts))


def intake(embedder: Any, codec: AvroCodec, values: Sequence[bytes | None], validation: ValidationSettings,
           min_quality: float) -> IntakeBatch:
    """Decode and check every message, then embed the crops of those that pass. An embedder that decodes JPEG
    bytes itself (nvJPEG) gets them after their headers are checked; if it refuses a crop, or returns a
    non-finite vector, the batch is redone with CPU decoding, which refuses exactly the frames whose crops do
    not decode. A non-finite vector on that path raises :class:`NonFiniteEmbedding` (the batch fails and is
    redelivered: nothing of it is stored)."""
    t0 = time.perf_counter()
    records = [parse_frame(codec, v, validation) for v in values]
    fallback = False
    embs: np.ndarray | None = None
    if getattr(embedder, "decodes_jpegs", False):
        jpegs: list[bytes] = []
        for i, rec in enumerate(records):
            if isinstance(rec, dict):
                try:
                    undecoded_crops(rec, validation)
                except InvalidFrame as exc:
                    records[i] = (exc.error_type, exc.reason)
                    continue
                jpegs.extend(c["jpeg"] for c in embeddable(rec, min_quality))
        t1 = time.perf_counter()
        try:
            embs = _embed(embedder.embed_jpegs, jpegs, embedder.dim)
        except CropError:
            fallback = True
    else:
        t1 = time.perf_counter()
    if embs is None:
        images: list[np.ndarray] = []
        for i, rec in enumerate(records):
            if isinstance(rec, dict):
                try:
                    decoded = decode_crops(rec, validation)
                except InvalidFrame as exc:
                    records[i] = (exc.error_type, exc.reason)
                    continue
                images.extend(d.image_bgr for d, c in zip(decoded, rec["crops"], strict=True)  # type: ignore[misc]
                              if c["quality"] >= min_quality)
        embs = _embed(embedder.embed, images, embedder.dim)
    for rec in records:  # the bytes stay here: the consumer has the message itself for a dead letter
        if isinstance(rec, dict):
            rec["frame_jpeg"] = None
            for c in rec["crops"]:
                c["jpeg"] = b""
    return IntakeBatch(records, embs, fallback, t1 - t0, time.perf_counter() - t1)


def _embed(fn: Any, inputs: list[Any], dim: int) -> np.ndarray:
    if not inputs:
        return np.zeros((0, dim), np.float32)
    embs = np.asarray(fn(inputs), dtype=np.float32)
    check_finite(embs)
    return embs
