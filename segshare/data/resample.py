"""Resampling of images, label maps and class probabilities between voxel grids.

All functions map a grid of ``old`` voxels onto ``new`` voxels covering the same physical extent
(voxel edges aligned, ``scipy.ndimage.zoom(grid_mode=True)``), so resampling there and back uses
the same geometry. When the data are anisotropic (one axis more than ``threshold`` times coarser
than the finest), that axis is resampled separately with nearest-neighbour interpolation and the
in-plane axes with the requested order, as nnU-Net does: interpolating across thick slices smears
structures that are not continuous between them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage


def compute_new_shape(
    shape: Sequence[int], spacing: Sequence[float], target_spacing: Sequence[float]
) -> tuple[int, int, int]:
    """Voxels per axis after resampling ``shape`` from ``spacing`` to ``target_spacing`` (>= 1)."""
    return tuple(
        max(1, int(round(s * sp / t)))
        for s, sp, t in zip(shape, spacing, target_spacing, strict=True)
    )


def anisotropic_axis(
    spacing: Sequence[float], target_spacing: Sequence[float], threshold: float = 3.0
) -> int | None:
    """The axis to resample separately, or None.

    The source spacing is checked first, then the target spacing (nnU-Net's rule): the coarsest
    axis of whichever has ``max / min > threshold``.
    """
    for sp in (spacing, target_spacing):
        sp = np.asarray(sp, dtype=float)
        if sp.max() / sp.min() > threshold:
            return int(np.argmax(sp))
    return None


def _zoom(vol: np.ndarray, new_shape: Sequence[int], order: int) -> np.ndarray:
    """Resample a 3D float array onto ``new_shape`` (edge-aligned)."""
    if tuple(vol.shape) == tuple(new_shape):
        return vol
    factors = [n / o for n, o in zip(new_shape, vol.shape, strict=True)]
    if order > 1:  # float32 spline coefficients: half the memory of scipy's float64 default
        vol = ndimage.spline_filter(vol, order, output=np.float32, mode="nearest")
    out = ndimage.zoom(vol, factors, order=order, mode="nearest", grid_mode=True, prefilter=False)
    if out.shape != tuple(new_shape):  # defensive: scipy rounds the output shape itself
        raise RuntimeError(f"zoom produced {out.shape}, expected {tuple(new_shape)}")
    return out


def _zoom_separate(
    vol: np.ndarray, new_shape: Sequence[int], order: int, axis: int | None, order_axis: int = 0
) -> np.ndarray:
    """In-plane with ``order``, then along ``axis`` with ``order_axis`` (or all axes at once)."""
    if axis is None:
        return _zoom(vol, new_shape, order)
    inplane = list(new_shape)
    inplane[axis] = vol.shape[axis]
    return _zoom(_zoom(vol, inplane, order), new_shape, order_axis)


def resample_image(
    image: np.ndarray, new_shape: Sequence[int], order: int = 3, axis: int | None = None
) -> np.ndarray:
    """Resample an image ``(D, H, W, C)`` per channel; returns float32 ``(*new_shape, C)``."""
    if tuple(image.shape[:3]) == tuple(new_shape):
        return image.astype(np.float32, copy=False)
    out = np.empty((*new_shape, image.shape[-1]), np.float32)
    for c in range(image.shape[-1]):
        out[..., c] = _zoom_separate(image[..., c].astype(np.float32), new_shape, order, axis)
    return out


def resample_label(
    label: np.ndarray, new_shape: Sequence[int], axis: int | None = None
) -> np.ndarray:
    """Resample a label map ``(D, H, W)``: each class's mask linearly, then the argmax.

    Linear interpolation of one-hot masks keeps thin structures and smooth borders that nearest
    neighbour loses, and can never invent a label value. Returns uint8 ``new_shape``.
    """
    if tuple(label.shape) == tuple(new_shape):
        return label.astype(np.uint8, copy=False)
    # Linear interpolation preserves sums, so background = 1 - sum(foreground): one pass fewer.
    best = np.zeros(tuple(new_shape), np.float32)
    total = np.zeros(tuple(new_shape), np.float32)
    out = np.zeros(tuple(new_shape), np.uint8)
    for c in np.unique(label):
        if c == 0:
            continue
        mask = _zoom_separate((label == c).astype(np.float32), new_shape, 1, axis)
        total += mask
        better = mask > best
        out[better] = c
        best[better] = mask[better]
    out[best <= 1.0 - total] = 0  # background wins ties, as argmax over (0, 1, ...) would
    return out


def resample_probabilities(
    probs: np.ndarray, new_shape: Sequence[int], axis: int | None = None
) -> np.ndarray:
    """Resample class probabilities ``(D, H, W, K)`` with linear interpolation (nearest along
    an anisotropic ``axis``); returns float32 ``(*new_shape, K)``, still summing to 1."""
    return resample_image(probs, new_shape, order=1, axis=axis)
