"""OSNet x0_25 served by OpenVINO on the CPU: the verified torchreid weights, converted in-process.

The checkpoint is loaded strictly into the project's own OSNet module (needs ``torch`` at start-up
only), converted with ``openvino.convert_model`` and compiled with ImageNet normalisation and
BGR→RGB folded into the graph. See docs/server-models.md for its speed against torch on the CPU.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from server.embed.base import OsnetOpenVinoConfig
from server.embed.openvino_runner import OpenVinoEmbedRunner

log = logging.getLogger(__name__)


def convert_osnet(model: object) -> object:
    import openvino as ov
    import torch

    with torch.no_grad():
        return ov.convert_model(model, example_input=torch.zeros(1, 3, 256, 128))


class OsnetOpenVinoEmbedder:
    def __init__(self, cfg: OsnetOpenVinoConfig, assets: str | None = None) -> None:
        from server.embed.osnet_model import fold_batchnorm
        from server.embed.osnet_torch import IMAGENET_MEAN_RGB, IMAGENET_STD_RGB, load_osnet, resolve_osnet_weights

        self.cfg = cfg
        path = resolve_osnet_weights(cfg.weights, cfg.weights_path, cfg.sha256, assets)
        ov_model = convert_osnet(fold_batchnorm(load_osnet(path)))
        self._runner = OpenVinoEmbedRunner(
            ov_model, height=256, width=128, rgb=True,
            mean=[255.0 * m for m in IMAGENET_MEAN_RGB], scale=[255.0 * s for s in IMAGENET_STD_RGB],
            device=cfg.device, threads=cfg.threads, batch_size=cfg.batch_size)
        self.dim = self._runner.dim
        self.model_id = f"osnet_x0_25_{cfg.weights if not cfg.weights_path else 'custom'}_256x128"
        log.info("osnet openvino embedder ready", extra={"model_id": self.model_id, "path": str(path)})

    def embed(self, crops_bgr: Sequence[np.ndarray]) -> np.ndarray:
        return self._runner.embed(crops_bgr)
