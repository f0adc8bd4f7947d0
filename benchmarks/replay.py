"""Record real appliance output once, then play it back into ``reid_input`` as N cameras at a real frame rate.

Why a replay and not N appliances: one appliance costs a CPU core for detection, so a load test of the
server with 100 cameras would need 100 cores. The server only ever sees ``edge_frame`` messages, so the
messages of a real appliance run (the real detector, tracker and best-shot crops on the shared videos)
played back with fresh ids and capture times are the same load for the server.

``python -m benchmarks.replay record``: runs the real appliance (``python -m appliance run``, as a
process) on each shared sample video into an embedded broker and saves its messages to
``var/replay/<video>.edgeframes`` (gitignored; the videos' terms forbid redistribution).

``python -m benchmarks.replay play --cameras N --fps 15 --duration-s 60``: camera *i* plays recording
``i mod len(recordings)`` from a staggered start, as device ``<prefix>-<i>``, with ``frame_index``
counting up, ``captured_at_us``/``sent_at_us`` stamped at send time, and track ids shifted by 10^6 on each
pass through the recording (what the appliance does on a tracker restart), so ids never repeat. Each
camera's frames are due at ``start + phase_i + k / fps``; one JSON progress line per second goes to stdout
(``produced``, ``acked``, ``behind_s``: how late the player itself is, so a saturated player is visible).

File format: ``REIDREPLAY1\\n`` + a JSON header line, then records of 4-byte big-endian length + the
original Avro message value.
"""

from __future__ import annotations

import argparse
import heapq
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.assets import REPO_ROOT, data_path, require

log = logging.getLogger(__name__)

MAGIC = b"REIDREPLAY1\n"
DEFAULT_DIR = REPO_ROOT / "var" / "replay"
VIDEOS = ("one-by-one-person-detection.mp4", "PETS09-S2L1_frames0001-0300.mp4")
TRACK_PASS_SPAN = 1_000_000  # same span as a tracker restart on the appliance (appliance.pipeline.TRACK_ID_SPAN)


@dataclass
class Recording:
    name: str
    source_fps: float
    frames: list[dict[str, Any]]

    @property
    def crops(self) -> int:
        return sum(len(f["crops"]) for f in self.frames)


def write_recording(path: Path, values: list[bytes], header: dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "wb") as f:
        f.write(MAGIC)
        f.write(json.dumps(header).encode() + b"\n")
        for v in values:
            f.write(len(v).to_bytes(4, "big"))
            f.write(v)
    os.replace(tmp, path)


def read_recording(path: Path) -> Recording:
    """Load and decode one recording; a truncated or foreign file fails with the path in the message."""
    from schemas.codec import AvroCodec, CodecError

    codec = AvroCodec("edge_frame")
    data = Path(path).read_bytes()
    if not data.startswith(MAGIC):
        raise ValueError(f"{path}: not a reidfleet replay file (missing {MAGIC!r} header)")
    nl = data.index(b"\n", len(MAGIC))
    header = json.loads(data[len(MAGIC):nl])
    pos, frames = nl + 1, []
    while pos < len(data):
        if pos + 4 > len(data):
            raise ValueError(f"{path}: truncated record length at byte {pos}")
        n = int.from_bytes(data[pos:pos + 4], "big")
        if pos + 4 + n > len(data):
            raise ValueError(f"{path}: record at byte {pos} claims {n} bytes, file ends first")
        try:
            frames.append(codec.decode(data[pos + 4:pos + 4 + n]))
        except CodecError as exc:
            raise ValueError(f"{path}: record {len(frames)} does not decode: {exc}") from exc
        pos += 4 + n
    if not frames:
        raise ValueError(f"{path}: recording holds no frames")
    return Recording(header.get("name", path.stem), float(header.get("source_fps", 0) or 0), frames)


def load_recordings(folder: Path) -> list[Recording]:
    files = sorted(Path(folder).glob("*.edgeframes"))
    if not files:
        raise FileNotFoundError(f"no recordings in {folder}; run `python -m benchmarks.replay record` first")
    return [read_recording(f) for f in files]


