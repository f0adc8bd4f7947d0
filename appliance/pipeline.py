"""The real-time loop: source -> detect -> track -> best-shot -> encode -> publish.

Threads and why:
- ``source-decode`` decodes the next frame while the detector works on this one;
- OpenVINO's own threads run inference, with ``stream`` keeping two requests in flight so the
  next frame's letterbox overlaps the current inference;
- the pipeline thread (the caller of :meth:`Pipeline.run`) tracks, picks crops, JPEG-encodes and
  hands the message to the publisher, all while the detector is busy with the next frame;
- ``kafka-pump`` serves delivery reports and replays the spool, so a broker outage never stalls
  the loop.

:class:`Pipeline` implements :class:`appliance.control.ApplianceControl` for the fleet agent.
Settings are validated as a whole and swapped between two frames; a new detector is loaded
completely (in the caller's thread) before the old one is dropped, and the frames in flight in
the old one are finished first, so a swap loses no frame.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from appliance.bestshot import BestShot
from appliance.config import ApplianceConfig, live_settings, merge_settings
from appliance.detect import build_detector
from appliance.detect.base import Detector
from appliance.encode import EdgeFrameEncoder
from appliance.publish import Publisher
from appliance.source import SourceError, VideoSource, classify
from appliance.track import Tracker
from appliance.types import Detections, Frame
from common.configfile import ConfigError
from common.metrics import HealthServer

log = logging.getLogger(__name__)

TRACK_ID_SPAN = 1_000_000
STAGES = ("decode", "detect", "track", "bestshot", "encode", "publish", "total")
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)


def _retire(detector: Detector) -> None:
    """Close a detector after giving the GIL away for a moment.

    OpenVINO 2026.4 can deadlock when a CompiledModel is destroyed while one of its executor threads
    still waits for the GIL to finish an AsyncInferQueue callback (the destructor joins that thread
    while holding the GIL; seen in bench-edge). Sleeping first lets those threads take the GIL and
    finish; see docs/appliance.md.
    """
    for _ in range(5):
        time.sleep(0.02)
    detector.close()


class PipelineMetrics:
    """``reidfleet_appliance_*`` series; the publisher adds ``_kafka_*`` and ``_spool_*`` to the same registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        p = "reidfleet_appliance_"
        self.frames = Counter(p + "frames_processed", "Frames through the whole loop.", registry=registry)
        self.dropped = Counter(p + "frames_dropped", "Frames a live source skipped (latest wins).", registry=registry)
        self.fps = Gauge(p + "fps", "Frames per second over the last few seconds.", registry=registry)
        self.latency = Histogram(
            p + "stage_latency_seconds", "Per-stage latency (detect = submit to result, total = capture to "
            "hand-over to Kafka).", ["stage"], buckets=_BUCKETS, registry=registry,
        )
        self.queue = Gauge(p + "queue_depth", "Decoded frames waiting for the detector.", registry=registry)
        self.msg_bytes = Counter(p + "message_bytes", "Bytes produced, by part.", ["part"], registry=registry)
        self.crops = Counter(p + "crops", "Person crops sent, by reason.", ["reason"], registry=registry)
        self.detections = Counter(p + "detections", "Boxes detected.", registry=registry)
        self.tracks = Gauge(p + "tracks_active", "Confirmed tracks alive.", registry=registry)
        self.source_up = Gauge(p + "source_up", "1 while the source delivers frames.", registry=registry)
        self.reconnects = Gauge(p + "source_reconnects", "Reconnects of the live source.", registry=registry)
        self.info = Gauge(p + "model_info", "Detector in use (value 1).", ["model_id", "model_version"],
                          registry=registry)


class _Ewma:
    __slots__ = ("alpha", "value")

    def __init__(self, alpha: float = 0.1) -> None:
        self.alpha = alpha
        self.value: float | None = None

    def add(self, x: float) -> None:
        self.value = x if self.value is None else self.value + self.alpha * (x - self.value)


