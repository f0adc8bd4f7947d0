"""The appliance's one root config: everything ``python -m appliance run`` needs, validated whole.

Defaults run out of the box on a developer machine: the shared sample video into the embedded
broker on 127.0.0.1:9092. Validators do no I/O (a missing video or model folder is reported at
start-up by the component that opens it, with the setting to change); ``check-config`` prints
every problem with its key path (``source.reconnect_max_s: Input should be greater than 0``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from appliance.detect.base import DetectorConfig
from appliance.track import TrackerConfig
from common.assets import data_path
from common.configfile import ConfigError, StrictModel, load_config, validate
from schemas.topics import REID_INPUT

DEFAULT_VIDEO = ("videos", "one-by-one-person-detection.mp4")
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

#: Sections the fleet agent may change at run time (``ApplianceControl.apply_settings``); the rest
#: (identity, broker, spool, HTTP port) needs a restart because they are bound at start-up.
LIVE_SECTIONS = ("source", "detector", "tracker", "sending")


class SourceConfig(StrictModel):
    """Where frames come from. Files, RTSP/HTTP URLs and USB cameras share one reader."""

    url: str = Field(
        default_factory=lambda: str(data_path(*DEFAULT_VIDEO)),
        min_length=1,
        description="Video file path, rtsp:// (or http://, rtmp://) URL, /dev/videoN, or a camera index like 0.",
    )
    loop: bool = Field(False, description="Files only: start again at the end instead of stopping.")
    realtime: bool = Field(
        False, description="Files only: pace frames at the file's native FPS (like a camera) instead of full speed."
    )
    fps: float | None = Field(
        None, gt=0, le=240, description="Override the frame rate the tracker assumes; None = read from the source."
    )
    prefetch_frames: int = Field(
        2, ge=1, le=64, description="Files only: decoded frames buffered ahead of the detector (decode overlaps it)."
    )
    open_timeout_s: float = Field(5.0, gt=0, le=300, description="Live sources: give up one connection attempt after.")
    read_timeout_s: float = Field(5.0, gt=0, le=300, description="Live sources: a read stalled this long reconnects.")
    reconnect_initial_s: float = Field(0.5, gt=0, le=60, description="First wait before reconnecting a live source.")
    reconnect_max_s: float = Field(30.0, gt=0, le=3600, description="Longest wait between reconnects (backoff cap).")
    reconnect_max_attempts: int | None = Field(
        None, ge=0, description="Live sources: failed attempts in a row before giving up; None = retry forever."
    )

    @model_validator(mode="after")
    def _backoff_order(self) -> SourceConfig:
        if self.reconnect_max_s < self.reconnect_initial_s:
            raise ValueError("reconnect_max_s must be >= reconnect_initial_s")
        return self


class SendingConfig(StrictModel):
    """What goes on the wire per frame. ``track`` mode: boxes every frame plus a best-shot crop when a
    track starts or its crop clearly improves. ``full`` mode: boxes plus a full-frame JPEG (the
    thesis behaviour; ~10-100x the bytes)."""

    mode: Literal["track", "full"] = Field("track", description="track = best-shot crops; full = full-frame JPEGs.")
    full_frame_fps: float = Field(
        0.0,
        ge=0,
        le=120,
        description="Full-frame JPEGs per second at most. track mode: extra frames for live view (0 = none); "
        "full mode: the cap (0 = every frame).",
    )
    frame_jpeg_quality: int = Field(80, ge=10, le=100, description="JPEG quality of full frames.")
    crop_jpeg_quality: int = Field(90, ge=10, le=100, description="JPEG quality of person crops.")
    crop_margin: float = Field(0.10, ge=0, le=1.0, description="Margin added around a box on each side, x box size.")
    min_crop_height_px: int = Field(48, ge=8, le=4096, description="Boxes shorter than this never get a crop.")
    target_height_px: int = Field(
        256, ge=16, le=4096, description="Box height that counts as full size in the quality score (OSNet: 256)."
    )
    improve_margin: float = Field(
        0.10, ge=0, le=1.0, description="A new crop is sent when quality beats the best sent one by this much."
    )
    max_crops_per_track: int = Field(4, ge=1, le=1000, description="Crops sent per track at most.")
    min_crop_interval_s: float = Field(1.0, ge=0, le=3600, description="Least time between two crops of one track.")
    refresh_interval_s: float = Field(
        0.0, ge=0, le=86400, description="Send a REFRESH crop of a long track this often (0 = never)."
    )
    sharpness_ref: float = Field(
        150.0, gt=0, description="Variance of Laplacian (on a 64 px high grey crop) that scores 0.63 sharpness."
    )


class KafkaConfig(StrictModel):
    bootstrap: str = Field("127.0.0.1:9092", min_length=1, description="Kafka bootstrap servers (host:port,...).")
    topic: str = Field(REID_INPUT, min_length=1, description="Topic the edge frames go to (key = device id).")
    client_id: str | None = Field(None, description="Kafka client.id; None = appliance-<device_id>.")
    producer: dict[str, Any] = Field(
        default_factory=dict, description="Extra librdkafka producer properties (override common.kafka defaults)."
    )
    flush_timeout_s: float = Field(10.0, ge=0, le=600, description="At stop: wait this long, then spool the rest.")
    probe_interval_s: float = Field(1.0, gt=0, le=60, description="While spooling: how often to check the broker.")


class SpoolConfig(StrictModel):
    dir: Path = Field(Path("var/spool"), description="Folder of the on-disk spool (created if missing).")
    max_bytes: int = Field(
        2 * 1024**3, ge=1024 * 1024, description="Size cap; when full the oldest segment is dropped (and counted)."
    )
    segment_bytes: int = Field(16 * 1024**2, ge=64 * 1024, description="Segment file size before rotating.")
    fsync: Literal["interval", "always", "never"] = Field(
        "interval", description="interval = fsync at most every fsync_interval_s and on rotate/close."
    )
    fsync_interval_s: float = Field(1.0, gt=0, le=60)
    replay_window: int = Field(500, ge=1, le=100000, description="Spooled messages in flight while replaying.")

    @model_validator(mode="after")
    def _segment_fits(self) -> SpoolConfig:
        if self.segment_bytes * 2 > self.max_bytes:
            raise ValueError("max_bytes must hold at least two segments (max_bytes >= 2 x segment_bytes)")
        return self


class HttpConfig(StrictModel):
    host: str = Field("127.0.0.1", description="Address of /healthz and /metrics (loopback by default).")
    port: int = Field(9108, ge=0, le=65535, description="Port of /healthz and /metrics; 0 = any free port.")


class ApplianceConfig(StrictModel):
    """Root config of one appliance (one camera)."""

    device_id: str = Field("appliance-dev", description="Fleet device id; also the Kafka key.")
    camera_id: str = Field("cam-1", description="Camera id, unique within the site.")
    source: SourceConfig = Field(default_factory=SourceConfig)
    detector: DetectorConfig = Field(default_factory=DetectorConfig)
    tracker: TrackerConfig = Field(default_factory=TrackerConfig)
    sending: SendingConfig = Field(default_factory=SendingConfig)
    kafka: KafkaConfig = Field(default_factory=KafkaConfig)
    spool: SpoolConfig = Field(default_factory=SpoolConfig)
    http: HttpConfig = Field(default_factory=HttpConfig)

    @field_validator("device_id", "camera_id")
    @classmethod
    def _ids(cls, value: str) -> str:
        if not _ID_RE.match(value):
            raise ValueError("must be 1-64 characters of letters, digits, '.', '_' or '-', starting alnum")
        return value


def load(path: str | Path | None = None, overrides: list[str] | None = None) -> ApplianceConfig:
    """Defaults <- YAML file <- ``--set`` overrides; raises ``ConfigError`` listing every problem."""
    return load_config(ApplianceConfig, path, overrides)


def live_settings(cfg: ApplianceConfig) -> dict[str, Any]:
    """The live-tunable part of ``cfg`` as JSON-ready data (what ``current_settings`` reports)."""
    data = cfg.model_dump(mode="json")
    out = {k: data[k] for k in LIVE_SECTIONS}
    out["detector"].pop("model_dir", None)  # the model is OTA's business (ApplianceControl.load_model)
    return out


def merge_settings(cfg: ApplianceConfig, settings: dict[str, Any]) -> ApplianceConfig:
    """``cfg`` with the (partial) live sections in ``settings`` merged in, validated as a whole.

    Raises ``ConfigError`` (each bad key with its path) for unknown or restart-only sections, so a
    desired config is taken whole or not at all.
    """
    if not isinstance(settings, dict):
        raise ConfigError("settings", [f"(root): expected a mapping, got {type(settings).__name__}"])
    fixed = [k for k in settings if k not in LIVE_SECTIONS]
    if fixed:
        raise ConfigError(
            "settings",
            [f"{k}: not live-tunable (live sections: {', '.join(LIVE_SECTIONS)}); change it in the file and restart"
             for k in fixed],
        )
    data = cfg.model_dump(mode="python")
    for section, values in settings.items():
        if not isinstance(values, dict):
            raise ConfigError("settings", [f"{section}: expected a mapping, got {type(values).__name__}"])
        data[section] = {**data[section], **values}
    return validate(ApplianceConfig, data, "settings")
