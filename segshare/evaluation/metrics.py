"""Per-case, per-label segmentation metrics: a pure function and a thin accumulating class.

Every metric and its empty-case convention is defined in ``docs/metrics.md``.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import numpy as np

from segshare.evaluation.overlap import (
    OVERLAP_METRICS,
    as_label_array,
    count_metrics,
    overlap_metrics,
)
from segshare.evaluation.surface import SURFACE_METRICS, check_spacing, surface_metrics

#: Every per-label metric, in report order.
ALL_METRICS = OVERLAP_METRICS + SURFACE_METRICS + ("VolDiff_ml", "VolDiff_pct")


def compute_case_metrics(
    pred: np.ndarray,
    ref: np.ndarray,
    labels: Sequence[int],
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    *,
    nsd_tolerance_mm: float = 1.0,
    hd95: str = "monai",
    ignore_label: int | None = None,
) -> dict[int, dict[str, float]]:
    """All metrics of one case.

    Args:
        pred: predicted label map ``(D, H, W)``, non-negative integers.
        ref: reference label map ``(D, H, W)``.
        labels: positive label values to score.
        spacing: voxel spacing in mm along the three array axes.
        nsd_tolerance_mm: tolerance of the normalised surface Dice, in mm.
        hd95: ``"monai"`` (max of the directed 95th percentiles) or ``"medpy"`` (pooled).
        ignore_label: the reference's value of unannotated voxels: never scored, and its voxels
            count nowhere (no TP/FP/FN/TN of any label; the surfaces are those of both maps
            outside it).

    Returns:
        ``{label: {metric: value}}`` with the metrics of :data:`ALL_METRICS`.
    """
    pred = as_label_array(pred, "pred")
    ref = as_label_array(ref, "ref")
    if pred.shape != ref.shape:
        raise ValueError(f"pred and ref shapes differ: {pred.shape} vs {ref.shape}.")
    spacing = check_spacing(spacing, ref.ndim)
    labels = [int(label) for label in labels if label != ignore_label]
    voxel_volume = float(np.prod(spacing))
    ignored = (ref == ignore_label) if ignore_label is not None else None
    if ignored is not None and ignored.any():
        keep = ~ignored
        overlap = overlap_metrics(pred[keep], ref[keep], labels, voxel_volume_mm3=voxel_volume)
        pred, ref = np.where(ignored, 0, pred), np.where(ignored, 0, ref)
    else:
        overlap = overlap_metrics(pred, ref, labels, voxel_volume_mm3=voxel_volume)
    surface = surface_metrics(
        pred, ref, labels, spacing, nsd_tolerance_mm=nsd_tolerance_mm, hd95_variant=hd95
    )
    merged = {label: {**overlap[label], **surface[label]} for label in labels}
    return {label: {m: merged[label][m] for m in ALL_METRICS} for label in labels}


#: The reference value of ignored voxels in a region's binary maps (0 and 1 are the region).
_REGION_IGNORE = 255


def compute_region_metrics(
    pred: np.ndarray,
    ref: np.ndarray,
    regions: Mapping[str, Sequence[int]],
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    *,
    nsd_tolerance_mm: float = 1.0,
    hd95: str = "monai",
    ignore_label: int | None = None,
) -> dict[str, dict[str, float]]:
    """All metrics of each region of one case: a region is the union of its label values in
    both maps (e.g. BraTS "whole tumor" = 1, 2 and 3), scored as one binary label by
    :func:`compute_case_metrics` (ignored reference voxels counted nowhere, as there).

    Returns:
        ``{region name: {metric: value}}`` with the metrics of :data:`ALL_METRICS`.
    """
    pred = as_label_array(pred, "pred")
    ref = as_label_array(ref, "ref")
    ignored = (ref == ignore_label) if ignore_label is not None else None
    out = {}
    for name, values in regions.items():
        pred_r = np.isin(pred, list(values)).astype(np.uint8)
        ref_r = np.isin(ref, list(values)).astype(np.uint8)
        if ignored is not None:
            ref_r[ignored] = _REGION_IGNORE
        metrics = compute_case_metrics(
            pred_r,
            ref_r,
            [1],
            spacing,
            nsd_tolerance_mm=nsd_tolerance_mm,
            hd95=hd95,
            ignore_label=_REGION_IGNORE if ignored is not None else None,
        )
        out[str(name)] = metrics[1]
    return out


def nanmean(values: Sequence[float]) -> float:
    """Mean ignoring NaN (as nnU-Net's ``np.nanmean``); NaN when all values are NaN or none."""
    arr = np.asarray(list(values), dtype=float)
    if arr.size == 0 or np.isnan(arr).all():
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(np.nanmean(arr))


def aggregate_means(
    per_case: Sequence[dict[int, dict[str, float]]], labels: Sequence[int]
) -> tuple[dict[int, dict[str, float]], dict[str, float]]:
    """nnU-Net's ``mean`` (nanmean over cases, per label) and ``foreground_mean``.

    ``foreground_mean`` is the plain mean of the per-label means over every label except 0
    (as nnU-Net computes it), so a label whose mean is NaN makes it NaN.

    Returns:
        ``(mean, foreground_mean)``: ``{label: {metric: value}}`` and ``{metric: value}``.
    """
    labels = [int(label) for label in labels]
    return _means_over_cases(per_case, labels, [label for label in labels if label != 0])


def region_means(
    per_case: Sequence[dict[str, dict[str, float]]], regions: Sequence[str]
) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """Per-region means over the cases (nanmean) and their plain mean over the regions (what
    region-based nnU-Net calls the foreground mean); the ``region_metrics`` of each case."""
    regions = [str(r) for r in regions]
    return _means_over_cases(per_case, regions, regions)


def _means_over_cases(per_case: Sequence[dict], keys: Sequence, pooled: Sequence):
    """``{key: {metric: nanmean over cases}}`` and the plain mean of those over ``pooled`` (NaN
    when ``pooled`` is empty or one of its means is NaN)."""
    mean = {k: {m: nanmean([case[k][m] for case in per_case]) for m in ALL_METRICS} for k in keys}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        overall = {
            m: float(np.mean([mean[k][m] for k in pooled])) if pooled else float("nan")
            for m in ALL_METRICS
        }
    return mean, overall


def global_overlap(
    per_case: Sequence[dict[int, dict[str, float]]], labels: Sequence[int]
) -> dict[int, dict[str, float]]:
    """Dice and IoU of the counts summed over all cases ("global" Dice, nnU-Net issue #72).

    Unlike the case average, this weighs each case by its size; NaN only when every case is
    empty on both sides.

    Returns:
        ``{label: {"Dice", "IoU", "TP", "FP", "FN"}}`` with summed counts.
    """
    out = {}
    for label in labels:
        tp, fp, fn = (sum(int(case[label][k]) for case in per_case) for k in ("TP", "FP", "FN"))
        out[int(label)] = count_metrics(tp, fp, fn)
    return out


class SegmentationMetrics:
    """Thin accumulator over :func:`compute_case_metrics` (MONAI-style ``__call__``/``aggregate``).

    Example:
        >>> metric = SegmentationMetrics(labels=[1, 2], nsd_tolerance_mm=2.0)
        >>> per_label = metric(pred, ref, spacing=(1.0, 1.0, 2.0))  # doctest: +SKIP
        >>> mean, foreground_mean = metric.aggregate()  # doctest: +SKIP
    """

    def __init__(
        self, labels: Sequence[int], *, nsd_tolerance_mm: float = 1.0, hd95: str = "monai"
    ) -> None:
        if not labels:
            raise ValueError(f"labels must name at least one label, got {labels!r}.")
        if nsd_tolerance_mm < 0:
            raise ValueError(f"nsd_tolerance_mm must be >= 0, got {nsd_tolerance_mm}.")
        self.labels = [int(label) for label in labels]
        self.nsd_tolerance_mm = float(nsd_tolerance_mm)
        self.hd95 = hd95
        self.results: list[dict[int, dict[str, float]]] = []

    def __call__(
        self, pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0)
    ) -> dict[int, dict[str, float]]:
        """Scores one case, stores and returns ``{label: {metric: value}}``."""
        result = compute_case_metrics(
            pred, ref, self.labels, spacing, nsd_tolerance_mm=self.nsd_tolerance_mm, hd95=self.hd95
        )
        self.results.append(result)
        return result

    def aggregate(self) -> tuple[dict[int, dict[str, float]], dict[str, float]]:
        """``(mean, foreground_mean)`` over the stored cases; see :func:`aggregate_means`."""
        return aggregate_means(self.results, self.labels)

    def reset(self) -> None:
        """Forgets the stored cases."""
        self.results.clear()