# --- record -------------------------------------------------------------------------------------
def record(assets: str | None, out_dir: Path, videos: tuple[str, ...] = VIDEOS, timeout_s: float = 1200) -> list[Path]:
    """Run the real appliance on each video (full speed) into an embedded broker; save what it sent."""
    import cv2
    from confluent_kafka import Consumer

    from common.kafka import consumer_config, ensure_topics
    from common.tansu import EmbeddedKafka
    from schemas.topics import TopicSpec

    out: list[Path] = []
    with tempfile.TemporaryDirectory(prefix="reidfleet-record-") as tmp, \
            EmbeddedKafka(log_file=Path(tmp) / "tansu.log") as broker:
        for i, name in enumerate(videos):
            video = require(data_path("videos", name, assets=assets), f"sample video {name}")
            cap = cv2.VideoCapture(str(video))
            fps = float(cap.get(cv2.CAP_PROP_FPS) or 0)
            cap.release()
            topic = f"record{i}"
            ensure_topics(broker.bootstrap, [TopicSpec(topic, 1, 1)])
            device = f"rec-{Path(name).stem[:40]}".replace(" ", "_")
            cmd = [sys.executable, "-m", "appliance", "run", "--set", f"source.url={video}",
                   "--set", f"kafka.bootstrap={broker.bootstrap}", "--set", f"kafka.topic={topic}",
                   "--set", f"spool.dir={Path(tmp) / f'spool{i}'}", "--set", "http.port=0",
                   "--set", f"device_id={device[:63]}", "--set", "camera_id=cam-1"]
            log.info("recording %s (the real appliance, full speed)", name)
            t0 = time.monotonic()
            env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "REIDFLEET_LOG_FORMAT": "text"}
            with open(Path(tmp) / f"appliance{i}.log", "wb") as logf:
                rc = subprocess.run(cmd, cwd=tmp, env=env, stdout=logf, stderr=subprocess.STDOUT,
                                    timeout=timeout_s).returncode
            if rc != 0:
                raise RuntimeError(f"appliance exited {rc} on {name}: "
                                   f"{(Path(tmp) / f'appliance{i}.log').read_text()[-2000:]}")
            c = Consumer(consumer_config(broker.bootstrap, f"rec-{i}", "recorder"))
            c.subscribe([topic])
            values: list[bytes] = []
            idle_since = time.monotonic()
            while time.monotonic() - idle_since < 5.0:
                m = c.poll(0.5)
                if m is not None and m.error() is None:
                    values.append(m.value())
                    idle_since = time.monotonic()
            c.close()
            path = out_dir / f"{Path(name).stem}.edgeframes"
            write_recording(path, values, {"name": Path(name).stem, "video": name, "source_fps": fps,
                                           "frames": len(values), "recorded_at": time.time()})
            log.info("recorded %d frames of %s in %.0f s -> %s", len(values), name, time.monotonic() - t0, path)
            out.append(path)
    return out


def ensure_recordings(assets: str | None, folder: Path = DEFAULT_DIR) -> list[Recording]:
    if not list(Path(folder).glob("*.edgeframes")):
        record(assets, Path(folder))
    return load_recordings(folder)


# --- play ---------------------------------------------------------------------------------------
def _shift(tid: int, shift: int) -> int:
    return tid + shift if tid >= 0 else tid


def restamp(frame: dict[str, Any], device_id: str, camera_id: str, frame_index: int, passes: int,
            now_us: int) -> dict[str, Any]:
    """The recorded frame as camera ``device_id`` sends it now (ids shifted per pass: no track id repeats)."""
    s = passes * TRACK_PASS_SPAN
    out = dict(frame)
    out.update(device_id=device_id, camera_id=camera_id, frame_index=frame_index, captured_at_us=now_us,
               sent_at_us=now_us, dropped_frames=0)
    out["detections"] = [{**d, "track_id": _shift(d["track_id"], s)} for d in frame["detections"]]
    out["crops"] = [{**c, "track_id": _shift(c["track_id"], s)} for c in frame["crops"]]
    out["ended_track_ids"] = [_shift(t, s) for t in frame["ended_track_ids"]]
    return out


