"""Fill an analytics store with a realistic shop week, through the server's own store API.

``python -m dashboard.seed --store sqlite:///./var/server/analytics.db --days 7`` writes what the
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
from dataclasses import dataclass
from datetime import datetime, timedelta
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dashboard.seed", description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", default="sqlite:///./var/server/analytics.db", help="analytics store URL")
    ap.add_argument("--days", type=int, default=7)
    ap.add_argument("--timezone", default="UTC")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--scale", type=float, default=1.0, help="multiply the visitor rate")
    ap.add_argument("--now", type=float, default=None, help="end of the data, epoch seconds (default: now)")
    args = ap.parse_args(argv)
    setup_logging("dashboard-seed", json_lines=False)
    summary = seed_store(args.store, days=args.days, tz=args.timezone, seed=args.seed, scale=args.scale,
                         now_us=int(args.now * US) if args.now else None)
    print(f"seeded {args.store}: {summary}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
