"""The commit process (server/writer.py) with several batches in flight, on a real SQLite file and broker."""

from __future__ import annotations

from pathlib import Path

import pytest

from schemas.codec import AvroCodec
from server.sink import DeliveryFailed
from server.store import AnalyticsStore, BatchWrite
from server.writer import CommitProcess
from tests.server.conftest import read_all, server_config

OUT = AvroCodec("reid_output")


def _camera_batch(camera: str, frame_index: int) -> BatchWrite:
    b = BatchWrite()
    b.cameras[("dev-w", camera)] = {"device_id": "dev-w", "camera_id": camera, "frame_width": 640,
                                    "frame_height": 480, "first_frame_at_us": 1_000 + frame_index,
                                    "last_frame_at_us": 1_000 + frame_index, "last_frame_index": frame_index}
    return b


def _output(camera: str, frame_index: int) -> tuple[bytes, dict]:
    return b"dev-w", {"device_id": "dev-w", "camera_id": camera, "frame_index": frame_index,
                      "captured_at_us": 1_000 + frame_index, "processed_at_us": 2_000, "embedder_id": "m",
                      "people": []}


def test_queued_batches_commit_in_order_and_none_after_a_failed_one(
        kafka_bootstrap: str, topics: dict[str, str], tmp_path: Path) -> None:
    """Three batches are in flight at once. The first commits; the second's SQL fails (a row without its
    columns); the third is valid but queued behind the failure, so it must not be committed either (its
    rows could build on the failed batch's) and its results must not be produced. Each answer comes back
    in submission order."""
    cfg = server_config(kafka_bootstrap, topics, tmp_path)
    writer = CommitProcess(cfg)
    try:
        bad = _camera_batch("cam-bad", 2)
        del bad.cameras[("dev-w", "cam-bad")]["frame_width"]  # the statement cannot bind: the transaction fails
        writer.submit(_camera_batch("cam-a", 1), [_output("cam-a", 1)], [])
        writer.submit(bad, [_output("cam-bad", 2)], [])
        writer.submit(_camera_batch("cam-c", 3), [_output("cam-c", 3)], [])
        assert writer.outstanding == 3
        sql_s, produce_s = writer.result(lambda: False)
        assert sql_s >= 0 and produce_s >= 0
        with pytest.raises(RuntimeError, match="commit failed in the commit process"):
            writer.result(lambda: False)
        with pytest.raises(DeliveryFailed, match="an earlier batch failed"):
            writer.result(lambda: False)
        assert writer.outstanding == 0
    finally:
        writer.close()
    store = AnalyticsStore(cfg.store.url)
    try:
        assert store.count("cameras") == 1, "only the batch before the failure is in SQL"
    finally:
        store.close()
    got = [OUT.decode(v)["camera_id"] for v in read_all(kafka_bootstrap, topics["reid_output"], 1, timeout_s=5)]
    assert got == ["cam-a"], "only the committed batch's results were produced"