class Pipeline:
    """One camera's loop. ``run()`` blocks until the file ends, ``stop`` is set, or the source dies."""

    def __init__(
        self,
        cfg: ApplianceConfig,
        stop: threading.Event | None = None,
        registry: CollectorRegistry | None = None,
        *,
        serve_http: bool = True,
    ) -> None:
        self.cfg = cfg
        self.stop = stop or threading.Event()
        self.registry = registry or CollectorRegistry()
        self.metrics = PipelineMetrics(self.registry)
        self.serve_http = serve_http
        self.http: HealthServer | None = None
        self.publisher = Publisher(cfg.kafka, cfg.spool, cfg.device_id, self.registry)
        self.encoder = EdgeFrameEncoder(cfg.device_id)
        self.bestshot = BestShot(cfg.sending)
        self._lock = threading.Lock()  # guards the pending swaps below
        self._detector: Detector | None = None
        self._pending_detector: tuple[Detector, ApplianceConfig] | None = None
        self._source_changed = False
        self.source: VideoSource | None = None
        self.tracker: Tracker | None = None
        self._tracker_cfg = cfg.tracker
        self._started = time.monotonic()
        self._running = False
        self._error: str | None = None
        self._lat = {s: _Ewma() for s in STAGES}
        self._frame_times: deque[float] = deque(maxlen=512)
        self._submitted: dict[tuple[int, int], float] = {}
        self.frames_processed = 0
        self.frames_dropped = 0
        self.bytes_produced = 0
        self.crop_bytes = 0
        self.frame_jpeg_bytes = 0
        self._source_gen = 0
        self._track_base = 0
        self.first_frame_at: float | None = None  # time.perf_counter() when the first/last frame was handed over
        self.last_frame_at: float | None = None
        self.first_frame_cpu_s: float | None = None  # time.process_time() (all threads) at those moments
        self.last_frame_cpu_s: float | None = None
        self._carry_ended: list[int] = []

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> Pipeline:
        """Load the detector, open the spool/producer and the health server (no frames yet)."""
        if self._detector is None:  # apply_settings/load_model before start may have built one already
            self._detector = build_detector(self.cfg.detector)
        self.metrics.info.labels(self._detector.model_id, self._detector.model_version).set(1)
        self.publisher.start()
        if self.serve_http:
            self.http = HealthServer(self.registry, self.health, self.cfg.http.host, self.cfg.http.port).start()
        return self

    def _open_source(self) -> VideoSource:
        def on_decode(seconds: float) -> None:
            self._observe("decode", seconds)

        src = VideoSource(self.cfg.source, self.cfg.camera_id, self.stop, on_decode=on_decode)
        src.start()
        self.tracker = Tracker(self.cfg.tracker, src.fps)
        self._tracker_cfg = self.cfg.tracker
        self._new_track_base()
        self.bestshot.reset()
        self._source_gen += 1
        return src

    def run(self) -> None:
        """Process frames until the end. Raises ``SourceError`` if the source fails for good."""
        if self._detector is None:
            self.start()
        self._running = True
        try:
            with self._lock:
                self._source_changed = False  # the source opened now already has the latest settings
            self.source = self._open_source()
            frames = self.source.frames()
            while not self.stop.is_set():
                exhausted = self._run_stream(frames)
                with self._lock:
                    pending, self._pending_detector = self._pending_detector, None
                    source_changed, self._source_changed = self._source_changed, False
                if pending is not None:
                    self._swap_detector(*pending)
                if source_changed:
                    self._end_all_tracks()
                    self.source.close()
                    self.source = self._open_source()
                    frames = self.source.frames()
                    continue
                if exhausted and pending is None:
                    break
        except SourceError as exc:
            self._error = str(exc)
            raise
        finally:
            self._running = False

    def _feed(self, frames: Iterator[Frame], done: list[bool]) -> Iterator[Frame]:
        """Frames for one ``detector.stream`` run; returns early (leaving ``frames`` resumable) when a
        swap is pending, so the stream drains its in-flight frames and nothing is lost."""
        for frame in frames:
            self._submitted[(self._source_gen, frame.frame_index)] = time.perf_counter()
            yield frame
            if self.stop.is_set() or self._pending_detector is not None or self._source_changed:
                return
        done[0] = True

    def _run_stream(self, frames: Iterator[Frame]) -> bool:
        assert self._detector is not None
        done = [False]
        for frame, detections in self._detector.stream(self._feed(frames, done)):
            self._process(frame, detections)
        return done[0]

    def _process(self, frame: Frame, detections: Detections) -> None:
        assert self.tracker is not None and self._detector is not None and self.source is not None
        t0 = time.perf_counter()
        submitted = self._submitted.pop((self._source_gen, frame.frame_index), t0)
        self._observe("detect", t0 - submitted)
        cfg = self.cfg
        if cfg.tracker != self._tracker_cfg:  # live tracker settings: new tracker, close the old tracks
            self._end_all_tracks()
            self.tracker = Tracker(cfg.tracker, self.source.fps)
            self._tracker_cfg = cfg.tracker
            self._new_track_base()
            self.bestshot.reset()
        tracked = self.tracker.update(detections)
        ids = tracked.tracker_id
        if len(ids):
            tracked = tracked.with_tracker_id(np.where(ids >= 0, ids + self._track_base, ids))
        ended = self._carry_ended + self._wire_ids(self.tracker.ended_track_ids)
        self._carry_ended = []
        t1 = time.perf_counter()
        self.bestshot.cfg = cfg.sending
        now_s = frame.frame_index / self.source.fps if not self.source.is_live else frame.captured_at_ns / 1e9
        picks = self.bestshot.select(frame.image, tracked, now_s, ended)
        t2 = time.perf_counter()
        enc = self.encoder.encode(
            frame, tracked, picks, ended, self._detector.model_id, self._detector.model_version, cfg.sending, now_s
        )
        t3 = time.perf_counter()
        self.publisher.publish(enc.value)
        t4 = time.perf_counter()
        self._observe("track", t1 - t0)
        self._observe("bestshot", t2 - t1)
        self._observe("encode", t3 - t2)
        self._observe("publish", t4 - t3)
        self._observe("total", max(0.0, time.time_ns() - frame.captured_at_ns) / 1e9)
        m = self.metrics
        m.frames.inc()
        m.detections.inc(len(detections))
        if frame.dropped_before:
            m.dropped.inc(frame.dropped_before)
            self.frames_dropped += frame.dropped_before
        for pick in picks:
            m.crops.labels(pick.reason).inc()
        m.msg_bytes.labels("total").inc(len(enc.value))
        m.msg_bytes.labels("crops").inc(enc.crop_bytes)
        m.msg_bytes.labels("frame").inc(enc.frame_jpeg_bytes)
        m.tracks.set(len(self.tracker.active_track_ids))
        m.queue.set(self.source.queue_depth)
        self.frames_processed += 1
        self.bytes_produced += len(enc.value)
        self.crop_bytes += enc.crop_bytes
        self.frame_jpeg_bytes += enc.frame_jpeg_bytes
        self.last_frame_at = t4
        self.last_frame_cpu_s = time.process_time()
        if self.first_frame_at is None:
            self.first_frame_at, self.first_frame_cpu_s = t4, self.last_frame_cpu_s
        self._frame_times.append(time.monotonic())
        m.fps.set(self.fps)
        m.source_up.set(1 if self.source.state == "ok" else 0)
        m.reconnects.set(self.source.reconnects)

    def _observe(self, stage: str, seconds: float) -> None:
        self.metrics.latency.labels(stage).observe(seconds)
        self._lat[stage].add(seconds)

    def _end_all_tracks(self) -> None:
        """A source change ends every track: the next message says so, so the server closes them."""
        if self.tracker is not None:
            self._carry_ended.extend(self._wire_ids(self.tracker.active_track_ids))

    def _new_track_base(self) -> None:
        """Track ids on the wire are ``<unix seconds at tracker start> * 10**6 + local id``: unique per
        device across tracker resets and appliance restarts (ByteTrack restarts at 1 each time)."""
        self._track_base = max(self._track_base + TRACK_ID_SPAN, int(time.time()) * TRACK_ID_SPAN)

    def _wire_ids(self, local_ids: list[int]) -> list[int]:
        return [self._track_base + t for t in local_ids]

    def _swap_detector(self, new: Detector, new_cfg: ApplianceConfig) -> None:
        old = self._detector
        self._detector = new
        self.cfg = self.cfg.model_copy(update={"detector": new_cfg.detector})
        self.metrics.info.clear()
        self.metrics.info.labels(new.model_id, new.model_version).set(1)
        if old is not None:
            _retire(old)
        log.info("detector swapped", extra={"model_id": new.model_id, "model_version": new.model_version})

    def close(self) -> None:
        """Stop the source, then flush Kafka / spool the rest (data first), then drop detectors and HTTP."""
        self.stop.set()
        if self.source is not None:
            self.source.close()
        # When run() is on another thread, let it finish its in-flight frames (the stop event ends
        # the feed) before the publisher and detector go away under it.
        deadline = time.monotonic() + 15.0
        while self._running and time.monotonic() < deadline:
            time.sleep(0.02)
        self.publisher.close()
        with self._lock:
            pending, self._pending_detector = self._pending_detector, None
        if pending is not None:
            _retire(pending[0])
        if self._detector is not None:
            _retire(self._detector)
            self._detector = None
        if self.http is not None:
            self.http.stop()
            self.http = None

    def __enter__(self) -> Pipeline:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- observability -----------------------------------------------------------------------
    @property
    def fps(self) -> float:
        times = self._frame_times
        if len(times) < 2:
            return 0.0
        now = time.monotonic()
        recent = [t for t in times if now - t <= 5.0]
        if len(recent) < 2:
            return 0.0
        return (len(recent) - 1) / max(recent[-1] - recent[0], 1e-6)

    def health(self) -> dict[str, Any]:
        src = self.source
        state = src.state if src is not None else "idle"
        kafka = self.publisher.snapshot()
        ok = self._error is None and state in ("idle", "connecting", "ok", "reconnecting", "eof")
        degraded = [r for r, bad in (("source " + state, state != "ok"), ("kafka " + kafka["state"],
                                                                          kafka["state"] != "direct")) if bad]
        return {"ok": ok, "running": self._running, "degraded": degraded, "error": self._error,
                "source": state, "kafka": kafka["state"], "fps": round(self.fps, 2)}

    def telemetry(self) -> dict[str, Any]:
        src = self.source
        det = self._detector
        n = max(self.frames_processed, 1)
        health = self.health()
        return {
            "health": "error" if not health["ok"] else ("degraded" if health["degraded"] else "ok"),
            "health_detail": health["error"] or ", ".join(health["degraded"]),
            "device_id": self.cfg.device_id,
            "camera_id": self.cfg.camera_id,
            "uptime_s": round(time.monotonic() - self._started, 1),
            "running": self._running,
            "error": self._error,
            "fps": round(self.fps, 2),
            "frames_processed": self.frames_processed,
            "frames_dropped": self.frames_dropped,
            "latency_ms": {s: round(e.value * 1000, 2) for s, e in self._lat.items() if e.value is not None},
            "queue_depth": src.queue_depth if src is not None else 0,
            "tracks_active": len(self.tracker.active_track_ids) if self.tracker is not None else 0,
            "bytes_per_frame": round(self.bytes_produced / n, 1),
            "model": {"id": det.model_id, "version": det.model_version} if det is not None else None,
            "source": {
                "url": src.display_url if src is not None else None,
                "kind": src.kind if src is not None else classify(self.cfg.source.url),
                "state": src.state if src is not None else "idle",
                "last_error": src.last_error if src is not None else None,
                "reconnects": src.reconnects if src is not None else 0,
                "fps": src.fps if src is not None else None,
                "resolution_wh": list(src.resolution_wh) if src is not None and src.resolution_wh else None,
            },
            "kafka": self.publisher.snapshot(),
        }

    # -- ApplianceControl -------------------------------------------------------------------
    def current_settings(self) -> dict[str, Any]:
        return live_settings(self.cfg)

    def apply_settings(self, settings: dict[str, Any]) -> dict[str, Any]:
        if isinstance(settings, dict) and isinstance(settings.get("detector"), dict) and (
            "model_dir" in settings["detector"]
        ):
            raise ConfigError("settings", ["detector.model_dir: the model is managed by OTA (load_model), "
                                           "not by config"])
        new_cfg = merge_settings(self.cfg, settings)
        new_url = new_cfg.source.url
        if new_cfg.source != self.cfg.source and classify(new_url) == "file" and not Path(new_url).is_file():
            raise ConfigError("settings", [f"source.url: video file not found: {new_cfg.source.url}"])
        if new_cfg.detector != self.cfg.detector:
            try:
                detector = build_detector(new_cfg.detector)  # loads fully before anything changes
            except Exception as exc:
                raise ConfigError("settings", [f"detector: cannot load: {exc}"]) from exc
            self._queue_detector(detector, new_cfg)
        with self._lock:
            if new_cfg.source != self.cfg.source:
                self._source_changed = True
            # one reference swap: the loop reads self.cfg once per frame
            self.cfg = new_cfg
        log.info("settings applied", extra={"sections": ",".join(sorted(settings))})
        return self.current_settings()

    def _queue_detector(self, detector: Detector, new_cfg: ApplianceConfig) -> None:
        with self._lock:
            previous, self._pending_detector = self._pending_detector, (detector, new_cfg)
        if previous is not None:
            _retire(previous[0])
        if not self._running:  # not looping: swap now
            with self._lock:
                pending, self._pending_detector = self._pending_detector, None
            if pending is not None:
                self._swap_detector(*pending)

    def load_model(self, model_dir: Path) -> None:
        new_detector_cfg = self.cfg.detector.model_copy(update={"model_dir": Path(model_dir)})
        new_cfg = self.cfg.model_copy(update={"detector": new_detector_cfg})
        detector = build_detector(new_detector_cfg)  # raises, old detector untouched
        self._queue_detector(detector, new_cfg)
