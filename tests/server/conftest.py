"""Fixtures for the server tests: real Market-1501 crops (read by path), per-test topics, a config."""

from __future__ import annotations

import collections
import time
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer

from common.assets import data_path
from common.kafka import ensure_topics
from schemas.topics import TopicSpec
from server.config import ServerConfig


class Market:
    """Market-1501 subset crops: ``crops(pid, camera_rank, n)`` = JPEG bytes of one person on one camera."""

    def __init__(self, root: Path) -> None:
        self.by: dict[str, dict[str, list[Path]]] = collections.defaultdict(lambda: collections.defaultdict(list))
        for f in sorted(root.glob("bounding_box_test/*.jpg")) + sorted(root.glob("query/*.jpg")):
            pid, cam = f.name[:4], f.name.split("_")[1][:2]
            self.by[pid][cam].append(f)

    def crops(self, pid: str, camera_rank: int, n: int = 3) -> list[bytes]:
        cams = self.by[pid]
        cam = sorted(cams, key=lambda c: (-len(cams[c]), c))[camera_rank]
        return [p.read_bytes() for p in cams[cam][:n]]


@pytest.fixture(scope="session")
def market(assets: Path) -> Market:
    root = data_path("market1501_subset", assets=str(assets))
    if not root.is_dir():
        pytest.fail(f"Market-1501 subset not found at {root}")
    return Market(root)


@pytest.fixture
def topics(kafka_bootstrap: str, unique_topic_prefix: str) -> dict[str, str]:
    names = {k: unique_topic_prefix + k for k in ("reid_input", "reid_output", "reid_dlq")}
    # One input partition: a single total order, so a crashed and a clean run see the same sequence.
    ensure_topics(kafka_bootstrap, [TopicSpec(names["reid_input"], 1, 1), TopicSpec(names["reid_output"], 1, 1),
                                    TopicSpec(names["reid_dlq"], 1, 1)])
    return names


def server_config(bootstrap: str, topics: dict[str, str], tmp: Path, **over: object) -> ServerConfig:
    data: dict = {
        "kafka": {"bootstrap": bootstrap, "group_id": f"g-{topics['reid_input']}", "input_topic": topics["reid_input"],
                  "output_topic": topics["reid_output"], "dlq_topic": topics["reid_dlq"]},
        "batch": {"max_crops": 16, "max_wait_ms": 30},
        "embedder": {"type": "intel_reid", "model": "0277"},
        "vectors": {"type": "qdrant_local", "path": str(tmp / "qdrant")},
        "store": {"url": f"sqlite:///{tmp / 'analytics.db'}"},
        "health": {"port": 0},
    }
    for k, v in over.items():
        data[k] = {**data.get(k, {}), **v} if isinstance(v, dict) else v
    return ServerConfig.model_validate(data)


def produce(bootstrap: str, topic: str, items: list[tuple[bytes | None, bytes]]) -> None:
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    for key, value in items:
        p.produce(topic, key=key, value=value)
    assert p.flush(30) == 0


def read_all(bootstrap: str, topic: str, expect: int, timeout_s: float = 60.0) -> list[bytes]:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"reader-{topic}-{time.time_ns()}",
                  "auto.offset.reset": "earliest", "enable.auto.commit": False,
                  "session.timeout.ms": 6000})
    c.subscribe([topic])
    out: list[bytes] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(out) < expect and time.monotonic() < deadline:
            m = c.poll(0.5)
            if m is not None and m.error() is None:
                out.append(m.value())
    finally:
        c.close()
    return out
