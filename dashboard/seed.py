"""Fill the server's stores for the dashboard: from a real pipeline run, or a realistic synthetic week.

``python -m dashboard.seed pipeline`` runs the real system on the shared videos: one appliance
process per video (OpenVINO YOLO11n + ByteTrack, best-shot crops) sends to Kafka (an embedded tansu
broker unless ``--kafka`` names one), and the real server consumer (``server.consume.ReidConsumer``:
embedding, gender, identity matching) writes the analytics store and the Qdrant gallery. The
dashboard then shows real tracks, identities and paths, and search-by-image finds real people.

``python -m dashboard.seed synthetic --days 7`` writes what the
server would have written for a small shop with three cameras (entrance, aisle, checkout): opening
hours 09–20 with lunch and evening peaks, visitors who walk entrance → aisle → checkout with
log-normal dwell times, some regulars who come back on other days, a gender estimate per identity,
and people in the shop right now (open tracks ending at ``--now``). Rows go through
``server.store.AnalyticsStore.write`` (the same upserts and transition bookkeeping the consumer
uses), so the dashboard is tested against the real schema and write path, not a copy of it.
Deterministic for a given ``--seed`` and ``--now``.
"""

from __future__ import annotations

import argparse
import math
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np

from common.logs import setup_logging

US = 1_000_000
NS = uuid.UUID("6f1d2c1e-0000-4000-8000-00000000d5b0")
CAMERAS = (("shop-01", "entrance"), ("shop-01", "aisle"), ("shop-02", "checkout"))
OPEN_H, CLOSE_H = 9, 20


@dataclass
class SeedSummary:
    identities: int
    tracks: int
    sightings: int
    visits: int
    open_tracks: int


def _arrival_rate(hour: float) -> float:
    """Visitors per hour: a base load plus lunch and after-work peaks."""
    if not OPEN_H <= hour < CLOSE_H:
        return 0.0
    return 6.0 + 14.0 * math.exp(-((hour - 12.5) ** 2) / 1.5) + 18.0 * math.exp(-((hour - 17.5) ** 2) / 1.2)


