"""Report pictures as PNG bytes: box plots per label, overlay montages with contours."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402

from segshare.data.io import load_nifti, read_label_voxels, read_voxels  # noqa: E402

#: (title, axis fixed by the slice) of the three views, on the closest-canonical (RAS) grid.
VIEWS = (("axial", 2), ("coronal", 1), ("sagittal", 0))


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def box_plots(
    values: dict[str, dict[str, list[float]]], metrics: Sequence[str] = ("Dice", "HD95")
) -> bytes:
    """Box plots of ``metrics`` per label, side by side.

    Args:
        values: ``{metric: {label_title: [per-case values]}}``; NaN and inf are not drawn (the
            axis title counts the infinite ones).
        metrics: metrics to draw, one panel each.

    Returns:
        PNG bytes.
    """
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        per_label = values.get(metric, {})
        titles = list(per_label)
        data = [np.asarray(per_label[t], float) for t in titles]
        n_inf = sum(int(np.isinf(d).sum()) for d in data)
        finite = [d[np.isfinite(d)] for d in data]
        ax.boxplot(finite, showmeans=True)
        ax.set_xticks(range(1, len(titles) + 1), titles)
        unit = " (mm)" if metric in ("HD95", "ASSD") else ""
        ax.set_title(f"{metric}{unit}" + (f" — {n_inf} infinite not drawn" if n_inf else ""))
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def bar_plot(values: dict[str, float], title: str, reference: float | None = None) -> bytes:
    """One bar per entry (e.g. the foreground-mean Dice per fold or per configuration), its value
    written above it, and an optional dashed line (e.g. the Dice over all cases).

    Returns:
        PNG bytes.
    """
    names = list(values)
    heights = [float(values[n]) for n in names]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(names) + 2), 3.5))
    bars = ax.bar(range(len(names)), np.nan_to_num(heights, nan=0.0), color="#4c72b0")
    for bar, h in zip(bars, heights, strict=True):
        ax.annotate("NaN" if np.isnan(h) else f"{h:.4f}", (bar.get_x() + bar.get_width() / 2,
                    np.nan_to_num(h)), ha="center", va="bottom", fontsize=8)  # fmt: skip
    if reference is not None and np.isfinite(reference):
        ax.axhline(reference, color="#c44e52", ls="--", lw=1, label=f"all cases {reference:.4f}")
        ax.legend(loc="lower right", fontsize=8)
    finite = [h for h in heights if np.isfinite(h)] or [0.0]
    ax.set_ylim(max(0.0, min(finite) - 0.1), min(1.0, max(finite) + 0.05))
    ax.set_xticks(range(len(names)), names, rotation=20 if len(names) > 4 else 0)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def _canonical(path: Path, is_label: bool) -> tuple[np.ndarray, tuple[float, ...]]:
    """A volume on its closest canonical (RAS) grid (first channel of a 4D one) and its spacing,
    as ``nib.as_closest_canonical`` would give."""
    img = load_nifti(path)
    data = read_label_voxels(img, path) if is_label else read_voxels(img, path)
    if data.ndim == 4:
        data = data[..., 0]
    ornt = nib.orientations.io_orientation(img.affine)
    data = nib.orientations.apply_orientation(data, ornt)
    spacing = [0.0, 0.0, 0.0]
    for axis, (target, _) in enumerate(ornt):
        spacing[int(target)] = float(img.header.get_zooms()[axis])
    data = data.astype(np.int32) if is_label else data.astype(np.float32, copy=False)
    return data, tuple(spacing)


def _centre(ref: np.ndarray, pred: np.ndarray) -> tuple[int, ...]:
    for mask in (ref > 0, pred > 0):
        if mask.any():
            return tuple(int(round(c)) for c in np.argwhere(mask).mean(axis=0))
    return tuple(s // 2 for s in ref.shape)


def _slice(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    # Transposed so that the first remaining axis runs horizontally and the second upwards.
    return np.take(volume, index, axis=axis).T


def overlay_montage(
    rows: Sequence[tuple[str, Path | None, Path, Path | None]],
    labels: dict[int, str],
) -> bytes:
    """Axial, coronal and sagittal slices with reference (solid) and prediction (dashed) contours.

    Args:
        rows: ``(title, image_path or None, reference_path, prediction_path or None)`` per row;
            every volume is shown on its closest canonical (RAS) grid, slices through the centre
            of the reference foreground.
        labels: ``{label: title}`` of the contours to draw (one colour each).

    Returns:
        PNG bytes.
    """
    colours = plt.get_cmap("tab10")
    fig, axes = plt.subplots(len(rows), 3, figsize=(11, 3.6 * len(rows)), squeeze=False)
    for r, (title, image_path, ref_path, pred_path) in enumerate(rows):
        ref, spacing = _canonical(ref_path, is_label=True)
        pred = _canonical(pred_path, True)[0] if pred_path is not None else np.zeros_like(ref)
        image = _canonical(image_path, False)[0] if image_path is not None else None
        centre = _centre(ref, pred)
        for c, (view, axis) in enumerate(VIEWS):
            ax = axes[r, c]
            shown = [a for a in range(3) if a != axis]
            aspect = spacing[shown[1]] / spacing[shown[0]]
            if image is not None and image.shape == ref.shape:
                ax.imshow(
                    _slice(image, axis, centre[axis]),
                    cmap="gray",
                    origin="lower",
                    aspect=aspect,
                    interpolation="nearest",
                )
            else:
                ax.imshow(
                    np.zeros(_slice(ref, axis, centre[axis]).shape),
                    cmap="gray",
                    origin="lower",
                    aspect=aspect,
                )
            for i, label in enumerate(labels):
                for vol, style in ((ref, "solid"), (pred, "dashed")):
                    mask = _slice(vol, axis, centre[axis]) == label
                    if mask.any() and not mask.all():
                        ax.contour(
                            mask.astype(float),
                            levels=[0.5],
                            colors=[colours(i % 10)],
                            linestyles=style,
                            linewidths=1.4,
                        )
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{title} — {view}" if c == 0 else view, fontsize=9)
    handles = [
        plt.Line2D([], [], color=colours(i % 10), label=name)
        for i, name in enumerate(labels.values())
    ]
    handles += [
        plt.Line2D([], [], color="k", label="reference"),
        plt.Line2D([], [], color="k", ls="--", label="prediction"),
    ]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return _png(fig)
