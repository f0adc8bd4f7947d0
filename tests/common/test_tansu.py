"""The embedded broker starts, takes the project's topics and round-trips a keyed message."""

from __future__ import annotations

import pytest
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient

from common.kafka import consumer_config, ensure_topics, producer_config
from schemas.topics import REID_DLQ, REID_INPUT, REID_OUTPUT, TopicSpec

pytestmark = pytest.mark.integration


def test_topics_created_with_partitions(kafka_bootstrap: str) -> None:
    md = AdminClient({"bootstrap.servers": kafka_bootstrap}).list_topics(timeout=10)
    assert len(md.topics[REID_INPUT].partitions) == 6
    assert len(md.topics[REID_OUTPUT].partitions) == 3
    assert REID_DLQ in md.topics
    assert ensure_topics(kafka_bootstrap) == []  # idempotent


def test_keyed_round_trip(kafka_bootstrap: str, unique_topic_prefix: str) -> None:
    topic = unique_topic_prefix + "rt"
    ensure_topics(kafka_bootstrap, [TopicSpec(topic, 3, 1)])
    p = Producer(producer_config(kafka_bootstrap, "test"))
    for i in range(50):
        p.produce(topic, key=b"dev-1", value=str(i).encode())
    assert p.flush(10) == 0
    c = Consumer(consumer_config(kafka_bootstrap, unique_topic_prefix + "g", "test"))
    c.subscribe([topic])
    got: list[int] = []
    try:
        for _ in range(200):
            m = c.poll(0.5)
            if m is None or m.error():
                if len(got) == 50:
                    break
                continue
            got.append(int(m.value()))
    finally:
        c.close()
    assert got == list(range(50))  # one key -> one partition -> order kept
