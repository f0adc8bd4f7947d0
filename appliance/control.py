"""The seam between the real-time loop and the fleet agent.

The pipeline implements :class:`ApplianceControl`; the MQTT agent and the OTA installer only talk
to it through this protocol, so the agent can run in-process (the default) or be tested against a
real pipeline without knowing its internals.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class ApplianceControl(Protocol):
    def telemetry(self) -> dict[str, Any]:
        """Current counters: fps, per-stage latency ms, drops, queue/spool sizes, model id/version,
        source state (ok/reconnecting + last error), uptime. JSON-serialisable."""
        ...

    def current_settings(self) -> dict[str, Any]:
        """The live-tunable settings now in force (thresholds, jpeg quality, send mode, rate
        limits, source URL), as a JSON-serialisable mapping."""
        ...

    def apply_settings(self, settings: dict[str, Any]) -> dict[str, Any]:
        """Validate the whole mapping and swap it in atomically; return what is now in force.

        Raises ``common.configfile.ConfigError`` (listing each bad key) and keeps the previous
        settings when anything is invalid.
        """
        ...

    def load_model(self, model_dir: Path) -> None:
        """Switch the detector to the OpenVINO IR in ``model_dir``. Raises and keeps the old
        detector running if the new one fails to load."""
        ...
