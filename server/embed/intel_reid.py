"""Intel OMZ person-reidentification-retail-0277/0286/0287/0288 (OmniScaleNet-based, 256-d) on OpenVINO.

OMZ convention: BGR, 0–255, no normalisation, 256×128 stretch. These are the CPU alternatives that
need no torch at all; 0277 is also the most accurate model on the Market subset (see
docs/server-models.md), at roughly 3× OSNet x0_25's compute.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from server.embed.base import IntelReidConfig
from server.embed.openvino_runner import OpenVinoEmbedRunner
from server.embed.weights import omz_ir

log = logging.getLogger(__name__)


class IntelReidEmbedder:
    def __init__(self, cfg: IntelReidConfig, assets: str | None = None) -> None:
        import openvino as ov

        self.cfg = cfg
        xml, precision = omz_ir(f"person-reidentification-retail-{cfg.model}", cfg.precision, assets)
        model = ov.Core().read_model(xml)
        self._runner = OpenVinoEmbedRunner(model, height=256, width=128, rgb=False, mean=None, scale=None,
                                           device=cfg.device, threads=cfg.threads, batch_size=cfg.batch_size)
        self.dim = self._runner.dim
        self.model_id = f"intel_reid_{cfg.model}_{precision.lower().replace('-', '_')}_256x128"
        log.info("intel re-id embedder ready", extra={"model_id": self.model_id, "xml": str(xml)})

    def embed(self, crops_bgr: Sequence[np.ndarray]) -> np.ndarray:
        return self._runner.embed(crops_bgr)
