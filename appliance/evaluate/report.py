"""Where evaluation results go: ``results/<name>.json``, ``results/<name>.png`` and a RESULT line."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

from common.assets import REPO_ROOT

RESULTS_DIR = REPO_ROOT / "results"


def write_json(name: str, payload: dict[str, Any], results_dir: Path = RESULTS_DIR) -> Path:
    """Atomic write (tmp + rename) so a crashed run never leaves half a file behind."""
    results_dir.mkdir(parents=True, exist_ok=True)
    payload = {
        "name": name,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": {
            "cpu": _cpu_model(),
            "allowed_cpus": len(os.sched_getaffinity(0)),
            "python": platform.python_version(),
            "load_average_1m_at_end": round(os.getloadavg()[0], 2),  # shared machines: read timings with this
        },
        **payload,
    }
    path = results_dir / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)
    return path


def result_line(name: str, metrics: dict[str, float | int | str]) -> str:
    parts = [f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()]
    return f"RESULT {name} " + " ".join(parts)


def bar_chart(
    path: Path,
    title: str,
    groups: list[str],
    series: dict[str, list[float]],
    ylabel: str,
    *,
    higher_better: bool = True,
) -> Path:
    """Grouped bars, one group per metric, one bar per system (ours first)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(groups) * len(series) / 2 + 2), 3.8), dpi=120)
    width = 0.8 / len(series)
    for i, (label, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        bars = ax.bar(xs, values, width, label=label)
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel(ylabel + ("" if higher_better else " (lower is better)"))
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    ax.margins(y=0.15)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()