def seed_store(store_url: str, *, days: int = 7, now_us: int | None = None, tz: str = "UTC", seed: int = 7,
               bucket_s: int = 10, scale: float = 1.0) -> SeedSummary:
    """Write ``days`` days ending at ``now_us`` into the store; returns what was written."""
    from server.store import AnalyticsStore, BatchWrite

    rng = np.random.default_rng(seed)
    now_us = now_us or int(time.time() * US)
    zone = ZoneInfo(tz)
    now = datetime.fromtimestamp(now_us / US, zone)
    first_day = (now - timedelta(days=days - 1)).date()
    store = AnalyticsStore(store_url)
    regulars = [str(uuid.uuid5(NS, f"regular-{i}")) for i in range(max(3, int(25 * scale)))]
    regular_gender = {g: float(rng.beta(0.6, 0.6)) for g in regulars}
    n_ident = n_tracks = n_sight = n_visits = n_open = 0
    frame_index = {cam: 0 for cam in CAMERAS}
    cam_first: dict[tuple[str, str], int] = {}
    cam_last: dict[tuple[str, str], int] = {}
    local_track = {cam: 0 for cam in CAMERAS}
    seen_ident: set[str] = set()

    for d in range(days):
        day = first_day + timedelta(days=d)
        batch = BatchWrite()
        # Thinned Poisson arrivals over the opening hours, minute resolution.
        for minute in range(OPEN_H * 60, CLOSE_H * 60):
            t_local = datetime.combine(day, datetime.min.time(), zone) + timedelta(minutes=minute)
            start_us = int(t_local.timestamp() * US) + int(rng.integers(0, 60 * US))
            if start_us > now_us:
                break
            if rng.random() >= _arrival_rate(minute / 60.0) * scale / 60.0:
                continue
            n_visits += 1
            regular = rng.random() < 0.2
            gid = regulars[int(rng.integers(len(regulars)))] if regular else str(uuid.uuid5(NS, f"v-{day}-{minute}"))
            male_p = regular_gender.get(gid, float(rng.beta(0.6, 0.6)))
            path = [CAMERAS[0]]
            if rng.random() < 0.75:
                path.append(CAMERAS[1])
            if rng.random() < 0.6:
                path.append(CAMERAS[2])
            if len(path) > 1 and rng.random() < 0.5:
                path.append(CAMERAS[0])  # seen again on the way out
            t = start_us
            for step, cam in enumerate(path):
                dwell_s = float(rng.lognormal(mean=math.log(45 if cam[1] == "entrance" else 150), sigma=0.6))
                first_us, last_us = t, t + int(dwell_s * US)
                ended = True
                if last_us >= now_us:  # still in view: an open track ending at now
                    last_us, ended = now_us, False
                    n_open += 1
                local_track[cam] += 1
                uid = str(uuid.uuid5(NS, f"{cam}-{local_track[cam]}-{first_us}"))
                fi0 = frame_index[cam]
                frame_index[cam] += max(1, int((last_us - first_us) / US * 10))
                batch.tracks[uid] = {
                    "track_uid": uid, "device_id": cam[0], "camera_id": cam[1], "track_id": local_track[cam],
                    "global_id": gid, "first_seen_us": first_us, "last_seen_us": last_us,
                    "first_frame_index": fi0, "last_frame_index": frame_index[cam], "n_crops": int(rng.integers(1, 4)),
                    "male_probability": float(np.clip(male_p + rng.normal(0, 0.05), 0, 1)),
                    "match_similarity": None if gid not in seen_ident else float(rng.uniform(0.6, 0.9)),
                    "is_new_identity": gid not in seen_ident, "ended": ended,
                }
                batch.assignments[uid] = gid
                n_tracks += 1
                if gid not in seen_ident:
                    seen_ident.add(gid)
                    n_ident += 1
                    batch.identities[gid] = {
                        "global_id": gid, "embedder_id": "intel_0277_market_256x128", "first_seen_us": first_us,
                        "last_seen_us": last_us, "first_device_id": cam[0], "first_camera_id": cam[1],
                        "founding_track_uid": uid, "male_probability": male_p, "n_tracks": 1,
                    }
                else:
                    batch.merge_row(batch.identities, gid, {
                        "global_id": gid, "embedder_id": "intel_0277_market_256x128", "first_seen_us": first_us,
                        "last_seen_us": last_us, "first_device_id": cam[0], "first_camera_id": cam[1],
                        "founding_track_uid": uid, "male_probability": male_p, "n_tracks": step + 1,
                    })
                b = first_us // (bucket_s * US) * (bucket_s * US)
                while b <= last_us:
                    batch.sightings[(uid, b)] = {
                        "track_uid": uid, "bucket_start_us": b, "device_id": cam[0], "camera_id": cam[1],
                        "global_id": gid, "first_seen_us": max(b, first_us),
                        "last_seen_us": min(b + bucket_s * US - 1, last_us)}
                    n_sight += 1
                    b += bucket_s * US
                cam_first[cam] = min(cam_first.get(cam, first_us), first_us)
                cam_last[cam] = max(cam_last.get(cam, last_us), last_us)
                if not ended:
                    break
                t = last_us + int(rng.uniform(5, 40) * US)  # walking to the next camera
        for cam in CAMERAS:
            if cam in cam_first:
                batch.cameras[cam] = {"device_id": cam[0], "camera_id": cam[1], "frame_width": 1920,
                                      "frame_height": 1080, "first_frame_at_us": cam_first[cam],
                                      "last_frame_at_us": now_us,  # cameras stream while nobody is in view
                                      "last_frame_index": frame_index[cam]}
        store.write(batch)
    store.close()
    return SeedSummary(n_ident, n_tracks, n_sight, n_visits, n_open)


DEFAULT_VIDEOS = (("videos/PETS09-S2L1_frames0001-0300.mp4", "shop-01", "entrance"),
                  ("videos/one-by-one-person-detection.mp4", "shop-02", "checkout"))


