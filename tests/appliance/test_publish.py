"""Publisher against real brokers: no broker at all, then a process restart that replays the spool."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from confluent_kafka import Consumer

from appliance.config import KafkaConfig, SpoolConfig
from appliance.publish import Publisher
from common.kafka import consumer_config, ensure_topics
from common.tansu import free_port
from schemas.topics import TopicSpec

pytestmark = pytest.mark.integration


def _consume(bootstrap: str, topic: str, group: str, n: int, timeout_s: float = 60) -> list[bytes]:
    c = Consumer(consumer_config(bootstrap, group, "t", **{"enable.auto.offset.store": True}))
    c.subscribe([topic])
    out: list[bytes] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(out) < n and time.monotonic() < deadline:
            m = c.poll(0.3)
            if m is not None and not m.error():
                out.append(m.value())
    finally:
        c.close()
    return out


def test_spool_survives_restart_and_is_replayed_first(
    kafka_bootstrap: str, unique_topic_prefix: str, tmp_path: Path
) -> None:
    topic = unique_topic_prefix + "pub"
    ensure_topics(kafka_bootstrap, [TopicSpec(topic, 3, 1)])
    spool = SpoolConfig(dir=tmp_path / "spool", max_bytes=8 * 2**20, segment_bytes=2**20)

    # 1st process: the broker is not there at all
    dead = f"127.0.0.1:{free_port()}"
    p1 = Publisher(KafkaConfig(bootstrap=dead, topic=topic, probe_interval_s=0.2, flush_timeout_s=1), spool, "dev-a")
    p1.start()
    for i in range(120):
        p1.publish(b"m%04d" % i)
        time.sleep(0.005)
    snap = p1.snapshot()
    assert snap["state"] in ("spooling", "direct")
    p1.close()
    assert len(list((tmp_path / "spool").glob("*.seg"))) >= 1

    # 2nd process: broker reachable; the spool goes first, then new messages, in one order
    p2 = Publisher(KafkaConfig(bootstrap=kafka_bootstrap, topic=topic, probe_interval_s=0.2), spool, "dev-a")
    p2.start()
    assert p2.snapshot()["spool_messages"] == 120
    for i in range(120, 150):
        p2.publish(b"m%04d" % i)
    assert p2.wait_idle(60), p2.snapshot()
    snap = p2.snapshot()
    p2.close()
    assert snap["spool_replayed_messages"] >= 120 and snap["spool_dropped_messages"] == 0
    got = _consume(kafka_bootstrap, topic, unique_topic_prefix + "g", 150)
    assert got == [b"m%04d" % i for i in range(150)]
    assert not list((tmp_path / "spool").glob("*.seg"))  # drained spool leaves no segment behind
