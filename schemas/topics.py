"""Every Kafka topic and MQTT topic name in one place, with the settings topics are created with.

Kafka settings follow the reference thesis (reid_input: 6 partitions, RF 3, min ISR 2, 1 day,
20 MB messages; reid_output: 3 partitions, 6 h). The embedded single-node broker gets the same
topics with replication 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field

REID_INPUT = "reid_input"
REID_OUTPUT = "reid_output"
REID_DLQ = "reid_dlq"

#: Largest single message we produce or accept (a full 1080p JPEG plus crops stays far below).
MAX_MESSAGE_BYTES = 20 * 1024 * 1024

_DAY_MS = 24 * 3600 * 1000


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    replication_factor: int
    config: dict[str, str] = field(default_factory=dict)

    def for_single_broker(self) -> TopicSpec:
        """The same topic for a one-node dev broker: RF 1 and no min-ISR above 1."""
        cfg = dict(self.config)
        cfg.pop("min.insync.replicas", None)
        return TopicSpec(self.name, self.partitions, 1, cfg)


PRODUCTION_TOPICS: tuple[TopicSpec, ...] = (
    TopicSpec(
        REID_INPUT,
        partitions=6,
        replication_factor=3,
        config={
            "retention.ms": str(_DAY_MS),
            "min.insync.replicas": "2",
            "max.message.bytes": str(MAX_MESSAGE_BYTES),
            "compression.type": "producer",
        },
    ),
    TopicSpec(
        REID_OUTPUT,
        partitions=3,
        replication_factor=3,
        config={"retention.ms": str(6 * 3600 * 1000), "min.insync.replicas": "2"},
    ),
    TopicSpec(
        REID_DLQ,
        partitions=1,
        replication_factor=3,
        config={
            "retention.ms": str(7 * _DAY_MS),
            "min.insync.replicas": "2",
            "max.message.bytes": str(MAX_MESSAGE_BYTES),
        },
    ),
)


# --- MQTT (fleet) -------------------------------------------------------------------------
MQTT_ROOT = "reidfleet"


def device_topic(device_id: str, leaf: str) -> str:
    """``reidfleet/devices/{id}/{leaf}``; the broker ACL confines each device to this subtree."""
    if not device_id or any(c in device_id for c in "/+#"):
        raise ValueError(f"invalid device id {device_id!r}: must be non-empty without '/', '+', '#'")
    return f"{MQTT_ROOT}/devices/{device_id}/{leaf}"


MQTT_STATUS = "status"  # retained, last will "offline"
MQTT_TELEMETRY = "telemetry"
MQTT_CONFIG_DESIRED = "config/desired"  # retained, written by the fleet manager
MQTT_CONFIG_REPORTED = "config/reported"  # retained, written by the device
MQTT_OTA_JOB = "ota/job"  # retained, written by the fleet manager
MQTT_OTA_PROGRESS = "ota/progress"  # written by the device
