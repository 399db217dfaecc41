"""What each augmentation keeps: label dtype and values, image/label agreement, shapes, intensity
statistics, the slices of dummy-2D patches; the identity defaults; the shipped settings."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from segshare.data.augment import (
    AugmentSettings,
    augment,
    gamma_transform,
    simulate_low_resolution,
    spatial_margin,
    thin_axis,
)

SHIPPED = Path(__file__).resolve().parents[2] / "conf" / "data" / "augment" / "default.yaml"
SPATIAL_ON = {
    "p_rotation": 1.0,
    "rotation_deg": 30.0,
    "p_scale": 1.0,
    "scale_range": [0.7, 1.4],
    "p_elastic": 1.0,
    "elastic_alpha": 2.0,
    "elastic_sigma": 3.0,
}
INTENSITY = {
    "noise": {"p_noise": 1.0, "noise_std": [0.05, 0.1]},
    "blur": {"p_blur": 1.0, "blur_sigma": [0.5, 1.0]},
    "brightness": {"p_brightness": 1.0, "brightness_range": [0.75, 0.9]},
    "contrast": {"p_contrast": 1.0, "contrast_range": [0.75, 0.9]},
    "lowres": {"p_lowres": 1.0, "lowres_zoom_range": [0.5, 0.6]},
    "gamma": {"p_gamma": 1.0, "gamma_range": [0.7, 0.8]},
    "gamma_inverted": {"p_gamma_inverted": 1.0, "gamma_range": [1.3, 1.5]},
}


def shipped() -> AugmentSettings:
    from omegaconf import OmegaConf

    from segshare.cli import instantiate

    return instantiate(OmegaConf.load(SHIPPED))


def _pair(shape=(21, 22, 23), dtype=np.int32, channels=1):
    """A label with two boxes and an image that carries the label's values in every channel."""
    label = np.zeros(shape, dtype)
    label[5:14, 6:12, 4:18] = 1
    label[12:18, 10:20, 9:13] = 2
    return np.repeat(label.astype(np.float32)[..., None], channels, axis=-1), label


def _ramp_image(shape=(16, 18, 20), channels=2) -> np.ndarray:
    """A smooth multi-channel image, each channel with its own offset and scale."""
    grids = np.meshgrid(*[np.linspace(0, 1, s) for s in shape], indexing="ij")
    base = (grids[0] + 2 * grids[1] ** 2 + np.sin(3 * grids[2])).astype(np.float32)
    return np.stack([base * (c + 1) - 3 * c for c in range(channels)], axis=-1)


def test_default_settings_are_the_identity():
    rng = np.random.default_rng(0)
    for shape in [(21, 22, 23), (6, 40, 41)]:
        image = rng.normal(size=(*shape, 2)).astype(np.float32)
        label = rng.integers(0, 3, shape).astype(np.uint8)
        assert spatial_margin(AugmentSettings(), shape) == (0, 0, 0)
        for out_shape in (None, shape):
            img, lbl = augment(image, label, AugmentSettings(), rng, out_shape)
            np.testing.assert_array_equal(img, image)
            np.testing.assert_array_equal(lbl, label)
            assert lbl.dtype == np.uint8


def test_shipped_settings_instantiate_with_nnunet_values_in_range():
    from omegaconf import OmegaConf

    cfg = shipped()
    assert isinstance(cfg, AugmentSettings)
    fields = {f.name for f in dataclasses.fields(AugmentSettings)}
    assert set(OmegaConf.load(SHIPPED)) - {"_target_"} == fields  # every setting is written there
    for name in fields:
        value = getattr(cfg, name)
        if name.startswith("p_"):
            assert 0.0 <= value <= 1.0, name
        if isinstance(value, tuple):
            assert len(value) == 2 and value[0] <= value[1], name
    assert cfg.p_elastic == 0.0 and cfg.p_flip == 0.5 and cfg.dummy_2d_ratio == 3.0
    assert (cfg.p_rotation, cfg.rotation_deg, cfg.p_scale, cfg.scale_range) == (
        0.2,
        30.0,
        0.2,
        (0.7, 1.4),
    )
    assert (cfg.p_lowres, cfg.p_lowres_per_channel, cfg.lowres_zoom_range) == (0.25, 0.5, (0.5, 1))
    assert (cfg.p_gamma_inverted, cfg.p_gamma, cfg.gamma_range) == (0.1, 0.3, (0.7, 1.5))
    assert cfg.gamma_retain_stats
    assert (cfg.p_blur, cfg.blur_sigma, cfg.p_noise, cfg.noise_std) == (
        0.2,
        (0.5, 1),
        0.1,
        (0, 0.1),
    )
    assert (cfg.p_brightness, cfg.brightness_range) == (0.15, (0.75, 1.25))
    assert (cfg.p_contrast, cfg.contrast_range) == (0.15, (0.75, 1.25))


