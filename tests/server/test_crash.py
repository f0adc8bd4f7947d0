"""SIGKILL the server mid-stream and restart it: nothing lost, no duplicate identity, same ids as a clean run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
import yaml

from common.assets import REPO_ROOT
from schemas.codec import AvroCodec
from server.consume import ReidConsumer
from tests.server.conftest import Market, produce, read_all, server_config
from tests.server.test_consume import run_until, track_frames

pytestmark = pytest.mark.integration
EDGE = AvroCodec("edge_frame")
OUT = AvroCodec("reid_output")
PIDS = ["0001", "0003", "0004", "0005", "0006", "0016", "0019", "0041", "0045", "0049"]


def stream(market: Market) -> list[dict]:
    """5 cameras, 4 people each; every person is seen on two cameras (first on one, later on another)."""
    t0 = (time.time_ns() // 1000) - 600_000_000
    frames: list[dict] = []
    for cam in range(5):
        people = {}
        for slot in range(4):
            k = cam * 4 + slot  # 20 appearances of 10 people
            pid, rank = PIDS[k % 10], k // 10
            people[10 * cam + slot] = market.crops(pid, rank)
        frames += track_frames(f"dev-{cam}", f"cam-{cam}", t0 + cam * 20_000_000, people)
    return frames


def snapshot(url: str) -> dict[str, object]:
    eng = sa.create_engine(url)
    with eng.connect() as c:
        snap = {
            "tracks": sorted(tuple(r) for r in c.execute(sa.text(
                "select track_uid, camera_id, track_id, global_id, first_seen_us, last_seen_us, ended from tracks"))),
            "identities": sorted(r[0] for r in c.execute(sa.text(
                "select global_id from identities where merged_into is null"))),
            "sightings": sorted(tuple(r) for r in c.execute(sa.text(
                "select track_uid, bucket_start_us, global_id, first_seen_us, last_seen_us from sightings"))),
            "transitions": sorted(tuple(r) for r in c.execute(sa.text(
                "select to_track_uid, from_track_uid, global_id from transitions"))),
        }
    eng.dispose()
    return snap


def count_ended(url: str) -> int:
    eng = sa.create_engine(url)
    try:
        with eng.connect() as c:
            return int(c.execute(sa.text("select count(*) from tracks where ended")).scalar() or 0)
    except sa.exc.OperationalError:
        return 0
    finally:
        eng.dispose()


def test_sigkill_mid_batch_then_restart_loses_nothing_and_duplicates_nothing(
        kafka_bootstrap: str, topics: dict[str, str], market: Market, tmp_path: Path) -> None:
    frames = stream(market)
    produce(kafka_bootstrap, topics["reid_input"], [(f["device_id"].encode(), EDGE.encode(f)) for f in frames])
    n_tracks = 20

    # The server under test, as a real process, killed with SIGKILL once some batches are stored.
    crash_dir = tmp_path / "crash"
    crash_dir.mkdir()
    cfg = server_config(kafka_bootstrap, topics, crash_dir, batch={"max_crops": 4, "max_wait_ms": 20})
    cfg_file = crash_dir / "server.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    env = {**os.environ, "REIDFLEET_LOG_FORMAT": "text", "PYTHONPATH": str(REPO_ROOT)}
    cmd = [sys.executable, "-m", "server", "run", "--config", str(cfg_file)]
    log = open(crash_dir / "server.log", "ab")  # noqa: SIM115
    proc = subprocess.Popen(cmd, cwd=crash_dir, env=env, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 120
        while count_ended(cfg.store.url) < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        done_at_kill = count_ended(cfg.store.url)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert 0 < done_at_kill < n_tracks, f"kill did not land mid-stream ({done_at_kill} tracks done)"

        proc = subprocess.Popen(cmd, cwd=crash_dir, env=env, stdout=log, stderr=log)
        deadline = time.monotonic() + 180
        while count_ended(cfg.store.url) < n_tracks and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        time.sleep(1.0)  # let a redelivered tail (if any) land too
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        log.close()
    assert proc.returncode == 0, (crash_dir / "server.log").read_text()[-3000:]
    crashed = snapshot(cfg.store.url)

    # The same stream through a clean, uninterrupted run (own group, own stores).
    clean_dir = tmp_path / "clean"
    clean_dir.mkdir()
    clean_cfg = server_config(kafka_bootstrap, topics, clean_dir, batch={"max_crops": 4, "max_wait_ms": 20},
                              kafka={"group_id": "clean-" + topics["reid_input"]})
    consumer = ReidConsumer(clean_cfg)
    run_until(consumer, lambda: consumer.metrics.messages.labels("ok")._value.get() >= len(frames))
    clean = snapshot(clean_cfg.store.url)

    assert len(crashed["tracks"]) == n_tracks and all(t[3] is not None and t[6] for t in crashed["tracks"])
    assert crashed == clean, "a crash and restart must leave exactly what an uninterrupted run leaves"
    assert len(clean["identities"]) <= 10 + 2, "cross-camera matching should mostly find the 10 people"

    outs = read_all(kafka_bootstrap, topics["reid_output"], 2 * len(frames), timeout_s=15)
    seen = {(r["device_id"], r["frame_index"]) for r in map(OUT.decode, outs)}
    assert seen == {(f["device_id"], f["frame_index"]) for f in frames}, "every frame has a result"


def _child_pid(consumer: ReidConsumer, child: str) -> int:
    return consumer._writer.pid if child == "writer" else consumer.vectors.mirror.pid  # type: ignore[union-attr]


@pytest.mark.parametrize("child", ["writer", "vector_mirror"])
def test_a_child_process_killed_mid_stream_is_replaced_and_loses_nothing(
        kafka_bootstrap: str, topics: dict[str, str], market: Market, tmp_path: Path, child: str) -> None:
    """SIGKILL the commit process (batch.commit_process) or the Qdrant mirror's process between batches: the
    batch in flight fails (DeliveryFailed / MirrorDied), run_forever starts a fresh consumer and children from
    the committed offsets, the stores end exactly as an uninterrupted run leaves them, and Qdrant ends
    holding exactly the SQL copy of the gallery (changes the dead mirror had queued are reconciled)."""
    import threading

    from common.service import StopSignal
    from server.consume import run_forever
    from server.store import AnalyticsStore
    from server.vectors.qdrant import QdrantVectorStore

    frames = stream(market)
    produce(kafka_bootstrap, topics["reid_input"], [(f["device_id"].encode(), EDGE.encode(f)) for f in frames])
    n_tracks = 20
    cfg = server_config(kafka_bootstrap, topics, tmp_path / "proc",
                        batch={"max_crops": 4, "max_wait_ms": 20, "commit_process": True})
    (tmp_path / "proc").mkdir(exist_ok=True)
    stop = StopSignal(install_handlers=False)
    consumers: list[ReidConsumer] = []
    th = threading.Thread(target=run_forever, args=(cfg, stop), kwargs={"on_ready": consumers.append}, daemon=True)
    th.start()
    try:
        deadline = time.monotonic() + 120
        while count_ended(cfg.store.url) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        done_at_kill = count_ended(cfg.store.url)
        killed_pid = _child_pid(consumers[0], child)
        os.kill(killed_pid, signal.SIGKILL)
        if child == "vector_mirror":  # health says so until the consumer notices it with its next batch
            mirror = consumers[0].vectors.mirror  # type: ignore[attr-defined]
            deadline = time.monotonic() + 10
            while mirror.is_alive() and time.monotonic() < deadline:
                time.sleep(0.02)
            assert any("Qdrant mirror" in d for d in consumers[0].health()["degraded"])
        assert 0 < done_at_kill < n_tracks, f"kill did not land mid-stream ({done_at_kill} tracks done)"
        deadline = time.monotonic() + 180
        while count_ended(cfg.store.url) < n_tracks and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)
    finally:
        stop.set()
        th.join(60)
    assert not th.is_alive()
    assert len(consumers) >= 2 and _child_pid(consumers[-1], child) != killed_pid, "a fresh child took over"
    crashed = snapshot(cfg.store.url)
    store = AnalyticsStore(cfg.store.url)
    model = consumers[-1].embedder.model_id
    in_sql = {pid: rev for pid, _gid, _vec, _payload, rev in store.load_prototypes(model)}
    store.close()
    qdrant = QdrantVectorStore(cfg.vectors, dim=consumers[-1].embedder.dim, model_id=model)
    in_qdrant = qdrant.revisions()
    qdrant.close()
    assert in_sql and in_qdrant == in_sql, "the mirror holds exactly the durable gallery"

    clean_cfg = server_config(kafka_bootstrap, topics, tmp_path / "clean", batch={"max_crops": 4, "max_wait_ms": 20},
                              kafka={"group_id": "clean-" + topics["reid_input"]})
    (tmp_path / "clean").mkdir(exist_ok=True)
    consumer = ReidConsumer(clean_cfg)
    run_until(consumer, lambda: consumer.metrics.messages.labels("ok")._value.get() >= len(frames))
    assert len(crashed["tracks"]) == n_tracks and all(t[3] is not None and t[6] for t in crashed["tracks"])
    assert crashed == snapshot(clean_cfg.store.url)


def test_a_failed_commit_refuses_the_batches_queued_behind_it_and_a_restart_ends_as_a_clean_run(
        kafka_bootstrap: str, topics: dict[str, str], market: Market, tmp_path: Path) -> None:
    """The writer thread's third SQL transaction fails (slowly, so the next batch is already queued behind it,
    batch.commit_queue 2): that queued batch must not be written (its rows may build on the failed one's), the
    consumer stops with the error and none of the two batches' offsets are stored; a fresh consumer then ends
    with exactly what an uninterrupted run leaves."""
    import threading

    frames = stream(market)
    produce(kafka_bootstrap, topics["reid_input"], [(f["device_id"].encode(), EDGE.encode(f)) for f in frames])
    n_tracks = 20
    (tmp_path / "fail").mkdir()
    cfg = server_config(kafka_bootstrap, topics, tmp_path / "fail",
                        batch={"max_crops": 4, "max_wait_ms": 20, "commit_queue": 2})
    consumer = ReidConsumer(cfg)
    writes: list[str] = []
    real_write = consumer.store.write
    submitted = threading.Event()
    real_submit = consumer._committer.submit  # type: ignore[union-attr]

    def submit(fn, work):  # notes when the batch after the failing one is queued
        if len(writes) >= 3:
            submitted.set()
        return real_submit(fn, work)

    def failing_write(batch) -> None:
        writes.append("call")
        if len(writes) == 3:
            submitted.wait(10)  # the next batch is queued behind this one before it fails
            raise sa.exc.OperationalError("COMMIT", {}, Exception("database is locked"))
        real_write(batch)

    consumer.store.write = failing_write  # type: ignore[method-assign]
    consumer._committer.submit = submit  # type: ignore[union-attr, method-assign]
    errors: list[BaseException] = []

    def run() -> None:
        try:
            consumer.run()
        except BaseException as exc:  # the test asserts on it
            errors.append(exc)

    th = threading.Thread(target=run, daemon=True)
    th.start()
    th.join(120)
    assert not th.is_alive() and errors and "database is locked" in str(errors[0])
    assert submitted.is_set(), "a batch was queued behind the failing one"
    assert len(writes) == 3, "no batch was written after the failed one"

    consumer = ReidConsumer(cfg)  # a restart: from the committed offsets, state reloaded from SQL
    run_until(consumer, lambda: count_ended(cfg.store.url) >= n_tracks)
    failed = snapshot(cfg.store.url)

    (tmp_path / "clean").mkdir()
    clean_cfg = server_config(kafka_bootstrap, topics, tmp_path / "clean", batch={"max_crops": 4, "max_wait_ms": 20},
                              kafka={"group_id": "clean-" + topics["reid_input"]})
    consumer = ReidConsumer(clean_cfg)
    run_until(consumer, lambda: consumer.metrics.messages.labels("ok")._value.get() >= len(frames))
    assert len(failed["tracks"]) == n_tracks and all(t[3] is not None and t[6] for t in failed["tracks"])
    assert failed == snapshot(clean_cfg.store.url)
