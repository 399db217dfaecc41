"""Segmentation evaluation: metrics as pure functions, folder runner, summary and report writers.

Definitions and empty-case conventions: ``docs/metrics.md``. The folder-level entry point is
:func:`evaluate_folders` (``segshare.evaluation.folders``); the report (matplotlib) is imported
only when written.
"""

from segshare.evaluation.folders import evaluate_folders
from segshare.evaluation.metrics import (
    ALL_METRICS,
    SegmentationMetrics,
    aggregate_means,
    compute_case_metrics,
)
from segshare.evaluation.overlap import confusion_matrix, dice, iou, overlap_metrics
from segshare.evaluation.surface import (
    assd,
    hd95,
    normalized_surface_dice,
    surface_distances,
    surface_metrics,
    surface_voxels,
)

__all__ = [
    "ALL_METRICS",
    "SegmentationMetrics",
    "aggregate_means",
    "assd",
    "compute_case_metrics",
    "confusion_matrix",
    "dice",
    "evaluate_folders",
    "hd95",
    "iou",
    "normalized_surface_dice",
    "overlap_metrics",
    "surface_distances",
    "surface_metrics",
    "surface_voxels",
]
