"""The fleet's home directory on the admin machine and its settings file (``fleet.yaml``).

Layout (``--home``, env ``REIDFLEET_FLEET_HOME``, default ``./var/fleet``)::

    fleet.yaml                  FleetConfig (endpoints devices are told about, ports)
    fleet.db                    SQLite: inventory, shadows, rollout campaigns (WAL)
    keys/fleet-signing.key      ed25519 private key, 0600: only `model publish` reads it
    keys/fleet-signing.pub      public key, copied into every device bundle
    broker/                     mosquitto config, CA, server cert, passwd, ACL, retained-message store
    artifacts/                  signed model artifacts served to devices
    bundles/<device>/           provisioning bundles (delete once installed: they hold a password)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field

from common.configfile import StrictModel, dump_yaml, load_config
from fleet.broker import BrokerPaths

DEFAULT_HOME = Path("var/fleet")
CONFIG_FILE = "fleet.yaml"


class FleetConfig(StrictModel):
    mqtt_host: str = Field("127.0.0.1", description="Broker host name devices connect to (goes into bundles).")
    mqtt_bind: str = Field("127.0.0.1", description="Address the broker listens on.")
    mqtt_port: int = Field(8883, ge=1, le=65535, description="Broker TLS port.")
    mqtt_cert_names: list[str] = Field(default_factory=list, description="Extra names/IPs in the broker certificate.")
    kafka_bootstrap: str = Field("127.0.0.1:9092", description="Kafka bootstrap servers devices produce to.")
    artifact_bind: str = Field("127.0.0.1", description="Address the artifact HTTP server listens on.")
    artifact_port: int = Field(8880, ge=0, le=65535)
    artifact_base_url: str = Field("", description="URL devices download from ('' = http://artifact_bind:port).")
    health_port: int = Field(9470, ge=0, le=65535, description="/healthz and /metrics of `fleet serve`.")
    tick_s: float = Field(0.5, gt=0, le=60, description="How often the manager advances rollouts.")
    stale_after_s: float = Field(120, gt=0, description="Online devices silent this long show as stale.")

    def artifact_url(self) -> str:
        return self.artifact_base_url.rstrip("/") or f"http://{self.artifact_bind}:{self.artifact_port}"


@dataclass(frozen=True)
class FleetHome:
    root: Path

    @classmethod
    def resolve(cls, value: str | os.PathLike[str] | None = None) -> FleetHome:
        return cls(Path(value or os.environ.get("REIDFLEET_FLEET_HOME") or DEFAULT_HOME).resolve())

    @property
    def config_path(self) -> Path:
        return self.root / CONFIG_FILE

    def config(self) -> FleetConfig:
        return load_config(FleetConfig, self.config_path if self.config_path.exists() else None)

    def write_config(self, cfg: FleetConfig) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(dump_yaml(cfg))

    @property
    def db_path(self) -> Path:
        return self.root / "fleet.db"

    @property
    def private_key(self) -> Path:
        return self.root / "keys" / "fleet-signing.key"

    @property
    def public_key(self) -> Path:
        return self.root / "keys" / "fleet-signing.pub"

    @property
    def broker(self) -> BrokerPaths:
        return BrokerPaths(self.root / "broker")

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    @property
    def bundles(self) -> Path:
        return self.root / "bundles"
