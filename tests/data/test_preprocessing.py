from __future__ import annotations

import numpy as np
import pytest

from segshare.data.preprocessing import Plan, preprocess_case, restore_to_original
from segshare.data.synthetic import make_affine

from .conftest import sphere_label, write_nifti

SHAPE = (33, 34, 35)


def _plan(spacing, normalization=("zscore",), ct_stats=None) -> Plan:
    return Plan(
        tuple(spacing),
        list(normalization),
        ct_stats,
        {"background": 0, "a": 1, "b": 2},
        in_channels=1,
        num_classes=3,
    )


def _case(tmp_path, affine, shape=SHAPE, pad=2):
    """A ball (labels 1 and 2) inside a nonzero box surrounded by zeros (so cropping acts)."""
    lbl = sphere_label(shape, min(shape) / 3.2)
    lbl[: shape[0] // 2][lbl[: shape[0] // 2] == 1] = 2
    img = np.zeros(shape, np.float32)
    img[pad:-pad, pad + 1 : -pad, pad : -pad - 1] = (
        100 + 50 * lbl[pad:-pad, pad + 1 : -pad, pad : -pad - 1]
    )
    img += (img > 0) * np.random.default_rng(0).normal(0, 5, shape).astype(np.float32)
    return (
        write_nifti(tmp_path / "img.nii.gz", img, affine),
        write_nifti(tmp_path / "lbl.nii.gz", lbl, affine),
        lbl,
    )


def _dice(a, b, c):
    return 2 * np.sum((a == c) & (b == c)) / (np.sum(a == c) + np.sum(b == c))


AFFINES = {
    "ras": np.diag([1.2, 0.9, 1.1, 1.0]),
    "lps": np.diag([-1.2, -0.9, 1.1, 1.0]),
    "oblique": make_affine((1.2, 0.9, 1.1), np.random.default_rng(1), max_deg=25, flip=True),
    "anisotropic": np.diag([0.8, 0.8, 4.0, 1.0]),
}


@pytest.mark.parametrize("kind", list(AFFINES))
def test_identity_where_spacing_kept(tmp_path, kind):
    aff = AFFINES[kind]
    img_p, lbl_p, lbl = _case(tmp_path, aff)
    spacing = sorted(np.sqrt((aff[:3, :3] ** 2).sum(0)))  # any order: find the RAS order below
    _, _, props = preprocess_case([img_p], lbl_p, _plan(spacing))
    image, label, props = preprocess_case([img_p], lbl_p, _plan(props["spacing"]))
    assert image.shape == (*props["resampled_shape"], 1) and image.dtype == np.float32
    assert props["cropped_shape"] == props["resampled_shape"]
    assert props["reoriented_shape"] != props["cropped_shape"]  # the crop did something
    np.testing.assert_array_equal(restore_to_original(label, props, is_label=True), lbl)
    probs = np.eye(3, dtype=np.float32)[label]
    back = restore_to_original(probs, props, is_label=False)
    assert back.shape == (*SHAPE, 3)
    np.testing.assert_array_equal(back.argmax(-1), lbl)
    np.testing.assert_allclose(back.sum(-1), 1.0, atol=1e-5)


@pytest.mark.parametrize("kind", list(AFFINES))
def test_dice_after_resampling(tmp_path, kind):
    img_p, lbl_p, lbl = _case(tmp_path, AFFINES[kind])
    target = (1.0, 1.0, 3.0) if kind == "anisotropic" else (1.0, 1.0, 1.0)
    image, label, props = preprocess_case([img_p], lbl_p, _plan(target))
    assert props["resampled_shape"] != props["cropped_shape"]
    assert (props["anisotropic_axis"] is not None) == (kind == "anisotropic")
    back = restore_to_original(label, props, is_label=True)
    assert back.shape == lbl.shape and set(np.unique(back)) <= {0, 1, 2}
    for c in (1, 2):
        assert _dice(back, lbl, c) > 0.95
    probs = restore_to_original(np.eye(3, dtype=np.float32)[label], props, is_label=False)
    for c in (1, 2):
        assert _dice(probs.argmax(-1), lbl, c) > 0.95


def test_normalization_zscore_and_ct(tmp_path):
    img_p, lbl_p, _ = _case(tmp_path, np.eye(4))
    image, _, _ = preprocess_case([img_p], lbl_p, _plan((1, 1, 1)))
    assert abs(float(image.mean())) < 1e-3 and abs(float(image.std()) - 1) < 1e-3
    stats = [{"p005": 110.0, "p995": 120.0, "mean": 60.0, "std": 30.0}]
    image, _, _ = preprocess_case([img_p], lbl_p, _plan((1, 1, 1), ("ct",), stats))
    assert image.max() == pytest.approx(2.0) and image.min() == pytest.approx(5 / 3)


def test_plan_roundtrip(tmp_path):
    plan = _plan((1.0, 2.0, 3.0))
    plan.save(tmp_path / "plan.json")
    assert Plan.load(tmp_path / "plan.json") == plan
    with pytest.raises(ValueError, match="unknown keys"):
        Plan.from_dict({**plan.to_dict(), "bogus": 1})


def test_restore_rejects_wrong_grid(tmp_path):
    img_p, lbl_p, _ = _case(tmp_path, np.eye(4))
    _, label, props = preprocess_case([img_p], lbl_p, _plan((1, 1, 1)))
    with pytest.raises(ValueError, match="preprocessed grid"):
        restore_to_original(label[1:], props, is_label=True)


@pytest.mark.realdata
def test_hippocampus_roundtrip_exact(hippocampus_root):
    import nibabel as nib

    from segshare.data.discovery import discover_dataset

    ds = discover_dataset(hippocampus_root)
    for case in ds.cases[:3]:
        _, label, props = preprocess_case(case.images, case.label, _plan((1.0, 1.0, 1.0)))
        ref = np.asarray(nib.load(case.label).dataobj).astype(np.uint8)
        np.testing.assert_array_equal(restore_to_original(label, props, is_label=True), ref)


@pytest.mark.parametrize("axis", [None, 0, 2])
def test_resample_label_box_equals_full_volume_argmax(axis):
    from segshare.data.resample import _zoom_separate, resample_label

    rng = np.random.default_rng(7)
    for _ in range(6):
        shape = tuple(int(s) for s in rng.integers(15, 36, 3))
        lbl = np.zeros(shape, np.uint8)
        for c in (1, 2, 3):  # boxes, some touching the volume's edges, some overlapping
            lo = [int(rng.integers(0, s - 3)) for s in shape]
            lbl[tuple(slice(a, a + int(rng.integers(2, 12))) for a in lo)] = c
        new = tuple(int(n) for n in rng.integers(10, 45, 3))
        onehot = [(lbl == c).astype(np.float32) for c in range(4)]
        ref = np.stack([_zoom_separate(m, new, 1, axis) for m in onehot], -1).argmax(-1)
        np.testing.assert_array_equal(resample_label(lbl, new, axis), ref)


@pytest.mark.parametrize("order", [0, 1, 3])
def test_separable_zoom_equals_scipy_zoom(order):
    from scipy import ndimage

    from segshare.data.resample import _zoom

    rng = np.random.default_rng(order)
    vol = ndimage.gaussian_filter(rng.normal(size=(33, 34, 35)), 1.5).astype(np.float32) * 10
    for new in [(20, 50, 35), (47, 13, 70), (33, 34, 36)]:
        factors = [n / o for n, o in zip(new, vol.shape, strict=True)]
        ref = ndimage.zoom(
            vol.astype(np.float64), factors, order=order, mode="nearest", grid_mode=True
        )
        np.testing.assert_allclose(_zoom(vol, new, order), ref, atol=1e-5)


def test_masked_zscore_keeps_background_zero(tmp_path):
    img = np.zeros((21, 22, 23), np.float32)
    img[4:17, 5:18, 3:20] = np.random.default_rng(0).normal(300, 40, (13, 13, 17))
    img[8:12, 8:12, 8:12] = 0  # a hole of zeros inside the box stays background too
    path = write_nifti(tmp_path / "mr.nii.gz", img)
    plan = _plan((1, 1, 1))
    plan.use_mask_for_norm = [True]
    image, _, _ = preprocess_case([path], None, plan)
    fg = image[..., 0] != 0
    assert fg.sum() == 13 * 13 * 17 - 64
    assert abs(float(image[..., 0][fg].mean())) < 1e-4
    assert abs(float(image[..., 0][fg].std()) - 1) < 1e-4
