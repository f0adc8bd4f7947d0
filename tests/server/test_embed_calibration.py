"""Per-model match thresholds: every shipped model has one, it is what the Market subset measures, and a
model without one cannot start on a guess."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import numpy as np
import pytest

from common.assets import data_path
from common.configfile import ConfigError
from server.config import IdentitySettings
from server.embed.base import IntelReidModel, OsnetWeights, build_embedder
from server.embed.calibration import CALIBRATED, calibrated_threshold, model_family, pair_f1_threshold
from server.eval_reid import load_split
from server.identity import settings_for_model


def test_every_selectable_model_has_a_calibrated_threshold() -> None:
    ids = [f"intel_reid_{m}_{p}_256x128" for m in get_args(IntelReidModel) for p in ("fp16", "fp32", "fp16_int8")]
    ids += [f"osnet_x0_25_{w}_256x128" for w in get_args(OsnetWeights)]
    for model_id in ids:
        assert calibrated_threshold(model_id) is not None, model_id
    assert {model_family(i) for i in ids} == set(CALIBRATED)
    assert calibrated_threshold("osnet_x0_25_custom_256x128") is None


def test_threshold_is_filled_from_the_model_kept_when_set_and_required_when_unknown() -> None:
    assert settings_for_model(IdentitySettings(), "intel_reid_0277_fp16_256x128").match_threshold == 0.44
    assert settings_for_model(IdentitySettings(), "osnet_x0_25_msmt17_256x128").match_threshold == 0.72
    own = IdentitySettings(match_threshold=0.6)
    assert settings_for_model(own, "osnet_x0_25_custom_256x128").match_threshold == 0.6
    with pytest.raises(ConfigError, match=r"identity\.match_threshold: no calibrated threshold.*custom"):
        settings_for_model(IdentitySettings(), "osnet_x0_25_custom_256x128")


def test_pair_f1_threshold_separates_two_scales_of_similarity() -> None:
    rng = np.random.default_rng(3)
    centres = rng.standard_normal((12, 64))
    pids = np.repeat(np.arange(12), 6)
    cams = np.tile(np.arange(6), 12)
    feats = centres[pids] + 0.35 * rng.standard_normal((len(pids), 64))
    th, f1 = pair_f1_threshold(feats, pids, cams)
    f = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    s = f @ f.T
    same, other = s[pids[:, None] == pids[None, :]], s[pids[:, None] != pids[None, :]]
    assert other.max() < th <= np.min(same[same < 0.9999]) + 1e-6 and f1 == pytest.approx(100.0)
    # Non-negative features (post-ReLU, like OSNet) shift every cosine up, and the threshold with them.
    pos = np.abs(feats)
    assert pair_f1_threshold(pos, pids, cams)[0] > th


def test_shipped_osnet_threshold_is_what_the_market_subset_measures(assets: Path) -> None:
    root = data_path("market1501_subset", assets=str(assets))
    q, g = load_split(root / "query"), load_split(root / "bounding_box_test")
    emb = build_embedder({"type": "osnet_openvino", "weights": "msmt17"}, assets=str(assets))
    pids, cams = np.concatenate([q.pids, g.pids]), np.concatenate([q.cams, g.cams])
    people = pids > 0
    feats = emb.embed(q.crops + g.crops)[people]
    th, _f1 = pair_f1_threshold(feats, pids[people], cams[people])
    assert th == pytest.approx(calibrated_threshold(emb.model_id), abs=0.015)
