"""The Live page's data: the newest frame (or crops) per camera, with boxes and global ids.

It reads the two Kafka topics the system already has instead of asking the server for images:
``reid_input`` carries each camera's boxes every frame, a crop when a track starts or improves, and
a rate-limited full JPEG in full-frame mode; ``reid_output`` carries the global id of each local
track. A :class:`LiveFeed` thread keeps only the latest state per camera in memory (nothing is
written anywhere, so privacy retention does not apply to it), and :func:`render_camera` draws it:
the real frame when one arrived recently, otherwise a "crop canvas" that pastes each visible
track's latest crop into its current box. No Streamlit import: the page only calls
:meth:`LiveFeed.snapshot` and :func:`render_camera`, so both are tested without a browser.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from schemas.codec import AvroCodec, CodecError
from schemas.topics import REID_INPUT, REID_OUTPUT

log = logging.getLogger(__name__)

FRAME_STALE_S = 10.0  # a full frame older than this is replaced by the crop canvas
TRACK_STALE_S = 5.0  # boxes not refreshed for this long are dropped from the picture


@dataclass
class TrackView:
    track_id: int
    xyxy: tuple[float, float, float, float]
    score: float
    seen_at_us: int
    crop_jpeg: bytes | None = None
    global_id: str | None = None


@dataclass
class CameraView:
    """Latest known state of one camera (copied out of the feed under its lock)."""

    camera_id: str
    device_id: str
    frame_index: int = -1
    captured_at_us: int = 0
    frame_wh: tuple[int, int] = (0, 0)
    model_version: str = ""
    tracks: dict[int, TrackView] = field(default_factory=dict)
    frame_jpeg: bytes | None = None
    frame_boxes: list[tuple[int, tuple[float, float, float, float]]] = field(default_factory=list)
    frame_at_us: int = 0
    received_at: float = 0.0

    def copy(self) -> CameraView:
        return CameraView(self.camera_id, self.device_id, self.frame_index, self.captured_at_us, self.frame_wh,
                          self.model_version, {k: TrackView(**vars(v)) for k, v in self.tracks.items()},
                          self.frame_jpeg, list(self.frame_boxes), self.frame_at_us, self.received_at)


class LiveState:
    """Per-camera latest state, fed by decoded ``EdgeFrame`` and ``ReidResult`` records."""

    def __init__(self, max_track_ids: int = 2_000) -> None:
        self._cams: dict[str, CameraView] = {}
        self._gids: dict[tuple[str, int], str] = {}  # (camera, local track) -> global id
        self._max_track_ids = max_track_ids
        self._lock = threading.Lock()
        self.messages = 0
        self.errors = 0

    def apply_edge_frame(self, rec: dict[str, Any]) -> None:
        now_us = int(rec["captured_at_us"])
        with self._lock:
            self.messages += 1
            cam = self._cams.get(rec["camera_id"])
            if cam is None:
                cam = self._cams[rec["camera_id"]] = CameraView(rec["camera_id"], rec["device_id"])
            if rec["frame_index"] < cam.frame_index and now_us <= cam.captured_at_us:
                return  # an older frame (replay, reordering): keep the newer state
            cam.device_id = rec["device_id"]
            cam.frame_index = int(rec["frame_index"])
            cam.captured_at_us = now_us
            cam.frame_wh = (int(rec["frame_width"]), int(rec["frame_height"]))
            cam.model_version = rec.get("model_version", "")
            crops = {int(c["track_id"]): c["jpeg"] for c in rec.get("crops") or []}
            boxes = []
            for d in rec["detections"]:
                if d["class_id"] != 0 or d["track_id"] < 0:
                    continue
                tid = int(d["track_id"])
                xyxy = (float(d["x1"]), float(d["y1"]), float(d["x2"]), float(d["y2"]))
                boxes.append((tid, xyxy))
                tv = cam.tracks.get(tid)
                if tv is None:
                    tv = cam.tracks[tid] = TrackView(tid, xyxy, float(d["score"]), now_us)
                tv.xyxy, tv.score, tv.seen_at_us = xyxy, float(d["score"]), now_us
                if tid in crops:
                    tv.crop_jpeg = crops[tid]
                tv.global_id = self._gids.get((cam.camera_id, tid), tv.global_id)
            for tid in rec.get("ended_track_ids") or []:
                cam.tracks.pop(int(tid), None)
            for tid in [t for t, v in cam.tracks.items() if now_us - v.seen_at_us > TRACK_STALE_S * 1e6]:
                del cam.tracks[tid]
            if rec.get("frame_jpeg"):
                cam.frame_jpeg, cam.frame_boxes, cam.frame_at_us = rec["frame_jpeg"], boxes, now_us
            cam.received_at = time.time()

    def apply_reid_result(self, rec: dict[str, Any]) -> None:
        with self._lock:
            self.messages += 1
            cam_id = rec["camera_id"]
            cam = self._cams.get(cam_id)
            for p in rec["people"]:
                if not p.get("global_id"):
                    continue
                self._gids[(cam_id, int(p["track_id"]))] = p["global_id"]
                if cam is not None and int(p["track_id"]) in cam.tracks:
                    cam.tracks[int(p["track_id"])].global_id = p["global_id"]
            if len(self._gids) > self._max_track_ids:  # drop the oldest half (dicts keep insertion order)
                for key in list(self._gids)[: len(self._gids) // 2]:
                    del self._gids[key]

    def global_id(self, camera_id: str, track_id: int) -> str | None:
        with self._lock:
            return self._gids.get((camera_id, track_id))

    def snapshot(self) -> dict[str, CameraView]:
        with self._lock:
            return {k: v.copy() for k, v in sorted(self._cams.items())}


class LiveFeed:
    """A background Kafka reader (no consumer group: partitions are assigned, nothing is committed)."""

    def __init__(self, bootstrap: str, *, input_topic: str = REID_INPUT, output_topic: str = REID_OUTPUT,
                 start: str = "latest", lookback_s: float = 30.0) -> None:
        self.bootstrap = bootstrap
        self.topics = (input_topic, output_topic)
        self.start_mode = start
        self.lookback_s = lookback_s
        self.state = LiveState()
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dashboard-live-feed", daemon=True)
        self._codecs = {input_topic: AvroCodec("edge_frame"), output_topic: AvroCodec("reid_output")}

    def start(self) -> LiveFeed:
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout_s)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def snapshot(self) -> dict[str, CameraView]:
        return self.state.snapshot()

    def _assignments(self, consumer: Any) -> list[Any]:
        from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, TopicPartition

        md = consumer.list_topics(timeout=10)
        parts = []
        for topic in self.topics:
            if topic not in md.topics or md.topics[topic].error is not None:
                raise RuntimeError(f"topic {topic} does not exist on {self.bootstrap} yet (is the server running?)")
            parts += [TopicPartition(topic, p) for p in md.topics[topic].partitions]
        if self.start_mode == "earliest":
            return [TopicPartition(tp.topic, tp.partition, OFFSET_BEGINNING) for tp in parts]
        # Start a little in the past so a camera shows up at once instead of at its next full frame.
        since_ms = int((time.time() - self.lookback_s) * 1000)
        try:
            found = consumer.offsets_for_times([TopicPartition(tp.topic, tp.partition, since_ms) for tp in parts],
                                               timeout=10)
            return [TopicPartition(tp.topic, tp.partition, tp.offset if tp.offset >= 0 else OFFSET_END)
                    for tp in found]
        except Exception as exc:  # brokers without ListOffsets-by-time: start at the end
            log.info("offsets_for_times unsupported (%s); starting live feed at the end", exc)
            return [TopicPartition(tp.topic, tp.partition, OFFSET_END) for tp in parts]

    def _run(self) -> None:
        from confluent_kafka import Consumer, KafkaError

        consumer = None
        while not self._stop.is_set():
            try:
                if consumer is None:
                    consumer = Consumer({
                        "bootstrap.servers": self.bootstrap,
                        "group.id": f"reidfleet-dashboard-live-{uuid.uuid4().hex[:8]}",  # required, never joined
                        "enable.auto.commit": False,
                        "enable.auto.offset.store": False,
                        "fetch.max.bytes": 64 * 1024 * 1024,
                        "max.partition.fetch.bytes": 24 * 1024 * 1024,
                        "receive.message.max.bytes": 80 * 1024 * 1024,
                        "socket.timeout.ms": 10_000,
                    })
                    consumer.assign(self._assignments(consumer))
                    self.error = None
                for msg in consumer.consume(num_messages=500, timeout=0.5):
                    if msg.error():
                        if msg.error().code() != KafkaError._PARTITION_EOF:
                            self.error = f"Kafka: {msg.error()}"
                        continue
                    self._handle(msg.topic(), msg.value())
            except Exception as exc:  # broker down, topic missing: say so and retry, never die
                self.error = f"live feed from {self.bootstrap}: {exc}"
                log.warning("live feed error: %s", exc)
                if consumer is not None:
                    consumer.close()
                    consumer = None
                self._stop.wait(3.0)
        if consumer is not None:
            consumer.close()

    def _handle(self, topic: str, value: bytes | None) -> None:
        if not value:
            return
        try:
            rec = self._codecs[topic].decode(value)
        except (CodecError, KeyError) as exc:
            self.state.errors += 1
            log.debug("live feed skipped an undecodable message on %s: %s", topic, exc)
            return
        if topic == self.topics[0]:
            self.state.apply_edge_frame(rec)
        else:
            self.state.apply_reid_result(rec)


# --- drawing -------------------------------------------------------------------------------------

def _colour(key: str) -> tuple[int, int, int]:
    h = zlib.crc32(key.encode()) % 180  # stable across processes, unlike hash()
    hsv = np.uint8([[[h, 200, 255]]])
    b, g, r = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0]
    return int(b), int(g), int(r)


def short_id(global_id: str | None) -> str:
    return global_id[:8] if global_id else "?"


def _draw_boxes(img: np.ndarray, items: Iterable[tuple[str, tuple[float, float, float, float]]],
                scale: float) -> None:
    for label, (x1, y1, x2, y2) in items:
        p1, p2 = (int(x1 * scale), int(y1 * scale)), (int(x2 * scale), int(y2 * scale))
        col = _colour(label)
        cv2.rectangle(img, p1, p2, col, 2)
        (tw, th), _ = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, 0.5, 1)
        ty = max(th + 4, p1[1])
        cv2.rectangle(img, (p1[0], ty - th - 4), (p1[0] + tw + 4, ty), col, -1)
        cv2.putText(img, label, (p1[0] + 2, ty - 3), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)


def _decode(jpeg: bytes | None) -> np.ndarray | None:
    if not jpeg:
        return None
    img = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    return img


def render_camera(view: CameraView, *, blur: bool, max_width: int = 960,
                  now_us: int | None = None) -> tuple[np.ndarray, str]:
    """An RGB picture of the camera and a caption saying what it is (frame or crop canvas, age)."""
    from dashboard.privacy import blur_crop, blur_heads

    now_us = now_us or int(time.time() * 1e6)
    w, h = view.frame_wh if view.frame_wh[0] > 0 else (640, 360)
    scale = min(1.0, max_width / w)
    frame = _decode(view.frame_jpeg) if view.frame_jpeg and now_us - view.frame_at_us < FRAME_STALE_S * 1e6 else None
    if frame is not None:
        boxes = [xyxy for _, xyxy in view.frame_boxes]
        if blur:
            frame = blur_heads(frame, boxes)
        img = cv2.resize(frame, (int(w * scale), int(h * scale))) if scale < 1.0 else frame.copy()
        items = [(f"#{short_id(view.tracks[t].global_id if t in view.tracks else None)} t{t}", xyxy)
                 for t, xyxy in view.frame_boxes]
        _draw_boxes(img, items, scale)
        age = (now_us - view.frame_at_us) / 1e6
        caption = f"full frame {view.frame_index}, {age:.1f} s old, {len(view.frame_boxes)} people"
    else:
        img = np.full((int(h * scale), int(w * scale), 3), 40, np.uint8)
        for tv in view.tracks.values():
            crop = _decode(tv.crop_jpeg)
            if crop is None:
                continue
            if blur:
                crop = blur_crop(crop)
            x1, y1, x2, y2 = (round(v * scale) for v in tv.xyxy)
            x1, y1 = max(0, x1), max(0, y1)
            x2, y2 = min(img.shape[1], x2), min(img.shape[0], y2)
            if x2 - x1 >= 2 and y2 - y1 >= 2:
                img[y1:y2, x1:x2] = cv2.resize(crop, (x2 - x1, y2 - y1))
        _draw_boxes(img, [(f"#{short_id(tv.global_id)} t{tv.track_id}", tv.xyxy) for tv in view.tracks.values()],
                    scale)
        age = (now_us - view.captured_at_us) / 1e6 if view.captured_at_us else float("nan")
        caption = (f"crop view (no recent full frame), frame {view.frame_index}, {age:.1f} s old, "
                   f"{len(view.tracks)} people")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB), caption
