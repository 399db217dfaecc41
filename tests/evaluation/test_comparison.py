"""Paired comparisons of per-case scores (segshare.evaluation.comparison)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from segshare.evaluation.comparison import case_scores, format_difference, paired_comparison


def test_a_consistent_gain_has_an_interval_above_zero_and_a_small_p():
    rng = np.random.default_rng(0)
    reference = {f"c{i}": float(v) for i, v in enumerate(rng.uniform(0.7, 0.9, 40))}
    other = {k: v + 0.01 + float(rng.normal(0, 0.002)) for k, v in reference.items()}
    result = paired_comparison(reference, other)
    assert result["num_cases"] == 40 and result["better_cases"] == 40
    assert result["mean_difference"] == pytest.approx(0.01, abs=0.001)
    assert 0.005 < result["ci95"][0] < result["mean_difference"] < result["ci95"][1] < 0.015
    assert result["wilcoxon_p"] < 1e-6


def test_noise_without_a_gain_has_an_interval_around_zero():
    rng = np.random.default_rng(1)
    reference = {f"c{i}": 0.8 for i in range(60)}
    other = {k: 0.8 + float(rng.normal(0, 0.02)) for k in reference}
    result = paired_comparison(reference, other)
    assert result["ci95"][0] < 0 < result["ci95"][1]
    assert result["wilcoxon_p"] > 0.05


def test_only_common_cases_count_and_identical_scores_give_p_1():
    reference = {"a": 0.5, "b": 0.6, "only_here": 0.1}
    result = paired_comparison(reference, {"a": 0.5, "b": 0.6, "only_there": 0.9})
    assert result["num_cases"] == 2 and result["mean_difference"] == 0
    assert result["wilcoxon_p"] == 1.0 and result["ci95"] == [0.0, 0.0]
    assert format_difference(result) == "+0.0000 [+0.0000, +0.0000], p 1"
    with pytest.raises(ValueError, match="no case is scored by both"):
        paired_comparison({"a": 1.0}, {"b": 1.0})


def test_case_scores_average_the_foreground_labels_that_have_a_dice():
    summary = {
        "labels": {"1": "a", "2": "b"},
        "metric_per_case": [
            {"case_id": "x", "metrics": {"1": {"Dice": 0.8}, "2": {"Dice": 0.6}}},
            {"case_id": "y", "metrics": {"1": {"Dice": math.nan}, "2": {"Dice": 0.5}}},
            {"case_id": "z", "metrics": {"1": {"Dice": math.nan}, "2": {"Dice": None}}},
        ],
    }
    assert case_scores(summary) == pytest.approx({"x": 0.7, "y": 0.5})


def test_a_constant_difference_has_a_point_interval_not_nan():
    reference = {f"c{i}": 0.5 + i / 100 for i in range(12)}
    other = {k: v + 0.01 for k, v in reference.items()}
    result = paired_comparison(reference, other)
    assert result["ci95"] == pytest.approx([0.01, 0.01])
    assert result["wilcoxon_p"] < 0.01 and result["better_cases"] == 12
