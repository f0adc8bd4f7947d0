"""Records image measurements in results/image.json and prints the RESULT line.

``build`` is called by build.sh (build time, sizes); ``boot`` by the boot test (boot-to-ready time).
Both merge into one JSON file so `just image` and `just image-test` can run separately.
"""

from __future__ import annotations

import argparse
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
    merge(args.results, "build", data)
    print(f"    image: {args.image}\n    compressed: {args.compressed} (+ .sha256)")
    print("RESULT image_build " + " ".join(f"{k}={data[k]}" for k in
                                            ("build_s", "compressed_mib", "disk_mib", "disk_allocated_mib",
                                             "root_erofs_mib")))


if __name__ == "__main__":
    main()
