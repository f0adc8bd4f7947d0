"""Dashboard configuration: where the stores are, who may log in, and the privacy defaults.

The dashboard reads the server's analytics store, the server's Qdrant collection and the fleet
inventory where those services keep them (no private copies), so every location here defaults
to the path the embedded demo uses and can point at a production URL instead. Secrets are never
in the file itself: a user's password is a PBKDF2 hash (``python -m dashboard hash-password``),
or the name of an environment variable or file that holds it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from common.configfile import StrictModel, load_config
from schemas.topics import REID_INPUT, REID_OUTPUT

CONFIG_ENV = "REIDFLEET_DASHBOARD_CONFIG"
Role = Literal["manager", "admin"]


class UserConfig(StrictModel):
    """One login. Exactly one of ``password_hash``, ``password_env`` or ``password_file`` is set."""

    role: Role = Field("manager", description="manager: analytics pages; admin: also fleet and privacy settings.")
    password_hash: str | None = Field(None, pattern=r"^pbkdf2_sha256\$\d+\$[0-9a-f]+\$[0-9a-f]{64}$",
                                      description="From `python -m dashboard hash-password`.")
    password_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
                                     description="Environment variable that holds the plain password.")
    password_file: str | None = Field(None, description="File whose first line is the plain password.")

    @model_validator(mode="after")
    def _one_secret(self) -> UserConfig:
        given = [k for k in ("password_hash", "password_env", "password_file") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(f"set exactly one of password_hash, password_env, password_file (got {given or 'none'})")
        return self


class AuthConfig(StrictModel):
    users: dict[str, UserConfig] = Field(
        default_factory=lambda: {
            "admin": UserConfig(role="admin", password_env="REIDFLEET_DASHBOARD_ADMIN_PASSWORD"),
            "manager": UserConfig(role="manager", password_env="REIDFLEET_DASHBOARD_MANAGER_PASSWORD"),
        },
        description="Login name -> user. Defaults read the passwords from two environment variables.",
    )
    max_failures: int = Field(5, ge=1, le=100, description="Failed logins per name before a lockout.")
    lockout_s: float = Field(60.0, ge=0, le=86_400, description="How long a name stays locked out.")

    @field_validator("users")
    @classmethod
    def _some_users(cls, v: dict[str, UserConfig]) -> dict[str, UserConfig]:
        if not v:
            raise ValueError("at least one user is needed, or nobody can log in")
        return v


class QdrantConfig(StrictModel):
    """The server's identity collection: local mode (``path``) or a Qdrant server (``url``)."""

    path: str | None = Field("./var/server/qdrant", description="Local-mode folder (the server's).")
    url: str | None = Field(None, description="Qdrant server URL; wins over path when set.")
    collection: str | None = Field(None, description="None = reid_<embedder model id>, as the server names it.")
    api_key_env: str | None = Field(None, description="Environment variable with the Qdrant API key.")


class PrivacyConfig(StrictModel):
    """Defaults for the settings an admin can change at run time (kept in ``settings_path``)."""

    blur_people: bool = Field(True, description="Blur heads on every image shown unless an admin turns it off.")
    retention_days: int = Field(30, ge=1, le=3650, description="Sightings, tracks and identities older than "
                                "this are deleted from the analytics store and Qdrant.")
    show_gender: bool = Field(True, description="Show gender splits and the gender filter (where the server "
                              "computes it).")


class AlertConfig(StrictModel):
    offline_after_s: float = Field(120.0, gt=0, description="An appliance not seen for this long is offline.")
    lag_warn_s: float = Field(30.0, gt=0, description="Warn when the server reports a lag in seconds above this.")
    lag_warn_messages: int = Field(5_000, ge=0, description="Warn when the server reports a lag in messages "
                                   "above this.")


class LiveConfig(StrictModel):
    """The Live page reads the appliances' and the server's Kafka topics directly (no consumer group)."""

    kafka_bootstrap: str | None = Field("127.0.0.1:9092", description="None turns the Live page off.")
    input_topic: str = REID_INPUT
    output_topic: str = REID_OUTPUT
    refresh_s: float = Field(2.0, ge=0.5, le=3600, description="How often the Live page redraws.")
    lookback_s: float = Field(30.0, ge=0, le=3600, description="On start, replay this much of the topics so "
                              "cameras show up at once.")


class SearchConfig(StrictModel):
    embedder: dict[str, Any] = Field(
        default_factory=lambda: {"type": "intel_reid", "model": "0277"},
        description="Same mapping as the server's `embedder` (must match the model that filled Qdrant).")
    top_k: int = Field(10, ge=1, le=200)


class DashboardConfig(StrictModel):
    store_url: str = Field("sqlite:///./var/server/analytics.db",
                           description="The server's analytics store, as a SQLAlchemy URL: sqlite:///path or "
                           "postgresql+psycopg://user@host/db (password via PGPASSWORD).")
    fleet_inventory: str = Field("./var/fleet/fleet.db", description="The fleet manager's SQLite database "
                                 "(inventory and rollout campaigns).")
    settings_path: str = Field("./var/dashboard/settings.json", description="Admin-changed privacy settings.")
    server_health_url: str | None = Field(None, description="The server consumer's /healthz (adds its lag "
                                          "and state to the Overview alerts).")
    timezone: str = Field("UTC", description="IANA zone the shop's days and hours are counted in.")
    auth: AuthConfig = AuthConfig()
    qdrant: QdrantConfig = QdrantConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    alerts: AlertConfig = AlertConfig()
    live: LiveConfig = LiveConfig()
    search: SearchConfig = SearchConfig()

    @field_validator("store_url")
    @classmethod
    def _known_scheme(cls, v: str) -> str:
        if not v.startswith(("sqlite:///", "postgresql")):
            raise ValueError("must be a sqlite:///path or postgresql+psycopg://... URL")
        return v

    @field_validator("timezone")
    @classmethod
    def _zone(cls, v: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {v!r}; use an IANA name like Europe/Berlin") from None
        return v


def load_dashboard_config(path: str | Path | None = None, overrides: list[str] | None = None) -> DashboardConfig:
    """File named by the argument or ``REIDFLEET_DASHBOARD_CONFIG``, else the defaults."""
    path = path or os.environ.get(CONFIG_ENV) or None
    return load_config(DashboardConfig, path, overrides)
