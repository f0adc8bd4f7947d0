"""`just eval-xcam [seq_a] [seq_b]`: cross-camera identity accuracy of the whole server on real appliance output.

Two "cameras" are two frame ranges of MOT15 sequences (default: PETS09-S2L1 frames 1-150 and 151-300 of the shared copy,
the same scene later on, so people leave and come back). ``--source appliance`` (default) runs the
appliance's own stages on every frame: the OpenVINO YOLO11n detector, the ByteTrack tracker, the best-shot
selector and the edge-frame encoder (appliance/detect, track.py, bestshot.py, encode.py, default
settings), exactly what an appliance would publish. ``--source gt`` builds the frames from ground-truth
boxes and ids instead (the old mode: a ceiling that ignores detector and tracker errors).
The frames go through a real tansu broker into the real ``ReidConsumer`` (decode, embed, gender, match,
SQLite, in-memory gallery); the global id of every track is read back from the analytics store.

Ground truth for appliance tracks: per frame, predicted boxes are matched one-to-one to ground-truth boxes
by IoU >= 0.5 (Hungarian on IoU); a track's ground-truth id is the majority of its matched frames. Tracks
that never match a ground-truth box (false positives) are left out of the score and counted.

Score: pairwise "same person" over tracks: precision = correct same-id pairs / pairs given one id,
recall = correct same-id pairs / pairs that are one person. Ours is beside the peer approach, plain
nearest-neighbour matching above the threshold (what the reference thesis does with Qdrant): the same
server with co-visibility exclusion, re-matching and gender turned off.

Threshold (no tuning on the reported split): ours runs at the embedder's shipped threshold, measured on
Market-1501 pairs (server/embed/calibration.py), unless ``--threshold`` gives one. ``--sweep 0.4,0.45,...``
scores each ``identity.match_threshold`` on the given sequences and names the best pairwise F1 (ties go to
the shipped one): a cross-check on TUD-Campus halves (``just eval-xcam TUD-Campus:1-35 TUD-Campus:36-71
--sweep ...``); docs/server.md records both runs.

Writes results/eval-xcam.json and .png; last line ``RESULT eval-xcam xcam_precision=.. xcam_recall=..``.
"""

from __future__ import annotations

import argparse
import configparser
import itertools
import json
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import sqlalchemy as sa

from common.assets import data_path, require


def parse_seq(spec: str) -> tuple[str, int | None, int | None]:
    """``NAME`` or ``NAME:first-last`` (1-based, inclusive)."""
    name, _, rng = spec.partition(":")
    if not rng:
        return name, None, None
    a, _, b = rng.partition("-")
    return name, int(a), int(b)


def load_gt(seq_dir: Path) -> dict[int, list[tuple[int, tuple[float, float, float, float]]]]:
    rows = np.loadtxt(seq_dir / "gt" / "gt.txt", delimiter=",", ndmin=2)
    by_frame: dict[int, list[tuple[int, tuple[float, float, float, float]]]] = defaultdict(list)
    for r in rows:
        if len(r) >= 7 and r[6] == 0:
            continue
        if len(r) == 9 and int(r[7]) != 1:  # MOT17 (9 columns): pedestrians only; MOT15 has 10
            continue
        f, tid, x, y, w, h = int(r[0]), int(r[1]), float(r[2]), float(r[3]), float(r[4]), float(r[5])
        by_frame[f].append((tid, (x, y, x + w, y + h)))
    return by_frame


def camera_frames(spec: str, camera: str, assets: str | None, t0_us: int) -> list[dict[str, Any]]:
    """Edge frames for one camera from ground truth (local track id = ground-truth id)."""
    from server.edge_records import Box, edge_frame, jpeg_bytes

    name, first, last = parse_seq(spec)
    seq_dir = require(data_path("mot15", "train", name, assets=assets), f"MOT15 sequence {name}")
    info = configparser.ConfigParser()
    info.read(seq_dir / "seqinfo.ini")
    fps = float(info["Sequence"]["frameRate"])
    length = int(info["Sequence"]["seqLength"])
    first, last = first or 1, min(last or length, length)
    gt = load_gt(seq_dir)
    frames: list[dict[str, Any]] = []
    best_area: dict[int, float] = {}
    last_crop: dict[int, int] = {}
    alive: set[int] = set()
    for k, f in enumerate(range(first, last + 1)):
        img = cv2.imread(str(seq_dir / "img1" / f"{f:06d}.jpg"))
        if img is None:
            raise FileNotFoundError(f"{seq_dir}/img1/{f:06d}.jpg")
        h, w = img.shape[:2]
        boxes = []
        now = set()
        for tid, (x1, y1, x2, y2) in gt.get(f, []):
            x1, y1, x2, y2 = max(0.0, x1), max(0.0, y1), min(float(w), x2), min(float(h), y2)
            if x2 - x1 < 4 or y2 - y1 < 8:
                continue
            now.add(tid)
            area = (x2 - x1) * (y2 - y1)
            crop = None
            reason = "NEW_TRACK" if tid not in best_area else "IMPROVED"
            if tid not in best_area or (area > 1.2 * best_area[tid] and k - last_crop[tid] >= 5):
                crop = jpeg_bytes(img[int(y1):int(y2), int(x1):int(x2)])
                best_area[tid], last_crop[tid] = area, k
            quality = min(1.0, area / (80.0 * 200.0))
            boxes.append(Box(tid, (x1, y1, x2, y2), 1.0, crop, quality, reason))
        ended = sorted(alive - now)
        for t in ended:  # a person who leaves and comes back is a new track, as on an appliance
            best_area.pop(t, None)
        alive = now
        frames.append(edge_frame(f"dev-{camera}", camera, k, t0_us + int(k * 1e6 / fps), boxes, (w, h), ended))
    # One last empty frame ends the tracks still open when the range ends.
    frames.append(edge_frame(f"dev-{camera}", camera, last - first + 1, t0_us + int((last - first + 1) * 1e6 / fps),
                             [], (frames[-1]["frame_width"], frames[-1]["frame_height"]), sorted(alive)))
    return frames