class Player:
    """Plays ``cameras`` cameras at ``fps`` into ``topic`` (key = device id, like the appliance)."""

    def __init__(self, bootstrap: str, topic: str, recordings: list[Recording], cameras: int, fps: float, *,
                 prefix: str = "replay", first_camera: int = 0, camera_id: str = "cam-1",
                 linger_ms: float | None = None) -> None:
        from confluent_kafka import Producer

        from common.kafka import producer_config
        from schemas.codec import AvroCodec

        if cameras < 1 or fps <= 0 or not recordings:
            raise ValueError("need cameras >= 1, fps > 0 and at least one recording")
        self.topic, self.recordings, self.cameras, self.fps = topic, recordings, cameras, fps
        self.prefix, self.first_camera, self.camera_id = prefix, first_camera, camera_id
        self.codec = AvroCodec("edge_frame")
        overrides = {} if linger_ms is None else {"linger.ms": linger_ms}  # default: the appliances' own
        self.producer = Producer(producer_config(bootstrap, f"replay-{prefix}", **overrides))
        self.produced = 0
        self.acked = 0
        self.errors = 0
        self.crops = 0
        self.behind_s = 0.0

    def _delivered(self, err: Any, _msg: Any) -> None:
        if err is None:
            self.acked += 1
        else:
            self.errors += 1

    def device(self, i: int) -> str:
        return f"{self.prefix}-{self.first_camera + i:04d}"

    def run(self, duration_s: float, should_stop: Callable[[], bool] = lambda: False,
            on_progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        n, period = self.cameras, 1.0 / self.fps
        start = time.monotonic() + 0.2
        end = start + duration_s
        # camera i: recording i mod R, starting at a staggered frame so cameras are not in lock-step
        heap = [(start + (i / n) * period, i, 0) for i in range(n)]
        heapq.heapify(heap)
        offsets = [(i // len(self.recordings)) * 37 % len(self.recordings[i % len(self.recordings)].frames)
                   for i in range(n)]
        next_report = start + 1.0
        while heap and not should_stop():
            due, i, k = heap[0]
            if due >= end:
                break
            now = time.monotonic()
            if due > now:
                self.producer.poll(min(due - now, 0.05))
                if on_progress and time.monotonic() >= next_report:
                    next_report += 1.0
                    on_progress(self.snapshot(time.monotonic() - start))
                continue
            heapq.heapreplace(heap, (due + period, i, k + 1))
            self.behind_s = max(0.0, now - due)
            rec = self.recordings[i % len(self.recordings)]
            pos = offsets[i] + k
            frame = rec.frames[pos % len(rec.frames)]
            msg = restamp(frame, self.device(i), self.camera_id, k, pos // len(rec.frames), time.time_ns() // 1000)
            value = self.codec.encode(msg)
            while True:
                try:
                    self.producer.produce(self.topic, value=value, key=msg["device_id"].encode(),
                                          on_delivery=self._delivered)
                    break
                except BufferError:
                    self.producer.poll(0.05)
            self.produced += 1
            self.crops += len(msg["crops"])
            self.producer.poll(0)
            if on_progress and now >= next_report:
                next_report += 1.0
                on_progress(self.snapshot(now - start))
        self.producer.flush(30)
        snap = self.snapshot(time.monotonic() - start)
        if on_progress:
            on_progress(snap)
        return snap

    def snapshot(self, t: float) -> dict[str, Any]:
        return {"t": round(t, 3), "produced": self.produced, "acked": self.acked, "errors": self.errors,
                "crops": self.crops, "behind_s": round(self.behind_s, 3)}


def iter_records(path: Path) -> Iterator[bytes]:
    """Raw message values of a recording (for tools that want the bytes, not records)."""
    data = Path(path).read_bytes()
    nl = data.index(b"\n", len(MAGIC))
    pos = nl + 1
    while pos + 4 <= len(data):
        n = int.from_bytes(data[pos:pos + 4], "big")
        yield data[pos + 4:pos + 4 + n]
        pos += 4 + n


def main(argv: list[str] | None = None) -> int:
    from common.logs import setup_logging

    p = argparse.ArgumentParser(prog="python -m benchmarks.replay", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("record", help="run the real appliance on the shared videos and save its messages")
    r.add_argument("--assets", default=None, help="shared assets folder (default ../shared/assets)")
    r.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="where recordings go (default var/replay)")
    pl = sub.add_parser("play", help="play the recordings as N cameras into reid_input")
    pl.add_argument("--bootstrap", default="127.0.0.1:9092")
    pl.add_argument("--topic", default="reid_input")
    pl.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    pl.add_argument("--cameras", type=int, default=4)
    pl.add_argument("--first-camera", type=int, default=0, help="number of the first camera (split across players)")
    pl.add_argument("--fps", type=float, default=15.0)
    pl.add_argument("--duration-s", type=float, default=60.0)
    pl.add_argument("--prefix", default="replay", help="device id prefix")
    pl.add_argument("--linger-ms", type=float, default=None, help="producer linger.ms (default: the appliances')")
    a = p.parse_args(argv)
    setup_logging("replay")
    if a.command == "record":
        for path in record(a.assets, a.dir):
            print(path)
        return 0
    from common.service import StopSignal

    stop = StopSignal()
    player = Player(a.bootstrap, a.topic, load_recordings(a.dir), a.cameras, a.fps, prefix=a.prefix,
                    first_camera=a.first_camera, linger_ms=a.linger_ms)
    player.run(a.duration_s, stop.is_set, lambda s: print(json.dumps(s), flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
