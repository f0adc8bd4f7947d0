"""``python -m models``: export, quantise, package and verify model artifacts."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.logs import setup_logging
from schemas.model_manifest import ManifestError, verify_model_dir


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m models",
        description="Prepare detector/Re-ID model artifacts: export (needs internet + Ultralytics), "
        "INT8-quantise with your own calibration images, package with a sha256 manifest, verify.",
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export", help="Ultralytics .pt (or model name) -> FP32 OpenVINO IR")
    e.add_argument("weights", help="e.g. yolo11n.pt")
    e.add_argument("--out", type=Path, required=True)
    e.add_argument("--imgsz", type=int, default=640)
    q = sub.add_parser("quantize", help="FP32 IR -> INT8 IR with NNCF and a folder of calibration images")
    q.add_argument("fp32_xml", type=Path)
    q.add_argument("--calib", type=Path, required=True, help="folder of images from the target cameras")
    q.add_argument("--preset", required=True, help="model preset (input layout/normalisation); see `package -h`")
    q.add_argument("--out", type=Path, required=True, help="output .xml path")
    q.add_argument("--subset-size", type=int, default=300)
    k = sub.add_parser("package", help="copy a model dir into a versioned artifact with manifest.json")
    k.add_argument("src", type=Path)
    k.add_argument("--out", type=Path, required=True)
    k.add_argument("--preset", required=True)
    k.add_argument("--version", required=True)
    v = sub.add_parser("verify", help="check a model dir against its manifest.json (sizes + sha256)")
    v.add_argument("model_dir", type=Path)
    a = p.parse_args(argv)
    setup_logging("models", json_lines=False)

    from models.presets import PRESETS

    if a.cmd == "export":
        from models.export import export_openvino_fp32

        print(export_openvino_fp32(a.weights, a.out, a.imgsz))
    elif a.cmd == "quantize":
        from models.quantize import quantize_ir

        preset = PRESETS.get(a.preset)
        if preset is None:
            p.error(f"unknown preset {a.preset!r}; known: {', '.join(sorted(PRESETS))}")
        print(quantize_ir(a.fp32_xml, a.calib, preset.input, a.out, task=preset.task, subset_size=a.subset_size))
    elif a.cmd == "package":
        from models.manifest import package

        m = package(a.src, a.out, a.preset, a.version)
        print(f"{a.out}: {m.model_id} {m.version}, {len(m.files)} files")
    elif a.cmd == "verify":
        try:
            m = verify_model_dir(a.model_dir)
        except ManifestError as exc:
            print(f"FAILED: {exc}", file=sys.stderr)
            return 1
        print(f"ok: {m.model_id} {m.version} ({len(m.files)} files match)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