def appliance_frames(spec: str, camera: str, assets: str | None, t0_us: int
                     ) -> tuple[list[dict[str, Any]], dict[int, int], dict[str, Any]]:
    """Edge frames as an appliance makes them (detector, tracker, best shot, encoder with default settings),
    plus each local track's ground-truth id (IoU >= 0.5 per frame, majority over the track) and stats."""
    from appliance.bestshot import BestShot
    from appliance.bytetrack import iou_matrix, linear_assignment
    from appliance.config import SendingConfig
    from appliance.detect import build_detector
    from appliance.detect.base import DEFAULT_MODEL_DIR, DetectorConfig
    from appliance.encode import EdgeFrameEncoder
    from appliance.track import Tracker, TrackerConfig
    from appliance.types import Detections, Frame
    from common.assets import model_path

    name, first, last = parse_seq(spec)
    seq_dir = require(data_path("mot15", "train", name, assets=assets), f"MOT15 sequence {name}")
    info = configparser.ConfigParser()
    info.read(seq_dir / "seqinfo.ini")
    fps = float(info["Sequence"]["frameRate"])
    length = int(info["Sequence"]["seqLength"])
    first, last = first or 1, min(last or length, length)
    if first > last:
        raise ValueError(f"{spec}: empty frame range (the sequence has {length} frames)")
    gt = load_gt(seq_dir)
    detector = build_detector(DetectorConfig(model_dir=model_path(DEFAULT_MODEL_DIR, assets=assets)))
    tracker = Tracker(TrackerConfig(), fps)
    sending = SendingConfig()
    bestshot = BestShot(sending)
    encoder = EdgeFrameEncoder(f"dev-{camera}")
    votes: dict[int, dict[int, int]] = defaultdict(lambda: defaultdict(int))
    frames: list[dict[str, Any]] = []
    try:
        for k, f in enumerate(range(first, last + 1)):
            img = cv2.imread(str(seq_dir / "img1" / f"{f:06d}.jpg"))
            if img is None:
                raise FileNotFoundError(f"{seq_dir}/img1/{f:06d}.jpg")
            dets = detector.detect(img)
            tracked = tracker.update(dets)
            ended = list(tracker.ended_track_ids)
            now_s = k / fps
            frame = Frame(camera, k, (t0_us + int(k * 1e6 / fps)) * 1000, img)
            picks = bestshot.select(img, tracked, now_s, ended)
            rec, _, _ = encoder.record(frame, tracked, picks, ended, detector.model_id, detector.model_version,
                                       sending, now_s)
            frames.append(rec)
            g = gt.get(f, [])
            keep = tracked.tracker_id >= 0
            if g and keep.any():
                iou = iou_matrix(tracked.xyxy[keep].astype(np.float64), np.array([b for _, b in g], np.float64))
                rows, cols = linear_assignment(1.0 - iou)
                tids = tracked.tracker_id[keep]
                for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
                    if iou[r, c] >= 0.5:
                        votes[int(tids[r])][g[c][0]] += 1
        # The sequence ends: every track still alive ends too.
        last_k = last - first + 1
        alive = list(tracker.active_track_ids)
        frames.append(encoder.record(Frame(camera, last_k, (t0_us + int(last_k * 1e6 / fps)) * 1000, img),
                                     Detections.empty(), [], alive, detector.model_id,
                                     detector.model_version, sending, last_k / fps)[0])
    finally:
        detector.close()
    gt_of = {tid: max(v.items(), key=lambda kv: (kv[1], -kv[0]))[0] for tid, v in votes.items()}
    stats = {"frames": len(frames), "crops": sum(len(fr["crops"]) for fr in frames),
             "tracks": len({d["track_id"] for fr in frames for d in fr["detections"] if d["track_id"] >= 0}),
             "tracks_matched_to_gt": len(gt_of), "gt_people": len({t for fr in gt for t, _ in gt[fr]
                                                                   if first <= fr <= last})}
    return frames, gt_of, stats


