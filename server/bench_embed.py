"""`just bench-embed [assets]`: throughput of the embedding stage alone, ours beside the plain-torch peer.

CPU mode (default on a machine without CUDA): the serving choices on this CPU, in interleaved
rounds (A B C ... A B C ...), on real Market crops (64×128, resized to 256×128 inside the stage):
  ours   = OSNet x0_25 on OpenVINO (in-graph preprocessing, folded BatchNorm)
  peer   = the same weights in eager fp32 PyTorch, unfused — what torchreid's FeatureExtractor runs
  also   = our torch path on CPU, Intel 0288 and 0277 IRs.
GPU mode (``--device cuda``): for batch sizes 64..1024,
  model-only: ours (BN folded, fp16, channels_last, optional CUDA graph) vs peer (fp32 eager, unfused),
  end-to-end from host BGR crops (CPU resize + upload) and from JPEG bytes (nvJPEG batched decode on the GPU),
  and the GPU JPEG decode alone.
Writes results/bench-embed{,-gpu}.json + .png; last line ``RESULT bench-embed... key=value``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from common.assets import data_path, require


def market_crops(assets: str | None, n: int) -> list[np.ndarray]:
    folder = require(data_path("market1501_subset", "bounding_box_test", assets=assets), "Market-1501 subset")
    imgs = [cv2.imread(str(f)) for f in sorted(folder.glob("*.jpg"))]
    return [imgs[i % len(imgs)] for i in range(n)]


def interleaved(fns: dict[str, Callable[[], int]], rounds: int, min_s: float) -> dict[str, list[float]]:
    """Items/s per round for each fn, run A B C A B C ... so drift and neighbours hit all alike."""
    for fn in fns.values():
        fn()  # warm-up
    rates: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0, items = time.perf_counter(), 0
            while True:
                items += fn()
                dt = time.perf_counter() - t0
                if dt >= min_s:
                    break
            rates[name].append(items / dt)
    return rates


def summarise(rates: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    return {k: {"median": round(statistics.median(v), 1), "min": round(min(v), 1), "max": round(max(v), 1)}
            for k, v in rates.items()}


def bench_cpu(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from server.embed.base import build_embedder
    from server.embed.osnet_model import INPUT_HEIGHT as HEIGHT
    from server.embed.osnet_model import INPUT_WIDTH as WIDTH
    from server.embed.osnet_torch import load_osnet, resolve_osnet_weights
    from server.embed.preprocess import resize_stack

    crops = market_crops(args.assets, args.batch)
    threads = args.threads
    torch.set_num_threads(threads)
    ours = build_embedder({"type": "osnet_openvino", "batch_size": args.batch, "threads": threads}, args.assets)
    ours_torch = build_embedder({"type": "osnet_torch", "device": "cpu", "batch_size": args.batch,
                                 "threads": threads}, args.assets)
    i288 = build_embedder({"type": "intel_reid", "model": "0288", "batch_size": args.batch, "threads": threads},
                          args.assets)
    i277 = build_embedder({"type": "intel_reid", "model": "0277", "batch_size": args.batch, "threads": threads},
                          args.assets)
    peer_model = load_osnet(resolve_osnet_weights("msmt17", None, None, args.assets))  # unfused, fp32, eager
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    def peer() -> int:
        x = torch.from_numpy(resize_stack(crops, HEIGHT, WIDTH)[..., ::-1].copy()).permute(0, 3, 1, 2).float()
        with torch.inference_mode():
            f = peer_model((x / 255.0 - mean) / std)
        torch.nn.functional.normalize(f, dim=1).numpy()
        return len(crops)

    fns = {
        "ours_osnet_openvino": lambda: len(ours.embed(crops)),
        "peer_osnet_torch_eager_fp32": peer,
        "ours_osnet_torch_folded": lambda: len(ours_torch.embed(crops)),
        "intel_0288_openvino": lambda: len(i288.embed(crops)),
        "intel_0277_openvino": lambda: len(i277.embed(crops)),
    }
    rates = summarise(interleaved(fns, args.rounds, args.min_seconds))
    ratio = rates["ours_osnet_openvino"]["median"] / rates["peer_osnet_torch_eager_fp32"]["median"]
    return {"mode": "cpu", "cpu": platform.processor() or platform.machine(), "threads": threads,
            "batch": args.batch, "crop_size_in": "64x128 Market JPEG crops (decoded), resized in-stage to 256x128",
            "crops_per_s": rates, "ratio_ours_vs_peer": round(ratio, 2),
            "torch": torch.__version__}


def bench_gpu(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from server.embed.base import OsnetTorchConfig
    from server.embed.jpeg_gpu import decode_resize_jpegs_gpu
    from server.embed.osnet_model import INPUT_HEIGHT as HEIGHT
    from server.embed.osnet_model import INPUT_WIDTH as WIDTH
    from server.embed.osnet_torch import OsnetTorchEmbedder, load_osnet, resolve_osnet_weights

    dev = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    peer_model = load_osnet(resolve_osnet_weights("msmt17", None, None, args.assets)).to(dev)
    emb = OsnetTorchEmbedder(OsnetTorchConfig(device="cuda", batch_size=max(args.batches)), assets=args.assets)
    emb_nv = OsnetTorchEmbedder(OsnetTorchConfig(device="cuda", batch_size=max(args.batches), jpeg_decoder="nvjpeg"),
                                assets=args.assets)
    ours_model = emb.model
    mean, std = emb._mean, emb._std

    def sync_rate(fn: Callable[[], None], n: int, min_s: float) -> float:
        fn()
        torch.cuda.synchronize()
        t0, items = time.perf_counter(), 0
        while time.perf_counter() - t0 < min_s:
            for _ in range(5):
                fn()
                items += n
            torch.cuda.synchronize()
        return items / (time.perf_counter() - t0)

    model_only: dict[str, Any] = {}
    for bs in args.batches:
        u8 = torch.randint(0, 256, (bs, 3, HEIGHT, WIDTH), dtype=torch.uint8, device=dev)

        def ours(u8: torch.Tensor = u8) -> None:
            with torch.inference_mode():
                x = ((u8.float() - mean) / std).half().contiguous(memory_format=torch.channels_last)
                torch.nn.functional.normalize(ours_model(x).float(), dim=1)

        def peer(u8: torch.Tensor = u8) -> None:
            with torch.inference_mode():
                x = (u8.float() - mean) / std
                torch.nn.functional.normalize(peer_model(x), dim=1)

        # CUDA graph of "ours": one launch for the whole forward (small kernels → launch-bound at small batch).
        static_in = u8.clone()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s), torch.inference_mode():
            for _ in range(3):
                x = ((static_in.float() - mean) / std).half().contiguous(memory_format=torch.channels_last)
                ours_model(x)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.inference_mode():
            x = ((static_in.float() - mean) / std).half().contiguous(memory_format=torch.channels_last)
            static_out = torch.nn.functional.normalize(ours_model(x).float(), dim=1)
        del static_out

        rates: dict[str, list[float]] = {"ours_fp16_cl": [], "ours_fp16_cl_cudagraph": [], "peer_fp32_eager": []}
        for _ in range(args.rounds):
            rates["ours_fp16_cl"].append(sync_rate(ours, bs, args.min_seconds))
            rates["ours_fp16_cl_cudagraph"].append(sync_rate(graph.replay, bs, args.min_seconds))
            rates["peer_fp32_eager"].append(sync_rate(peer, bs, args.min_seconds))
        model_only[str(bs)] = summarise(rates)
        print(f"batch {bs}: {model_only[str(bs)]}", flush=True)
        del graph

    # End to end from host crops and from JPEG bytes at the largest batch.
    bs = max(args.batches)
    crops = market_crops(args.assets, bs)
    big = [cv2.resize(c, (96, 192)) for c in crops]  # project-made larger crops, closer to edge best shots
    jpegs_small = [cv2.imencode(".jpg", c, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes() for c in crops]
    jpegs_big = [cv2.imencode(".jpg", c, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes() for c in big]
    from torchvision.io import ImageReadMode, decode_jpeg

    t_big = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in jpegs_big]
    cases = {
        "embed_host_crops_64x128": lambda: emb.embed(crops),
        "embed_host_crops_96x192": lambda: emb.embed(big),
        "embed_jpegs_cpu_threads_64x128": lambda: emb.embed_jpegs(jpegs_small),
        "embed_jpegs_cpu_threads_96x192": lambda: emb.embed_jpegs(jpegs_big),
        "embed_jpegs_gpu_decode_64x128": lambda: emb_nv.embed_jpegs(jpegs_small),
        "embed_jpegs_gpu_decode_96x192": lambda: emb_nv.embed_jpegs(jpegs_big),
        "decode_resize_gpu_64x128": lambda: decode_resize_jpegs_gpu(jpegs_small, dev),
        "decode_resize_gpu_96x192": lambda: decode_resize_jpegs_gpu(jpegs_big, dev),
        "nvjpeg_decode_only_96x192": lambda: decode_jpeg(t_big, mode=ImageReadMode.RGB, device=dev),
    }
    e2e: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(args.rounds):
        for name, fn in cases.items():
            e2e[name].append(sync_rate(fn, bs, args.min_seconds))
    end_to_end = summarise(e2e)
    print(f"end to end (batch {bs}): {end_to_end}", flush=True)
    best_bs = max(model_only, key=lambda b: model_only[b]["ours_fp16_cl_cudagraph"]["median"])
    return {"mode": "gpu", "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
            "model_only_crops_per_s": model_only, "end_to_end_crops_per_s": end_to_end, "end_to_end_batch": bs,
            "best_batch": int(best_bs),
            "best_crops_per_s": model_only[best_bs]["ours_fp16_cl_cudagraph"]["median"],
            "ratio_ours_vs_peer_at_best": round(model_only[best_bs]["ours_fp16_cl_cudagraph"]["median"]
                                                / model_only[best_bs]["peer_fp32_eager"]["median"], 2)}


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if result["mode"] == "cpu":
        fig, ax = plt.subplots(figsize=(9, 4.5))
        names = list(result["crops_per_s"])
        vals = [result["crops_per_s"][n]["median"] for n in names]
        colors = ["tab:green" if n.startswith("ours") else "tab:grey" if n.startswith("peer") else "tab:blue"
                  for n in names]
        ax.barh(names, vals, color=colors)
        for i, v in enumerate(vals):
            ax.text(v, i, f" {v:.0f}", va="center")
        ax.set_xlabel("crops/s (median of interleaved rounds)")
        ax.set_title(f"Embedding stage on {result['threads']} CPU threads, batch {result['batch']}: "
                     f"ours/peer = {result['ratio_ours_vs_peer']}×")
    else:
        fig, ax = plt.subplots(figsize=(9, 5))
        bss = list(result["model_only_crops_per_s"])
        for key, style in (("ours_fp16_cl_cudagraph", "-o"), ("ours_fp16_cl", "-s"), ("peer_fp32_eager", "--^")):
            ax.plot([int(b) for b in bss], [result["model_only_crops_per_s"][b][key]["median"] for b in bss], style,
                    label=key)
        ax.axhline(25000, color="red", lw=0.8, ls=":", label="target 25k/s")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel("crops/s")
        ax.set_title(f"OSNet x0_25 on {result['gpu']} (model only)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("assets", nargs="?", default=None)
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--batch", type=int, default=64, help="CPU batch size")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads for every CPU runtime")
    ap.add_argument("--batches", default="64,128,256,512,1024", help="GPU batch sizes")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--min-seconds", type=float, default=2.0)
    ap.add_argument("--out", default="results")
    args = ap.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    device = args.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    result = bench_gpu(args) if device == "cuda" else bench_cpu(args)
    name = "bench-embed-gpu" if device == "cuda" else "bench-embed"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2))
    plot(result, out / f"{name}.png")
    if device == "cuda":
        e2e = result["end_to_end_crops_per_s"]
        print(f"RESULT {name} crops_per_s={result['best_crops_per_s']} best_batch={result['best_batch']} "
              f"ratio_vs_peer={result['ratio_ours_vs_peer_at_best']} "
              f"jpeg_e2e_crops_per_s={e2e['embed_jpegs_cpu_threads_96x192']['median']} "
              f"nvjpeg_e2e_crops_per_s={e2e['embed_jpegs_gpu_decode_96x192']['median']} "
              f"jpeg_decode_per_s={e2e['nvjpeg_decode_only_96x192']['median']} "
              f"host_crops_e2e_crops_per_s={e2e['embed_host_crops_96x192']['median']}")
    else:
        r = result["crops_per_s"]
        print(f"RESULT {name} crops_per_s={r['ours_osnet_openvino']['median']} "
              f"peer_crops_per_s={r['peer_osnet_torch_eager_fp32']['median']} ratio={result['ratio_ours_vs_peer']} "
              f"intel_0277_crops_per_s={r['intel_0277_openvino']['median']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
