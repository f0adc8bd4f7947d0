"""Once-per-run service fixtures: real brokers on free loopback ports, always stopped.

Set ``REIDFLEET_TEST_KAFKA=host:port`` to run against an already running broker instead.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.assets import assets_dir

# fleet + agent fixtures (real mosquitto, artifact server, manager, agents)
pytest_plugins = ["tests.fleetkit"]


@pytest.fixture(scope="session")
def assets() -> Path:
    root = assets_dir()
    if not (root / "models").is_dir():
        pytest.fail(f"shared assets not found at {root}; set REIDFLEET_ASSETS")
    return root


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    external = os.environ.get("REIDFLEET_TEST_KAFKA")
    if external:
        yield external
        return
    from common.kafka import ensure_topics
    from common.tansu import EmbeddedKafka

    broker = EmbeddedKafka(log_file=tmp_path_factory.mktemp("tansu") / "tansu.log")
    broker.start()
    try:
        ensure_topics(broker.bootstrap)
        yield broker.bootstrap
    finally:
        broker.stop()


@pytest.fixture
def unique_topic_prefix() -> str:
    """Topic-name prefix per test so tests sharing one broker never see each other's messages."""
    return f"t{uuid.uuid4().hex[:10]}_"
