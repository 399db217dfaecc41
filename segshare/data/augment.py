"""Data augmentation of one patch (NumPy/SciPy), spatial transforms applied identically to the
image and its label.

Spatial: random flips, rotation and scaling (one affine resampling: image linear, label nearest),
optional elastic deformation (smoothed random displacements). Intensity (image only): Gaussian
noise, Gaussian blur, brightness, contrast, gamma. Each has its probability in the config
(``conf/data/default.yaml`` ``augment``); missing keys count as "off".
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from scipy import ndimage


def _get(cfg: Mapping[str, Any] | None, key: str, default: Any = 0.0) -> Any:
    if cfg is None:
        return default
    value = cfg.get(key, default)
    return default if value is None else value


def _rotation_matrix(angles: np.ndarray) -> np.ndarray:
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
        mat = _rotation_matrix(np.deg2rad(rng.uniform(-deg, deg, 3))) @ mat
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


def spatial_augment(
    image: np.ndarray, label: np.ndarray, cfg: Mapping[str, Any] | None, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Flips, rotation, scaling and elastic deformation of ``(D, H, W, C)`` image and
    ``(D, H, W)`` label with the same transform (image order 1, label order 0, zero outside)."""
    shape = image.shape[:3]
    mat = _spatial_matrix(cfg, rng)
    disp = _elastic(shape, cfg, rng) if rng.random() < float(_get(cfg, "p_elastic")) else None
    if mat is not None or disp is not None:
        center = (np.asarray(shape) - 1) / 2
        mat = np.eye(3) if mat is None else mat
        coords = None
        if disp is not None:
            grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"))
            coords = mat @ (grid.reshape(3, -1) - center[:, None]) + center[:, None]
            coords = coords.reshape(3, *shape) + np.stack(disp)

        def warp(a: np.ndarray, order: int) -> np.ndarray:
            if coords is not None:
                return ndimage.map_coordinates(a, coords, order=order, mode="constant")
            offset = center - mat @ center
            return ndimage.affine_transform(a, mat, offset, order=order, mode="constant")

        image = np.stack([warp(image[..., c], 1) for c in range(image.shape[-1])], axis=-1)
        label = warp(label, 0)
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
    image: np.ndarray, label: np.ndarray, cfg: Mapping[str, Any] | None, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Spatial then intensity augmentation; returns image float32 and label of the input dtype.

    Args:
        image: ``(D, H, W, C)`` float32 patch.
        label: ``(D, H, W)`` integer patch.
        cfg: the ``augment`` config (None: no augmentation).
        rng: the random generator (the only source of randomness).
    """
    if cfg is None:
        return image, label
    image, label = spatial_augment(image, label, cfg, rng)
    return intensity_augment(image, cfg, rng), label
