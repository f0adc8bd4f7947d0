"""The intake of raw messages (decode, checks, embedding), as the embedder's processes run it: it must refuse and
embed exactly what the consumer's in-process path does, on real crops and the real OpenVINO embedder."""

from __future__ import annotations

import math
import time

import cv2
import numpy as np
import pytest

from schemas.codec import AvroCodec
from server.config import ServerConfig, ValidationSettings
from server.edge_records import Box, edge_frame
from server.embed.base import build_embedder
from server.intake import NonFiniteEmbedding, embeddable, intake, parse_frame
from server.validate import InvalidFrame, decode_crops
from tests.server.conftest import Market
from tests.server.test_consume import JpegBytesEmbedder

EDGE = AvroCodec("edge_frame")
CHECKS = ValidationSettings()
MIN_Q = 0.3


@pytest.fixture(scope="module")
def embedder() -> object:
    cfg = ServerConfig.model_validate({"embedder": {"type": "intel_reid", "model": "0277"}})
    return build_embedder(cfg.embedder, assets=cfg.assets)


def _messages(market: Market) -> list[bytes]:
    """Good frames (one with a crop below the quality floor) among every kind of refusal."""
    t0 = (time.time_ns() // 1000) - 60_000_000
    a, b = market.crops("0001", 0, 2)
    c = market.crops("0004", 0, 1)[0]
    header_only = a[:a.index(b"\xff\xc0") + 19]  # a readable JPEG header, no image data
    png = cv2.imencode(".png", cv2.imdecode(np.frombuffer(a, np.uint8), cv2.IMREAD_COLOR))[1].tobytes()
    frames = [
        edge_frame("dev-1", "cam-a", 0, t0, [Box(1, (10, 10, 74, 138), crop_jpeg=a, quality=0.9),
                                             Box(2, (100, 10, 164, 138), crop_jpeg=c, quality=0.1)]),
        edge_frame("dev-1", "cam-a", 1, t0 + 1, [Box(1, (math.nan, 10, 74, 138))]),
        edge_frame("dev-1", "cam-a", 2, t0 + 2, [Box(3, (10, 10, 74, 138), crop_jpeg=png)]),
        edge_frame("dev-1", "cam-a", 3, t0 + 3, [Box(4, (10, 10, 74, 138), crop_jpeg=header_only)]),
        edge_frame("dev-1", "cam-a", 4, t0 + 4, [Box(1, (12, 10, 76, 138), crop_jpeg=b, quality=0.8),
                                                 Box(2, (102, 10, 166, 138))]),
    ]
    values = [EDGE.encode(f) for f in frames]
    return [values[0], b"garbage that is not avro", *values[1:], values[0][:-7]]


def _in_process(embedder: object, values: list[bytes]) -> tuple[list[object], np.ndarray]:
    """What the consumer's own CPU path makes of the same messages: refusals, and vectors of the good crops."""
    out: list[object] = []
    images = []
    for v in values:
        rec = parse_frame(EDGE, v, CHECKS)
        if isinstance(rec, dict):
            try:
                decoded = decode_crops(rec, CHECKS)
            except InvalidFrame as exc:
                rec = (exc.error_type, exc.reason)
            else:
                images += [d.image_bgr for d, c in zip(decoded, rec["crops"], strict=True) if c["quality"] >= MIN_Q]
        out.append(rec)
    return out, embedder.embed(images)  # type: ignore[attr-defined]


def _kinds(records: list[object]) -> list[str]:
    return ["ok" if isinstance(r, dict) else r[0] for r in records]  # type: ignore[index]


def test_intake_refuses_and_embeds_what_the_in_process_path_does(embedder: object, market: Market) -> None:
    values = _messages(market)
    want, want_embs = _in_process(embedder, values)
    assert _kinds(want) == ["ok", "not_avro", "invalid_box", "bad_jpeg", "bad_jpeg", "ok", "corrupt_payload"]
    for emb in (embedder, JpegBytesEmbedder(embedder)):  # CPU decoding, and bytes for the (GPU) decoder
        got = intake(emb, EDGE, values, CHECKS, MIN_Q)
        assert _kinds(got.records) == _kinds(want)
        # The JPEG-bytes path only finds the header-only crop when decoding it: it redoes the batch on the CPU.
        assert got.fallback == isinstance(emb, JpegBytesEmbedder)
        assert got.embs.shape == (2, want_embs.shape[1]), "the two good crops above the quality floor"
        assert np.allclose(got.embs, want_embs, atol=1e-5)
        for g, w in zip(got.records, want, strict=True):
            if isinstance(w, dict):
                assert isinstance(g, dict) and all(c["jpeg"] == b"" for c in g["crops"]), "bytes stay behind"
                assert [{k: x for k, x in c.items() if k != "jpeg"} for c in g["crops"]] == \
                    [{k: x for k, x in c.items() if k != "jpeg"} for c in w["crops"]]
                assert len(embeddable(g, MIN_Q)) == len(embeddable(w, MIN_Q))
            elif emb is embedder:
                assert g == w, "the same error type and reason"
            else:  # the PNG is refused from its header, before any decoding
                assert g[0] == w[0] and ("not a JPEG" in g[1] or g == w)  # type: ignore[index]


class NanEverywhere(JpegBytesEmbedder):
    def embed(self, crops: list) -> object:
        out = np.array(super().embed(crops))
        out[-1, 0] = np.inf
        return out

    def embed_jpegs(self, jpegs: list[bytes]) -> object:
        out = np.array(super().embed_jpegs(jpegs))
        out[0, :] = np.nan
        return out


def test_non_finite_vectors_are_redone_on_the_cpu_path_and_refused_there(embedder: object, market: Market) -> None:
    values = [v for v in _messages(market) if isinstance(parse_frame(EDGE, v, CHECKS), dict)]
    with pytest.raises(NonFiniteEmbedding, match="non-finite vectors for 1 of 2 crops"):
        intake(NanEverywhere(embedder), EDGE, values, CHECKS, MIN_Q)


def test_the_embedder_processes_split_a_batch_and_answer_in_order(embedder: object, market: Market) -> None:
    """Enough messages for two workers: the joined answer equals one intake of the whole batch here."""
    from server.embed.remote import MIN_INTAKE_PART, RemoteEmbedder

    values = _messages(market) * (2 * MIN_INTAKE_PART // 7 + 2)
    local = intake(embedder, EDGE, values, CHECKS, MIN_Q)
    cfg = ServerConfig.model_validate({"embedder": {"type": "intel_reid", "model": "0277"}})
    remote = RemoteEmbedder(cfg.embedder, assets=cfg.assets, workers=2)
    try:
        got = remote.intake(values, CHECKS, MIN_Q)
        assert len(set(remote.pids)) == 2
    finally:
        remote.close()
    assert _kinds(got.records) == _kinds(local.records) and got.records == local.records
    assert got.embs.shape == local.embs.shape and np.allclose(got.embs, local.embs, atol=1e-5)
    assert not got.fallback and got.parse_s > 0 and got.embed_s > 0