def test_new_settings_are_checked():
    with pytest.raises(ValueError, match=r"lowres_zoom_range must lie in \(0, 1\]"):
        AugmentSettings(lowres_zoom_range=[0.5, 1.5])
    with pytest.raises(ValueError, match="gamma_range must be positive"):
        AugmentSettings(gamma_range=[0.0, 1.5])
    with pytest.raises(ValueError, match="p_lowres_per_channel must be in"):
        AugmentSettings(p_lowres_per_channel=2.0)
    with pytest.raises(ValueError, match="dummy_2d_ratio must be >= 1, got 0.5"):
        AugmentSettings(dummy_2d_ratio=0.5)


@pytest.mark.parametrize("dtype", [np.int32, np.uint8, np.int64])
def test_every_shipped_transform_drawn_keeps_labels_integer_and_aligned(dtype):
    always = {f.name: 1.0 for f in dataclasses.fields(AugmentSettings) if f.name.startswith("p_")}
    cfg = dataclasses.replace(shipped(), **always)  # the shipped ranges, every transform drawn
    image, label = _pair(dtype=dtype, channels=2)
    spatial = ("p_flip", "p_rotation", "p_scale", "p_elastic")
    spatial_only = dataclasses.replace(cfg, **{k: 0.0 for k in always if k not in spatial})
    for seed in range(3):
        img, lbl = augment(image, label, cfg, np.random.default_rng(seed))
        assert lbl.dtype == dtype and set(np.unique(lbl)) <= {0, 1, 2}
        assert img.dtype == np.float32 and img.shape == image.shape and np.isfinite(img).all()
        # the same spatial draws without the intensity part: the same label, and the image
        # still carries it
        ref_img, ref_lbl = augment(image, label, spatial_only, np.random.default_rng(seed))
        np.testing.assert_array_equal(lbl, ref_lbl)
        assert np.mean(np.rint(ref_img[..., 0]) == ref_lbl) > 0.97


@pytest.mark.parametrize("name", list(INTENSITY))
def test_each_intensity_transform_leaves_the_label_and_changes_the_image(name):
    image = _ramp_image(channels=2)
    _, label = _pair(image.shape[:3], np.uint8)
    cfg = AugmentSettings(**INTENSITY[name], p_blur_per_channel=1.0, p_lowres_per_channel=1.0)
    img, lbl = augment(image, label, cfg, np.random.default_rng(1))
    np.testing.assert_array_equal(lbl, label)
    assert lbl.dtype == np.uint8
    assert img.dtype == np.float32 and img.shape == image.shape and np.isfinite(img).all()
    for c in range(image.shape[-1]):  # every channel is transformed (with its own draw)
        assert not np.allclose(img[..., c], image[..., c]), c


def test_rotation_by_30_degrees_keeps_image_and_label_in_agreement():
    cfg = AugmentSettings(p_rotation=1.0, rotation_deg=30.0)
    image, label = _pair()
    patch = (15, 16, 17)
    margin = spatial_margin(cfg, patch)
    big = tuple(p + 2 * m for p, m in zip(patch, margin, strict=True))
    big_image, big_label = _pair(big)
    rng = np.random.default_rng(7)
    for img, lbl, out in ((image, label, None), (big_image, big_label, patch)):
        for _ in range(5):
            out_img, out_lbl = augment(img, lbl, cfg, rng, out)
            assert out_lbl.shape == (out or img.shape[:3]) and out_lbl.dtype == np.int32
            assert np.mean(np.rint(out_img[..., 0]) == out_lbl) > 0.97


