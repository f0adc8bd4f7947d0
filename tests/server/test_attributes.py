"""Gender classifier on real Market crops, plus the aggregation helpers."""

from __future__ import annotations

import csv

import cv2
import numpy as np
import pytest

from common.assets import data_path
from common.configfile import ConfigError
from server.attributes import aggregate_male_probability, build_gender, gender_agreement
from server.embed.preprocess import CropError


def test_gender_probabilities_on_real_crops() -> None:
    root = data_path("market1501_subset")
    with open(root / "gender.csv") as f:
        male = {int(r["person_id"]): r["gender_code"] == "1" for r in csv.DictReader(f)}
    files = sorted((root / "query").glob("*.jpg"))
    clf = build_gender({"type": "intel_0230"})
    p = clf.male_probability([cv2.imread(str(f)) for f in files])
    assert p.shape == (len(files),) and p.dtype == np.float32
    assert float(p.min()) >= 0.0 and float(p.max()) <= 1.0
    assert float(p.std()) > 0.05  # real probabilities, not a constant
    truth = np.array([male[int(f.name[:4])] for f in files])
    assert ((p > 0.5) == truth).mean() > 0.7  # measured 0.81 per image over the whole subset


def test_gender_bad_inputs() -> None:
    with pytest.raises(ConfigError, match="known: intel_0230"):
        build_gender({"type": "nope"})
    clf = build_gender({"type": "intel_0230", "precision": "FP16-INT8"})
    assert clf.male_probability([]).shape == (0,)
    with pytest.raises(CropError, match="crop 0"):
        clf.male_probability([np.zeros((0, 5, 3), np.uint8)])


def test_aggregation_and_agreement() -> None:
    assert aggregate_male_probability([]) == 0.5
    assert aggregate_male_probability([0.9, 0.7]) == pytest.approx(0.8)
    assert aggregate_male_probability([0.99, 0.4, 0.45], "logodds") > aggregate_male_probability([0.99, 0.4, 0.45])
    with pytest.raises(ValueError, match="known: mean, logodds"):
        aggregate_male_probability([0.5], "median")  # type: ignore[arg-type]
    agree = gender_agreement(0.9, np.array([0.9, 0.5, 0.1]))
    assert agree[0] > 0 and agree[1] == pytest.approx(0.0, abs=1e-6) and agree[2] < 0
