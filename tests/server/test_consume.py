"""The consumer end to end on a real broker, real crops, real models, real Qdrant local mode and SQLite."""

from __future__ import annotations

import math
import sys
import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from schemas.codec import AvroCodec
from server.consume import ReidConsumer
from server.edge_records import Box, edge_frame
from server.store import AnalyticsStore
from tests.server.conftest import Market, produce, read_all, server_config

pytestmark = pytest.mark.integration

EDGE = AvroCodec("edge_frame")
OUT = AvroCodec("reid_output")
DLQ = AvroCodec("dead_letter")


def track_frames(device: str, camera: str, t0_us: int, people: dict[int, list[bytes]], n_frames: int = 8,
                 crop_every: int = 3) -> list[dict]:
    """``people``: local track id -> its crops. Each track walks across the frame; crops on every
    ``crop_every``-th frame (first NEW_TRACK, then IMPROVED with rising quality); tracks end after the last frame."""
    frames = []
    for f in range(n_frames + 1):
        boxes = []
        if f < n_frames:
            for slot, (tid, crops) in enumerate(people.items()):
                x = 50 + 40 * f + 300 * slot
                k = f // crop_every
                crop = crops[k] if f % crop_every == 0 and k < len(crops) else None
                boxes.append(Box(tid, (x, 100, x + 64, 228), crop_jpeg=crop, quality=0.4 + 0.1 * k,
                                 reason="NEW_TRACK" if f == 0 else "IMPROVED"))
        frames.append(edge_frame(device, camera, f, t0_us + f * 200_000, boxes,
                                 ended_track_ids=list(people) if f == n_frames else ()))
    return frames


def run_until(consumer: ReidConsumer, done: callable, timeout_s: float = 120.0) -> None:
    th = threading.Thread(target=consumer.run, daemon=True)
    th.start()
    try:
        deadline = time.monotonic() + timeout_s
        while not done() and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        consumer.stop.set()
        th.join(30)
    assert not th.is_alive()


@pytest.mark.parametrize(("processes", "gender"), [(False, "soft"), (True, "soft"), (True, "off")],
                         ids=["in_process", "embed_and_commit_processes", "remote_intake"])