def seed_from_pipeline(store_url: str, qdrant_path: str, *, videos: Sequence[tuple[str, str, str]] = DEFAULT_VIDEOS,
                       kafka: str | None = None, assets: str | None = None, work_dir: str | Path | None = None,
                       quiet_s: float = 8.0, timeout_s: float = 900.0) -> dict[str, Any]:
    """Run appliances on ``videos`` ((path relative to the data folder or absolute, device id, camera id))
    into the real server consumer; returns counts. The consumer stops once the appliances have exited
    and it has processed nothing new for ``quiet_s``."""
    import subprocess
    import sys
    import tempfile
    import threading

    from common.assets import data_path, require
    from common.kafka import ensure_topics
    from common.tansu import EmbeddedKafka
    from server.config import ServerConfig
    from server.consume import ReidConsumer

    work = Path(work_dir or tempfile.mkdtemp(prefix="reidfleet-seed-"))
    work.mkdir(parents=True, exist_ok=True)
    broker = None
    if kafka is None:
        broker = EmbeddedKafka(log_file=work / "tansu.log").start()
        kafka = broker.bootstrap
    try:
        ensure_topics(kafka)
        cfg = ServerConfig.model_validate({
            "kafka": {"bootstrap": kafka, "group_id": f"dashboard-seed-{uuid.uuid4().hex[:6]}"},
            "vectors": {"type": "qdrant_local", "path": qdrant_path},
            "store": {"url": store_url}, "health": {"port": 0}, "assets": assets})
        consumer = ReidConsumer(cfg)
        thread = threading.Thread(target=consumer.run, name="seed-consumer", daemon=True)
        thread.start()
        procs = []
        for rel, device, camera in videos:
            path = Path(rel) if Path(rel).is_absolute() else data_path(*Path(rel).parts, assets=assets)
            require(path, f"video for camera {camera}")
            log_fh = (work / f"appliance-{camera}.log").open("wb")
            cmd = [sys.executable, "-m", "appliance", "run", "--set", f"source.url={path}",
                   "--set", f"device_id={device}", "--set", f"camera_id={camera}", "--set", f"kafka.bootstrap={kafka}",
                   "--set", f"spool.dir={work / ('spool-' + camera)}", "--set", "http.port=0"]
            if assets:
                cmd += ["--set", f"detector.model_dir={Path(assets) / 'models' / 'yolo11n_int8_openvino_model'}"]
            procs.append((camera, subprocess.Popen(cmd, stdout=log_fh, stderr=subprocess.STDOUT)))
            log_fh.close()
        deadline = time.monotonic() + timeout_s
        for camera, proc in procs:
            rc = proc.wait(max(1.0, deadline - time.monotonic()))
            if rc != 0:
                raise RuntimeError(f"appliance for {camera} exited with {rc}; see {work}/appliance-{camera}.log")
        ok, dlq = consumer.metrics.messages.labels("ok"), consumer.metrics.messages.labels("dlq")
        last, since = -1.0, time.monotonic()
        while time.monotonic() < deadline:
            done = ok._value.get() + dlq._value.get()
            if done != last:
                last, since = done, time.monotonic()
            elif done > 0 and time.monotonic() - since > quiet_s:
                break
            time.sleep(0.5)
        consumer.stop.set()
        thread.join(60)
        return {"frames": int(ok._value.get()), "dead_letters": int(dlq._value.get()),
                "tracks": consumer.store.count("tracks") if hasattr(consumer.store, "count") else None,
                "work_dir": str(work)}
    finally:
        if broker is not None:
            broker.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dashboard.seed", description=__doc__.split("\n\n")[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--store", default="sqlite:///./var/server/analytics.db", help="analytics store URL")
    sub = ap.add_subparsers(dest="mode", required=True)
    pipe = sub.add_parser("pipeline", parents=[common],
                          help="run appliances on the shared videos into the real server consumer")
    pipe.add_argument("--qdrant", default="./var/server/qdrant", help="Qdrant local folder (the server's)")
    pipe.add_argument("--kafka", default=None, help="bootstrap of a running broker (default: an embedded one)")
    pipe.add_argument("--assets", default=None, help="shared assets folder (default ../shared/assets)")
    pipe.add_argument("--video", action="append", default=[], metavar="PATH:DEVICE:CAMERA",
                      help="a video and the camera it plays (repeatable; default: the two shared videos)")
    syn = sub.add_parser("synthetic", parents=[common], help="a realistic shop week through the server's store API")
    syn.add_argument("--days", type=int, default=7)
    syn.add_argument("--timezone", default="UTC")
    syn.add_argument("--seed", type=int, default=7)
    syn.add_argument("--scale", type=float, default=1.0, help="multiply the visitor rate")
    syn.add_argument("--now", type=float, default=None, help="end of the data, epoch seconds (default: now)")
    args = ap.parse_args(argv)
    setup_logging("dashboard-seed", "WARNING", json_lines=False)
    if args.mode == "pipeline":
        videos = [tuple(v.rsplit(":", 2)) for v in args.video] or list(DEFAULT_VIDEOS)
        if any(len(v) != 3 for v in videos):
            ap.error("--video takes PATH:DEVICE:CAMERA")
        result = seed_from_pipeline(args.store, args.qdrant, videos=videos, kafka=args.kafka,  # type: ignore[arg-type]
                                    assets=args.assets)
        print(f"seeded {args.store} and {args.qdrant} from a pipeline run: {result}")
        return 0
    summary = seed_store(args.store, days=args.days, tz=args.timezone, seed=args.seed, scale=args.scale,
                         now_us=int(args.now * US) if args.now else None)
    print(f"seeded {args.store}: {summary}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
