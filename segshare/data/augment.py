"""Data augmentation of one patch (NumPy/SciPy), spatial transforms applied identically to the
image and its label.

Spatial: random flips, rotation and scaling (one affine resampling: image linear, label nearest),
optional elastic deformation (smoothed random displacements). Intensity (image only): Gaussian
noise, Gaussian blur, brightness, contrast, gamma. Each has its probability and range in
:class:`AugmentSettings` (the app's values: ``conf/data/augment/default.yaml``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class AugmentSettings:
    """Probabilities and ranges of every transform. ``AugmentSettings()`` changes nothing: every
    probability is 0 and every range the identity; the tuned values live in the app's config.

    Attributes:
        p_flip: probability of flipping each spatial axis.
        p_rotation, rotation_deg: probability of a rotation, and its maximum angle about each axis.
        p_scale, scale_range: probability of an isotropic scaling, and its factor range.
        p_elastic, elastic_alpha, elastic_sigma: probability of an elastic deformation, its
            maximum displacement (voxels) and the smoothing (voxels) of its field.
        p_noise, noise_std: additive Gaussian noise and its standard deviation range.
        p_blur, blur_sigma: Gaussian blur and its sigma range (voxels).
        p_brightness, brightness_range: multiplicative brightness and its factor range.
        p_contrast, contrast_range: contrast about the mean and its factor range.
        p_gamma, gamma_range: gamma on intensities rescaled to [0, 1] and its range.
    """

    p_flip: float = 0.0
    p_rotation: float = 0.0
    rotation_deg: float = 0.0
    p_scale: float = 0.0
    scale_range: tuple[float, float] = (1.0, 1.0)
    p_elastic: float = 0.0
    elastic_alpha: float = 0.0
    elastic_sigma: float = 1.0
    p_noise: float = 0.0
    noise_std: tuple[float, float] = (0.0, 0.0)
    p_blur: float = 0.0
    blur_sigma: tuple[float, float] = (0.0, 0.0)
    p_brightness: float = 0.0
    brightness_range: tuple[float, float] = (1.0, 1.0)
    p_contrast: float = 0.0
    contrast_range: tuple[float, float] = (1.0, 1.0)
    p_gamma: float = 0.0
    gamma_range: tuple[float, float] = (1.0, 1.0)

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if name.startswith("p_") and not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"data.augment.{name} must be in [0, 1], got {value!r}.")
            if name.endswith(("_range", "_std", "_sigma")) and not isinstance(value, float | int):
                if len(value) != 2 or float(value[0]) > float(value[1]):
                    raise ValueError(f"data.augment.{name} must be [low, high], got {value!r}.")
                object.__setattr__(self, name, (float(value[0]), float(value[1])))


def rotation_matrix(angles: np.ndarray) -> np.ndarray:
    """3x3 rotation by ``angles`` (radians) about axes 0, 1, 2 (applied in that order)."""
    ca, cb, cc = np.cos(angles)
    sa, sb, sc = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, ca, -sa], [0, sa, ca]])
    ry = np.array([[cb, 0, sb], [0, 1, 0], [-sb, 0, cb]])
    rz = np.array([[cc, -sc, 0], [sc, cc, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _spatial_matrix(cfg: AugmentSettings, rng: np.random.Generator) -> np.ndarray | None:
    """Output->input coordinate matrix for rotation/scaling, or None when neither is drawn."""
    mat, used = np.eye(3), False
    if rng.random() < cfg.p_rotation:
        deg = float(cfg.rotation_deg)
        mat = rotation_matrix(np.deg2rad(rng.uniform(-deg, deg, 3))) @ mat
        used = True
    if rng.random() < cfg.p_scale:
        lo, hi = cfg.scale_range
        mat = mat / rng.uniform(lo, hi)  # zoom in by s = sample input at coords / s
        used = True
    return mat if used else None


def _elastic(shape, cfg: AugmentSettings, rng: np.random.Generator) -> list[np.ndarray]:
    alpha, sigma = float(cfg.elastic_alpha), float(cfg.elastic_sigma)
    fields = []
    for _ in range(3):
        f = ndimage.gaussian_filter(rng.uniform(-1, 1, shape), sigma)
        fields.append(f * (alpha / max(float(np.abs(f).max()), 1e-8)))  # max displacement alpha
    return fields


def spatial_margin(cfg: AugmentSettings | None, patch_size: Sequence[int]) -> tuple[int, ...]:
    """Voxels to add on each side of a patch so that the largest configured rotation, zoom-out
    and elastic displacement still sample real data, not padding (nnU-Net samples such a larger
    patch and crops the centre after the spatial transform). Zero when no spatial transform."""
    patch = np.asarray(patch_size, dtype=float)
    cfg = cfg or AugmentSettings()
    rot = float(cfg.rotation_deg) if cfg.p_rotation > 0 else 0.0
    s_min = min(cfg.scale_range) if cfg.p_scale > 0 else 1.0
    alpha = float(cfg.elastic_alpha) if cfg.p_elastic > 0 else 0.0
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
    cfg: AugmentSettings,
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
    disp = _elastic(out_shape, cfg, rng) if rng.random() < cfg.p_elastic else None
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
        if rng.random() < cfg.p_flip:
            image, label = np.flip(image, ax), np.flip(label, ax)
    return np.ascontiguousarray(image), np.ascontiguousarray(label)


def intensity_augment(
    image: np.ndarray, cfg: AugmentSettings, rng: np.random.Generator
) -> np.ndarray:
    """Noise, blur, brightness, contrast and gamma on a ``(D, H, W, C)`` float32 image."""
    image = image.astype(np.float32, copy=True)
    if rng.random() < cfg.p_noise:
        std = rng.uniform(*cfg.noise_std)
        image += rng.normal(0.0, std, image.shape).astype(np.float32)
    if rng.random() < cfg.p_blur:
        sigma = rng.uniform(*cfg.blur_sigma)
        image = ndimage.gaussian_filter(image, sigma=(sigma, sigma, sigma, 0))
    if rng.random() < cfg.p_brightness:
        image *= rng.uniform(*cfg.brightness_range)
    if rng.random() < cfg.p_contrast:
        factor = rng.uniform(*cfg.contrast_range)
        mean, lo, hi = image.mean(), image.min(), image.max()
        image = np.clip((image - mean) * factor + mean, lo, hi)
    if rng.random() < cfg.p_gamma:
        gamma = rng.uniform(*cfg.gamma_range)
        lo, hi = image.min(), image.max()
        rng_span = max(hi - lo, 1e-8)
        image = np.power((image - lo) / rng_span, gamma) * rng_span + lo
    return image.astype(np.float32, copy=False)


def augment(
    image: np.ndarray,
    label: np.ndarray,
    cfg: AugmentSettings | None,
    rng: np.random.Generator,
    out_shape: Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Spatial then intensity augmentation; returns image float32 and label of the input dtype.

    Args:
        image: ``(D, H, W, C)`` float32 patch.
        label: ``(D, H, W)`` integer patch.
        cfg: the settings (None: no augmentation).
        rng: the random generator (the only source of randomness).
        out_shape: output patch size when the input carries a :func:`spatial_margin`.
    """
    if cfg is None and out_shape is None:
        return image, label
    cfg = cfg or AugmentSettings()
    image, label = spatial_augment(image, label, cfg, rng, out_shape)
    return intensity_augment(image, cfg, rng), label
