"""Summarise `ab_server_gpu.sh` runs: whole-consumer crops/s per variant, each against the base variant.

    python -m benchmarks.ab_summary --name NAME [--base base] RUN.json ...

Each RUN.json is one `server.bench` run named ``ab-<variant>-<round>`` (or a ``bench-server-gpu-...-<variant>-<round>``
copy of one). Variants only compare within the same lease, where they alternated on the same machine; the files
passed should come from one lease. Writes results/<NAME>.json + .png (every run as a dot, the mean as a bar, the
target as a line) and prints ``RESULT <NAME> <variant>_mean=... <variant>_min=... ratio_<variant>_vs_<base>=...``.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path
from typing import Any

TARGET = 10_000.0
_NAME = re.compile(r"-(?P<variant>[A-Za-z0-9]+)-(?P<round>\d+)$")


def load_runs(paths: list[Path]) -> dict[str, list[dict[str, Any]]]:
    runs: dict[str, list[dict[str, Any]]] = {}
    for p in paths:
        data = json.loads(p.read_text())
        m = _NAME.search(data.get("args", {}).get("name") or p.stem)
        if not m:
            raise SystemExit(f"{p}: its run name does not end in -<variant>-<round>")
        pipe = data["pipeline"]
        threads = pipe.get("threads", {})
        runs.setdefault(m["variant"], []).append({
            "file": p.name, "crops_s": round(pipe["crops_s"], 1), "gpu": data.get("gpu"),
            "prepare_wall_s": threads.get("prepare_wall_s"), "finish_wall_s": threads.get("finish_wall_s"),
            "match_batch_wall_s": threads.get("match_batch_wall_s"),
            "match_batch_cpu_s": threads.get("match_batch_cpu_s"),
        })
    return runs


def summarise(runs: dict[str, list[dict[str, Any]]], base: str) -> dict[str, Any]:
    gpus = sorted({r["gpu"] for rs in runs.values() for r in rs if r["gpu"]})
    out: dict[str, Any] = {"gpus": gpus, "target_crops_s": TARGET, "base": base, "variants": {}}
    base_mean = statistics.mean(r["crops_s"] for r in runs[base]) if base in runs else None
    for v, rs in sorted(runs.items(), key=lambda kv: kv[0] != base):  # the base first
        rates = [r["crops_s"] for r in rs]
        entry = {"runs": rs, "mean": round(statistics.mean(rates), 1), "min": min(rates), "max": max(rates),
                 "runs_at_target": sum(x >= TARGET for x in rates), "n": len(rates)}
        if base_mean:
            entry["ratio_vs_base"] = round(entry["mean"] / base_mean, 3)
        out["variants"][v] = entry
    return out


def plot(summary: dict[str, Any], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(summary["variants"])
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(variants)), 4.5))
    for i, v in enumerate(variants):
        e = summary["variants"][v]
        ax.bar(i, e["mean"], 0.6, color="tab:grey" if v == summary["base"] else "tab:green", alpha=0.6)
        ax.scatter([i] * e["n"], [r["crops_s"] for r in e["runs"]], color="black", s=14, zorder=3)
        label = f"{e['mean'] / 1000:.2f}k" + (f"\n×{e['ratio_vs_base']:.2f}" if "ratio_vs_base" in e else "")
        ax.text(i, e["mean"], label, ha="center", va="bottom", fontsize=9)
    ax.axhline(summary["target_crops_s"], color="red", ls=":", lw=1, label="target 10k crops/s")
    ax.set_xticks(range(len(variants)), [f"{v}{' (base)' if v == summary['base'] != 'base' else ''}" for v in variants])
    ax.set_ylabel("whole consumer, crops/s (dots: runs; bar: mean)")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="server.bench JSONs of one lease")
    ap.add_argument("--name", required=True, help="results/<name>.json and .png")
    ap.add_argument("--base", default="base", help="the variant the others are divided by")
    ap.add_argument("--title", default="", help="chart title (default: the GPU and the variants)")
    ap.add_argument("--out", type=Path, default=Path("results"))
    a = ap.parse_args(argv)
    summary = summarise(load_runs(a.runs), a.base)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"{a.name}.json").write_text(json.dumps(summary, indent=2))
    plot(summary, a.out / f"{a.name}.png",
         a.title or f"Whole consumer, 60k crops, {', '.join(summary['gpus'])}: variants alternating in one lease")
    parts = []
    for v, e in summary["variants"].items():
        parts += [f"{v}_mean={e['mean']:.0f}", f"{v}_min={e['min']:.0f}",
                  f"{v}_at_target={e['runs_at_target']}/{e['n']}"]
        if v != a.base and "ratio_vs_base" in e:
            parts.append(f"ratio_{v}_vs_{a.base}={e['ratio_vs_base']:.2f}")
    print(f"RESULT {a.name} " + " ".join(parts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
