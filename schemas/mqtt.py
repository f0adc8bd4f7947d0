"""MQTT payloads between the fleet manager and the appliance agent: one pydantic model per payload.

Both sides import these models; nothing else defines the wire format. Payloads are UTF-8 JSON
(``model.model_dump_json()``), validated on receipt with ``Model.model_validate_json``: a payload
that does not validate is logged and reported, never half-applied. Topics come from
``schemas.topics.device_topic(device_id, leaf)``:

======================  =========  ==========  ==========================================
leaf                    written by retained    payload
======================  =========  ==========  ==========================================
``status``              device     yes         :class:`DeviceStatus` (last will: offline)
``telemetry``           device     no          :class:`Telemetry`
``config/desired``      manager    yes         :class:`DesiredConfig`
``config/reported``     device     yes         :class:`ReportedConfig`
``ota/job``             manager    yes         :class:`OtaJob`
``ota/progress``        device     yes         :class:`OtaProgress` (latest state wins)
======================  =========  ==========  ==========================================

``ota/progress`` is retained (unlike AWS IoT job notifications) so a fleet manager that restarts
mid-rollout reads every device's latest job state from the broker instead of losing it.
"""

from __future__ import annotations

import re
import time
from typing import Any, Literal

from pydantic import Field, model_validator

from common.configfile import StrictModel
from common.signing import artifact_statement

#: Device ids are also MQTT usernames and path components: keep them boring.
DEVICE_ID_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
DEVICE_ID_PATTERN = DEVICE_ID_RE.pattern
#: The fleet manager's own MQTT account; no device may take this name.
MANAGER_USERNAME = "fleet-manager"


def check_device_id(device_id: str) -> str:
    if not DEVICE_ID_RE.match(device_id) or device_id == MANAGER_USERNAME:
        raise ValueError(
            f"invalid device id {device_id!r}: use 1-63 lowercase letters, digits, '-' or '_', "
            f"starting with a letter or digit (and not {MANAGER_USERNAME!r})"
        )
    return device_id


def now() -> float:
    return time.time()


class DeviceStatus(StrictModel):
    """Retained availability. The agent sets an ``offline`` last will before it connects."""

    state: Literal["online", "offline"]
    ts: float | None = Field(None, description="Epoch seconds when the device published it (None in the will).")
    reason: str = Field("", description="Why offline: 'connection lost' (will) or 'shutdown'.")
    agent_version: str = ""
    model_id: str = ""
    model_version: str = ""


class SystemStats(StrictModel):
    cpu_percent: float | None = Field(None, ge=0, description="Whole-box CPU use since the last sample.")
    load1: float | None = None
    memory_used_bytes: int | None = Field(None, ge=0)
    memory_total_bytes: int | None = Field(None, ge=0)
    process_rss_bytes: int | None = Field(None, ge=0)
    temperature_c: float | None = Field(None, description="Hottest thermal zone; None where not readable.")
    disk_free_bytes: int | None = Field(None, ge=0, description="Free space on the data dir's filesystem.")


class Telemetry(StrictModel):
    ts: float
    uptime_s: float = Field(ge=0)
    health: Literal["ok", "degraded", "error"]
    health_detail: str = ""
    model_id: str = ""
    model_version: str = ""
    model_slot: str = ""
    config_version: int = Field(0, ge=0, description="Desired-config version in force (0 = local defaults).")
    pipeline: dict[str, Any] = Field(default_factory=dict, description="ApplianceControl.telemetry() as is.")
    system: SystemStats = Field(default_factory=SystemStats)


class DesiredConfig(StrictModel):
    """The settings the fleet wants in force. Validated whole by the appliance, then applied or rejected."""

    version: int = Field(ge=1, description="Increases with every change; the device reports which it applied.")
    settings: dict[str, Any]
    issued_at: float = Field(default_factory=now)


class ReportedConfig(StrictModel):
    version: int = Field(ge=0, description="The desired version this report answers (0: none received).")
    status: Literal["applied", "rejected"]
    applied_version: int = Field(ge=0, description="The version in force after this report (last good).")
    settings: dict[str, Any] = Field(description="Settings in force now.")
    error: str = ""
    problems: list[str] = Field(default_factory=list, description="One line per bad key, with its path.")
    ts: float = Field(default_factory=now)


class ArtifactRef(StrictModel):
    """A signed model artifact: a tar of a model directory with its manifest.json."""

    model_id: str = Field(min_length=1)
    version: str = Field(min_length=1)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size_bytes: int = Field(gt=0)
    signature: str = Field(min_length=1, description="Base64 ed25519 over common.signing.artifact_statement.")
    url: str = Field("", description="Where to download it (HTTP with Range); filled in per fleet.")

    def statement(self) -> bytes:
        return artifact_statement(self.model_id, self.version, self.sha256, self.size_bytes)


class ModelRef(StrictModel):
    model_id: str
    version: str


class HealthCheckSpec(StrictModel):
    duration_s: float = Field(5.0, ge=0, le=600, description="How long the new model must keep the FPS floor.")
    min_fps: float = Field(0.0, ge=0, description="FPS floor on the probe image (0 = no floor).")
    min_people: int = Field(1, ge=0, description="People the model must find in the probe image.")


OtaState = Literal[
    "received", "downloading", "verifying", "installing", "switching", "health_check",
    "succeeded", "failed", "rolled_back",
]
OTA_TERMINAL: frozenset[str] = frozenset({"succeeded", "failed", "rolled_back"})


class OtaJob(StrictModel):
    """``install``: download, verify, install into the inactive slot, switch, health-check.
    ``revert``: switch back to the model kept in the inactive slot (campaign abort), if it is ``revert_to``."""

    job_id: str = Field(min_length=1, max_length=128)
    action: Literal["install", "revert"] = "install"
    campaign_id: str = ""
    artifact: ArtifactRef | None = None
    revert_to: ModelRef | None = None
    health: HealthCheckSpec = Field(default_factory=HealthCheckSpec)
    issued_at: float = Field(default_factory=now)

    @model_validator(mode="after")
    def _action_fields(self) -> OtaJob:
        if self.action == "install" and self.artifact is None:
            raise ValueError("an install job needs an artifact")
        if self.action == "revert" and self.revert_to is None:
            raise ValueError("a revert job needs revert_to")
        return self


class OtaProgress(StrictModel):
    job_id: str
    campaign_id: str = ""
    action: Literal["install", "revert"] = "install"
    state: OtaState
    progress: float = Field(0.0, ge=0, le=1)
    bytes_done: int = Field(0, ge=0)
    bytes_total: int = Field(0, ge=0)
    model_id: str = Field("", description="Model in force after this step.")
    model_version: str = ""
    error: str = ""
    ts: float = Field(default_factory=now)

    @property
    def terminal(self) -> bool:
        return self.state in OTA_TERMINAL
