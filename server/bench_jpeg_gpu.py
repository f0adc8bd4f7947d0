"""`just bench-jpeg-gpu [assets]`: GPU JPEG decoders side by side, alone and with processes sharing the card.

The whole consumer's embedding side decodes every crop's JPEG on the GPU in 2-3 embedder worker processes.
torchvision's nvJPEG (the peer, our default) runs on the SMs and stays at ~15-16k small crops/s per GPU however
many processes share it. nvImageCodec can send the same JPEGs to the card's hardware JPEG engines instead. This
measures, on real Market-1501 crops (64x128, as the appliance ships them), in rounds A B C A B C:

- ``decode``: bytes → (N, 3, 256, 128) resized RGB on the GPU, for each decoder;
- ``embed``: the embedder's whole ``embed_jpegs`` (decode + resize + OSNet x0_25 fp16) with that decoder;

each with 1 process and with ``--procs`` processes at once (all start together at a barrier; the rate is all
crops over the slowest process's time). It also checks every decoder against OpenCV's CPU decode of the same
bytes (largest pixel difference after the resize, cosine of the embeddings).

Writes results/bench-jpeg-gpu.json + .png; last line ``RESULT bench-jpeg-gpu key=value ...``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import time
from pathlib import Path
from typing import Any

from common.assets import data_path, require

DECODERS = {"nvjpeg": {"jpeg_decoder": "nvjpeg"},
            "nvimgcodec_hw": {"jpeg_decoder": "nvimgcodec", "nvimgcodec_backends": "hw"},
            "nvimgcodec_cuda": {"jpeg_decoder": "nvimgcodec", "nvimgcodec_backends": "cuda"}}


def market_jpegs(assets: str | None, n: int) -> list[bytes]:
    folder = require(data_path("market1501_subset", "bounding_box_test", assets=assets), "Market-1501 subset")
    files = sorted(folder.glob("*.jpg"))
    return [files[i % len(files)].read_bytes() for i in range(n)]


def _worker(rank: int, args: argparse.Namespace, decoders: list[str], barrier: Any, out: Any) -> None:
    try:
        _measure(rank, args, decoders, barrier, out)
    except BaseException:
        import traceback

        out.put(("error", f"process {rank}: {traceback.format_exc()}"))
        barrier.abort()  # the others stop waiting for this one


def _measure(rank: int, args: argparse.Namespace, decoders: list[str], barrier: Any, out: Any) -> None:
    import torch

    from server.embed import build_embedder

    jpegs = market_jpegs(args.assets, args.batch)
    embedders = {d: build_embedder({"type": "osnet_torch", "device": "cuda", "batch_size": args.batch,
                                    **DECODERS[d]}, assets=args.assets) for d in decoders}
    cases = {}
    for d, emb in embedders.items():
        cases[("decode", d)] = lambda emb=emb: emb._decode_resize_gpu(jpegs, 0)
        cases[("embed", d)] = lambda emb=emb: emb.embed_jpegs(jpegs)
    for fn in cases.values():  # warm-up: allocator pools, decoder state, cuDNN choices
        for _ in range(3):
            fn()
    torch.cuda.synchronize()
    if rank == 0:
        out.put(("check", _check(embedders, jpegs)))
    for rnd in range(args.rounds):
        for (what, d), fn in cases.items():
            for procs in (1, args.procs):
                barrier.wait()
                if rank < procs:
                    t0, n = time.perf_counter(), 0
                    while time.perf_counter() - t0 < args.min_seconds:
                        fn()
                        n += len(jpegs)
                    torch.cuda.synchronize()
                    out.put(("rate", (rnd, what, d, procs, n, time.perf_counter() - t0)))
                barrier.wait()
    out.put(("done", rank))


def _check(embedders: dict[str, Any], jpegs: list[bytes]) -> dict[str, Any]:
    """Every GPU decoder against OpenCV's decode of the same bytes, through the same resize and network."""
    from server.embed.osnet_torch import decode_jpegs_cpu

    any_emb = next(iter(embedders.values()))
    crops = decode_jpegs_cpu(jpegs)
    ref_pix = any_emb._upload_resize(crops, 0)
    ref_vec = any_emb.embed(crops)
    res = {}
    for d, emb in embedders.items():
        pix = emb._decode_resize_gpu(jpegs, 0)
        vec = emb.embed_jpegs(jpegs)
        diff = (pix - ref_pix).abs()
        res[d] = {"max_abs_pixel_diff": round(float(diff.max()), 2),
                  "mean_abs_pixel_diff": round(float(diff.mean()), 3),
                  "min_cosine_vs_opencv": round(float((vec * ref_vec).sum(1).min()), 5)}
    return res


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    decoders = [d for d in args.decoders.split(",") if d]
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(args.procs, timeout=600), ctx.Queue()
    workers = [ctx.Process(target=_worker, args=(r, args, decoders, barrier, out), daemon=True)
               for r in range(args.procs)]
    for w in workers:
        w.start()
    raw: dict[tuple[str, str, int], dict[int, list[tuple[int, float]]]] = {}
    check: dict[str, Any] = {}
    done = 0
    while done < args.procs:
        kind, payload = out.get(timeout=900)
        if kind == "error":
            for w in workers:
                w.terminate()
            raise RuntimeError(payload)
        if kind == "check":
            check = payload
        elif kind == "rate":
            rnd, what, d, procs, n, dt = payload
            raw.setdefault((what, d, procs), {}).setdefault(rnd, []).append((n, dt))
        else:
            done += 1
    for w in workers:
        w.join(timeout=60)
    rates: dict[str, dict[str, Any]] = {}
    for (what, d, procs), by_round in raw.items():
        vals = [sum(n for n, _ in runs) / max(dt for _, dt in runs) for runs in by_round.values()]
        rates[f"{what}_p{procs}_{d}"] = {"median": round(statistics.median(vals), 1), "min": round(min(vals), 1),
                                         "max": round(max(vals), 1)}
    return {"gpu": torch.cuda.get_device_name(0), "batch": args.batch, "procs": args.procs, "rounds": args.rounds,
            "crops_per_s": rates, "check_vs_opencv": check}


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=False)
    decoders = sorted({k.split("_", 2)[2] for k in result["crops_per_s"]}, key=lambda d: d != "nvjpeg")
    colors = {"nvjpeg": "tab:grey", "nvimgcodec_hw": "tab:green", "nvimgcodec_cuda": "tab:blue"}
    for ax, what in zip(axes, ("decode", "embed"), strict=True):
        groups = (1, result["procs"])
        width = 0.8 / len(decoders)
        for j, d in enumerate(decoders):
            vals = [result["crops_per_s"].get(f"{what}_p{p}_{d}", {}).get("median", 0.0) for p in groups]
            xs = [i + j * width for i in range(len(groups))]
            label = d + (" (torchvision, the default)" if d == "nvjpeg" else "")
            ax.bar(xs, vals, width, label=label, color=colors.get(d))
            for x, v in zip(xs, vals, strict=True):
                ax.text(x, v, f"{v / 1000:.1f}k", ha="center", va="bottom", fontsize=8)
        ax.set_xticks([i + width * (len(decoders) - 1) / 2 for i in range(len(groups))],
                      [f"{p} process{'es' if p > 1 else ''}" for p in groups])
        ax.set_title({"decode": "decode + resize", "embed": "embed_jpegs (decode + resize + OSNet)"}[what])
        ax.set_ylabel("crops/s, all processes (median of rounds)")
        ax.legend(fontsize=8)
    agree = ", ".join(f"{d} {c['min_cosine_vs_opencv']:.4f}" for d, c in result.get("check_vs_opencv", {}).items())
    fig.suptitle(f"JPEG crops on {result['gpu']}, {result['batch']} Market-1501 crops a call"
                 + (f"\nembedding cosine vs OpenCV's decode (min over crops): {agree}" if agree else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("assets", nargs="?", default=None, help="shared assets folder (default ../shared/assets)")
    ap.add_argument("--decoders", default="nvjpeg,nvimgcodec_hw", help=f"comma list of {', '.join(DECODERS)}; "
                    "nvimgcodec_cuda with nvimgcodec_hw fails on an H100 (a second nvImageCodec decoder in one "
                    "process: 'Could not create decoder'), so give it alone")
    ap.add_argument("--batch", type=int, default=512, help="crops per call (the embedder's batch_size)")
    ap.add_argument("--procs", type=int, default=3, help="processes sharing the GPU (the consumer's embed_workers)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--min-seconds", type=float, default=2.0, help="each case's run per round")
    ap.add_argument("--out", default="results")
    ap.add_argument("--name", default="bench-jpeg-gpu")
    ap.add_argument("--replot", metavar="JSON", help="redraw the chart and RESULT line from an earlier run's JSON")
    args = ap.parse_args(argv)
    result = json.loads(Path(args.replot).read_text()) if args.replot else run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=2))
    plot(result, out / f"{args.name}.png")
    print(json.dumps(result, indent=2))
    r = result["crops_per_s"]
    keys = [f"{w}_p{p}_{d}" for w in ("decode", "embed") for p in (1, result["procs"])
            for d in ("nvjpeg", "nvimgcodec_hw")]
    line = " ".join(f"{k}={r[k]['median']:.0f}" for k in keys if k in r)
    p = result["procs"]
    ours, peer = r.get(f"embed_p{p}_nvimgcodec_hw"), r.get(f"embed_p{p}_nvjpeg")
    if ours and peer:
        line += f" ratio_embed_p{p}_hw_vs_nvjpeg={ours['median'] / peer['median']:.2f}"
    print(f"RESULT {args.name} {line}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