def test_low_resolution_keeps_shape_and_is_the_identity_at_zoom_one():
    image = _ramp_image()
    np.testing.assert_array_equal(simulate_low_resolution(image[..., 0], 1.0), image[..., 0])
    cfg = AugmentSettings(p_lowres=1.0, lowres_zoom_range=[1.0, 1.0])
    np.testing.assert_array_equal(
        augment(image, image[..., 0] > 0, cfg, np.random.default_rng())[0], image
    )
    for zoom in (0.5, 0.73):
        low = simulate_low_resolution(image[..., 1], zoom)
        assert low.shape == image.shape[:3] and low.dtype == np.float32
        assert not np.allclose(low, image[..., 1])
        assert image[..., 1].min() <= low.min() and low.max() <= image[..., 1].max()  # clipped
        assert np.corrcoef(low.ravel(), image[..., 1].ravel())[0, 1] > 0.99  # still the image


@pytest.mark.parametrize("shape", [(33, 34, 35), (7, 50, 61)])
def test_low_resolution_equals_scipy_zoom_down_and_up(shape):
    from scipy import ndimage

    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    for zoom in (0.5, 0.63, 0.91):
        small = np.maximum(np.round(np.asarray(shape) * zoom), 1) / shape
        down = ndimage.zoom(x, small, order=0, mode="nearest", grid_mode=True)
        up = ndimage.zoom(down, 1 / small, order=3, mode="nearest", grid_mode=True)
        ref = np.clip(up, down.min(), down.max())
        np.testing.assert_allclose(simulate_low_resolution(x, zoom), ref, atol=1e-5)


def test_low_resolution_of_a_dummy_2d_patch_does_not_mix_slices():
    steps = np.arange(6, dtype=np.float32) ** 2  # one value per slice along the thin axis 1
    image = np.broadcast_to(steps[None, :, None], (30, 6, 32)).copy()
    assert thin_axis(AugmentSettings(), image.shape) == 1
    np.testing.assert_allclose(simulate_low_resolution(image, 0.5, thin=1), image, atol=1e-5)
    assert not np.allclose(simulate_low_resolution(image, 0.5), image)  # a 3D zoom would
    cfg = AugmentSettings(p_lowres=1.0, p_lowres_per_channel=1.0, lowres_zoom_range=[0.5, 0.6])
    out = augment(image[..., None], np.zeros(image.shape, np.uint8), cfg, np.random.default_rng())
    np.testing.assert_allclose(out[0][..., 0], image, atol=1e-5)  # augment finds the thin axis


@pytest.mark.parametrize("invert", [False, True])
def test_gammas_keep_mean_and_std_or_the_range(invert):
    image = _ramp_image(channels=2)
    for c in range(2):
        x = image[..., c]
        kept = gamma_transform(x, 0.6, invert=invert, retain_stats=True)
        assert not np.allclose(kept, x)
        np.testing.assert_allclose(kept.mean(), x.mean(), atol=1e-4 * x.std())
        np.testing.assert_allclose(kept.std(), x.std(), rtol=1e-4)
        ranged = gamma_transform(x, 0.6, invert=invert, retain_stats=False)
        np.testing.assert_allclose([ranged.min(), ranged.max()], [x.min(), x.max()], atol=1e-5)
    ramp = np.linspace(0, 1, 101, dtype=np.float32).reshape(101, 1, 1)
    plain = gamma_transform(ramp, 0.5, invert=False, retain_stats=False)
    inverted = gamma_transform(ramp, 0.5, invert=True, retain_stats=False)
    assert (plain >= ramp - 1e-6).all() and (inverted <= ramp + 1e-6).all()  # opposite effects
    np.testing.assert_allclose(inverted, 1 - (1 - ramp) ** 0.5, atol=1e-5)
    np.testing.assert_allclose(
        gamma_transform(ramp, 1.0, invert, retain_stats=False), ramp, atol=1e-6
    )