def pairwise(tracks: list[tuple[str, int, str]]) -> dict[str, float]:
    """tracks: (camera, gt id, predicted global id) per track."""
    tp = fp = fn = 0
    for (_ca, ga, pa), (_cb, gb, pb) in itertools.combinations(tracks, 2):
        same_true, same_pred = ga == gb, pa == pb
        tp += same_true and same_pred
        fp += same_pred and not same_true
        fn += same_true and not same_pred
    prec = 100.0 * tp / (tp + fp) if tp + fp else 100.0
    rec = 100.0 * tp / (tp + fn) if tp + fn else 100.0
    return {"precision": prec, "recall": rec, "tp": tp, "fp": fp, "fn": fn,
            "f1": 2 * prec * rec / (prec + rec) if prec + rec else 0.0}


def run_server(bootstrap: str, topic: str, n_frames: int, cfg_over: dict[str, Any], tmp: Path,
               group: str) -> tuple[list[tuple[str, int, str]], float]:
    """(camera, local track id, global id) of every stored track, and the match threshold the server used."""
    from server.config import ServerConfig
    from server.consume import ReidConsumer

    data = {"kafka": {"bootstrap": bootstrap, "input_topic": topic, "output_topic": topic + "_out",
                      "dlq_topic": topic + "_dlq", "group_id": group},
            "vectors": {"type": "memory"},  # exact in-memory gallery over the SQL copy: same matches, no mirror
            "store": {"url": f"sqlite:///{tmp / group / 'analytics.db'}"}, **cfg_over}
    consumer = ReidConsumer(ServerConfig.model_validate(data))
    threshold = consumer.matcher.threshold
    th = threading.Thread(target=consumer.run, daemon=True)
    th.start()
    ok, dlq = consumer.metrics.messages.labels("ok"), consumer.metrics.messages.labels("dlq")
    deadline = time.monotonic() + 900
    while ok._value.get() + dlq._value.get() < n_frames and time.monotonic() < deadline:
        time.sleep(0.05)
    consumer.stop.set()
    th.join(60)
    if dlq._value.get():
        raise RuntimeError(f"{dlq._value.get()} frames went to the dead-letter topic")
    eng = sa.create_engine(data["store"]["url"])
    with eng.connect() as c:
        rows = c.execute(sa.text("select camera_id, track_id, global_id from tracks")).all()
    eng.dispose()
    return [(r[0], int(r[1]), r[2] or f"none-{r[0]}-{r[1]}-{i}") for i, r in enumerate(rows)], threshold


