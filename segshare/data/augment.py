"""Data augmentation of one patch (NumPy/SciPy), spatial transforms applied identically to the
image and its label; the transforms of nnU-Net's default trainer
(``nnUNetTrainer.get_training_transforms``), in its order.

Spatial (one resampling of image and label, image linear, label nearest): rotation, scaling,
optional elastic deformation, then flips. Intensity (image only): Gaussian noise, Gaussian blur,
brightness, contrast, low-resolution simulation, inverted gamma, gamma. Each has its probability
and range in :class:`AugmentSettings` (the app's values: ``conf/data/augment/default.yaml``).

"Dummy 2D": when a patch is anisotropic (its first smallest axis, the *thin* axis, is less than
``1 / dummy_2d_ratio`` of its largest, or one voxel), rotation, scaling, elastic deformation and the
low-resolution zoom act only in the plane of the two other axes, so every slice along the thin
axis stays at its index and becomes a transform of the same input slice (nnU-Net's
``do_dummy_2d_data_aug``, decided there by ``max(patch) / patch[0] > 3``, here for any axis).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class AugmentSettings:
    """Probabilities and ranges of every transform. ``AugmentSettings()`` changes nothing: every
    probability of a transform is 0 and every range the identity; the tuned values live in the
    app's config. A ``p_*_per_channel`` is the chance of each channel once the transform is drawn.

    Attributes:
        p_flip: probability of flipping each spatial axis.
        p_rotation, rotation_deg: probability of a rotation, and its maximum angle (degrees) about
            each axis (one uniform angle per axis; about the thin axis only in dummy 2D).
        p_scale, scale_range: probability of an isotropic scaling (in-plane in dummy 2D), and its
            factor range (> 1 magnifies); below or above 1 with equal chance, as nnU-Net draws it.
        p_elastic, elastic_alpha, elastic_sigma: probability of an elastic deformation, its
            maximum displacement (voxels) and the smoothing (voxels) of its field.
        dummy_2d_ratio: a patch whose largest axis exceeds this many times its smallest one is
            augmented as a stack of 2D slices along the smallest axis (see the module docstring).
        p_noise, noise_std: additive Gaussian noise and its standard deviation range (nnU-Net's
            "noise_variance" (0, 0.1) is passed to NumPy as the standard deviation).
        p_blur, p_blur_per_channel, blur_sigma: Gaussian blur, its chance per channel and its
            sigma range (voxels, one sigma per channel).
        p_brightness, brightness_range: multiplicative brightness, one factor per channel.
        p_contrast, contrast_range: contrast about each channel's mean, clipped to the channel's
            range, one factor per channel.
        p_lowres, p_lowres_per_channel, lowres_zoom_range: low-resolution simulation, its chance
            per channel, and the zoom range in (0, 1] (one zoom per channel, the same on its axes).
        p_gamma_inverted, p_gamma, gamma_range: gamma on the inverted intensities (invert, gamma,
            invert back), gamma, and the range of the exponent (one per channel).
        gamma_retain_stats: both gammas restore each channel's mean and standard deviation
            (nnU-Net's ``retain_stats``); when False they keep each channel's [min, max] range.
    """

    p_flip: float = 0.0
    p_rotation: float = 0.0
    rotation_deg: float = 0.0
    p_scale: float = 0.0
    scale_range: tuple[float, float] = (1.0, 1.0)
    p_elastic: float = 0.0
    elastic_alpha: float = 0.0
    elastic_sigma: float = 1.0
    dummy_2d_ratio: float = 3.0
    p_noise: float = 0.0
    noise_std: tuple[float, float] = (0.0, 0.0)
    p_blur: float = 0.0
    p_blur_per_channel: float = 1.0
    blur_sigma: tuple[float, float] = (0.0, 0.0)
    p_brightness: float = 0.0
    brightness_range: tuple[float, float] = (1.0, 1.0)
    p_contrast: float = 0.0
    contrast_range: tuple[float, float] = (1.0, 1.0)
    p_lowres: float = 0.0
    p_lowres_per_channel: float = 1.0
    lowres_zoom_range: tuple[float, float] = (1.0, 1.0)
    p_gamma_inverted: float = 0.0
    p_gamma: float = 0.0
    gamma_range: tuple[float, float] = (1.0, 1.0)
    gamma_retain_stats: bool = True

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if name.startswith("p_") and not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"data.augment.{name} must be in [0, 1], got {value!r}.")
            if name.endswith(("_range", "_std", "_sigma")) and not isinstance(value, float | int):
                if len(value) != 2 or float(value[0]) > float(value[1]):
                    raise ValueError(f"data.augment.{name} must be [low, high], got {value!r}.")
                object.__setattr__(self, name, (float(value[0]), float(value[1])))
        for name in ("scale_range", "gamma_range", "lowres_zoom_range"):
            if getattr(self, name)[0] <= 0:
                raise ValueError(
                    f"data.augment.{name} must be positive, got {getattr(self, name)}."
                )
        if self.lowres_zoom_range[1] > 1:
            raise ValueError(
                f"data.augment.lowres_zoom_range must lie in (0, 1], got {self.lowres_zoom_range}."
            )
        if not float(self.dummy_2d_ratio) >= 1:
            raise ValueError(
                f"data.augment.dummy_2d_ratio must be >= 1, got {self.dummy_2d_ratio}."
            )


@dataclass(frozen=True)
class AugmentByLength:
    """The augmentation chosen by the length of the run: nnU-Net's ``full`` set, made for its
    250,000 steps, or a ``light`` one for a run of fewer than ``light_below_steps`` steps, where the
    full set's harder samples cost Dice (measured on the hippocampus: docs/benchmarks.md). A run
    with a time budget counts its steps once epoch 0 has fixed them (epoch 0 counts the provisional
    ``trainer.max_epochs``).

    Attributes:
        full: nnU-Net's augmentation (``conf/data/augment/default.yaml``).
        light: the lighter set (``conf/data/augment/light.yaml``).
        light_below_steps: runs of fewer optimizer steps get ``light``.
    """

    full: AugmentSettings
    light: AugmentSettings
    light_below_steps: int = 10_000

    def __post_init__(self) -> None:
        if not int(self.light_below_steps) >= 0:
            raise ValueError(
                f"data.augment.light_below_steps must be >= 0, got {self.light_below_steps!r}."
            )

    def for_steps(self, total_steps: int) -> AugmentSettings:
        """The set for a run of ``total_steps`` optimizer steps."""
        return self.light if int(total_steps) < int(self.light_below_steps) else self.full

    def describe(self, total_steps: int) -> str:
        """One line naming the set chosen for ``total_steps`` and why."""
        if int(total_steps) < int(self.light_below_steps):
            return (
                f"augmentation: light ({total_steps:,} steps < data.augment.light_below_steps="
                f"{int(self.light_below_steps):,})"
            )
        return (
            f"augmentation: nnU-Net's full set ({total_steps:,} steps >= "
            f"data.augment.light_below_steps={int(self.light_below_steps):,})"
        )


def augmentation_for(
    settings: AugmentSettings | AugmentByLength | None, total_steps: int
) -> AugmentSettings | None:
    """The augmentation of a run of ``total_steps`` steps: ``settings`` itself, or the set an
    :class:`AugmentByLength` chooses."""
    if isinstance(settings, AugmentByLength):
        return settings.for_steps(total_steps)
    return settings


def rotation_matrix(angles: np.ndarray) -> np.ndarray:
    """3x3 rotation by ``angles`` (radians) about axes 0, 1, 2 (applied in that order)."""
    ca, cb, cc = np.cos(angles)
    sa, sb, sc = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, ca, -sa], [0, sa, ca]])
    ry = np.array([[cb, 0, sb], [0, 1, 0], [-sb, 0, cb]])
    rz = np.array([[cc, -sc, 0], [sc, cc, 0], [0, 0, 1]])
    return rz @ ry @ rx


def thin_axis(cfg: AugmentSettings, patch_size: Sequence[int]) -> int | None:
    """The thin axis of a "dummy 2D" patch: the first smallest axis when the largest one exceeds
    ``cfg.dummy_2d_ratio`` times it, or when it is one voxel thick (a 2D slice); None for a patch
    augmented in 3D."""
    patch = np.asarray(patch_size, dtype=float)
    axis = int(np.argmin(patch))
    if patch.max() > float(cfg.dummy_2d_ratio) * patch[axis] or patch[axis] == 1 < patch.max():
        return axis
    return None


def _in_plane(thin: int | None) -> np.ndarray:
    """1 on the axes a spatial transform may act on, 0 on the thin axis."""
    mask = np.ones(3)
    if thin is not None:
        mask[thin] = 0.0
    return mask


def _factor(low: float, high: float, rng: np.random.Generator) -> float:
    """A factor from ``[low, high]``; when the range straddles 1, below or above 1 with equal
    chance (nnU-Net's draw of contrast, gamma and scale factors)."""
    if low < 1.0 < high:
        return float(rng.uniform(low, 1.0) if rng.random() < 0.5 else rng.uniform(1.0, high))
    return float(rng.uniform(low, high))


def _spatial_matrix(
    cfg: AugmentSettings, rng: np.random.Generator, thin: int | None
) -> np.ndarray | None:
    """Output->input coordinate matrix for rotation/scaling, or None when neither is drawn."""
    mat, used = np.eye(3), False
    if rng.random() < cfg.p_rotation:
        deg = float(cfg.rotation_deg)
        angles = rng.uniform(-deg, deg, 3)
        if thin is not None:  # only the rotation about the thin axis keeps the slices apart
            angles = angles * (np.arange(3) == thin)
        mat = rotation_matrix(np.deg2rad(angles)) @ mat
        used = True
    if rng.random() < cfg.p_scale:
        s = _factor(*cfg.scale_range, rng)  # magnify by s = sample the input at coords / s
        mat = np.diag(1.0 + (1.0 / s - 1.0) * _in_plane(thin)) @ mat
        used = True
    return mat if used else None


def _elastic(shape, cfg: AugmentSettings, rng: np.random.Generator, thin: int | None):
    """Displacements (voxels) along each axis; in dummy 2D, none along the thin axis and the same
    in-plane field on every slice."""
    alpha, sigma = float(cfg.elastic_alpha), float(cfg.elastic_sigma)
    field_shape = tuple(1 if ax == thin else s for ax, s in enumerate(shape))
    fields = []
    for ax in range(3):
        if ax == thin:
            fields.append(np.zeros(shape))
            continue
        f = ndimage.gaussian_filter(rng.uniform(-1, 1, field_shape), sigma)
        f = f * (alpha / max(float(np.abs(f).max()), 1e-8))  # max displacement alpha
        fields.append(np.broadcast_to(f, shape))
    return fields


def spatial_margin(cfg: AugmentSettings | None, patch_size: Sequence[int]) -> tuple[int, ...]:
    """Voxels to add on each side of a patch so that the largest configured rotation, zoom-out
    and elastic displacement still sample real data, not padding (nnU-Net samples such a larger
    patch and crops the centre after the spatial transform). Zero when no spatial transform, and
    zero along the thin axis of a dummy-2D patch (its transforms are in-plane)."""
    patch = np.asarray(patch_size, dtype=float)
    cfg = cfg or AugmentSettings()
    rot = float(cfg.rotation_deg) if cfg.p_rotation > 0 else 0.0
    s_min = min(cfg.scale_range) if cfg.p_scale > 0 else 1.0
    alpha = float(cfg.elastic_alpha) if cfg.p_elastic > 0 else 0.0
    if rot == 0 and s_min >= 1 and alpha == 0:
        return (0,) * len(patch)
    thin = thin_axis(cfg, patch)
    plane = _in_plane(thin)
    zoom_out = np.diag(1.0 + (1.0 / min(s_min, 1.0) - 1.0) * plane)
    steps = np.deg2rad(rot) * np.linspace(-1.0, 1.0, 9)  # the extent may peak inside the range
    grids = [steps if thin is None or ax == thin else [0.0] for ax in range(3)]
    extent = patch.copy()
    for angles in np.stack(np.meshgrid(*grids, indexing="ij"), -1).reshape(-1, 3):
        extent = np.maximum(extent, zoom_out @ np.abs(rotation_matrix(angles)) @ patch)
    margin = np.ceil((extent - patch) / 2 + alpha) + 1
    return tuple(int(m) for m in margin * plane)


def spatial_augment(
    image: np.ndarray,
    label: np.ndarray,
    cfg: AugmentSettings,
    rng: np.random.Generator,
    out_shape: Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Rotation, scaling, elastic deformation and flips of ``(D, H, W, C)`` image and
    ``(D, H, W)`` label with the same transform (image order 1, label order 0, zero outside);
    in-plane only for a dummy-2D ``out_shape`` (see :func:`thin_axis`).

    Args:
        out_shape: output size; the input may be larger (see :func:`spatial_margin`): the
            transform is about the centres and the output is the centre of the result.
    """
    shape = tuple(image.shape[:3])
    out_shape = shape if out_shape is None else tuple(int(s) for s in out_shape)
    thin = thin_axis(cfg, out_shape)
    mat = _spatial_matrix(cfg, rng, thin)
    disp = _elastic(out_shape, cfg, rng, thin) if rng.random() < cfg.p_elastic else None
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


@lru_cache(maxsize=256)
def _resize_operator(n_in: int, n_out: int, order: int) -> np.ndarray:
    """The ``(n_out, n_in)`` matrix of ``ndimage.zoom`` along one axis (spline ``order``, grid
    mode, edge values repeated): the columns are the zoomed unit vectors."""
    columns = [
        ndimage.zoom(e, n_out / n_in, order=order, mode="nearest", grid_mode=True)
        for e in np.eye(n_in)
    ]
    matrix = np.stack(columns, axis=1).astype(np.float32)
    matrix.flags.writeable = False
    return matrix


def _resize(array: np.ndarray, shape: Sequence[int], order: int) -> np.ndarray:
    """``ndimage.zoom(array, shape / array.shape, order, mode="nearest", grid_mode=True)`` of a
    3D array, one axis at a time (spline interpolation is separable): many times faster for
    cubic; ``einsum`` rather than BLAS, whose threads contend with the pipeline's workers."""
    for axis, n_out in enumerate(int(n) for n in shape):
        if n_out != array.shape[axis]:
            matrix = _resize_operator(array.shape[axis], n_out, order)
            if order == 0:  # one-hot rows: a selection
                array = np.take(array, matrix.argmax(axis=1), axis=axis)
            else:
                sub = "ijk"[axis]
                array = np.einsum(f"z{sub},ijk->{'ijk'.replace(sub, 'z')}", matrix, array)
    return array


def simulate_low_resolution(
    channel: np.ndarray, zoom: float, thin: int | None = None
) -> np.ndarray:
    """nnU-Net's low-resolution simulation of one ``(D, H, W)`` channel: resample to
    ``round(shape * zoom)`` (nearest; the thin axis of a dummy-2D patch keeps its size), back to
    ``shape`` (cubic spline), clipped to the range of the downsampled channel (as the resize
    nnU-Net uses does). Unchanged when the smaller shape is the shape (e.g. ``zoom == 1``)."""
    shape = np.asarray(channel.shape)
    small_shape = np.where(_in_plane(thin) > 0, np.maximum(np.round(shape * zoom), 1), shape)
    if np.array_equal(small_shape, shape):
        return channel
    small = _resize(channel, small_shape, order=0)
    return np.clip(_resize(small, shape, order=3), small.min(), small.max())


def gamma_transform(
    channel: np.ndarray, gamma: float, invert: bool = False, retain_stats: bool = True
) -> np.ndarray:
    """nnU-Net's gamma of one channel: ``x -> ((x - min) / span) ** gamma * span + min``, on
    ``-x`` (then negated back) when ``invert``, which brightens where gamma darkens. With
    ``retain_stats`` the result is shifted and scaled back to the channel's mean and standard
    deviation (its range may change); without, the range ``[min, max]`` is kept."""
    x = (-channel if invert else channel).astype(np.float32)
    mean, std = float(x.mean(dtype=np.float64)), float(x.std(dtype=np.float64))
    low = float(x.min())
    span = float(x.max()) - low + 1e-7
    x = np.power((x - low) / span, gamma) * span + low
    if retain_stats:
        new_mean, new_std = float(x.mean(dtype=np.float64)), float(x.std(dtype=np.float64))
        x = (x - new_mean) * (std / (new_std + 1e-8)) + mean
    return -x if invert else x


def _contrast(channel: np.ndarray, factor: float) -> np.ndarray:
    mean, low, high = channel.mean(), channel.min(), channel.max()
    return np.clip((channel - mean) * factor + mean, low, high)


def intensity_augment(
    image: np.ndarray, cfg: AugmentSettings, rng: np.random.Generator
) -> np.ndarray:
    """Noise, blur, brightness, contrast, low resolution, inverted gamma and gamma (nnU-Net's
    order) on a ``(D, H, W, C)`` float32 image; all but the noise draw their factor per channel."""
    image = image.astype(np.float32, copy=True)
    channels = range(image.shape[-1])
    if rng.random() < cfg.p_noise:
        std = rng.uniform(*cfg.noise_std)
        image += rng.normal(0.0, std, image.shape).astype(np.float32)
    if rng.random() < cfg.p_blur:
        for c in channels:
            if rng.random() < cfg.p_blur_per_channel:
                sigma = rng.uniform(*cfg.blur_sigma)
                image[..., c] = ndimage.gaussian_filter(image[..., c], sigma)
    if rng.random() < cfg.p_brightness:
        image *= rng.uniform(*cfg.brightness_range, image.shape[-1]).astype(np.float32)
    if rng.random() < cfg.p_contrast:
        for c in channels:
            image[..., c] = _contrast(image[..., c], _factor(*cfg.contrast_range, rng))
    if rng.random() < cfg.p_lowres:
        thin = thin_axis(cfg, image.shape[:3])
        for c in channels:
            if rng.random() < cfg.p_lowres_per_channel:
                zoom = rng.uniform(*cfg.lowres_zoom_range)
                image[..., c] = simulate_low_resolution(image[..., c], zoom, thin)
    for p, invert in ((cfg.p_gamma_inverted, True), (cfg.p_gamma, False)):
        if rng.random() < p:
            for c in channels:
                gamma = _factor(*cfg.gamma_range, rng)
                image[..., c] = gamma_transform(
                    image[..., c], gamma, invert, cfg.gamma_retain_stats
                )
    return image


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
        out_shape: output patch size when the input carries a :func:`spatial_margin`; it also
            decides whether the patch is augmented as dummy 2D (:func:`thin_axis`).
    """
    if cfg is None and out_shape is None:
        return image, label
    cfg = cfg or AugmentSettings()
    image, label = spatial_augment(image, label, cfg, rng, out_shape)
    return intensity_augment(image, cfg, rng), label
