"""Data augmentation of one patch (NumPy/SciPy), spatial transforms applied identically to the
image and its label.

Spatial: random flips, rotation and scaling (one affine resampling: image linear, label nearest),
optional elastic deformation (smoothed random displacements). Intensity (image only): Gaussian
noise, Gaussian blur, brightness, contrast, gamma. Each has its probability in the config
(``conf/data/default.yaml`` ``augment``); missing keys count as "off".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import ndimage


def _get(cfg: Mapping[str, Any] | None, key: str, default: Any = 0.0) -> Any:
    if cfg is None:
        return default
    value = cfg.get(key, default)
    return default if value is None else value


def rotation_matrix(angles: np.ndarray) -> np.ndarray:
    """3x3 rotation by ``angles`` (radians) about axes 0, 1, 2 (applied in that order)."""
    ca, cb, cc = np.cos(angles)
    sa, sb, sc = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, ca, -sa], [0, sa, ca]])
    ry = np.array([[cb, 0, sb], [0, 1, 0], [-sb, 0, cb]])
    rz = np.array([[cc, -sc, 0], [sc, cc, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _spatial_matrix(cfg, rng: np.random.Generator) -> np.ndarray | None:
    """Output->input coordinate matrix for rotation/scaling, or None when neither is drawn."""
    mat, used = np.eye(3), False
    if rng.random() < float(_get(cfg, "p_rotation")):
        deg = float(_get(cfg, "rotation_deg", 15.0))
        mat = rotation_matrix(np.deg2rad(rng.uniform(-deg, deg, 3))) @ mat
        used = True
    if rng.random() < float(_get(cfg, "p_scale")):
        lo, hi = _get(cfg, "scale_range", (0.85, 1.25))
        mat = mat / rng.uniform(lo, hi)  # zoom in by s = sample input at coords / s
        used = True
    return mat if used else None


def _elastic(shape, cfg, rng: np.random.Generator) -> list[np.ndarray]:
    alpha, sigma = float(_get(cfg, "elastic_alpha", 4.0)), float(_get(cfg, "elastic_sigma", 3.0))
    fields = []
    for _ in range(3):
        f = ndimage.gaussian_filter(rng.uniform(-1, 1, shape), sigma)
        fields.append(f * (alpha / max(float(np.abs(f).max()), 1e-8)))  # max displacement alpha
    return fields


def spatial_margin(cfg: Mapping[str, Any] | None, patch_size: Sequence[int]) -> tuple[int, ...]:
    """Voxels to add on each side of a patch so that the largest configured rotation, zoom-out
    and elastic displacement still sample real data, not padding (nnU-Net samples such a larger
    patch and crops the centre after the spatial transform). Zero when no spatial transform."""
    patch = np.asarray(patch_size, dtype=float)
    rot = float(_get(cfg, "rotation_deg", 15.0)) if float(_get(cfg, "p_rotation")) > 0 else 0.0
    s_min = min(_get(cfg, "scale_range", (1.0, 1.0))) if float(_get(cfg, "p_scale")) > 0 else 1.0
    alpha = float(_get(cfg, "elastic_alpha", 4.0)) if float(_get(cfg, "p_elastic")) > 0 else 0.0
    if rot == 0 and s_min >= 1 and alpha == 0:
        return (0,) * len(patch)
    extent = patch.copy()
    for signs in np.ndindex(3, 3, 3):  # rotations at -max, 0, +max about each axis
        mat = rotation_matrix(np.deg2rad(rot) * (np.asarray(signs) - 1)) / min(s_min, 1.0)
        extent = np.maximum(extent, np.abs(mat) @ patch)
    return tuple(int(np.ceil((e - p) / 2 + alpha)) + 1 for e, p in zip(extent, patch, strict=True))


def spatial_augment(
    image: np.ndarray,
    label: np.ndarray,
    cfg: Mapping[str, Any] | None,
    rng: np.random.Generator,
    out_shape: Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Rotation, scaling, elastic deformation and flips of ``(D, H, W, C)`` image and
    ``(D, H, W)`` label with the same transform (image order 1, label order 0, zero outside).

    Args:
        out_shape: output size; the input may be larger (see :func:`spatial_margin`): the
            transform is about the centres and the output is the centre of the result.
    """
    shape = tuple(image.shape[:3])
    out_shape = shape if out_shape is None else tuple(int(s) for s in out_shape)
    mat = _spatial_matrix(cfg, rng)
    disp = _elastic(out_shape, cfg, rng) if rng.random() < float(_get(cfg, "p_elastic")) else None
    c_in, c_out = (np.asarray(shape) - 1) / 2, (np.asarray(out_shape) - 1) / 2
    if mat is not None or disp is not None:
        mat = np.eye(3) if mat is None else mat
        coords = None
        if disp is not None:
            grid = np.stack(np.meshgrid(*[np.arange(s) for s in out_shape], indexing="ij"))
            coords = mat @ (grid.reshape(3, -1) - c_out[:, None]) + c_in[:, None]
            coords = coords.reshape(3, *out_shape) + np.stack(disp)

        def warp(a: np.ndarray, order: int) -> np.ndarray:
            if coords is not None:
                return ndimage.map_coordinates(a, coords, order=order, mode="constant")
            return ndimage.affine_transform(
                a, mat, c_in - mat @ c_out, output_shape=out_shape, order=order, mode="constant"
            )

        image = np.stack([warp(image[..., c], 1) for c in range(image.shape[-1])], axis=-1)
        label = warp(label, 0)
    elif out_shape != shape:
        crop = tuple(
            slice((s - o) // 2, (s - o) // 2 + o) for s, o in zip(shape, out_shape, strict=True)
        )
        image, label = image[crop], label[crop]
    for ax in range(3):
        if rng.random() < float(_get(cfg, "p_flip")):
            image, label = np.flip(image, ax), np.flip(label, ax)
    return np.ascontiguousarray(image), np.ascontiguousarray(label)


def intensity_augment(
    image: np.ndarray, cfg: Mapping[str, Any] | None, rng: np.random.Generator
) -> np.ndarray:
    """Noise, blur, brightness, contrast and gamma on a ``(D, H, W, C)`` float32 image."""
    image = image.astype(np.float32, copy=True)
    if rng.random() < float(_get(cfg, "p_noise")):
        std = rng.uniform(*_get(cfg, "noise_std", (0.0, 0.1)))
        image += rng.normal(0.0, std, image.shape).astype(np.float32)
    if rng.random() < float(_get(cfg, "p_blur")):
        sigma = rng.uniform(*_get(cfg, "blur_sigma", (0.5, 1.0)))
        image = ndimage.gaussian_filter(image, sigma=(sigma, sigma, sigma, 0))
    if rng.random() < float(_get(cfg, "p_brightness")):
        image *= rng.uniform(*_get(cfg, "brightness_range", (0.75, 1.25)))
    if rng.random() < float(_get(cfg, "p_contrast")):
        factor = rng.uniform(*_get(cfg, "contrast_range", (0.75, 1.25)))
        mean, lo, hi = image.mean(), image.min(), image.max()
        image = np.clip((image - mean) * factor + mean, lo, hi)
    if rng.random() < float(_get(cfg, "p_gamma")):
        gamma = rng.uniform(*_get(cfg, "gamma_range", (0.7, 1.5)))
        lo, hi = image.min(), image.max()
        rng_span = max(hi - lo, 1e-8)
        image = np.power((image - lo) / rng_span, gamma) * rng_span + lo
    return image.astype(np.float32, copy=False)


def augment(
    image: np.ndarray,
    label: np.ndarray,
    cfg: Mapping[str, Any] | None,
    rng: np.random.Generator,
    out_shape: Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Spatial then intensity augmentation; returns image float32 and label of the input dtype.

    Args:
        image: ``(D, H, W, C)`` float32 patch.
        label: ``(D, H, W)`` integer patch.
        cfg: the ``augment`` config (None: no augmentation).
        rng: the random generator (the only source of randomness).
        out_shape: output patch size when the input carries a :func:`spatial_margin`.
    """
    if cfg is None and out_shape is None:
        return image, label
    cfg = cfg or {}
    image, label = spatial_augment(image, label, cfg, rng, out_shape)
    return intensity_augment(image, cfg, rng), label
