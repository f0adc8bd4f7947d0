"""Kafka down while real appliances run: nothing lost, order per camera kept, everyone recovers alone.

Two appliance processes play the PETS video at camera pace (looping) into tansu, a real server process
consumes. Every client reaches the broker through a TCP relay (kit.CutProxy) that is cut for ``outage_s``:
all connections reset, the port refuses, then it listens again on the same port. To the clients that is
a broker that died and came back; the broker keeps its log and the group's offsets, as a Kafka cluster
does (tansu's only durable storage here, s3 on moto_server, was too slow on a 2-core box to consume at
all). Nobody is restarted or told anything. Then the appliances are stopped (SIGTERM: clean flush) and the test
checks, from the broker's own log of record and the appliances' own counts:
- reid_input holds every frame each appliance processed, exactly once, in order (one key = one partition);
- reid_output has a result for every one of those frames, first deliveries in frame order;
- the server process never exited and is healthy; the appliances spooled during the outage and went
  back to direct sending.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from common.kafka import ensure_topics
from schemas.topics import TopicSpec
from tests.system.kit import (
    PETS,
    CutKafka,
    TopicReader,
    appliance,
    first_occurrence,
    frames_by_device,
    frames_processed,
    server,
    wait_for,
)

pytestmark = pytest.mark.integration
TOPICS = {"reid_input": "reid_input", "reid_output": "reid_output", "reid_dlq": "reid_dlq"}


def run_outage(tmp_path: Path, outage_s: float) -> None:
    kafka = CutKafka(tmp_path)
    procs = []
    try:
        ensure_topics(kafka.bootstrap, [TopicSpec("reid_input", 3, 1), TopicSpec("reid_output", 3, 1),
                                        TopicSpec("reid_dlq", 1, 1)])
        srv = server(tmp_path, "server", kafka.bootstrap, TOPICS, "outage-server", gender={"mode": "off"})
        procs.append(srv)
        devices = ["edge-a", "edge-b"]
        apps = [appliance(tmp_path, d, kafka.bootstrap, "reid_input", f"source.url={PETS}", "source.loop=true",
                          "source.realtime=true") for d in devices]
        procs += apps
        for a in apps:
            wait_for(lambda a=a: (a.metric("reidfleet_appliance_kafka_messages_sent_total") or 0) >= 10, 120,
                     f"{a.name} delivering")
        wait_for(lambda: (srv.metric("reidfleet_server_messages_total", 'outcome="ok"') or 0) >= 10, 180,
                 "server consuming")

        kafka.kill()
        down_at = time.monotonic()
        before = {a.name: a.metric("reidfleet_appliance_frames_processed_total") or 0 for a in apps}
        wait_for(lambda: all(a.metric("reidfleet_appliance_kafka_direct") == 0 for a in apps), 60,
                 "appliances spooling")
        for a in apps:
            h = a.health()
            assert h["_status"] == 200 and h["ok"] and any("kafka" in d for d in h["degraded"]), h
        time.sleep(max(0.0, outage_s - (time.monotonic() - down_at)))
        for a in apps:  # the loop kept going at camera pace during the whole outage
            assert (a.metric("reidfleet_appliance_frames_processed_total") or 0) > before[a.name] + 2 * outage_s
            assert (a.metric("reidfleet_appliance_spool_messages") or 0) > outage_s
        assert srv.alive() and all(a.alive() for a in apps), [p.tail() for p in procs]

        kafka.start()
        wait_for(lambda: all(a.metric("reidfleet_appliance_kafka_direct") == 1 for a in apps), 180,
                 "appliances replayed their spools")
        time.sleep(5)
        for a in apps:
            assert a.stop(60) == 0, a.tail()
        sent = {a.name: frames_processed(a) for a in apps}
        assert all(n and n > 2 * outage_s for n in sent.values()), sent  # ~2 FPS at least, even on a busy box

        inputs = TopicReader(kafka.bootstrap, "reid_input", "check-in", "edge_frame")
        outputs = TopicReader(kafka.bootstrap, "reid_output", "check-out", "reid_output")
        total = sum(sent.values())  # type: ignore[arg-type]
        wait_for(lambda: len(inputs.items) >= total, 120, "reid_input read back")
        wait_for(lambda: len({(r["device_id"], r["frame_index"]) for r in outputs.values}) >= total, 300,
                 f"server caught up ({total} frames)")
        time.sleep(2)
        inputs.stop()
        outputs.stop()
        got_in = frames_by_device(inputs.values)
        for d in devices:
            # At least once: a frame in flight when the broker died (written, its ack lost) is spooled and
            # replayed by a fresh producer, which idempotence cannot dedupe (seen once: frame 28 twice, right at
            # the kill); the server's writes are idempotent. Every frame must be there, first occurrences in order.
            assert first_occurrence(got_in[d]) == list(range(sent[d])), f"{d}: reid_input not complete/in order"  # type: ignore[arg-type]
        got_out = frames_by_device(outputs.values)
        for d in devices:
            assert first_occurrence(got_out[d]) == list(range(sent[d])), f"{d}: results missing or out of order"  # type: ignore[arg-type]
        assert srv.alive(), srv.tail()
        assert srv.health()["ok"]
    finally:
        for p in reversed(procs):
            p.stop(30)
        kafka.close()


def test_broker_outage_60s_loses_nothing(tmp_path: Path) -> None:
    run_outage(tmp_path, 60.0)
