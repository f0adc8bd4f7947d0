"""Identity match thresholds calibrated per re-id model.

Why per model: cosine scales differ by model far more than people differ within one. On the Market-1501
subset's cross-camera pairs, two different people score a median cosine of 0.08 with Intel's 0277 but
0.46 with OSNet x0_25 MSMT17, whose post-ReLU features are all non-negative. One threshold for all either
merges strangers (OSNet at 0.55: 50 % pairwise precision on TUD-Campus) or splits everybody. So the
default of ``identity.match_threshold`` is the threshold measured for the configured model, and a
model without a measurement needs an explicit threshold rather than a guess.

Procedure (``just eval-reid`` re-measures every shipped model and prints it beside this table): the
threshold that maximises pairwise F1 of "same person" over every cross-camera pair of the Market-1501
subset (same person = true pair), on a 0.01 grid. ``just eval-xcam`` then reports the whole server at that
default on PETS09-S2L1 video, and a ``--sweep`` on TUD-Campus halves cross-checks it (docs/server.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Calibration:
    threshold: float
    pair_f1: float  # pairwise F1 at that threshold on the Market-1501 subset (percent)


#: model family (the embedder's model id without input size and precision) -> measured calibration.
#: Measured by `just eval-reid` (results/eval-reid.json, "calibration"); precisions of one IR share an entry
#: (FP16 vs FP32 move cosines by < 0.001).
CALIBRATED: dict[str, Calibration] = {
    "intel_reid_0277": Calibration(0.44, 84.6),
    "intel_reid_0286": Calibration(0.44, 83.1),
    "intel_reid_0287": Calibration(0.40, 80.9),
    "intel_reid_0288": Calibration(0.43, 69.3),
    "osnet_x0_25_msmt17": Calibration(0.72, 47.4),  # OpenVINO; torch on CPU: 0.72, 47.2
    "osnet_x0_25_market1501": Calibration(0.67, 76.8),
}


def model_family(model_id: str) -> str:
    """``intel_reid_0277_fp16_256x128`` -> ``intel_reid_0277``, ``osnet_x0_25_msmt17_256x128`` ->
    ``osnet_x0_25_msmt17``: what a calibration holds for, whatever the IR precision."""
    parts = model_id.split("_")
    if model_id.startswith("intel_reid_"):
        return "_".join(parts[:3])
    if parts and parts[-1].count("x") == 1 and parts[-1].replace("x", "").isdigit():
        parts = parts[:-1]
    return "_".join(parts)


def calibrated_threshold(model_id: str) -> float | None:
    """The measured match threshold of ``model_id``, or None when this model was never measured."""
    cal = CALIBRATED.get(model_family(model_id))
    return cal.threshold if cal is not None else None


def pair_f1_threshold(features: np.ndarray, pids: np.ndarray, cams: np.ndarray,
                      grid: np.ndarray | None = None) -> tuple[float, float]:
    """(threshold, pairwise F1) maximising F1 of "cosine >= threshold means same person" over all pairs of
    L2-normalised ``features`` seen by different cameras. Ties go to the higher threshold (fewer merges)."""
    f = np.asarray(features, np.float32)
    f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    i, j = np.triu_indices(len(f), 1)
    cross = cams[i] != cams[j]
    i, j = i[cross], j[cross]
    scores = np.einsum("nd,nd->n", f[i], f[j])
    same = pids[i] == pids[j]
    if not same.any():
        raise ValueError("no cross-camera pair of one person: cannot calibrate")
    grid = np.round(np.arange(-0.5, 1.0, 0.01), 2) if grid is None else grid
    best = (0.0, -1.0)
    for t in grid:
        accepted = scores >= t
        tp = int(np.count_nonzero(accepted & same))
        if tp == 0:
            continue
        precision, recall = tp / int(np.count_nonzero(accepted)), tp / int(np.count_nonzero(same))
        f1 = 2 * precision * recall / (precision + recall)
        if f1 >= best[1]:
            best = (float(t), f1)
    return best[0], 100 * best[1]