def test_same_person_two_cameras_one_id_others_distinct(kafka_bootstrap: str, topics: dict[str, str],
                                                         market: Market, tmp_path: Path, processes: bool,
                                                         gender: str) -> None:
    t0 = (time.time_ns() // 1000) - 120_000_000
    cam_a = track_frames("dev-1", "cam-a", t0, {1: market.crops("0001", 0), 2: market.crops("0004", 0)})
    cam_b = track_frames("dev-2", "cam-b", t0 + 10_000_000, {7: market.crops("0001", 1), 8: market.crops("0005", 1)})
    frames = cam_a + cam_b
    produce(kafka_bootstrap, topics["reid_input"], [(f["device_id"].encode(), EDGE.encode(f)) for f in frames])

    cfg = server_config(kafka_bootstrap, topics, tmp_path, gender={"mode": gender})
    cfg = cfg.model_copy(update={"batch": cfg.batch.model_copy(update={
        "embed_process": processes, "overlap": processes, "commit_process": processes})})
    consumer = ReidConsumer(cfg)
    # Messages are decoded in the embedder's processes only when no gender model needs their pixels here.
    assert consumer.remote_intake == (processes and gender == "off")
    if processes:
        from server.embed.remote import RemoteEmbedder

        assert isinstance(consumer.embedder, RemoteEmbedder) and consumer.embedder.pid is not None
        assert consumer._writer is not None and consumer._writer.pid not in (None, consumer.embedder.pid)
    outs: list[bytes] = []
    run_until(consumer, lambda: consumer.metrics.messages.labels("ok")._value.get() >= len(frames))
    outs = read_all(kafka_bootstrap, topics["reid_output"], len(frames))
    assert len(outs) == len(frames)

    gid: dict[tuple[str, int], set[str]] = {}
    for raw in outs:
        rec = OUT.decode(raw)
        assert rec["embedder_id"] == consumer.embedder.model_id
        for p in rec["people"]:
            assert p["global_id"] is not None, "every box here belongs to a track whose first frame had a crop"
            gid.setdefault((rec["camera_id"], p["track_id"]), set()).add(p["global_id"])
    assert all(len(v) == 1 for v in gid.values()), gid  # a track keeps one id for its whole life
    ids = {k: next(iter(v)) for k, v in gid.items()}
    assert ids[("cam-a", 1)] == ids[("cam-b", 7)], "person 0001 on two cameras must get one global id"
    assert len({ids[("cam-a", 1)], ids[("cam-a", 2)], ids[("cam-b", 8)]}) == 3, "three people, three ids"

    store = AnalyticsStore(cfg.store.url)
    with store.engine.connect() as c:
        assert c.execute(sa.text("select count(*) from identities where merged_into is null")).scalar() == 3
        assert c.execute(sa.text("select count(*) from tracks where ended")).scalar() == 4
        assert c.execute(sa.text("select count(*) from tracks where global_id is null")).scalar() == 0
        trans = c.execute(sa.text("select from_camera_id, to_camera_id, global_id from transitions")).all()
        assert [tuple(t) for t in trans] == [("cam-a", "cam-b", ids[("cam-a", 1)])]
        # Every frame of every track lies inside a stored sighting of that track.
        spans = c.execute(sa.text("select t.camera_id, t.track_id, min(s.first_seen_us), max(s.last_seen_us) "
                                  "from sightings s join tracks t using (track_uid) group by t.track_uid")).all()
    assert {(r[0], r[1]): (r[2], r[3]) for r in spans} == {
        ("cam-a", 1): (t0, t0 + 7 * 200_000), ("cam-a", 2): (t0, t0 + 7 * 200_000),
        ("cam-b", 7): (t0 + 10_000_000, t0 + 10_000_000 + 7 * 200_000),
        ("cam-b", 8): (t0 + 10_000_000, t0 + 10_000_000 + 7 * 200_000)}
    store.close()


def test_the_last_batch_of_a_burst_has_its_offsets_stored_as_soon_as_it_is_durable(
        kafka_bootstrap: str, topics: dict[str, str], market: Market, tmp_path: Path) -> None:
    """Once the stream goes quiet, the batch in the commit thread gets its offsets stored when its commit ends,
    not when the next Kafka poll times out (that waited up to 0.5 s, and a crash meanwhile replayed it)."""
    t0 = (time.time_ns() // 1000) - 60_000_000
    frames = track_frames("dev-1", "cam-a", t0, {1: market.crops("0001", 0)}, n_frames=3)
    produce(kafka_bootstrap, topics["reid_input"], [(f["device_id"].encode(), EDGE.encode(f)) for f in frames])
    consumer = ReidConsumer(server_config(kafka_bootstrap, topics, tmp_path, batch={"max_crops": 512}))
    assert consumer._committer is not None, "the default commits on a thread"
    durable: list[float] = []
    stored: list[float] = []
    commit, store_offsets = consumer._commit, consumer._store_offsets

    def timed_commit(c: object) -> None:
        commit(c)  # type: ignore[arg-type]
        durable.append(time.monotonic())

    def timed_store(items: object) -> None:
        stored.append(time.monotonic())
        store_offsets(items)  # type: ignore[arg-type]

    consumer._commit, consumer._store_offsets = timed_commit, timed_store  # type: ignore[method-assign]
    run_until(consumer, lambda: len(stored) >= 1 and len(stored) == len(durable)
              and consumer.metrics.messages.labels("ok")._value.get() >= len(frames))
    assert durable and len(stored) == len(durable)
    delays = [s - d for s, d in zip(stored, durable, strict=True)]
    assert max(delays) < 0.25, f"offsets stored {delays} s after the commit ended"


def test_switch_interval_is_set_while_the_consumer_runs_and_put_back(kafka_bootstrap: str, topics: dict[str, str],
                                                                      market: Market, tmp_path: Path) -> None:
    t0 = (time.time_ns() // 1000) - 60_000_000
    frames = track_frames("dev-1", "cam-a", t0, {1: market.crops("0001", 0)}, n_frames=2)
    produce(kafka_bootstrap, topics["reid_input"], [(f["device_id"].encode(), EDGE.encode(f)) for f in frames])
    consumer = ReidConsumer(server_config(kafka_bootstrap, topics, tmp_path, batch={"switch_interval_ms": 0.5}))
    before = sys.getswitchinterval()
    seen: list[float] = []
    finish = consumer.finish

    def watched(items: object, prep: object) -> None:
        seen.append(sys.getswitchinterval())
        finish(items, prep)  # type: ignore[arg-type]

    consumer.finish = watched  # type: ignore[method-assign]
    run_until(consumer, lambda: consumer.metrics.messages.labels("ok")._value.get() >= len(frames))
    assert seen and set(seen) == {0.0005}
    assert sys.getswitchinterval() == before


def test_remote_intake_sizes_batches_from_message_bytes(kafka_bootstrap: str, topics: dict[str, str],
                                                         market: Market, tmp_path: Path) -> None:
    """Undecoded messages are counted by their size: after the first batch has taught the consumer the bytes per
    crop, batches close near ``max_crops`` (the GPU batch), and every crop is still embedded once."""
    t0 = (time.time_ns() // 1000) - 60_000_000
    crops = market.crops("0001", 0, 3) + market.crops("0004", 0, 3)
    frames = [edge_frame("dev-1", "cam-a", f, t0 + f * 100_000,
                         [Box(10 * f + s, (10 + 150 * s, 10, 74 + 150 * s, 138), crop_jpeg=crops[(f + s) % 6])
                          for s in range(2)]) for f in range(60)]
    produce(kafka_bootstrap, topics["reid_input"], [(b"dev-1", EDGE.encode(f)) for f in frames])
    consumer = ReidConsumer(server_config(kafka_bootstrap, topics, tmp_path, gender={"mode": "off"},
                                          batch={"embed_process": True, "max_crops": 16, "max_wait_ms": 2000}))
    assert consumer.remote_intake
    consumer._bytes_per_crop = 100.0  # a first guess far off (a batch of one message): the first batch corrects it
    sizes: list[int] = []
    finish = consumer.finish

    def counted(items: object, prep: object) -> None:
        sizes.append(len(prep.todo))  # type: ignore[attr-defined]
        finish(items, prep)  # type: ignore[arg-type]

    consumer.finish = counted  # type: ignore[method-assign]
    run_until(consumer, lambda: consumer.metrics.messages.labels("ok")._value.get() >= len(frames))
    assert sum(sizes) == 2 * len(frames)
    assert len(sizes) >= 4 and all(10 <= n <= 24 for n in sizes[1:-1]), sizes  # 16 +- 50 %


@pytest.mark.parametrize("remote_intake", [False, True], ids=["in_process", "remote_intake"])
def test_corrupt_messages_go_to_dlq_and_the_consumer_carries_on(kafka_bootstrap: str, topics: dict[str, str],
                                                                market: Market, tmp_path: Path,
                                                                remote_intake: bool) -> None:
    t0 = (time.time_ns() // 1000) - 60_000_000
    good = edge_frame("dev-1", "cam-a", 0, t0, [Box(1, (10, 10, 74, 138), crop_jpeg=market.crops("0003", 0, 1)[0])])
    nan_box = edge_frame("dev-1", "cam-a", 1, t0 + 1, [Box(1, (math.nan, 10, 74, 138))])
    outside = edge_frame("dev-1", "cam-a", 2, t0 + 2, [Box(1, (10, 10, 5000, 138))])
    bad_jpeg = edge_frame("dev-1", "cam-a", 3, t0 + 3, [Box(2, (10, 10, 74, 138), crop_jpeg=b"\xff\xd8not a jpeg")])
    future = edge_frame("dev-1", "cam-a", 4, t0 + 10**15, [])
    good2 = edge_frame("dev-1", "cam-a", 5, t0 + 400_000, [Box(1, (12, 10, 76, 138))])
    encoded = [EDGE.encode(good), b"garbage that is not avro", EDGE.encode(nan_box), EDGE.encode(outside),
               EDGE.encode(bad_jpeg), EDGE.encode(good)[:-7], EDGE.encode(future), EDGE.encode(good2)]
    produce(kafka_bootstrap, topics["reid_input"], [(b"dev-1", v) for v in encoded])

    consumer = ReidConsumer(server_config(kafka_bootstrap, topics, tmp_path, gender={"mode": "off"},
                                          batch={"embed_process": remote_intake, "embed_workers": 2}))
    assert consumer.remote_intake == remote_intake
    run_until(consumer, lambda: consumer.metrics.messages.labels("ok")._value.get()
              + consumer.metrics.messages.labels("dlq")._value.get() >= len(encoded))
    dead = [DLQ.decode(v) for v in read_all(kafka_bootstrap, topics["reid_dlq"], 6)]
    assert [d["error_type"] for d in sorted(dead, key=lambda d: d["source_offset"])] == [
        "not_avro", "invalid_box", "invalid_box", "bad_jpeg", "corrupt_payload", "invalid_timestamp"]
    for d in dead:
        assert d["value"] == encoded[d["source_offset"]], "the dead letter keeps the message byte for byte"
        assert d["reason"] and d["source_topic"] == topics["reid_input"]
    outs = [OUT.decode(v) for v in read_all(kafka_bootstrap, topics["reid_output"], 2)]
    assert [o["frame_index"] for o in outs] == [0, 5]
    assert outs[0]["people"][0]["global_id"] == outs[1]["people"][0]["global_id"] is not None


class JpegBytesEmbedder:
    """The real OpenVINO embedder behind the JPEG-bytes interface of the nvJPEG path (``decodes_jpegs``),
    decoding with OpenCV here, so the consumer's GPU-decode branch and its CPU fallback run without a GPU."""

    decodes_jpegs = True

    def __init__(self, inner: object) -> None:
        self.inner = inner
        self.model_id, self.dim = inner.model_id, inner.dim  # type: ignore[attr-defined]
        self.jpeg_batches = 0

    def embed(self, crops: list) -> object:
        return self.inner.embed(crops)  # type: ignore[attr-defined]

    def embed_jpegs(self, jpegs: list[bytes]) -> object:
        import cv2
        import numpy as np

        from server.embed.preprocess import CropError

        self.jpeg_batches += 1
        images = []
        for i, data in enumerate(jpegs):
            img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
            if img is None:
                raise CropError(f"crop {i}: does not decode")
            images.append(img)
        return self.inner.embed(images)  # type: ignore[attr-defined]


def test_jpeg_bytes_path_checks_headers_and_falls_back_to_cpu_for_corrupt_bodies(
        kafka_bootstrap: str, topics: dict[str, str], market: Market, tmp_path: Path) -> None:
    import cv2
    import numpy as np

    from server.embed.base import build_embedder

    t0 = (time.time_ns() // 1000) - 60_000_000
    crop = market.crops("0003", 0, 1)[0]
    sof = crop.index(b"\xff\xc0")
    header_only = crop[:sof + 19]  # a readable frame header, no image data: only a decoder finds out
    png = cv2.imencode(".png", cv2.imdecode(np.frombuffer(crop, np.uint8), cv2.IMREAD_COLOR))[1].tobytes()
    frames = [edge_frame("dev-1", "cam-a", 0, t0, [Box(1, (10, 10, 74, 138), crop_jpeg=crop)]),
              edge_frame("dev-1", "cam-a", 1, t0 + 100_000, [Box(2, (100, 10, 164, 138), crop_jpeg=png)]),
              edge_frame("dev-1", "cam-a", 2, t0 + 200_000, [Box(3, (200, 10, 264, 138), crop_jpeg=header_only)]),
              edge_frame("dev-1", "cam-a", 3, t0 + 300_000, [Box(1, (12, 10, 76, 138), crop_jpeg=crop)])]
    produce(kafka_bootstrap, topics["reid_input"], [(b"dev-1", EDGE.encode(f)) for f in frames])
    cfg = server_config(kafka_bootstrap, topics, tmp_path, gender={"mode": "off"},
                        batch={"max_crops": 64, "max_wait_ms": 500})
    embedder = JpegBytesEmbedder(build_embedder(cfg.embedder, assets=cfg.assets))
    consumer = ReidConsumer(cfg, embedder=embedder)
    assert consumer.gpu_jpeg
    run_until(consumer, lambda: consumer.metrics.messages.labels("ok")._value.get()
              + consumer.metrics.messages.labels("dlq")._value.get() >= len(frames))
    dead = sorted((DLQ.decode(v) for v in read_all(kafka_bootstrap, topics["reid_dlq"], 2)),
                  key=lambda d: d["source_offset"])
    assert [(d["source_offset"], d["error_type"]) for d in dead] == [(1, "bad_jpeg"), (2, "bad_jpeg")]
    assert "not a JPEG" in dead[0]["reason"]  # refused from its header, before any decoding
    assert embedder.jpeg_batches >= 1 and consumer.metrics.gpu_decode_fallbacks._value.get() >= 1
    outs = [OUT.decode(v) for v in read_all(kafka_bootstrap, topics["reid_output"], 2)]
    assert [o["frame_index"] for o in outs] == [0, 3]
    assert outs[0]["people"][0]["global_id"] == outs[1]["people"][0]["global_id"] is not None


class NanOnGpuEmbedder(JpegBytesEmbedder):
    """The GPU path returns NaN for one crop, as nvJPEG's decode racing the previous part's forward did on an
    H200; the host-pixel path is sound."""

    def embed_jpegs(self, jpegs: list[bytes]) -> object:
        out = super().embed_jpegs(jpegs)
        out[0, :] = float("nan")  # type: ignore[index]
        return out


def test_non_finite_vectors_from_the_gpu_path_are_refused_and_the_batch_redone(
        kafka_bootstrap: str, topics: dict[str, str], market: Market, tmp_path: Path) -> None:
    import numpy as np

    from server.embed.base import build_embedder

    t0 = (time.time_ns() // 1000) - 60_000_000
    crops = market.crops("0003", 0, 2)
    frames = [edge_frame("dev-1", "cam-a", i, t0 + i * 100_000, [Box(1, (10, 10, 74, 138), crop_jpeg=crops[i])])
              for i in range(2)]
    produce(kafka_bootstrap, topics["reid_input"], [(b"dev-1", EDGE.encode(f)) for f in frames])
    cfg = server_config(kafka_bootstrap, topics, tmp_path, gender={"mode": "off"},
                        batch={"max_crops": 64, "max_wait_ms": 500})
    embedder = NanOnGpuEmbedder(build_embedder(cfg.embedder, assets=cfg.assets))
    consumer = ReidConsumer(cfg, embedder=embedder)
    run_until(consumer, lambda: consumer.metrics.messages.labels("ok")._value.get() >= len(frames))
    assert embedder.jpeg_batches >= 1 and consumer.metrics.gpu_decode_fallbacks._value.get() >= 1
    assert consumer.metrics.messages.labels("dlq")._value.get() == 0  # the crops were fine: nothing dead-lettered
    protos = list(consumer.vectors.scroll())
    assert protos and all(np.isfinite(p.vector).all() for p in protos)
    outs = [OUT.decode(v) for v in read_all(kafka_bootstrap, topics["reid_output"], 2)]
    ids = [o["people"][0]["global_id"] for o in outs]
    assert len(ids) == 2 and ids[0] == ids[1] is not None  # one track, one identity, every frame answered


def four_partition_backlog(bootstrap: str, prefix: str, market: Market) -> tuple[dict[str, str], list[tuple[str, int]]]:
    """Topics named ``prefix``+name, reid_input with 4 partitions holding one device's 17 frames each (a crop on
    every 4th frame); returns the topic names and the (device, frame index) of every frame produced."""
    from confluent_kafka import Producer

    from common.kafka import ensure_topics
    from schemas.topics import TopicSpec

    names = {k: prefix + k for k in ("reid_input", "reid_output", "reid_dlq")}
    ensure_topics(bootstrap, [TopicSpec(names["reid_input"], 4, 1), TopicSpec(names["reid_output"], 1, 1),
                              TopicSpec(names["reid_dlq"], 1, 1)])
    t0 = (time.time_ns() // 1000) - 120_000_000
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    frames = []
    for d in range(4):  # one device per partition
        for f in track_frames(f"dev-{d}", f"cam-{d}", t0, {1: market.crops("0001", 0)}, n_frames=16, crop_every=4):
            p.produce(names["reid_input"], key=f["device_id"].encode(), value=EDGE.encode(f), partition=d)
            frames.append((f["device_id"], f["frame_index"]))
    assert p.flush(30) == 0
    return names, frames


def run_b_joining_a(a: ReidConsumer, b: ReidConsumer, n_frames: int, settle_s: float = 0.0) -> None:
    """A starts alone; B joins the group once A has processed a few messages; both run until every frame is
    processed between them and B holds partitions (then ``settle_s`` more), and stop cleanly."""
    ta = threading.Thread(target=a.run, daemon=True)
    tb = threading.Thread(target=b.run, daemon=True)
    ta.start()
    try:
        deadline = time.monotonic() + 60
        while a.metrics.messages.labels("ok")._value.get() < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        tb.start()
        done = lambda: sum(c.metrics.messages.labels("ok")._value.get() for c in (a, b)) >= n_frames  # noqa: E731
        deadline = time.monotonic() + 120
        while not (done() and b._assigned) and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(settle_s)
    finally:
        a.stop.set()
        b.stop.set()
        ta.join(60)
        tb.join(60)
    assert not ta.is_alive() and not tb.is_alive()


def assert_committed_to_end(bootstrap: str, names: dict[str, str], frames: list[tuple[str, int]]) -> None:
    from confluent_kafka import Consumer, TopicPartition

    check = Consumer({"bootstrap.servers": bootstrap, "group.id": f"g-{names['reid_input']}"})
    try:
        parts = [TopicPartition(names["reid_input"], i) for i in range(4)]
        committed = {tp.partition: tp.offset for tp in check.committed(parts, timeout=10)}
    finally:
        check.close()
    produced = {d: sum(dev == f"dev-{d}" for dev, _ in frames) for d in range(4)}
    assert committed == produced, "the group's committed offsets reach the end of every partition"


def test_a_rebalance_mid_stream_stores_the_queued_batches_offsets_and_loses_nothing(
        kafka_bootstrap: str, unique_topic_prefix: str, market: Market, tmp_path: Path) -> None:
    """Consumer A works through a backlog on 4 partitions with slow commits, so its commit thread always holds
    ``batch.commit_queue`` (2) batches; consumer B joins the group mid-stream. When A gives partitions up it first
    waits for every queued batch and stores its offsets (none is left in flight); between them every frame gets
    its reid_output and the group's committed offsets reach the end of every partition."""
    names, frames = four_partition_backlog(kafka_bootstrap, unique_topic_prefix, market)
    batch = {"max_crops": 2, "max_messages": 3, "max_wait_ms": 10, "commit_queue": 2}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = ReidConsumer(server_config(kafka_bootstrap, names, tmp_path / "a", batch=batch))
    b = ReidConsumer(server_config(kafka_bootstrap, names, tmp_path / "b", batch=batch))
    write = a.store.write

    def slow_write(batch_write: object) -> None:  # a slow disk: A's commit thread always has a queue
        time.sleep(0.4)
        write(batch_write)  # type: ignore[arg-type]

    a.store.write = slow_write  # type: ignore[method-assign]
    queued_at_revoke: list[tuple[int, int]] = []
    on_revoke = a._on_revoke

    def revoke(c: object, parts: list) -> None:
        before = len(a._inflight)
        on_revoke(c, parts)  # type: ignore[arg-type]
        queued_at_revoke.append((before, len(a._inflight)))

    a._on_revoke = revoke  # type: ignore[method-assign]
    run_b_joining_a(a, b, len(frames))
    assert queued_at_revoke and any(before > 0 for before, _ in queued_at_revoke), \
        f"B joined while A had batches queued for its commit: {queued_at_revoke}"
    assert all(after == 0 for _, after in queued_at_revoke), "every queued batch was durable before the revoke ended"
    got = {(r["device_id"], r["frame_index"]) for r in map(OUT.decode, read_all(
        kafka_bootstrap, names["reid_output"], len(frames), timeout_s=30))}
    assert got == set(frames), "every frame has its reid_output"
    assert_committed_to_end(kafka_bootstrap, names, frames)


@pytest.mark.parametrize("ahead", [1, 2])
def test_overlap_queues_prepare_ahead_batches_and_finishes_them_in_order(
        kafka_bootstrap: str, topics: dict[str, str], market: Market, tmp_path: Path, ahead: int) -> None:
    """With ``batch.overlap`` the consumer collects up to ``prepare_ahead`` batches beyond the one it finishes (so
    the prepare worker has the next one queued when a finish runs long), finishes them strictly in collection
    order, and every frame still gets its reid_output and the group's committed offset reaches the end."""
    from confluent_kafka import Consumer, TopicPartition

    t0 = (time.time_ns() // 1000) - 120_000_000
    frames = track_frames("dev-1", "cam-a", t0, {1: market.crops("0001", 0), 2: market.crops("0004", 0)},
                          n_frames=16, crop_every=2)
    produce(kafka_bootstrap, topics["reid_input"], [(f["device_id"].encode(), EDGE.encode(f)) for f in frames])
    consumer = ReidConsumer(server_config(kafka_bootstrap, topics, tmp_path, batch={
        "max_crops": 2, "max_messages": 3, "max_wait_ms": 10, "overlap": True, "prepare_ahead": ahead}))
    collected: list[list[int]] = []
    finished: list[list[int]] = []
    leads: list[int] = []
    collect, finish = consumer._collect, consumer.finish

    def counting_collect() -> list:
        items = collect()
        if items:
            collected.append([it.msg.offset() for it in items])
        return items

    def watched_finish(items: list, prep: object) -> None:
        leads.append(len(collected) - len(finished) - 1)  # batches collected beyond this one
        finished.append([it.msg.offset() for it in items])
        finish(items, prep)  # type: ignore[arg-type]

    consumer._collect, consumer.finish = counting_collect, watched_finish  # type: ignore[method-assign]
    run_until(consumer, lambda: consumer.metrics.messages.labels("ok")._value.get() >= len(frames))
    assert len(collected) >= 6, collected
    assert finished == collected, "batches are finished in the order they were collected, none skipped"
    assert max(leads) == ahead and all(0 <= n <= ahead for n in leads), leads
    got = [OUT.decode(r)["frame_index"] for r in read_all(kafka_bootstrap, topics["reid_output"], len(frames))]
    assert got == [f["frame_index"] for f in frames], "one reid_output per frame, in stream order"
    check = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": f"g-{topics['reid_input']}"})
    try:
        [tp] = check.committed([TopicPartition(topics["reid_input"], 0)], timeout=10)
    finally:
        check.close()
    assert tp.offset == len(frames), "the committed offset reaches the end of the stream"


def test_a_rebalance_drops_prepared_batches_of_revoked_partitions(
        kafka_bootstrap: str, unique_topic_prefix: str, market: Market, tmp_path: Path) -> None:
    """With ``batch.overlap`` and two batches queued ahead, consumer A holds prepared batches when consumer B
    joins. Those messages are no longer A's to finish: the partitions' next owner (B, or A again after the
    eager rebalance) fetches them from the committed offsets. A must not match or publish them after the
    revoke, so every frame gets exactly one reid_output and the committed offsets reach the end."""
    names, frames = four_partition_backlog(kafka_bootstrap, unique_topic_prefix, market)
    batch = {"max_crops": 2, "max_messages": 3, "max_wait_ms": 10, "overlap": True, "prepare_ahead": 2}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = ReidConsumer(server_config(kafka_bootstrap, names, tmp_path / "a", batch=batch))
    b = ReidConsumer(server_config(kafka_bootstrap, names, tmp_path / "b", batch=batch))
    collected_at: dict[tuple[int, int], float] = {}
    revoked_at: dict[int, list[float]] = {}
    stale: list[tuple[int, int]] = []  # (partition, offset) finished by A after a revoke that followed its fetch
    collect, finish, on_revoke = a._collect, a.finish, a._on_revoke

    def a_collect() -> list:
        items = collect()
        now = time.monotonic()
        for it in items:
            collected_at[(it.msg.partition(), it.msg.offset())] = now
        return items

    def a_finish(items: list, prep: object) -> None:
        time.sleep(0.3)  # a slow matcher: the prepare worker always has batches queued
        now = time.monotonic()
        for it in items:
            key = (it.msg.partition(), it.msg.offset())
            if any(collected_at[key] < r <= now for r in revoked_at.get(key[0], ())):
                stale.append(key)
        finish(items, prep)  # type: ignore[arg-type]

    def a_revoke(c: object, parts: list) -> None:
        on_revoke(c, parts)  # type: ignore[arg-type]
        for tp in parts:
            revoked_at.setdefault(tp.partition, []).append(time.monotonic())

    a._collect, a.finish, a._on_revoke = a_collect, a_finish, a_revoke  # type: ignore[method-assign]
    run_b_joining_a(a, b, len(frames), settle_s=1.0)  # anything finished twice shows up in the settling second
    assert revoked_at, "B's join revoked A's partitions"
    assert not stale, f"A finished {len(stale)} messages fetched before their partition was revoked: {stale[:5]}"
    outs = [(r["device_id"], r["frame_index"]) for r in map(OUT.decode, read_all(
        kafka_bootstrap, names["reid_output"], len(frames), timeout_s=30))]
    assert sorted(outs) == sorted(frames), "every frame has exactly one reid_output"
    assert_committed_to_end(kafka_bootstrap, names, frames)


def test_a_partly_revoked_batch_is_finished_for_the_partitions_still_owned(
        kafka_bootstrap: str, topics: dict[str, str], tmp_path: Path) -> None:
    """A cooperative rebalance revokes some partitions only: a prepared batch then keeps the messages of the others,
    each with its own crops' vectors and gender probabilities, and its dead letters."""
    import numpy as np

    from server.consume import Item, Prepared
    from server.validate import DecodedCrop

    class Msg:  # the three things the consumer asks of a fetched message
        def __init__(self, partition: int, offset: int) -> None:
            self._p, self._o = partition, offset

        def topic(self) -> str:
            return topics["reid_input"]

        def partition(self) -> int:
            return self._p

        def offset(self) -> int:
            return self._o

    consumer = ReidConsumer(server_config(kafka_bootstrap, topics, tmp_path))
    try:
        items = [Item(Msg(i % 2, i), record={"i": i}) for i in range(6)]  # partitions 0, 1, 0, 1, 0, 1
        items[2].record, items[2].error = None, ("bad_jpeg", "refused")  # a dead letter of partition 0
        ok = [it for it in items if it.record is not None]  # messages 0, 1, 3, 4, 5
        crops = [(0, 2), (1, 1), (2, 1), (3, 1), (4, 2)]  # (index in ok, how many crops)
        todo = [(i, DecodedCrop(10 * ok[i].msg.offset() + k, None, 0.5, 0.9, (0, 0, 1, 1), "NEW_TRACK"))
                for i, n in crops for k in range(n)]
        embs = np.arange(len(todo), dtype=np.float32)[:, None] * np.ones((1, 4), np.float32)
        males = np.linspace(0, 1, len(todo)).astype(np.float32)
        got: list[tuple[list, Prepared]] = []
        consumer.finish = lambda its, prep: got.append((its, prep))  # type: ignore[method-assign]
        since = consumer._revocations
        consumer._revocations += 1
        consumer._revoked_in[(topics["reid_input"], 1)] = consumer._revocations

        consumer._finish_if_ours(items, Prepared(ok, todo, embs, males), since)
        [(kept, prep)] = got
        assert [it.msg.offset() for it in kept] == [0, 2, 4], "partition 0's messages, its dead letter included"
        assert [it.msg.offset() for it in prep.ok] == [0, 4]
        assert [(i, c.track_id) for i, c in prep.todo] == [(0, 0), (0, 1), (1, 40)]
        rows = [j for j, (i, _c) in enumerate(todo) if ok[i].msg.partition() == 0]
        np.testing.assert_array_equal(prep.embs, embs[rows])
        np.testing.assert_array_equal(prep.males, males[rows])

        got.clear()
        consumer._finish_if_ours(items, Prepared(ok, todo, embs, males), consumer._revocations)
        assert got[0][0] is items, "nothing revoked since the fetch: the batch as it is"
        consumer._revoked_in[(topics["reid_input"], 0)] = consumer._revocations
        got.clear()
        consumer._finish_if_ours(items, Prepared(ok, todo, embs, males), since)
        assert not got, "every partition revoked: nothing left to finish"
    finally:
        consumer.stop.set()
        consumer.close()
