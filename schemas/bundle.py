"""The device bundle: what ``python -m fleet device add`` writes and the installer puts on the box.

The disk image reads ``bundle.json`` at first boot (``DeviceBundle.model_validate_json``) and
from it alone knows who the device is, where the MQTT broker and Kafka are, how to log in, which
CA to trust and which key signs model artifacts. It holds a password, so it is written 0600 and
should be deleted from the admin machine once installed. ``python -m schemas.bundle`` prints the
JSON Schema.
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import Field, field_validator

from common.configfile import StrictModel
from schemas.mqtt import DEVICE_ID_PATTERN, check_device_id

BUNDLE_FILE = "bundle.json"


class MqttEndpoint(StrictModel):
    host: str = Field(min_length=1, description="Broker host name or IP the device connects to.")
    port: int = Field(ge=1, le=65535)
    tls: bool = Field(True, description="TLS with ca_cert_pem as the only trusted CA.")
    tls_server_name: str = Field("", description="Name to check in the broker certificate ('' = host).")
    ca_cert_pem: str = Field("", description="The fleet CA certificate (PEM).")
    username: str = Field(description="Equals the device id.")
    password: str = Field(min_length=16, description="Per-device broker password (secret).")
    keepalive_s: int = Field(30, ge=5, le=3600)


class KafkaEndpoint(StrictModel):
    bootstrap: str = Field(min_length=1, description="host:port[,host:port] of the Kafka brokers.")
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_SSL", "SASL_PLAINTEXT"] = "PLAINTEXT"


class DeviceBundle(StrictModel):
    schema_version: Literal[1] = 1
    device_id: str = Field(pattern=DEVICE_ID_PATTERN)
    group: str = Field("default", pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$", description="Rollout group.")
    created_at: float
    mqtt: MqttEndpoint
    kafka: KafkaEndpoint
    fleet_public_key_pem: str = Field(description="ed25519 key that signs model artifacts (PEM).")
    camera_url: str = Field("", description="RTSP/HTTP/file URL of the camera ('' = set at install).")

    @field_validator("device_id")
    @classmethod
    def _device_id(cls, value: str) -> str:
        return check_device_id(value)


def bundle_json_schema() -> dict:
    return DeviceBundle.model_json_schema()


if __name__ == "__main__":
    print(json.dumps(bundle_json_schema(), indent=2))
