"""Kafka client settings shared by producers and consumers, and topic creation.

Message-size limits are set consistently end to end (producer ``message.max.bytes``, topic
``max.message.bytes``, consumer fetch sizes) from :data:`schemas.topics.MAX_MESSAGE_BYTES`, so a
large full-frame message never fails at one hop only.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from schemas.topics import MAX_MESSAGE_BYTES, PRODUCTION_TOPICS, TopicSpec

log = logging.getLogger(__name__)


LINGER_MS = 20  # the appliances' producer batching delay; load generators replay with the same


def producer_config(bootstrap: str, client_id: str, **overrides: Any) -> dict[str, Any]:
    """Reliable, ordered, compressed producer: idempotent + acks=all keeps per-key order across retries."""
    cfg: dict[str, Any] = {
        "bootstrap.servers": bootstrap,
        "client.id": client_id,
        "enable.idempotence": True,
        "acks": "all",
        "compression.type": "zstd",
        "linger.ms": LINGER_MS,
        "batch.size": 1_000_000,
        "message.max.bytes": MAX_MESSAGE_BYTES + 1_000_000,
        # Retry forever within the delivery timeout; the appliance spools what still fails.
        "message.timeout.ms": 30_000,
        "queue.buffering.max.kbytes": 65_536,
        "queue.buffering.max.messages": 100_000,
        "socket.keepalive.enable": True,
        "reconnect.backoff.ms": 200,
        "reconnect.backoff.max.ms": 5_000,
    }
    cfg.update(overrides)
    return cfg


def consumer_config(bootstrap: str, group_id: str, client_id: str, **overrides: Any) -> dict[str, Any]:
    """At-least-once consumer: offsets are stored by the application only after its work is durable."""
    cfg: dict[str, Any] = {
        "bootstrap.servers": bootstrap,
        "group.id": group_id,
        "client.id": client_id,
        "enable.auto.commit": True,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        # Group joins take ~half the session timeout on tansu; 6 s keeps rebalances quick while
        # riding out a GC pause. max.poll.interval covers a slow GPU batch with margin.
        "session.timeout.ms": 6_000,
        "heartbeat.interval.ms": 1_500,
        "max.poll.interval.ms": 300_000,
        "fetch.max.bytes": 4 * MAX_MESSAGE_BYTES,
        "max.partition.fetch.bytes": MAX_MESSAGE_BYTES + 1_000_000,
        "message.max.bytes": MAX_MESSAGE_BYTES + 1_000_000,
        "receive.message.max.bytes": 4 * MAX_MESSAGE_BYTES + 1_000_000,
    }
    cfg.update(overrides)
    return cfg


def ensure_topics(bootstrap: str, specs: Iterable[TopicSpec] = PRODUCTION_TOPICS, *,
                  single_broker: bool | None = None, timeout_s: float = 15.0) -> list[str]:
    """Create missing topics with explicit settings; existing topics are left as they are.

    ``single_broker=None`` asks the cluster how many brokers it has and lowers RF to fit a dev broker.
    """
    admin = AdminClient({"bootstrap.servers": bootstrap})
    md = admin.list_topics(timeout=timeout_s)
    if single_broker is None:
        single_broker = len(md.brokers) < 3
    specs = [s.for_single_broker() if single_broker else s for s in specs]
    missing = [s for s in specs if s.name not in md.topics]
    if not missing:
        return []
    futures = admin.create_topics(
        [NewTopic(s.name, s.partitions, s.replication_factor, config=dict(s.config)) for s in missing],
        request_timeout=timeout_s,
    )
    created = []
    for name, fut in futures.items():
        try:
            fut.result()
            created.append(name)
        except KafkaException as exc:
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise
    log.info("created topics %s on %s", created, bootstrap)
    return created
