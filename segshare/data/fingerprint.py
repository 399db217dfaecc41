"""Dataset fingerprint (spacings, shapes, intensity statistics, class frequencies) and the plan.

Per-case statistics are gathered in the same pass as validation (each case is read once); the
fingerprint aggregates them and :func:`make_plan` turns it into a preprocessing :class:`Plan`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from segshare.data.discovery import Dataset, split_ignore_label
from segshare.data.preprocessing import Plan, nonzero_bbox, reorient_to_ras, spacing_of

SAMPLES_PER_CASE = 10_000


def case_statistics(
    image: np.ndarray,
    label: np.ndarray | None,
    affine: np.ndarray,
    seed: int = 0,
    ignore_label: int | None = None,
) -> dict[str, Any]:
    """Statistics of one case for the fingerprint.

    Args:
        image: ``(I, J, K, C)`` float32 in file voxel order.
        label: ``(I, J, K)`` integer label map or None.
        affine: the 4x4 voxel-to-world affine.
        seed: seed for the foreground intensity sample.
        ignore_label: the value of unannotated voxels: never foreground intensities.

    Returns:
        ``spacing`` (RAS order), ``shape`` and ``cropped_shape`` (RAS order), per-channel
        ``fg_samples`` (up to 10 000 foreground intensities; all nonzero voxels when unlabelled),
        ``class_counts`` (label value -> voxels) and the size in bytes of the float32 image.
    """
    ras, aff_ras, _ = reorient_to_ras(image, affine)
    mask = (ras != 0).any(axis=-1)
    lbl_ras = None
    if label is not None:
        lbl_ras, _, _ = reorient_to_ras(label, affine)
        mask |= lbl_ras > 0
    box = nonzero_bbox(mask)
    annotated_fg = None
    if lbl_ras is not None:
        annotated_fg = lbl_ras > 0
        if ignore_label is not None:
            annotated_fg &= lbl_ras != ignore_label
    fg = annotated_fg if annotated_fg is not None and annotated_fg.any() else mask
    rng = np.random.default_rng(seed)
    samples = []
    for c in range(ras.shape[-1]):
        vals = ras[..., c][fg]
        if vals.size > SAMPLES_PER_CASE:
            vals = rng.choice(vals, SAMPLES_PER_CASE, replace=False)
        samples.append(vals.astype(np.float32))
    counts = {}
    if lbl_ras is not None:
        values, n = np.unique(lbl_ras, return_counts=True)
        counts = {int(v): int(k) for v, k in zip(values, n, strict=True)}
    return {
        "spacing": list(spacing_of(aff_ras)),
        "shape": [int(s) for s in ras.shape[:3]],
        "cropped_shape": [hi - lo for lo, hi in box],
        "fg_samples": samples,
        "class_counts": counts,
        "nbytes": int(np.prod(ras.shape) * 4),
    }


def build_fingerprint(dataset: Dataset, stats: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Aggregate per-case statistics (``case_id -> case_statistics(...)``) into a JSON-able dict."""
    ids = sorted(stats)
    spacings = np.array([stats[i]["spacing"] for i in ids], dtype=float)
    shapes = np.array([stats[i]["cropped_shape"] for i in ids], dtype=float)
    n_ch = len(stats[ids[0]]["fg_samples"])
    intensity = []
    for c in range(n_ch):
        vals = np.concatenate([stats[i]["fg_samples"][c] for i in ids]).astype(np.float64)
        if vals.size == 0:
            vals = np.zeros(1)
        intensity.append(
            {
                "mean": float(vals.mean()),
                "std": float(vals.std()),
                "min": float(vals.min()),
                "max": float(vals.max()),
                "median": float(np.median(vals)),
                "p005": float(np.percentile(vals, 0.5)),
                "p995": float(np.percentile(vals, 99.5)),
            }
        )
    totals: dict[int, int] = {}
    for i in ids:
        for v, n in stats[i]["class_counts"].items():
            totals[int(v)] = totals.get(int(v), 0) + n
    all_vox = max(sum(totals.values()), 1)
    return {
        "num_cases": len(ids),
        "channel_names": dataset.channel_names,
        "labels": dataset.labels,
        "spacings": {i: stats[i]["spacing"] for i in ids},
        "shapes": {i: stats[i]["shape"] for i in ids},
        "cropped_shapes": {i: stats[i]["cropped_shape"] for i in ids},
        "median_spacing": np.median(spacings, axis=0).tolist(),
        "median_cropped_shape": np.median(shapes, axis=0).tolist(),
        "median_relative_size_after_cropping": float(
            np.median(
                [np.prod(stats[i]["cropped_shape"]) / np.prod(stats[i]["shape"]) for i in ids]
            )
        ),
        "intensity_foreground": intensity,
        "class_voxels": {str(k): v for k, v in sorted(totals.items())},
        "class_frequency": {str(k): v / all_vox for k, v in sorted(totals.items())},
        "total_image_bytes": int(sum(stats[i]["nbytes"] for i in ids)),
    }