def test_dummy_2d_rule():
    cfg = AugmentSettings()
    assert thin_axis(cfg, (12, 80, 80)) == 0
    assert thin_axis(cfg, (80, 20, 80)) == 1
    assert thin_axis(cfg, (80, 80, 26)) == 2
    assert thin_axis(cfg, (40, 56, 40)) is None
    assert thin_axis(cfg, (30, 90, 90)) is None  # exactly 3: not (nnU-Net's strict ">")
    assert thin_axis(AugmentSettings(dummy_2d_ratio=10), (12, 80, 80)) is None
    assert thin_axis(AugmentSettings(dummy_2d_ratio=10), (3, 1, 2)) == 1  # a 2D slice


def _slice_coded(shape, axis):
    """Label ``1 + 2 * k + r``: ``k`` the index along ``axis``, ``r`` an in-plane region."""
    grids = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    plane = [g for ax, g in enumerate(grids) if ax != axis]
    region = (plane[0] > plane[0].max() // 2) & (plane[1] < plane[1].max() // 3)
    return (1 + 2 * grids[axis] + region).astype(np.int32)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_dummy_2d_keeps_every_voxel_in_its_slice(axis):
    cfg = AugmentSettings(**SPATIAL_ON)
    patch = tuple(5 if ax == axis else s for ax, s in enumerate((24, 26, 25)))
    margin = spatial_margin(cfg, patch)
    assert margin[axis] == 0 and all(m > 0 for ax, m in enumerate(margin) if ax != axis)
    big = tuple(p + 2 * m for p, m in zip(patch, margin, strict=True))
    label = _slice_coded(big, axis)
    image = label.astype(np.float32)[..., None]
    index = np.arange(patch[axis]).reshape([-1 if ax == axis else 1 for ax in range(3)])
    rng = np.random.default_rng(2)
    for _ in range(4):
        out_img, out_lbl = augment(image, label, cfg, rng, patch)
        assert out_lbl.shape == patch and (out_lbl > 0).all()  # the margin: no padding sampled
        np.testing.assert_array_equal((out_lbl - 1) // 2, np.broadcast_to(index, patch))
        np.testing.assert_allclose((out_img[..., 0] - 1) // 2, np.broadcast_to(index, patch))
        assert not np.array_equal(out_lbl, _slice_coded(patch, axis))  # transformed in-plane
    as_3d = dataclasses.replace(cfg, dummy_2d_ratio=100.0)  # the same patch augmented in 3D
    margin_3d = spatial_margin(as_3d, patch)
    assert margin_3d[axis] > 0
    big = tuple(p + 2 * m for p, m in zip(patch, margin_3d, strict=True))
    label = _slice_coded(big, axis)
    out_lbl = augment(label.astype(np.float32)[..., None], label, as_3d, rng, patch)[1]
    assert ((out_lbl - 1) // 2 != np.broadcast_to(index + margin_3d[axis], patch)).any()


def test_dummy_2d_slice_constant_label_stays_constant_in_each_slice():
    cfg = AugmentSettings(**SPATIAL_ON, p_flip=0.5)
    patch = (40, 36, 8)
    margin = spatial_margin(cfg, patch)
    big = tuple(p + 2 * m for p, m in zip(patch, margin, strict=True))
    label = np.broadcast_to(np.arange(big[2], dtype=np.int16) % 3, big).copy()
    rng = np.random.default_rng(5)
    for _ in range(4):
        img, lbl = augment(label[..., None].astype(np.float32), label, cfg, rng, patch)
        assert lbl.dtype == np.int16
        for k in range(patch[2]):  # each slice: one value (flips may reverse the slice order)
            assert np.unique(lbl[..., k]).size == 1
            np.testing.assert_allclose(img[..., k, 0], lbl[0, 0, k], atol=1e-5)


def test_augment_is_seeded():
    image, label = _pair(channels=2)
    cfg = dataclasses.replace(shipped(), p_rotation=1.0, p_lowres=1.0, p_gamma=1.0)
    a = augment(image, label, cfg, np.random.default_rng(11))
    b = augment(image, label, cfg, np.random.default_rng(11))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
