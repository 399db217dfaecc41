"""Paired comparison of two segmentations of the same cases: is one configuration better than a
reference, case by case, or only by chance?

Each case's score is its foreground-mean Dice (the mean over the foreground labels that have a
Dice; a case where none has one is left out of both sides). Over the cases scored by both:

* the mean difference ``other - reference`` with a 95 % bootstrap interval of that mean
  (``scipy.stats.bootstrap``, BCa, resampling cases, a fixed seed), and
* the two-sided Wilcoxon signed-rank p (``scipy.stats.wilcoxon``, ``zero_method="zsplit"``:
  cases with no difference count, as they do in the mean).

A difference whose interval contains 0 is not supported by the data. With few cases the two can
disagree (an interval above 0 from 2 cases, Wilcoxon p 0.5): read both. The mean difference is
over cases; the ranking's Dice is the mean over labels of per-label means, so the two differ when
a case misses a label.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from scipy import stats

BOOTSTRAP_RESAMPLES = 10_000


def case_scores(summary: Mapping) -> dict[str, float]:
    """``case_id -> foreground-mean Dice`` of an evaluation summary (``summary.json``)."""
    labels = [str(k) for k in summary["labels"]]
    scores = {}
    for case in summary["metric_per_case"]:
        values = [case["metrics"].get(k, {}).get("Dice", math.nan) for k in labels]
        values = [float(v) for v in values if v is not None and math.isfinite(float(v))]
        if values:
            scores[str(case["case_id"])] = float(np.mean(values))
    return scores


def paired_comparison(
    reference: Mapping[str, float], other: Mapping[str, float], seed: int = 0
) -> dict:
    """The paired difference ``other - reference`` over the cases both score (module docstring).

    Returns:
        ``{"num_cases", "mean_difference", "ci95": [low, high], "wilcoxon_p", "better_cases",
        "worse_cases"}``; the interval and p are NaN for 1 case; when every difference is the
        same ``d`` the interval is ``[d, d]`` (p 1 when ``d`` is 0).

    Raises:
        ValueError: no case is scored by both.
    """
    common = sorted(set(reference) & set(other))
    if not common:
        raise ValueError(
            f"no case is scored by both sides ({len(reference)} and {len(other)} cases)."
        )
    diff = np.array([other[c] - reference[c] for c in common], dtype=float)
    result = {
        "num_cases": len(common),
        "mean_difference": float(diff.mean()),
        "ci95": [math.nan, math.nan],
        "wilcoxon_p": math.nan,
        "better_cases": int((diff > 0).sum()),
        "worse_cases": int((diff < 0).sum()),
    }
    if len(common) < 2:
        return result
    if np.ptp(diff) == 0:  # one value: no spread to resample (BCa would be NaN)
        result["ci95"] = [float(diff[0]), float(diff[0])]
    else:
        boot = stats.bootstrap(
            (diff,),
            np.mean,
            n_resamples=BOOTSTRAP_RESAMPLES,
            confidence_level=0.95,
            method="BCa",
            random_state=np.random.default_rng(seed),
        )
        result["ci95"] = [float(boot.confidence_interval.low), float(boot.confidence_interval.high)]
    if not np.any(diff):
        result["wilcoxon_p"] = 1.0  # no difference at all (scipy would warn and give NaN)
    else:
        result["wilcoxon_p"] = float(
            stats.wilcoxon(diff, zero_method="zsplit", alternative="two-sided").pvalue
        )
    return result


def format_difference(comparison: Mapping) -> str:
    """``+0.0012 [-0.0008, +0.0031], p 0.21`` (mean difference, its interval, Wilcoxon p)."""
    low, high = comparison["ci95"]
    return (
        f"{comparison['mean_difference']:+.4f} [{low:+.4f}, {high:+.4f}], "
        f"p {comparison['wilcoxon_p']:.2g}"
    )


__all__ = ["BOOTSTRAP_RESAMPLES", "case_scores", "format_difference", "paired_comparison"]
