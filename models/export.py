"""Ultralytics ``.pt`` → OpenVINO FP32 IR, for users with internet access.

The shipped INT8 IR was made this way upstream; here the export and the INT8 step are separate so
the calibration set is ours (``models/quantize.py``) and the result gets a manifest. Ultralytics
(and torch) are only needed for this step: install the ``bench`` extra.
"""

from __future__ import annotations

import shutil
from pathlib import Path


def export_openvino_fp32(weights: Path | str, out_dir: Path, imgsz: int = 640) -> Path:
    """Export YOLO weights to an FP32 OpenVINO IR in ``out_dir``; returns the .xml path.

    ``weights`` may be a local ``.pt`` file or a model name Ultralytics downloads (needs internet).
    """
    try:
        from ultralytics import YOLO
    except ImportError as exc:
        raise RuntimeError("export needs Ultralytics: pip install '.[bench]' (it brings torch)") from exc
    exported = Path(YOLO(str(weights)).export(format="openvino", imgsz=imgsz, half=False, int8=False, dynamic=False))
    out_dir.mkdir(parents=True, exist_ok=True)
    xml = next(exported.glob("*.xml"))
    for f in exported.iterdir():
        shutil.copy2(f, out_dir / f.name)
    return out_dir / xml.name