def default_normalization(channel_names: dict[str, str]) -> list[str]:
    """``"ct"`` for channels named CT (case-insensitive), else ``"zscore"``."""
    return [
        "ct" if name.strip().upper() == "CT" else "zscore"
        for _, name in sorted(channel_names.items(), key=lambda kv: int(kv[0]))
    ]


def default_target_spacing(
    fingerprint: dict[str, Any], anisotropy_threshold: float = 3.0
) -> tuple[float, float, float]:
    """The dataset's median spacing, except along a strongly anisotropic axis (nnU-Net's rule).

    When the median spacing's coarsest axis is more than ``anisotropy_threshold`` times the
    next-coarsest one *and* the median cropped image has fewer than ``1/anisotropy_threshold`` as
    many voxels along it as along the others (thick slices, few of them), that axis takes the 10th
    percentile of the cases' spacings instead of the median (never finer than the other axes'
    spacing): the few high-resolution scans of such a dataset are not blurred down to the
    median's thick slices, while the typical scan is not upsampled across slices either.
    """
    median = [float(v) for v in fingerprint["median_spacing"]]
    spacings = np.array(list(fingerprint.get("spacings", {}).values()), dtype=float)
    median_shape = fingerprint.get("median_cropped_shape")
    if spacings.size == 0 or not median_shape:
        return tuple(median)
    worst = int(np.argmax(median))
    others = [a for a in range(3) if a != worst]
    coarsest_other = max(median[a] for a in others)
    thick = median[worst] > anisotropy_threshold * coarsest_other
    few = median_shape[worst] * anisotropy_threshold < min(median_shape[a] for a in others)
    if thick and few:
        p10 = float(np.percentile(spacings[:, worst], 10))
        median[worst] = p10 if p10 >= coarsest_other else coarsest_other + 1e-5
    return tuple(median)


def make_plan(
    fingerprint: dict[str, Any],
    labels: dict[str, int],
    target_spacing: list[float] | None = None,
    normalization: list[str] | str | None = None,
    anisotropy_threshold: float = 3.0,
    regions: dict[str, list[int]] | None = None,
    regions_class_order: list[int] | None = None,
) -> Plan:
    """Turn a fingerprint into a preprocessing plan.

    z-scored channels are normalised over their nonzero voxels (``use_mask_for_norm``) when
    cropping to the nonzero box kept less than 3/4 of the median case, as nnU-Net decides.

    Args:
        fingerprint: from :func:`build_fingerprint`.
        labels: label name -> value (background included).
        target_spacing: None = :func:`default_target_spacing` (the median spacing; the 10th
            percentile along a strongly anisotropic axis).
        normalization: None = from channel names ("CT" -> ct, else zscore); a string applies to
            every channel; a list gives one scheme per channel.
        anisotropy_threshold: see :func:`segshare.data.resample.anisotropic_axis`.
        regions: region name -> values (region-based training: one output per region), with
            ``regions_class_order``; None: softmax over the classes ``0..max label``.
    """
    n_ch = len(fingerprint["intensity_foreground"])
    if normalization is None:
        norm = default_normalization(fingerprint["channel_names"])
        norm = norm if len(norm) == n_ch else ["zscore"] * n_ch
    elif isinstance(normalization, str):
        norm = [normalization] * n_ch
    else:
        norm = list(normalization)
    bad = [n for n in norm if n not in ("ct", "zscore")]
    if bad or len(norm) != n_ch:
        raise ValueError(
            f"data.normalization must be 'ct'/'zscore' per channel ({n_ch}), got {normalization!r}"
        )
    spacing = target_spacing
    if spacing is None:
        spacing = default_target_spacing(fingerprint, anisotropy_threshold)
    if len(spacing) != 3 or any(float(s) <= 0 for s in spacing):
        raise ValueError(f"data.target_spacing must be 3 positive numbers, got {spacing!r}")
    ct_stats = None
    if "ct" in norm:
        ct_stats = [
            {k: st[k] for k in ("p005", "p995", "mean", "std")} if n == "ct" else None
            for n, st in zip(norm, fingerprint["intensity_foreground"], strict=True)
        ]
    if max(labels.values()) > 255 or min(labels.values()) < 0:
        raise ValueError(f"label values must be in [0, 255] (cached as uint8), got {labels}")
    labels, ignore = split_ignore_label(dict(labels))
    if not labels:
        raise ValueError(f"the dataset has no label besides 'ignore' ({ignore}).")
    shrunk = fingerprint.get("median_relative_size_after_cropping", 1.0) < 0.75
    return Plan(
        use_mask_for_norm=[n == "zscore" and shrunk for n in norm],
        target_spacing=tuple(float(s) for s in spacing),
        normalization=norm,
        ct_stats=ct_stats,
        labels=dict(labels),
        in_channels=n_ch,
        num_classes=len(regions) if regions else max(labels.values()) + 1,
        anisotropy_threshold=float(anisotropy_threshold),
        channel_names=dict(fingerprint["channel_names"]),
        ignore_label=ignore,
        regions={k: list(v) for k, v in regions.items()} if regions else None,
        regions_class_order=list(regions_class_order) if regions else None,
    )
