"""``summary.json`` (nnU-Net's shape) and the tidy ``metrics.csv``.

NaN handling follows nnU-Net: Python's ``json`` writes NaN and infinities as the bare tokens
``NaN`` / ``Infinity`` (readable by Python's ``json``, nnU-Net's ``load_json`` and pandas). With
``strict=True`` they are written as ``null`` instead, which every JSON parser accepts.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path

from segshare.data.io import write_text_atomic
from segshare.evaluation.metrics import ALL_METRICS, aggregate_means, global_overlap, region_means


def build_summary(
    cases: Sequence[dict],
    labels: Sequence[int],
    *,
    label_names: dict[int, str] | None = None,
    missing: Sequence[dict] = (),
    unmatched: Sequence[str] = (),
    settings: dict | None = None,
    regions: dict[str, list[int]] | None = None,
) -> dict:
    """Builds the summary dictionary.

    Args:
        cases: per-case entries from :func:`segshare.evaluation.runner.evaluate_case`, already
            restricted to ``labels``.
        labels: evaluated labels.
        label_names: optional ``{label: name}``.
        missing: ``{"case_id", "reference_file", "prediction_file"}`` of references without a
            prediction.
        unmatched: prediction files without a reference.
        settings: how the numbers were computed (tolerance, HD95 variant, ...).
        regions: region name -> values, when the cases carry ``region_metrics``: adds
            ``regions``, ``region_mean`` (per region) and ``region_foreground_mean`` (their mean),
            and each case's ``region_metrics``.

    Returns:
        ``{"metric_per_case", "mean", "foreground_mean", "global_overlap", ...}``; label keys
        are strings as in nnU-Net's file.
    """
    mean, foreground = aggregate_means([c["metrics"] for c in cases], labels)
    names = label_names or {}
    by_region = {}
    if regions:
        per_region, overall = region_means([c["region_metrics"] for c in cases], list(regions))
        by_region = {
            "regions": {str(k): list(v) for k, v in regions.items()},
            "region_mean": per_region,
            "region_foreground_mean": overall,
        }
    return {
        **by_region,
        "metric_per_case": [
            {
                "case_id": c["case_id"],
                "reference_file": c["reference_file"],
                "prediction_file": c["prediction_file"],
                "metrics": {str(k): dict(v) for k, v in c["metrics"].items()},
                **({"region_metrics": c["region_metrics"]} if regions else {}),
                **({"prediction_missing": True} if c.get("prediction_missing") else {}),
            }
            for c in cases
        ],
        "mean": {str(k): v for k, v in mean.items()},
        "foreground_mean": foreground,
        "global_overlap": {
            str(k): v for k, v in global_overlap([c["metrics"] for c in cases], labels).items()
        },
        "labels": {str(k): names.get(k, str(k)) for k in labels},
        "num_cases": len(cases),
        "missing_predictions": [dict(m) for m in missing],
        "num_missing_predictions": len(missing),
        "unmatched_predictions": [str(u) for u in unmatched],
        "settings": dict(settings or {}),
    }


def _strictify(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _strictify(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_strictify(v) for v in obj]
    return obj


def write_summary_json(summary: dict, path: Path, strict: bool = False) -> None:
    """Writes ``summary`` with sorted keys (nnU-Net: ``NaN`` tokens; ``strict``: ``null``)."""
    data = _strictify(summary) if strict else summary
    write_text_atomic(json.dumps(data, sort_keys=True, indent=4, allow_nan=not strict) + "\n", path)


CSV_COLUMNS = (
    "case_id",
    "label",
    "label_name",
    "metric",
    "value",
    "reference_file",
    "prediction_file",
)


def write_metrics_csv(summary: dict, path: Path) -> None:
    """One row per case, label and metric (tidy): ``pd.read_csv(path)`` reads ``nan``/``inf``.
    Regions follow each case's labels, with ``label`` "region" and ``label_name`` the region."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    names = summary.get("labels", {})
    for case in summary["metric_per_case"]:
        scored = [(label, names.get(label, label), v) for label, v in case["metrics"].items()]
        scored += [("region", r, v) for r, v in case.get("region_metrics", {}).items()]
        for label, name, values in scored:
            for metric in ALL_METRICS:
                value = values[metric]
                writer.writerow(
                    [
                        case["case_id"],
                        label,
                        name,
                        metric,
                        repr(value) if isinstance(value, float) else value,
                        case["reference_file"],
                        case["prediction_file"],
                    ]
                )
    write_text_atomic(buf.getvalue(), path)
