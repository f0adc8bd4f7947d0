"""Records image measurements in results/image.json and prints the RESULT line.

``build`` is called by build.sh (build time, sizes); ``boot`` by the boot test (boot-to-ready time).
Both merge into one JSON file so `just image` and `just image-test` can run separately.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from pathlib import Path

MIB = 1024 * 1024


def merge(results: Path, section: str, data: dict) -> dict:
    results.parent.mkdir(parents=True, exist_ok=True)
    try:
        doc = json.loads(results.read_text())
    except (OSError, ValueError):
        doc = {}
    doc[section] = {**data, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    tmp = results.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, results)
    return doc


def chart(doc: dict, png: Path) -> None:
    """Boot timeline and sizes. The prototype figures from issue 6 (~100 s to the service being ready,
    425-710 MiB compressed with the payload) are drawn as reference lines: they were reported there, not
    re-measured side by side here, and the chart says so."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    boot, build = doc.get("boot", {}), doc.get("build", {})
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    keys = [("status_page_s", "status page up"), ("boot_to_ready_s", "appliance healthy"),
            ("first_frame_s", "frames on host Kafka")]
    vals = [boot.get(k) or 0 for k, _ in keys]
    ax1.barh([label for _, label in keys], vals, color="#2a7")
    ax1.axvline(100, color="#c22", ls="--", label="issue 6 prototype: ~100 s to ready (reported)")
    ax1.set_xlabel("seconds after qemu start (TCG, -smp 2, no KVM)")
    ax1.set_title("boot under qemu TCG")
    ax1.legend(loc="lower right", fontsize=8)
    sizes = [build.get("compressed_mib") or 0, build.get("root_erofs_mib") or 0, build.get("disk_mib") or 0]
    ax2.bar(["image .zst", "root erofs", "raw disk"], sizes, color="#27a")
    ax2.axhspan(425, 710, color="#c22", alpha=0.15, label="issue 6 prototype: 425-710 MiB compressed (reported)")
    ax2.set_ylabel("MiB")
    ax2.set_title(f"image size (build {build.get('build_s', '?')} s)")
    ax2.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--image", type=Path, required=True)
    b.add_argument("--compressed", type=Path, required=True)
    b.add_argument("--root", type=Path, required=True)
    b.add_argument("--build-s", type=float, required=True)
    b.add_argument("--version", required=True)
    b.add_argument("--results", type=Path, required=True)
    args = ap.parse_args()
    st = args.image.stat()
    data = {
        "version": args.version,
        "build_s": args.build_s,
        "image": str(args.image),
        "disk_mib": round(st.st_size / MIB, 1),
        "disk_allocated_mib": round(st.st_blocks * 512 / MIB, 1),
        "compressed_mib": round(args.compressed.stat().st_size / MIB, 1),
        "root_erofs_mib": round(args.root.stat().st_size / MIB, 1),
        "cpus": os.cpu_count(),
    }
    doc = merge(args.results, "build", data)
    with contextlib.suppress(ImportError):  # matplotlib is not in every venv; the JSON is the record
        chart(doc, args.results.with_suffix(".png"))
    print(f"    image: {args.image}\n    compressed: {args.compressed} (+ .sha256)")
    print("RESULT image_build " + " ".join(f"{k}={data[k]}" for k in
                                            ("build_s", "compressed_mib", "disk_mib", "disk_allocated_mib",
                                             "root_erofs_mib")))


if __name__ == "__main__":
    main()
