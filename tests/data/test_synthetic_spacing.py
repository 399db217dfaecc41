"""data.synthetic.spacing: one range for all axes (unchanged output) or three per-axis ranges."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from segshare.data.synthetic import SyntheticSpec, generate_synthetic_dataset

from .conftest import data_settings

THICK = [[0.6, 0.7], [0.6, 0.7], [3.5, 4.5]]

# Recorded with the code before per-axis ranges existed (commit 9f45efb):
# generate_synthetic_dataset(out, num_cases=3, seed=7, shape_range=(16, 20)).
# (shape, label voxel counts, sum of channel 0, affine rows 0-2)
RECORDED = [
    (
        (20, 19, 19),
        [7080, 112, 28],
        385158.657,
        [
            [1.391072, -0.130485, -0.16095, 29.706944],
            [0.156638, 0.963128, -0.154205, -3.206505],
            [0.244182, 0.12553, 1.015833, -19.696758],
        ],
    ),
    (
        (20, 20, 16),
        [6279, 60, 61],
        446606.131,
        [
            [-1.263222, -0.143807, -0.090602, -15.646161],
            [0.11115, -1.474726, 0.082888, -7.228172],
            [-0.14175, 0.125181, 0.8724, 48.933182],
        ],
    ),
    (
        (19, 20, 18),
        [6717, 45, 78],
        418172.328,
        [
            [1.266044, -0.116822, 0.139888, 1.84379],
            [0.12972, 1.182984, -0.002924, -45.559666],
            [-0.222642, 0.024946, 0.793763, 41.919556],
        ],
    ),
]


def _cases(root, split: str = "Tr") -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``[(image channel 0, label, affine)]`` of a generated dataset, in case order."""
    out = []
    for lbl_path in sorted((root / f"labels{split}").glob("*.nii.gz")):
        lbl = nib.load(lbl_path)
        img = nib.load(root / f"images{split}" / lbl_path.name.replace(".nii", "_0000.nii"))
        out.append((np.asarray(img.dataobj), np.asarray(lbl.dataobj), img.affine))
    return out


@pytest.mark.parametrize("spacing", [None, (0.8, 1.6), [0.8, 1.6]])
def test_single_range_reproduces_the_recorded_files(tmp_path, spacing):
    kwargs = {} if spacing is None else {"spacing": spacing}
    root = generate_synthetic_dataset(
        tmp_path / "s", num_cases=3, seed=7, shape_range=(16, 20), **kwargs
    )
    cases = _cases(root)
    assert len(cases) == len(RECORDED)
    for (img, lbl, aff), (shape, counts, total, rows) in zip(cases, RECORDED, strict=True):
        assert img.shape == lbl.shape == shape
        assert np.bincount(lbl.ravel()).tolist() == counts
        assert float(img.astype(np.float64).sum()) == pytest.approx(total, abs=1e-2)
        np.testing.assert_allclose(aff[:3], rows, atol=1e-5)


def test_three_equal_ranges_give_the_same_files_as_one_range(tmp_path):
    args = dict(num_cases=3, seed=2, shape_range=(10, 14), num_channels=2)
    one = _cases(generate_synthetic_dataset(tmp_path / "one", spacing=(0.9, 1.3), **args))
    three = _cases(generate_synthetic_dataset(tmp_path / "three", spacing=[[0.9, 1.3]] * 3, **args))
    for a, b in zip(one, three, strict=True):
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y)


def test_per_axis_ranges_give_thick_slices_with_fewer_voxels(tmp_path):
    root = generate_synthetic_dataset(
        tmp_path / "thick", num_cases=4, seed=1, spacing=THICK, num_test_cases=1
    )
    # the default shape_range 28-40; the last axis scaled by 0.65 / 4.0 (rounded, >= 4 voxels)
    thick_min, thick_max = round(28 * 0.65 / 4.0), round(40 * 0.65 / 4.0)
    for split in ("Tr", "Ts"):
        for img, lbl, aff in _cases(root, split):
            norms = np.linalg.norm(aff[:3, :3], axis=0)
            for norm, (lo, hi) in zip(norms, THICK, strict=True):
                assert lo - 1e-5 <= norm <= hi + 1e-5
            assert 28 <= img.shape[0] <= 40 and 28 <= img.shape[1] <= 40
            assert thick_min <= img.shape[2] <= thick_max
            extent = np.array(img.shape) * norms  # the phantom keeps its physical size
            assert extent.max() / extent.min() < 2.0
            assert lbl.max() >= 1


def test_thick_axis_keeps_at_least_four_voxels(tmp_path):
    spacing = [[1.0, 1.0], [1.0, 1.0], [20.0, 20.0]]
    root = generate_synthetic_dataset(
        tmp_path / "t", num_cases=2, shape_range=(16, 18), spacing=spacing
    )
    assert [img.shape[2] for img, _, _ in _cases(root)] == [4, 4]


@pytest.mark.parametrize(
    "bad",
    [[1.0], [2.0, 1.0], [0.0, 1.0], "thick", [[0.6, 0.7], [0.6, 0.7]], [[1, 2], [1, 2], [3, 2]]],
)
def test_bad_spacing_is_refused_with_the_value_quoted(bad):
    fields = dict(
        generate_if_missing=True,
        num_cases=2,
        num_test_cases=0,
        seed=0,
        shape_range=(8, 10),
        num_organs=1,
        num_channels=1,
    )
    expected = "data.synthetic.spacing must be [min, max] or three [min, max] ranges, got "
    with pytest.raises(ValueError) as err:
        SyntheticSpec(spacing=bad, **fields)
    assert str(err.value).startswith(expected + repr(bad))
    with pytest.raises(ValueError, match=r"^spacing must be \[min, max\]"):
        generate_synthetic_dataset("/nonexistent/never-written", spacing=bad)


def test_config_spacing_default_and_per_axis_override():
    default = data_settings().synthetic
    assert default.spacing == (0.8, 1.6)
    thick = data_settings(f"data.synthetic.spacing={THICK}").synthetic
    assert thick.spacing == tuple(tuple(r) for r in THICK)
    with pytest.raises(
        ValueError, match=r"data\.synthetic\.spacing must be .* got \[1\.0, 2\.0, 3\.0\]"
    ):
        data_settings("data.synthetic.spacing=[1.0,2.0,3.0]")


def test_spec_generates_per_axis_spacing(tmp_path):
    spec = data_settings(
        f"data.synthetic.spacing={THICK}",
        "data.synthetic.num_cases=2",
        "data.synthetic.num_test_cases=0",
        "data.synthetic.shape_range=[20,24]",
    ).synthetic
    cases = _cases(spec.generate(tmp_path / "spec"))
    assert len(cases) == 2
    for img, _, aff in cases:  # 20-24 slices x 0.65 / 4.0 -> 3-4, at least 4
        assert 20 <= img.shape[0] <= 24 and 20 <= img.shape[1] <= 24 and img.shape[2] == 4
        assert 3.5 - 1e-5 <= np.linalg.norm(aff[:3, 2]) <= 4.5 + 1e-5
