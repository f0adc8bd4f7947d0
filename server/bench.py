"""`just bench-server [assets]`: server throughput and identity-match latency on this machine.

1. Embedding stage alone: crops/s of the configured embedder on real Market-1501 crops.
2. Whole consumer: edge frames with real crops on an embedded tansu broker → ReidConsumer (decode, embed,
   gender, match, SQLite with the gallery's durable copy, Qdrant local mirror, reid_output) → crops/s from
   the first batch to the last.
3. Host side only (``--host-crops``): the same consumer with the real models' outputs replayed by content
   (:class:`ReplayModels`), i.e. the ceiling of the consumer when the models cost nothing (a GPU box).
4. Identity-match latency (p50/p95) at 1k, 20k and 100k gallery identities, measured interleaved
   (A B A B ...) on the same queries: Qdrant local mode (the embedded default's own search) vs what we
   ship (the exact in-memory gallery). One prototype per identity.
   Qdrant local keeps every point in memory and searches in Python/numpy whether or not it persists, so
   the gallery is built with ``QdrantClient(":memory:")``: building 100k persisted points takes ~5 min
   here (measured 60 s per 20k), the search code is the same. The persisted write is timed separately.
Writes results/<name>.json (after every stage) and .png; last line ``RESULT <name> key=value ...``.
GPU box: ``--embedder osnet_torch --gender off --batch-crops 2048 --crops 20000 --name bench-server-gpu``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import threading
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from common.assets import data_path, require
from common.service import allowed_cpus


def market_jpegs(root: Path, n: int) -> list[tuple[str, bytes]]:
    files = sorted(root.glob("bounding_box_test/*.jpg")) + sorted(root.glob("query/*.jpg"))
    if not files:
        raise FileNotFoundError(f"no Market-1501 JPEGs under {root}")
    return [(files[i % len(files)].name[:4], files[i % len(files)].read_bytes()) for i in range(n)]


def bench_embed(embedder: Any, images: list[np.ndarray], rounds: int) -> tuple[float, float | None]:
    """Crops/s of one ``embed`` call over all images, and (interleaved, when the embedder splits a call into
    parts of ``batch_size``) of the same parts as separate calls: each call reads its result back before the
    next part is packed, which is how a call ran before parts were queued back to back on the GPU."""
    embedder.embed(images[:16])  # warm-up
    part = getattr(getattr(embedder, "cfg", None), "batch_size", None)
    split = bool(part and part < len(images))
    if split:
        whole = embedder.embed(images[:2 * part])
        apart = np.concatenate([embedder.embed(images[:part]), embedder.embed(images[part:2 * part])])
        assert np.allclose(whole, apart, atol=1e-3), "queued parts differ from part-by-part calls"
    rates, serial = [], []
    for _ in range(rounds):
        t = time.perf_counter()
        embedder.embed(images)
        rates.append(len(images) / (time.perf_counter() - t))
        if split:
            t = time.perf_counter()
            for s in range(0, len(images), part):
                embedder.embed(images[s:s + part])
            serial.append(len(images) / (time.perf_counter() - t))
    return statistics.median(rates), (statistics.median(serial) if serial else None)


class ReplayModels:
    """Real model outputs served by content, so the consumer's host side can be measured on its own.

    ``prime`` runs the real embedder (and gender classifier) once per distinct crop; ``embed`` and
    ``male_probability`` then return those outputs for the same decoded pixels (looked up by a hash of
    the pixels, ~10 us a crop). Identities, matches and writes are exactly what the real models give;
    only the model time is gone: the ceiling of the consumer on a box whose GPU is never the limit.
    """

    def __init__(self, embedder: Any, gender: Any | None) -> None:
        self.model_id, self.dim = embedder.model_id, embedder.dim
        self._embedder, self._gender = embedder, gender
        self._emb: dict[bytes, np.ndarray] = {}
        self._male: dict[bytes, float] = {}

    @staticmethod
    def _key(img: np.ndarray) -> bytes:
        import hashlib

        return hashlib.blake2b(np.ascontiguousarray(img).data, digest_size=16).digest() + bytes(img.shape[:2])

    def prime(self, images: list[np.ndarray]) -> None:
        embs = self._embedder.embed(images)
        males = self._gender.male_probability(images) if self._gender is not None else None
        for i, img in enumerate(images):
            k = self._key(img)
            self._emb[k] = embs[i]
            if males is not None:
                self._male[k] = float(males[i])

    def embed(self, crops_bgr: list[np.ndarray]) -> np.ndarray:
        if not crops_bgr:
            return np.zeros((0, self.dim), np.float32)
        return np.stack([self._emb[self._key(c)] for c in crops_bgr])

    def male_probability(self, crops_bgr: list[np.ndarray]) -> np.ndarray:
        return np.array([self._male[self._key(c)] for c in crops_bgr], dtype=np.float32)


def bench_pipeline(cfg_data: dict[str, Any], jpegs: list[tuple[str, bytes]], tmp: Path,
                   embedder: Any = None, gender: Any = None, n_crops: int | None = None,
                   vectors: str = "qdrant_local") -> dict[str, Any]:
    from confluent_kafka import Producer

    from common.kafka import ensure_topics
    from common.tansu import EmbeddedKafka
    from schemas.codec import AvroCodec
    from schemas.topics import TopicSpec
    from server.config import ServerConfig
    from server.consume import ReidConsumer
    from server.edge_records import Box, edge_frame

    codec = AvroCodec("edge_frame")
    t0 = time.time_ns() // 1000 - 3_600_000_000
    # 4 crops per frame, 8 cameras; each track sends a NEW_TRACK crop then one IMPROVED crop.
    frames, k = [], 0
    per_cam: dict[int, int] = {}
    total = n_crops or len(jpegs)
    while k < total:
        cam = (k // 4) % 8
        fi = per_cam.get(cam, 0)
        per_cam[cam] = fi + 1
        boxes = []
        for slot in range(4):
            if k >= total:
                break
            tid = 1_000_000 * cam + 4 * (fi // 2) + slot
            boxes.append(Box(tid, (10 + 150 * slot, 50, 74 + 150 * slot, 178), crop_jpeg=jpegs[k % len(jpegs)][1],
                             quality=0.5 + 0.1 * (fi % 2), reason="NEW_TRACK" if fi % 2 == 0 else "IMPROVED"))
            k += 1
        # A pair of frames per track (NEW_TRACK, IMPROVED); the appliance reports the previous pair ended.
        ended = [1_000_000 * cam + 4 * (fi // 2 - 1) + s for s in range(4)] if fi % 2 == 0 and fi else []
        frames.append(edge_frame(f"dev-{cam}", f"cam-{cam}", fi, t0 + fi * 100_000, boxes, ended_track_ids=ended))
    with EmbeddedKafka(log_file=tmp / "tansu.log") as broker:
        names = {n: f"bench_{n}" for n in ("reid_input", "reid_output", "reid_dlq")}
        ensure_topics(broker.bootstrap, [TopicSpec(names["reid_input"], 6, 1), TopicSpec(names["reid_output"], 3, 1),
                                         TopicSpec(names["reid_dlq"], 1, 1)])
        p = Producer({"bootstrap.servers": broker.bootstrap, "linger.ms": 20})
        for f in frames:
            p.produce(names["reid_input"], key=f["device_id"].encode(), value=codec.encode(f))
        assert p.flush(60) == 0
        data = json.loads(json.dumps(cfg_data))
        data["kafka"] = {**data.get("kafka", {}), "bootstrap": broker.bootstrap, "input_topic": names["reid_input"],
                         "output_topic": names["reid_output"], "dlq_topic": names["reid_dlq"],
                         "group_id": "bench"}
        data["vectors"] = {"type": "qdrant_local", "path": str(tmp / "qdrant")} if vectors == "qdrant_local" \
            else {"type": "memory"}
        data["store"] = {"url": f"sqlite:///{tmp / 'analytics.db'}"}
        # The warmed-up embedder of the stage benchmark: a first inference's compile cost is not throughput.
        consumer = ReidConsumer(ServerConfig.model_validate(data), embedder=embedder, gender=gender)
        first: list[float] = []
        inner, finish = consumer.prepare, consumer.finish  # the two halves of every batch, overlapped or not
        # Wall and CPU seconds of each half on its own thread: CPU well below wall means the thread waited (for the
        # GIL, for a core), not that its own code was slow.
        clocks = {"prepare_wall_s": 0.0, "prepare_cpu_s": 0.0, "finish_wall_s": 0.0, "finish_cpu_s": 0.0}

        def clocked(name: str, fn: Any, *args: Any) -> Any:
            w, c = time.perf_counter(), time.thread_time()
            try:
                return fn(*args)
            finally:
                clocks[f"{name}_wall_s"] += time.perf_counter() - w
                clocks[f"{name}_cpu_s"] += time.thread_time() - c

        def clocking(name: str, fn: Any) -> Any:
            return lambda *args: clocked(name, fn, *args)

        def timed(items: Any) -> Any:
            if not first:
                first.append(time.perf_counter())
                first.append(time.time())
            return clocked("prepare", inner, items)

        consumer.prepare = timed  # type: ignore[method-assign]
        consumer.finish = lambda items, prep: clocked("finish", finish, items, prep)  # type: ignore[method-assign]
        # The same clocks on each per-batch call inside finish (what is left of finish is the per-frame Python):
        # wall well above CPU in one of them says where the consumer's thread waits (a pipe, BLAS threads, the GIL).
        parts: dict[str, Any] = {"matcher": ("prefetch", "fold_crops", "match_batch", "expire", "write_rows"),
                                 "vectors": ("take_changes",), "_writer": ("submit",)}
        for owner_name, names in parts.items():
            owner = getattr(consumer, owner_name, None)
            for nm in names if owner is not None else ():
                clocks[f"{nm}_wall_s"] = clocks[f"{nm}_cpu_s"] = 0.0
                setattr(owner, nm, clocking(nm, getattr(owner, nm)))
        th = threading.Thread(target=consumer.run, daemon=True)
        th.start()
        ok = consumer.metrics.messages.labels("ok")
        deadline = time.monotonic() + 600
        while ok._value.get() < len(frames) and time.monotonic() < deadline:
            time.sleep(0.01)
        end, end_epoch = time.perf_counter(), time.time()
        lag_at_end = getattr(consumer.vectors, "mirror_lag", lambda: 0)()
        mirror = getattr(consumer.vectors, "mirror", None)
        drained = mirror.drain(120) if mirror is not None else True
        drain_s = time.perf_counter() - end
        consumer.stop.set()
        th.join(60)
        stages = {}
        for metric in consumer.registry.collect():
            if metric.name == "reidfleet_server_stage_seconds":
                for s in metric.samples:
                    if s.name.endswith("_sum"):
                        stages[s.labels["stage"]] = round(s.value, 3)
        n_crops = sum(len(f["crops"]) for f in frames)
        host = sum(v for k, v in stages.items() if k not in ("embed", "gender", "wait_prepared"))
        return {"crops": n_crops, "frames": len(frames), "seconds": end - first[0],
                "crops_s": n_crops / (end - first[0]), "stage_seconds": stages,
                "window_epoch_s": [first[1], end_epoch],  # for benchmarks/cpu_sampler.py --report --window
                "thread_seconds": {k: round(v, 3) for k, v in clocks.items()},
                # Ceiling of the whole consumer if the models cost nothing (a GPU box): the host-side stages.
                "host_stage_crops_s": n_crops / host if host else float("inf"),
                # The Qdrant mirror trails the SQL copy (server/vectors/memory.py): how far, and how long it took
                # to catch up once the stream was processed.
                "mirror_lag_points_at_end": lag_at_end, "mirror_drain_s": drain_s, "mirror_drained": drained,
                "batches": consumer.batches, "identities": consumer.matcher.gallery_size(),
                "gpu_jpeg_fallbacks": int(consumer.metrics.gpu_decode_fallbacks._value.get()),
                "matcher": consumer.matcher.stats, "embedder": consumer.embedder.model_id,
                "gender": consumer.cfg.gender.mode}


def bench_match(dim: int, sizes: list[int], queries: int, tmp: Path) -> dict[str, Any]:
    from qdrant_client import QdrantClient, models

    from server.config import QdrantLocalSettings
    from server.vectors.base import Prototype
    from server.vectors.memory import MemoryVectorStore
    from server.vectors.qdrant import QdrantVectorStore

    rng = np.random.default_rng(0)
    out: dict[str, Any] = {}
    for n in sizes:
        vecs = rng.standard_normal((n, dim)).astype(np.float32)
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        ids = [str(uuid.UUID(int=i + 1)) for i in range(n)]
        client = QdrantClient(":memory:")
        client.create_collection("g", vectors_config=models.VectorParams(size=dim, distance=models.Distance.COSINE))
        for s in range(0, n, 5000):
            client.upsert("g", points=models.Batch(ids=ids[s:s + 5000], vectors=vecs[s:s + 5000].tolist(),
                                                   payloads=[{"global_id": g} for g in ids[s:s + 5000]]), wait=False)
        mem = MemoryVectorStore(dim=dim, capacity=n + 16)
        mem.upsert([Prototype(ids[i], ids[i], vecs[i]) for i in range(n)])
        # Queries: noisy copies of gallery vectors (a returning person), like real matching.
        q = vecs[rng.integers(0, n, queries)] + 0.05 * rng.standard_normal((queries, dim)).astype(np.float32)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        n_q = queries if n <= 20_000 else max(10, queries // 10)
        lat_q, lat_m, agree = [], [], 0
        for i in range(n_q):  # interleaved A B A B
            t = time.perf_counter()
            res = client.query_points("g", query=q[i].tolist(), limit=16 * 8, with_payload=["global_id"]).points
            lat_q.append((time.perf_counter() - t) * 1e3)
            t = time.perf_counter()
            hits = mem.search(q[i], 16, 8)
            lat_m.append((time.perf_counter() - t) * 1e3)
            agree += int(str(res[0].payload["global_id"]) == hits[0].global_id)  # type: ignore[index]
        client.close()
        # What the consumer does per batch since it batches its searches: one GEMM for every query.
        t = time.perf_counter()
        batched = mem.search_many(q[:n_q], 16, 8)
        batched_ms = (time.perf_counter() - t) * 1e3 / n_q
        assert [h[0][0] for h in batched] == [mem.search(q[i], 16, 8)[0].global_id for i in range(n_q)]
        out[str(n)] = {"queries": n_q, "top1_agreement": agree / n_q, "ours_batched_ms_per_query": batched_ms,
                       "qdrant_local_p50_ms": float(np.percentile(lat_q, 50)),
                       "qdrant_local_p95_ms": float(np.percentile(lat_q, 95)),
                       "ours_p50_ms": float(np.percentile(lat_m, 50)), "ours_p95_ms": float(np.percentile(lat_m, 95))}
        print(f"  match {n:>6}: qdrant local p95 {out[str(n)]['qdrant_local_p95_ms']:.1f} ms, "
              f"ours p95 {out[str(n)]['ours_p95_ms']:.2f} ms, ours batched {batched_ms:.3f} ms/query", flush=True)
    # The persisted write per new/improved track (write-through of the cache), on a real local-mode folder.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        store = QdrantVectorStore(QdrantLocalSettings(path=str(tmp / "qdrant_w"), collection="w"), dim=dim,
                                  model_id="bench")
    lat_w = []
    for i in range(200):
        v = rng.standard_normal(dim).astype(np.float32)
        t = time.perf_counter()
        store.upsert([Prototype(str(uuid.uuid4()), str(i), v / np.linalg.norm(v), {"last_seen_us": i})])
        lat_w.append((time.perf_counter() - t) * 1e3)
    store.close()
    out["persisted_upsert_p50_ms"] = float(np.percentile(lat_w, 50))
    out["persisted_upsert_p95_ms"] = float(np.percentile(lat_w, 95))
    return out


def chart(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    sizes = [k for k in res["match"] if k.isdigit()]
    x = np.arange(len(sizes))
    a.bar(x - 0.2, [res["match"][s]["qdrant_local_p95_ms"] for s in sizes], 0.4, label="Qdrant local mode (peer)")
    a.bar(x + 0.2, [res["match"][s]["ours_p95_ms"] for s in sizes], 0.4, label="ours: numpy cache over Qdrant")
    a.axhline(20, color="red", ls="--", lw=1, label="target 20 ms")
    a.set_yscale("log")
    a.set_xticks(x, [f"{int(s) // 1000}k" for s in sizes])
    a.set_xlabel("gallery identities")
    a.set_ylabel("match latency p95 (ms, log)")
    a.legend(fontsize=8)
    a.set_title("identity match, one query")
    by_part = res.get("embed_crops_s_part_by_part")
    labels = (["embed, part\nby part"] if by_part else []) + ["embed stage", "whole consumer"] + (
        ["host side only"] if "host_only" in res else [])
    vals = ([by_part] if by_part else []) + [res["embed_crops_s"], res["pipeline"]["crops_s"]] + (
        [res["host_only"]["crops_s"]] if "host_only" in res else [])
    b.bar(labels, vals, color=(["tab:orange"] if by_part else []) + ["tab:blue", "tab:green", "tab:gray"][:len(vals)])
    b.axhline(10_000, color="red", ls="--", lw=1, label="GPU target 10k")
    b.set_yscale("log")
    b.legend(fontsize=8)
    for i, v in enumerate(vals):
        b.text(i, v, f"{v:.0f}", ha="center", va="bottom")
    b.set_ylabel("crops / s")
    b.set_title(f"{res['pipeline']['embedder']}, {res['cpus']} CPU cores" + (f", {res['gpu']}" if "gpu" in res
                                                                               else ""), fontsize=9)
    fig.suptitle(f"bench-server ({res.get('gpu', 'this machine, CPU')})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench-server", description=__doc__.split("\n")[0])
    ap.add_argument("assets", nargs="?", default=None, help="shared assets folder (default ../shared/assets)")
    ap.add_argument("--embedder", default="intel_reid", help="embedder type (intel_reid, osnet_openvino, osnet_torch)")
    ap.add_argument("--crops", type=int, default=512, help="crops through the whole consumer with the real models")
    ap.add_argument("--host-crops", type=int, default=4000, help="crops through the whole consumer with the model "
                    "outputs replayed (host-side ceiling); 0 = skip")
    ap.add_argument("--batch-crops", type=int, default=256, help="batch.max_crops of the consumer")
    ap.add_argument("--vectors", default="qdrant_local", choices=["qdrant_local", "memory"])
    ap.add_argument("--sizes", default="1000,20000,100000")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--gender", default="soft", choices=["off", "filter", "soft"])
    ap.add_argument("--name", default="bench-server", help="results/<name>.json (bench-server-gpu on the GPU box)")
    ap.add_argument("--out", default="results")
    ap.add_argument("--no-overlap", action="store_true", help="batch.overlap off (decode+embed not overlapped)")
    ap.add_argument("--embed-process", action="store_true", help="batch.embed_process: the whole consumer's embedder "
                    "runs in a child process (the stage figure stays in-process)")
    ap.add_argument("--embed-workers", type=int, default=1, help="batch.embed_workers: embedder child processes "
                    "(with --embed-process)")
    ap.add_argument("--switch-interval-ms", type=float, default=0.0, help="batch.switch_interval_ms of the "
                    "consumer (0: the config's)")
    ap.add_argument("--jpeg-decoder", choices=["cpu", "nvjpeg", "nvimgcodec"], help="osnet_torch's jpeg_decoder "
                    "(default: the config's)")
    ap.add_argument("--nvimgcodec-backends", choices=["hw", "cuda", "auto"], help="osnet_torch's nvimgcodec_backends "
                    "(default: the config's)")
    ap.add_argument("--cpu-decode-share", type=float, help="osnet_torch's cpu_decode_share: crops decoded by "
                    "OpenCV threads beside nvJPEG (default: the config's)")
    ap.add_argument("--commit-queue", type=int, help="batch.commit_queue: batches handed to the commit stage before "
                    "the consumer waits for the oldest (default: the config's)")
    ap.add_argument("--prepare-ahead", type=int, help="batch.prepare_ahead: batches queued for the prepare worker "
                    "beyond the one being matched (default: the config's)")
    ap.add_argument("--commit-process", action="store_true", help="batch.commit_process: SQL commit and reid_output "
                    "in a child process")
    a = ap.parse_args(argv)

    import cv2

    from common.logs import setup_logging
    from server.embed.base import build_embedder

    setup_logging("bench-server", "WARNING")
    root = require(data_path("market1501_subset", assets=a.assets), "Market-1501 subset")
    jpegs = market_jpegs(root, max(a.crops, 512))
    images = [cv2.imdecode(np.frombuffer(j, np.uint8), cv2.IMREAD_COLOR) for _, j in jpegs]
    res: dict[str, Any] = {"machine": platform.processor() or platform.machine(), "cpus": allowed_cpus(),
                           "args": vars(a)}
    try:
        import torch

        if torch.cuda.is_available():
            res["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    emb_cfg: dict[str, Any] = {"type": a.embedder}
    if a.jpeg_decoder:
        emb_cfg["jpeg_decoder"] = a.jpeg_decoder
    if a.nvimgcodec_backends:
        emb_cfg["nvimgcodec_backends"] = a.nvimgcodec_backends
    if a.cpu_decode_share is not None:
        emb_cfg["cpu_decode_share"] = a.cpu_decode_share
    embedder = build_embedder(emb_cfg, assets=a.assets)
    res["embedder"] = embedder.model_id
    n_stage = min(len(images), 4096 if "gpu" in res else 256)
    res["embed_crops_s"], res["embed_crops_s_part_by_part"] = bench_embed(
        embedder, [images[i % len(images)] for i in range(n_stage)], rounds=3)
    by_part = res["embed_crops_s_part_by_part"]
    print(f"  embed stage: {res['embed_crops_s']:.0f} crops/s ({embedder.model_id})"
          + (f"; part by part: {by_part:.0f}" if by_part else ""), flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every stage: a run cut short (device time limit) still leaves its numbers
        (out / f"{a.name}.json").write_text(json.dumps(res, indent=2, default=str))

    save()
    gender = None
    if a.gender != "off":
        from server.attributes import IntelGenderConfig, build_gender

        gender = build_gender(IntelGenderConfig(), assets=a.assets)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = {"embedder": emb_cfg, "gender": {"mode": a.gender}, "assets": a.assets,
               "batch": {"max_crops": a.batch_crops, "max_wait_ms": 50, "overlap": not a.no_overlap,
                         "embed_process": a.embed_process, "embed_workers": a.embed_workers,
                         "commit_process": a.commit_process}}
        if a.switch_interval_ms:
            cfg["batch"]["switch_interval_ms"] = a.switch_interval_ms
        if a.commit_queue:
            cfg["batch"]["commit_queue"] = a.commit_queue
        if a.prepare_ahead:
            cfg["batch"]["prepare_ahead"] = a.prepare_ahead
        consumer_embedder = embedder
        if a.embed_process:
            from server.embed.remote import RemoteEmbedder

            consumer_embedder = RemoteEmbedder(emb_cfg, assets=a.assets, workers=a.embed_workers)
            warm = [j for _, j in jpegs[:a.batch_crops]]  # compile/graph capture is not throughput
            if consumer_embedder.decodes_jpegs:
                consumer_embedder.embed_jpegs(warm)
                # What the consumer's embed stage can do on its own: JPEG bytes in, vectors out, through the
                # worker processes (nvJPEG decode + resize + network).
                t = time.perf_counter()
                for _ in range(3):
                    consumer_embedder.embed_jpegs(warm)
                res["remote_jpegs_crops_s"] = 3 * len(warm) / (time.perf_counter() - t)
                print(f"  embed stage from JPEG bytes, {a.embed_workers} worker process(es): "
                      f"{res['remote_jpegs_crops_s']:.0f} crops/s", flush=True)
            consumer_embedder.embed(images[:a.batch_crops])
        res["pipeline"] = bench_pipeline(cfg, jpegs, Path(tmp) / "real", consumer_embedder, gender, n_crops=a.crops,
                                         vectors=a.vectors)
        print(f"  whole consumer: {res['pipeline']['crops_s']:.0f} crops/s, stages {res['pipeline']['stage_seconds']}, "
              f"threads {res['pipeline']['thread_seconds']}", flush=True)
        save()
        if a.host_crops:
            replay = ReplayModels(embedder, gender)
            replay.prime(images)
            res["host_only"] = bench_pipeline(cfg, jpegs, Path(tmp) / "host", replay, replay if gender else None,
                                              n_crops=a.host_crops, vectors=a.vectors)
            print(f"  host side only (model outputs replayed): {res['host_only']['crops_s']:.0f} crops/s, "
                  f"stages {res['host_only']['stage_seconds']}", flush=True)
            save()
        res["match"] = bench_match(embedder.dim, [int(s) for s in a.sizes.split(",") if s], a.queries, Path(tmp))
    save()
    try:
        chart(res, out / f"{a.name}.png")
    except ImportError:
        print("  (matplotlib missing: no chart)")
    m20 = res["match"].get("20000", {})
    host = res.get("host_only", {}).get("crops_s", float("nan"))
    print(f"RESULT {a.name} embed_crops_s={res['embed_crops_s']:.1f} "
          f"pipeline_crops_s={res['pipeline']['crops_s']:.1f} "
          f"match_p95_ms_20k={m20.get('ours_p95_ms', float('nan')):.2f} "
          f"qdrant_local_p95_ms_20k={m20.get('qdrant_local_p95_ms', float('nan')):.2f} "
          f"match_p95_ms_100k={res['match'].get('100000', {}).get('ours_p95_ms', float('nan')):.2f} "
          f"host_only_crops_s={host:.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
