from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from segshare.data.augment import AugmentSettings, augment
from segshare.data.sampling import PatchSampler, crop_with_padding

from .conftest import data_settings


def test_crop_with_padding_matches_numpy_pad():
    arr = np.arange(5 * 6 * 7 * 2).reshape(5, 6, 7, 2)
    padded = np.pad(arr, ((10, 10), (10, 10), (10, 10), (0, 0)))
    for start in [(-3, 0, 2), (1, -4, 5), (3, 2, -1), (0, 0, 0)]:
        ref = padded[
            tuple(slice(s + 10, s + 10 + p) for s, p in zip(start, (9, 3, 8), strict=True))
        ]
        np.testing.assert_array_equal(crop_with_padding(arr, start, (9, 3, 8)), ref)


def test_sampler_seeded_and_shapes(prepared):
    s = PatchSampler(prepared.cache_dir, prepared.train_ids, (13, 14, 15))
    x1, y1 = s.sample_batch(3, np.random.default_rng(5))
    x2, y2 = s.sample_batch(3, np.random.default_rng(5))
    x3, _ = s.sample_batch(3, np.random.default_rng(6))
    assert x1.shape == (3, 13, 14, 15, 1) and x1.dtype == np.float32
    assert y1.shape == (3, 13, 14, 15) and y1.dtype == np.int32
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
    assert not np.array_equal(x1, x3)


def test_sampler_pads_when_volume_smaller_than_patch(prepared):
    s = PatchSampler(prepared.cache_dir, prepared.train_ids[:1], (64, 9, 65))
    image = np.asarray(s._case(prepared.train_ids[0])[0])
    x, y = s.sample(np.random.default_rng(0))
    assert x.shape == (64, 9, 65, 1)
    assert np.sum(x != 0) <= image.size  # the rest is padding
    assert (x[0] == 0).all() or (x[-1] == 0).all()


def test_forced_foreground_share(prepared):
    s = PatchSampler(prepared.cache_dir, prepared.train_ids, (9, 9, 9), oversample_foreground=1 / 3)
    rng = np.random.default_rng(0)
    for _ in range(25):
        _, y = s.sample_batch(3, rng)
        assert (y[2] > 0).any()  # round(3 * 2/3) = 2 random samples, the last forced
        _, y = s.sample_batch(3, rng, margin=(3, 4, 5))
        assert y.shape == (3, 15, 17, 19) and (y[2, 3:12, 4:13, 5:14] > 0).any()  # in the centre
    never = PatchSampler(prepared.cache_dir, prepared.train_ids, (5, 5, 5), oversample_foreground=0)
    fg = [(never.sample_batch(3, rng)[1] > 0).any(axis=(1, 2, 3)) for _ in range(25)]
    assert not np.all(fg)
    with pytest.raises(ValueError, match="oversample_foreground"):
        PatchSampler(prepared.cache_dir, prepared.train_ids, (5, 5, 5), oversample_foreground=1.5)


def _pair(shape=(21, 22, 23)):
    label = np.zeros(shape, np.int32)
    label[5:14, 6:12, 4:18] = 1
    label[12:18, 10:20, 9:13] = 2
    return label.astype(np.float32)[..., None], label


@pytest.mark.parametrize(
    "spatial",
    [
        {"p_flip": 1.0},
        {"p_rotation": 1.0, "rotation_deg": 30.0, "p_scale": 1.0, "scale_range": [0.8, 1.2]},
        {"p_elastic": 1.0, "elastic_alpha": 2.0, "elastic_sigma": 3.0, "p_rotation": 1.0},
    ],
)
def test_spatial_augment_identical_on_image_and_label(spatial):
    image, label = _pair()
    out_img, out_lbl = augment(image, label, AugmentSettings(**spatial), np.random.default_rng(3))
    assert out_img.shape == image.shape and out_lbl.shape == label.shape
    assert not np.array_equal(out_lbl, label)
    agree = np.mean(np.rint(out_img[..., 0]) == out_lbl)  # image carries the label's values
    assert agree > 0.97


def test_intensity_augment_leaves_label_and_off_is_identity():
    image, label = _pair()
    intensity = dict.fromkeys(("p_noise", "p_blur", "p_brightness", "p_contrast", "p_gamma"), 1.0)
    spatial = dict.fromkeys(("p_flip", "p_rotation", "p_scale", "p_elastic"), 0.0)
    # the shipped ranges, every intensity transform drawn, no spatial one
    cfg = dataclasses.replace(data_settings("data/augment=default").augment, **intensity, **spatial)
    out_img, out_lbl = augment(image, label, cfg, np.random.default_rng(0))
    np.testing.assert_array_equal(out_lbl, label)
    assert out_img.dtype == np.float32 and not np.allclose(out_img, image)
    same_img, same_lbl = augment(image, label, AugmentSettings(), np.random.default_rng(0))
    np.testing.assert_array_equal(same_img, image)
    np.testing.assert_array_equal(same_lbl, label)


def test_augment_settings_are_checked():
    with pytest.raises(ValueError, match=r"data.augment.p_gamma must be in \[0, 1\], got 1.5"):
        AugmentSettings(p_gamma=1.5)
    with pytest.raises(ValueError, match=r"scale_range must be \[low, high\]"):
        AugmentSettings(scale_range=[1.2, 0.8])
    assert AugmentSettings(noise_std=[0, 1]).noise_std == (0.0, 1.0)


def test_margin_keeps_rotated_and_scaled_patches_free_of_padding():
    from segshare.data.augment import spatial_margin

    cfg = {
        "p_rotation": 1.0,
        "rotation_deg": 30.0,
        "p_scale": 1.0,
        "scale_range": [0.8, 1.2],
        "p_elastic": 1.0,
        "elastic_alpha": 2.0,
    }
    cfg = AugmentSettings(**cfg)
    patch = (13, 16, 11)
    margin = spatial_margin(cfg, patch)
    big = tuple(p + 2 * m for p, m in zip(patch, margin, strict=True))
    rng = np.random.default_rng(0)
    for _ in range(5):
        img, lbl = augment(np.ones((*big, 1), np.float32), np.ones(big, np.int32), cfg, rng, patch)
        assert img.shape == (*patch, 1) and lbl.shape == patch
        assert (lbl == 1).all() and np.allclose(img, 1.0)  # no zero padding sampled
    no_margin, _ = augment(np.ones((*patch, 1), np.float32), np.ones(patch, np.int32), cfg, rng)
    assert (no_margin == 0).any()  # without the margin the corners are padding


def test_margin_centre_crop_when_no_spatial_transform_drawn(prepared):
    s = PatchSampler(prepared.cache_dir, prepared.train_ids, (9, 10, 11))
    big, big_lbl = s.sample(np.random.default_rng(4), margin=(2, 3, 4))
    assert big.shape == (13, 16, 19, 1)
    img, lbl = augment(big, big_lbl, AugmentSettings(), np.random.default_rng(0), (9, 10, 11))
    np.testing.assert_array_equal(img, big[2:11, 3:13, 4:15])
    np.testing.assert_array_equal(lbl, big_lbl[2:11, 3:13, 4:15])


def test_sampler_pickles_without_its_memory_maps(prepared):
    import pickle

    s = PatchSampler(prepared.cache_dir, prepared.train_ids, (5, 6, 7))
    x, _ = s.sample(np.random.default_rng(1))
    blob = pickle.dumps(s)
    assert len(blob) < 10_000
    np.testing.assert_array_equal(pickle.loads(blob).sample(np.random.default_rng(1))[0], x)
