"""Person detectors. ``build_detector(cfg)`` imports the chosen backend only when asked for it."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from appliance.detect.base import Detector, DetectorConfig

# name -> "module:Class"; a backend is imported only when a config names it.
DETECTORS: dict[str, str] = {
    "openvino": "appliance.detect.openvino:OpenVinoDetector",
}


def build_detector(cfg: DetectorConfig) -> Detector:
    """Construct the backend ``cfg.type`` names; an unknown name fails listing the known ones."""
    try:
        target = DETECTORS[cfg.type]
    except KeyError:
        raise ValueError(f"unknown detector type {cfg.type!r}; known: {', '.join(sorted(DETECTORS))}") from None
    module_name, class_name = target.split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(cfg)


__all__ = ["DETECTORS", "build_detector"]