def chart(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    names = list(res["variants"])[:2]
    x = np.arange(2)
    for i, n in enumerate(names):
        v = res["variants"][n]
        ax.bar(x + (i - 0.5) * 0.38, [v["precision"], v["recall"]], 0.38, label=n)
        for j, val in enumerate([v["precision"], v["recall"]]):
            ax.text(x[j] + (i - 0.5) * 0.38, val + 1, f"{val:.1f}", ha="center", fontsize=8)
    ax.set_xticks(x, ["pairwise precision %", "pairwise recall %"])
    ax.set_ylim(0, 110)
    ax.legend(fontsize=8)
    ax.set_title(f"eval-xcam: {res['seq_a']} vs {res['seq_b']} ({res['source']} tracks, {res['embedder']}, "
                 f"threshold {res['threshold'] if res['threshold'] is not None else 'default'})",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="eval-xcam", description=__doc__.split("\n")[0])
    ap.add_argument("seq_a", nargs="?", default="PETS09-S2L1:1-150")
    ap.add_argument("seq_b", nargs="?", default="PETS09-S2L1:151-300")
    ap.add_argument("--assets", default=None, help="shared assets folder (default ../shared/assets)")
    ap.add_argument("--source", default="appliance", choices=["appliance", "gt"], help="where tracks come from")
    ap.add_argument("--embedder", default="intel_reid")
    ap.add_argument("--threshold", type=float, default=None, help="identity.match_threshold (default: config's)")
    ap.add_argument("--sweep", default="", help="comma-separated thresholds to score (choose on another split)")
    ap.add_argument("--name", default="eval-xcam", help="results/<name>.json")
    ap.add_argument("--out", default="results")
    a = ap.parse_args(argv)

    from confluent_kafka import Producer

    from common.kafka import ensure_topics
    from common.logs import setup_logging
    from common.tansu import EmbeddedKafka
    from schemas.codec import AvroCodec
    from schemas.topics import TopicSpec

    setup_logging("eval-xcam", "WARNING")
    t0 = time.time_ns() // 1000 - 3 * 3600 * 1_000_000
    gt_of: dict[tuple[str, int], int] = {}
    sources: dict[str, Any] = {}
    frames: list[dict[str, Any]] = []
    for cam, spec in (("cam-a", a.seq_a), ("cam-b", a.seq_b)):
        start = t0 if not frames else frames[-1]["captured_at_us"] + 1_000_000
        if a.source == "appliance":
            fr, mapping, stats = appliance_frames(spec, cam, a.assets, start)
            gt_of.update({(cam, tid): g for tid, g in mapping.items()})
        else:
            fr = camera_frames(spec, cam, a.assets, start)
            stats = {"frames": len(fr), "crops": sum(len(f["crops"]) for f in fr)}
            gt_of.update({(cam, d["track_id"]): d["track_id"] for f in fr for d in f["detections"]})
        sources[cam] = {"sequence": spec, **stats}
        print(f"  {cam} {spec}: {stats}", flush=True)
        frames += fr
    codec = AvroCodec("edge_frame")
    identity: dict[str, Any] = {} if a.threshold is None else {"match_threshold": a.threshold}
    variants = {
        "ours (track fusion, co-visibility, re-match, soft gender)": {"identity": identity},
        "peer: nearest neighbour above threshold": {
            "identity": {**identity, "exclude_co_visible": False, "rematch_new_identities": False},
            "gender": {"mode": "off"}},
    }
    for th in [float(x) for x in a.sweep.split(",") if x.strip()]:
        variants[f"sweep {th:.2f}"] = {"identity": {"match_threshold": th}}
    res: dict[str, Any] = {"seq_a": a.seq_a, "seq_b": a.seq_b, "source": a.source, "frames": len(frames),
                           "crops": sum(len(f["crops"]) for f in frames), "cameras": sources,
                           "threshold": a.threshold, "variants": {}}
    with tempfile.TemporaryDirectory() as tmp, EmbeddedKafka(log_file=Path(tmp) / "tansu.log") as broker:
        ensure_topics(broker.bootstrap, [TopicSpec("xcam", 1, 1), TopicSpec("xcam_out", 1, 1),
                                         TopicSpec("xcam_dlq", 1, 1)])
        p = Producer({"bootstrap.servers": broker.bootstrap, "linger.ms": 20})
        for f in frames:
            p.produce("xcam", key=f["device_id"].encode(), value=codec.encode(f))
        assert p.flush(60) == 0
        for i, (name, over) in enumerate(variants.items()):
            cfg = {"embedder": {"type": a.embedder}, "assets": a.assets, **over}
            tracks, threshold = run_server(broker.bootstrap, "xcam", len(frames), cfg, Path(tmp), f"v{i}")
            if i == 0:
                res["threshold"] = threshold  # the one ours ran at: given, or the embedder's shipped one
            scored = [(cam, gt_of[(cam, tid)], gid) for cam, tid, gid in tracks if (cam, tid) in gt_of]
            r = pairwise(scored)
            r["identities"] = len({g for _, _, g in scored})
            r["tracks"] = len(scored)
            r["tracks_without_gt"] = len(tracks) - len(scored)
            res["variants"][name] = r
            print(f"  {name}: precision {r['precision']:.1f} % recall {r['recall']:.1f} % F1 {r['f1']:.1f} "
                  f"({r['identities']} ids for {len({g for _, g, _ in scored})} people, {r['tracks']} tracks)",
                  flush=True)
    from server.embed.base import parse_embedder_config

    res["embedder"] = parse_embedder_config({"type": a.embedder}).type
    res["people"] = len(set(gt_of.values()))
    sweep = {k: v for k, v in res["variants"].items() if k.startswith("sweep ")}
    if sweep:
        best = max(sweep, key=lambda k: (sweep[k]["f1"], -abs(float(k.split()[1]) - res["threshold"])))
        res["sweep_best_threshold"] = float(best.split()[1])
        print(f"  best threshold by pairwise F1 on this split: {res['sweep_best_threshold']:.2f}", flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{a.name}.json").write_text(json.dumps(res, indent=2))
    chart(res, out / f"{a.name}.png")
    ours = next(iter(res["variants"].values()))
    peer = list(res["variants"].values())[1]
    extra = f" best_threshold={res['sweep_best_threshold']:.2f}" if sweep else ""
    print(f"RESULT {a.name} xcam_precision={ours['precision']:.1f} xcam_recall={ours['recall']:.1f} "
          f"peer_precision={peer['precision']:.1f} peer_recall={peer['recall']:.1f} source={a.source}{extra}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
