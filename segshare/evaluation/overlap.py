"""Overlap metrics (Dice, IoU, TP/FP/FN/TN, volumes) from one confusion-matrix pass.

All labels' counts come from a single ``np.bincount`` over ``ref * n + pred`` (a confusion matrix),
never from one boolean mask per label. Definitions are documented in ``docs/metrics.md``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: Names of the overlap metrics, in report order.
OVERLAP_METRICS = ("Dice", "IoU", "TP", "FP", "FN", "TN", "n_ref", "n_pred")


def as_label_array(array: np.ndarray, name: str) -> np.ndarray:
    """Returns ``array`` as a non-negative integer array (floats must hold whole numbers)."""
    array = np.asarray(array)
    if array.dtype == bool:
        return array.view(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        rounded = np.rint(array)
        if not np.array_equal(rounded, array):
            raise ValueError(f"{name} holds non-integer values ({array.dtype}).")
        array = rounded.astype(np.int64)
    elif not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"{name} must be an integer label map, got dtype {array.dtype}.")
    if array.size and np.issubdtype(array.dtype, np.signedinteger) and array.min() < 0:
        raise ValueError(f"{name} holds negative labels (min {array.min()}).")
    return array


def confusion_matrix(
    pred: np.ndarray, ref: np.ndarray, num_classes: int | None = None
) -> np.ndarray:
    """Confusion matrix of two label maps in one ``np.bincount`` pass.

    Args:
        pred: predicted label map, any shape, non-negative integers.
        ref: reference label map, same shape as ``pred``.
        num_classes: size ``n`` of the matrix; default ``max(pred.max(), ref.max()) + 1``.

    Returns:
        ``(n, n)`` int64 array ``cm`` with ``cm[r, p]`` = number of voxels where ``ref == r`` and
        ``pred == p``.
    """
    pred = as_label_array(pred, "pred")
    ref = as_label_array(ref, "ref")
    if pred.shape != ref.shape:
        raise ValueError(f"pred and ref shapes differ: {pred.shape} vs {ref.shape}.")
    top = int(max(pred.max(initial=0), ref.max(initial=0))) + 1
    n = top if num_classes is None else int(num_classes)
    if n < top:
        raise ValueError(
            f"num_classes={num_classes} is smaller than the largest label + 1 ({top})."
        )
    if n * n <= 256:
        # uint8 arithmetic is ~3x faster than widening to intp first.
        idx = ref.astype(np.uint8, copy=False) * np.uint8(n) + pred.astype(np.uint8, copy=False)
    else:
        idx = ref.astype(np.intp) * n + pred
    return np.bincount(idx.ravel(), minlength=n * n).reshape(n, n)


def dice(tp: float, fp: float, fn: float) -> float:
    """Dice ``2TP / (2TP + FP + FN)``; NaN when reference and prediction are both empty."""
    denom = 2 * tp + fp + fn
    return float("nan") if denom == 0 else 2.0 * tp / denom


def iou(tp: float, fp: float, fn: float) -> float:
    """IoU (Jaccard) ``TP / (TP + FP + FN)``; NaN when reference and prediction are both empty."""
    denom = tp + fp + fn
    return float("nan") if denom == 0 else float(tp) / denom


def count_metrics(tp: int, fp: int, fn: int) -> dict[str, float]:
    """Dice, IoU and the counts they come from, for one label."""
    return {"Dice": dice(tp, fp, fn), "IoU": iou(tp, fp, fn), "TP": tp, "FP": fp, "FN": fn}


def volume_difference(n_pred: int, n_ref: int, voxel_volume_mm3: float) -> tuple[float, float]:
    """Volume difference ``pred - ref`` in ml and in percent of the reference volume.

    The percentage is NaN when both are empty and +inf when only the reference is empty.
    """
    diff_ml = (n_pred - n_ref) * voxel_volume_mm3 / 1000.0
    if n_ref == 0:
        pct = float("nan") if n_pred == 0 else float("inf")
    else:
        pct = 100.0 * (n_pred - n_ref) / n_ref
    return float(diff_ml), float(pct)


def overlap_metrics(
    pred: np.ndarray,
    ref: np.ndarray,
    labels: Sequence[int],
    voxel_volume_mm3: float = 1.0,
) -> dict[int, dict[str, float]]:
    """Overlap metrics of every label from one confusion matrix.

    Args:
        pred: predicted label map ``(D, H, W)`` (any shape works), integers.
        ref: reference label map, same shape.
        labels: label values to score (a label absent from both maps gets Dice NaN).
        voxel_volume_mm3: volume of one voxel, for ``VolDiff_ml``.

    Returns:
        ``{label: {"Dice", "IoU", "TP", "FP", "FN", "TN", "n_ref", "n_pred", "VolDiff_ml",
        "VolDiff_pct"}}``; counts are ints, the rest floats.
    """
    top = max(list(labels) + [0]) + 1
    cm = confusion_matrix(pred, ref)
    if cm.shape[0] < top:
        cm = np.pad(cm, (0, top - cm.shape[0]))
    total = int(cm.sum())
    ref_counts, pred_counts = cm.sum(axis=1), cm.sum(axis=0)
    out: dict[int, dict[str, float]] = {}
    for label in labels:
        tp = int(cm[label, label])
        n_ref, n_pred = int(ref_counts[label]), int(pred_counts[label])
        fn, fp = n_ref - tp, n_pred - tp
        vol_ml, vol_pct = volume_difference(n_pred, n_ref, voxel_volume_mm3)
        out[int(label)] = {
            **count_metrics(tp, fp, fn),
            "TN": total - tp - fp - fn,
            "n_ref": n_ref,
            "n_pred": n_pred,
            "VolDiff_ml": vol_ml,
            "VolDiff_pct": vol_pct,
        }
    return out
