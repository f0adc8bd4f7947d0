"""`just eval-reid [assets]`: Re-ID and gender accuracy of every embedder option on the Market subset.

Market protocol: each query ranks the whole gallery by cosine similarity; gallery images of the
same identity *and* the same camera are ignored (they are too easy). Rank-1 and mAP are computed
the way torchreid's ``eval_market1501`` does. Gender (Intel 0230) is scored per image and per
identity (mean probability over all of that identity's images), and used three ways in ranking:
off, a hard filter (drop candidates whose predicted gender differs from the query's) and a soft
score (cosine + w · log-odds that both have the same gender). w is chosen by 2-fold cross-validation
over query identities (chosen on one half, scored on the other), so the reported soft figure is not
tuned on the queries it is scored on. Each model's identity match threshold is re-measured (pairwise F1
over cross-camera pairs, server/embed/calibration.py) and printed beside the one the server ships.

Writes results/eval-reid.json and results/eval-reid.png, last line ``RESULT eval-reid key=value ...``.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from common.assets import data_path, require
from server.attributes import build_gender, gender_agreement
from server.embed.base import build_embedder
from server.embed.calibration import calibrated_threshold, pair_f1_threshold

MODELS: list[dict[str, Any]] = [
    {"type": "osnet_torch", "weights": "msmt17", "device": "cpu"},  # default model: first
    {"type": "osnet_torch", "weights": "market1501", "device": "cpu"},
    {"type": "osnet_openvino", "weights": "msmt17"},
    {"type": "intel_reid", "model": "0277"},
    {"type": "intel_reid", "model": "0286"},
    {"type": "intel_reid", "model": "0287"},
    {"type": "intel_reid", "model": "0288"},
]
# torchreid MODEL_ZOO (KaiyangZhou/deep-person-reid, docs/MODEL_ZOO.md), Rank-1 (mAP) on the FULL Market-1501
# test set (750 ids, 19,732 gallery images), so far harder than this 50-id subset: context, not a peer score.
PUBLISHED = {
    "osnet_x0_25 MSMT17(all)→Market": (59.9, 31.0),
    "osnet_x0_25 Market→Market": (91.2, 75.0),
}
W_GRID = [0.0, 0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3]


@dataclass
class Split:
    files: list[Path]
    pids: np.ndarray
    cams: np.ndarray
    crops: list[np.ndarray]


def load_split(folder: Path) -> Split:
    files = sorted(folder.glob("*.jpg"))
    if not files:
        raise FileNotFoundError(f"no .jpg images in {folder}")
    pids, cams, crops = [], [], []
    for f in files:
        pid, cam = f.name.split("_")[:2]  # <pid>_c<cam>s<seq>_<frame>_<box>.jpg
        img = cv2.imread(str(f), cv2.IMREAD_COLOR)
        if img is None:
            raise ValueError(f"{f}: cannot decode")
        pids.append(int(pid))
        cams.append(int(cam[1:cam.index("s")]))
        crops.append(img)
    return Split(files, np.array(pids), np.array(cams), crops)


def video_split(seq_dir: Path, min_height: float = 50.0, per_id_queries: int = 3, gallery_step: int = 5,
                ) -> tuple[Split, Split]:
    """Re-ID from a MOTChallenge sequence: queries from the first half of the frames, gallery from the second.

    A crude stand-in for "the same people seen again later" in a shop camera: one camera, so the
    same-camera rule is off (query camera 1, gallery camera 2), and the time gap keeps near-duplicate
    frames apart. Boxes shorter than ``min_height`` pixels are skipped (too small to judge).
    """
    gt = np.loadtxt(seq_dir / "gt" / "gt.txt", delimiter=",")
    n_frames = int(gt[:, 0].max())
    half = n_frames // 2
    rows = gt[(gt[:, 5] >= min_height) & (gt[:, 6] != 0)]
    q_rows, g_rows = [], []
    for pid in np.unique(rows[:, 1]):
        mine = rows[rows[:, 1] == pid]
        first, second = mine[mine[:, 0] <= half], mine[mine[:, 0] > half]
        if len(first) == 0 or len(second) == 0:
            continue
        pick = np.linspace(0, len(first) - 1, min(per_id_queries, len(first))).round().astype(int)
        q_rows += list(first[np.unique(pick)])
        g_rows += list(second[:: gallery_step])
    frames: dict[int, np.ndarray] = {}

    def crops_of(sel: list[np.ndarray], cam: int) -> Split:
        crops, pids = [], []
        for r in sel:
            f = int(r[0])
            if f not in frames:
                frames[f] = cv2.imread(str(seq_dir / "img1" / f"{f:06d}.jpg"))
            img = frames[f]
            x0, y0 = max(int(r[2]), 0), max(int(r[3]), 0)
            x1, y1 = min(int(r[2] + r[4]), img.shape[1]), min(int(r[3] + r[5]), img.shape[0])
            if x1 - x0 < 4 or y1 - y0 < 8:
                continue
            crops.append(img[y0:y1, x0:x1].copy())
            pids.append(int(r[1]))
        return Split([], np.array(pids), np.full(len(pids), cam), crops)

    return crops_of(q_rows, 1), crops_of(g_rows, 2)


def evaluate_scores(scores: np.ndarray, q: Split, g: Split, valid: np.ndarray | None = None) -> tuple[float, float]:
    """Rank-1 and mAP (fractions) from a (Q, G) similarity matrix; ``valid`` masks candidates out per query."""
    hits, aps = [], []
    for i in range(len(q.pids)):
        keep = ~((g.pids == q.pids[i]) & (g.cams == q.cams[i]))
        if valid is not None:
            keep &= valid[i]
        order = np.argsort(-scores[i][keep], kind="stable")
        match = (g.pids[keep] == q.pids[i])[order]
        if not match.any():  # every true match filtered away: a miss with AP 0 (torchreid would skip it)
            hits.append(0.0)
            aps.append(0.0)
            continue
        hits.append(float(match[0]))
        cum = np.cumsum(match)
        aps.append(float((cum[match] / (np.flatnonzero(match) + 1)).mean()))
    return float(np.mean(hits)), float(np.mean(aps))


def per_query_rank1(scores: np.ndarray, q: Split, g: Split) -> np.ndarray:
    out = np.zeros(len(q.pids))
    for i in range(len(q.pids)):
        keep = ~((g.pids == q.pids[i]) & (g.cams == q.cams[i]))
        out[i] = g.pids[keep][np.argmax(scores[i][keep])] == q.pids[i]
    return out


def timed_us(fn: Any, repeats: int = 200) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats * 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("assets", nargs="?", default=None, help="assets folder (default: shared assets)")
    ap.add_argument("--out", default="results", help="output folder")
    args = ap.parse_args(argv)
    root = require(data_path("market1501_subset", assets=args.assets), "Market-1501 subset")
    q, g = load_split(root / "query"), load_split(root / "bounding_box_test")
    with open(root / "gender.csv") as f:
        male = {int(r["person_id"]): r["gender_code"] == "1" for r in csv.DictReader(f)}

    videos = {name: video_split(data_path("mot15", "train", name, assets=args.assets))
              for name in ("PETS09-S2L1", "TUD-Campus")}
    models: list[dict[str, Any]] = []
    feats: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for cfg in MODELS:
        emb = build_embedder(cfg, assets=args.assets)
        video_scores = {}
        for name, (vq, vg) in videos.items():
            vr1, vmap = evaluate_scores(emb.embed(vq.crops) @ emb.embed(vg.crops).T, vq, vg)
            video_scores[name] = {"rank1": round(100 * vr1, 2), "map": round(100 * vmap, 2),
                                  "queries": len(vq.pids), "gallery": len(vg.pids)}
        t0 = time.perf_counter()
        fq, fg = emb.embed(q.crops), emb.embed(g.crops)
        ms_per_crop = (time.perf_counter() - t0) * 1e3 / (len(q.crops) + len(g.crops))
        r1, m_ap = evaluate_scores(fq @ fg.T, q, g)
        label = f"{emb.model_id} ({cfg['type']})"
        feats[label] = (fq, fg)
        # The identity match threshold this model ships with, re-measured (server/embed/calibration.py).
        pids, cams = np.concatenate([q.pids, g.pids]), np.concatenate([q.cams, g.cams])
        people = pids > 0  # Market's 0 / -1 are distractors and junk, not one person
        th, f1 = pair_f1_threshold(np.concatenate([fq, fg])[people], pids[people], cams[people])
        shipped = calibrated_threshold(emb.model_id)
        calibration = {"measured_threshold": th, "pair_f1": round(f1, 2), "shipped_threshold": shipped,
                       "matches_shipped": shipped is not None and abs(th - shipped) <= 0.015}
        models.append({"label": label, "config": cfg, "model_id": emb.model_id, "dim": emb.dim,
                       "rank1": round(100 * r1, 2), "map": round(100 * m_ap, 2),
                       "cpu_ms_per_crop_2cores": round(ms_per_crop, 3), "video": video_scores,
                       "calibration": calibration})
        vtxt = "  ".join(f"{k} {v['rank1']:.1f}/{v['map']:.1f}" for k, v in video_scores.items())
        print(f"{label:55s} rank1 {100 * r1:5.1f}  mAP {100 * m_ap:5.1f}  {ms_per_crop:.2f} ms/crop  video {vtxt}  "
              f"threshold {th:.2f} (pair F1 {f1:.1f} %, shipped {shipped})"
              + ("" if calibration["matches_shipped"] else "  <- differs from server/embed/calibration.py"),
              flush=True)

    # Gender: both variants measured; the configured default is the one reported under the headline keys.
    gender: dict[str, Any] = {}
    probs: dict[bool, tuple[np.ndarray, np.ndarray]] = {}
    for flip in (False, True):
        clf = build_gender({"type": "intel_0230", "flip_average": flip}, assets=args.assets)
        pq, pg = clf.male_probability(q.crops), clf.male_probability(g.crops)
        probs[flip] = (pq, pg)
        all_p, all_pid = np.concatenate([pq, pg]), np.concatenate([q.pids, g.pids])
        truth = np.array([male[p] for p in all_pid])
        img_acc = float(((all_p > 0.5) == truth).mean())
        ids = sorted(set(all_pid.tolist()))
        id_acc = float(np.mean([(all_p[all_pid == i].mean() > 0.5) == male[i] for i in ids]))
        id_acc_lo = float(np.mean([(np.mean(np.log(np.clip(all_p[all_pid == i], 1e-4, 1 - 1e-4))
                                            - np.log(np.clip(1 - all_p[all_pid == i], 1e-4, 1 - 1e-4))) > 0)
                                   == male[i] for i in ids]))
        gender[clf.model_id] = {"flip_average": flip, "acc_image": round(100 * img_acc, 2),
                                "acc_identity_mean_prob": round(100 * id_acc, 2),
                                "acc_identity_mean_logodds": round(100 * id_acc_lo, 2),
                                "n_images": len(all_p), "n_identities": len(ids)}
        print(f"gender {clf.model_id}: image {100 * img_acc:.1f} %, identity {100 * id_acc:.1f} % "
              f"(log-odds pooling {100 * id_acc_lo:.1f} %)", flush=True)
    from server.attributes import IntelGenderConfig
    default_flip = IntelGenderConfig().flip_average
    gender_default = next(v for v in gender.values() if v["flip_average"] == default_flip)
    pq, pg = probs[default_flip]

    # Gender in retrieval, default embedder.
    default_label = models[0]["label"]
    fq, fg = feats[default_label]
    cos = fq @ fg.T
    hard_valid = (pq[:, None] > 0.5) == (pg[None, :] > 0.5)
    agree = gender_agreement(pq[:, None], pg[None, :])
    r1_off, map_off = evaluate_scores(cos, q, g)
    r1_hard, map_hard = evaluate_scores(cos, q, g, hard_valid)
    sweep = []
    for w in W_GRID:
        r1, m = evaluate_scores(cos + w * agree, q, g)
        sweep.append({"w": w, "rank1": round(100 * r1, 2), "map": round(100 * m, 2)})
    # 2-fold CV over query identities: choose w on one half (max Rank-1, then mAP, then smaller w), score the other.
    uniq = np.unique(q.pids)
    fold_of = {pid: k % 2 for k, pid in enumerate(uniq)}
    qfold = np.array([fold_of[p] for p in q.pids])
    cv_hits = np.zeros(len(q.pids))
    chosen = []
    for k in (0, 1):
        tr, te = qfold != k, qfold == k
        def sub(mask: np.ndarray) -> Split:
            return Split([f for f, m in zip(q.files, mask, strict=True) if m], q.pids[mask], q.cams[mask], [])
        best = max(W_GRID, key=lambda w, tr=tr: (*evaluate_scores((cos + w * agree)[tr], sub(tr), g), -w))
        chosen.append(best)
        cv_hits[te] = per_query_rank1((cos + best * agree)[te], sub(te), g)
    r1_soft_cv = float(cv_hits.mean())
    w_all = max(W_GRID, key=lambda w: (*evaluate_scores(cos + w * agree, q, g), -w))

    def rank_off(i: int = 0) -> np.ndarray:
        return np.argsort(-(fg @ fq[i]))

    def rank_hard(i: int = 0) -> np.ndarray:
        keep = np.flatnonzero((pg > 0.5) == (pq[i] > 0.5))
        return keep[np.argsort(-(fg[keep] @ fq[i]))]

    def rank_soft(i: int = 0) -> np.ndarray:
        return np.argsort(-(fg @ fq[i] + w_all * gender_agreement(pq[i], pg)))

    latency = {"off": timed_us(rank_off), "hard": timed_us(rank_hard), "soft": timed_us(rank_soft)}
    retrieval = {
        "model": default_label, "gallery_size": len(g.pids), "queries": len(q.pids),
        "off": {"rank1": round(100 * r1_off, 2), "map": round(100 * map_off, 2)},
        "hard": {"rank1": round(100 * r1_hard, 2), "map": round(100 * map_hard, 2),
                 "true_matches_dropped_pct": round(100 * float(
                     ((q.pids[:, None] == g.pids[None, :]) & ~hard_valid).sum()
                     / (q.pids[:, None] == g.pids[None, :]).sum()), 2)},
        "soft": {"rank1_cv": round(100 * r1_soft_cv, 2), "w_chosen_per_fold": chosen,
                 "w_default": w_all, "sweep": sweep},
        "query_latency_us": {k: round(v, 1) for k, v in latency.items()},
    }
    print(f"retrieval {default_label}: off {100 * r1_off:.1f}, hard {100 * r1_hard:.1f}, soft (2-fold CV) "
          f"{100 * r1_soft_cv:.1f} [w per fold {chosen}, on all {w_all}]; latency µs {retrieval['query_latency_us']}")

    result = {
        "dataset": str(root), "protocol": "Market: ignore same-id same-camera gallery images; cosine similarity",
        "video_protocol": video_split.__doc__.split("\n\n")[0].strip(),
        "models": models, "published_torchreid_full_market": {k: {"rank1": v[0], "map": v[1]}
                                                             for k, v in PUBLISHED.items()},
        "gender": gender, "retrieval_with_gender": retrieval,
        "rank1": models[0]["rank1"], "map": models[0]["map"],
        "gender_acc_image": gender_default["acc_image"],
        "gender_acc_identity": gender_default["acc_identity_mean_prob"],
        "rank1_gender_hard": retrieval["hard"]["rank1"], "rank1_gender_soft": retrieval["soft"]["rank1_cv"],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval-reid.json").write_text(json.dumps(result, indent=2))
    plot(result, out / "eval-reid.png")
    keys = ["rank1", "map", "gender_acc_image", "gender_acc_identity", "rank1_gender_hard", "rank1_gender_soft"]
    print("RESULT eval-reid " + " ".join(f"{k}={result[k]}" for k in keys))
    return 0


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, c, b) = plt.subplots(1, 3, figsize=(20, 5.5), gridspec_kw={"width_ratios": [3, 2, 1.4]})
    seqs = list(result["models"][0]["video"])
    xm = np.arange(len(result["models"]))
    for j, seq in enumerate(seqs):
        c.bar(xm + (j - 0.5) * 0.4, [m["video"][seq]["rank1"] for m in result["models"]], 0.4, label=seq)
    c.set_xticks(xm, [m["model_id"].replace("_256x128", "") for m in result["models"]], fontsize=7, rotation=20)
    c.set_ylim(0, 100)
    c.set_title("Rank-1 on MOT15 video (query: 1st half, gallery: 2nd half)")
    c.legend(fontsize=8)
    rows = [(m["model_id"] + ("\n(openvino)" if m["config"]["type"] == "osnet_openvino" else ""), m["rank1"], m["map"],
             "ours") for m in result["models"]]
    rows += [(k.replace(" ", "\n"), v["rank1"], v["map"], "published")
             for k, v in result["published_torchreid_full_market"].items()]
    x = np.arange(len(rows))
    for off, key, name in ((-0.2, 1, "Rank-1"), (0.2, 2, "mAP")):
        bars = a.bar(x + off, [r[key] for r in rows], 0.4, label=name)
        for bar, r in zip(bars, rows, strict=True):
            if r[3] == "published":
                bar.set_hatch("//")
                bar.set_alpha(0.5)
    a.set_xticks(x, [r[0] for r in rows], fontsize=7, rotation=20)
    a.set_ylabel("%")
    a.set_ylim(0, 100)
    a.set_title("Market subset (50 ids, ours) vs torchreid published (full Market, hatched)")
    a.legend()
    ret = result["retrieval_with_gender"]
    vals = [ret["off"]["rank1"], ret["hard"]["rank1"], ret["soft"]["rank1_cv"]]
    b.bar(["gender off", "hard filter", "soft (CV)"], vals, color=["grey", "tab:red", "tab:green"])
    for i, v in enumerate(vals):
        b.text(i, v + 1, f"{v:.1f}", ha="center")
    b.set_ylim(0, 100)
    b.set_title(f"Rank-1, {result['models'][0]['model_id']}\ngender image acc {result['gender_acc_image']} %, "
                f"identity {result['gender_acc_identity']} %", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
