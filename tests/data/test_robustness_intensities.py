"""Intensities that cannot be normalised are refused naming the file (validation, preprocessing,
prediction); large but real intensities are normalised exactly (statistics in float64)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from segshare.data.discovery import Case, discover_dataset
from segshare.data.preprocessing import Plan, normalize, preprocess_case
from segshare.data.validation import validate_dataset
from segshare.inference.predictor import Predictor, predict_cases
from segshare.inference.sliding_window import WindowSettings

from .conftest import ONE_LABEL_PLAN, make_msd_dataset, write_nifti

PLAN = ONE_LABEL_PLAN


def _scan(seed: int = 0, shape=(13, 14, 15)) -> np.ndarray:
    return np.random.default_rng(seed).normal(100.0, 10.0, shape).astype(np.float32)


def test_zscore_statistics_do_not_overflow_in_float32():
    image = np.random.default_rng(1).normal(0.0, 1e18, (10, 11, 12, 1)).astype(np.float32)
    out = normalize(image, PLAN)
    assert np.isfinite(out).all()
    assert abs(float(out.mean())) < 1e-3 and abs(float(out.std()) - 1.0) < 1e-3
    masked = Plan(**{**PLAN.to_dict(), "use_mask_for_norm": [True]})
    out = normalize(image, masked, np.ones(image.shape[:3], bool))
    assert abs(float(out.std()) - 1.0) < 1e-3


@pytest.mark.parametrize("value", [1e30, -3.4028235e38, 9.96921e36])
def test_a_fill_value_voxel_is_refused_by_preprocess_case(tmp_path, value):
    data = _scan()
    data[3, 4, 5] = value
    path = write_nifti(tmp_path / "scan_0000.nii.gz", data)
    with pytest.raises(ValueError, match="scan_0000.nii.gz") as info:
        preprocess_case([path], None, PLAN)
    assert "cannot be normalised" in str(info.value)


def test_a_fill_value_voxel_is_a_validation_problem(tmp_path):
    root = make_msd_dataset(tmp_path / "ds", num_cases=3)
    data = _scan()
    data[0, 0, 0] = 1e30
    write_nifti(root / "imagesTr" / "case_01.nii.gz", data)
    problems, stats = validate_dataset(discover_dataset(root), progress=False)
    assert [Path(p.path).name for p in problems] == ["case_01.nii.gz"]
    assert "cannot be normalised" in problems[0].message
    assert "case_01" not in stats and "case_00" in stats


def _probabilities(batch: np.ndarray) -> np.ndarray:
    fg = (batch[..., :1] > 0).astype(np.float32)
    return np.concatenate([1.0 - fg, fg], axis=-1)


def test_prediction_lists_a_fill_value_scan_as_a_failure(tmp_path):
    good = write_nifti(tmp_path / "scans" / "a_good.nii.gz", _scan(1))
    bad_data = _scan(2)
    bad_data[6, 7, 8] = 1e30
    bad = write_nifti(tmp_path / "scans" / "b_fill.nii.gz", bad_data)
    predictor = Predictor(_probabilities, PLAN, WindowSettings((8, 8, 8), 0.5, 2, 0.125))
    with pytest.raises(ValueError, match="b_fill.nii.gz"):
        predictor.load(Case("b_fill", (bad,)))
    cases = [Case("a_good", (good,)), Case("b_fill", (bad,))]
    report = predict_cases(predictor, cases, tmp_path / "out", progress=False)
    assert report.written == ["a_good"]
    assert [f["case_id"] for f in report.failed] == ["b_fill"]
    assert "b_fill.nii.gz" in report.failed[0]["reason"]
    assert "cannot be normalised" in report.failed[0]["reason"]
