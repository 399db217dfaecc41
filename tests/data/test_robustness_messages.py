"""A broken header gets one line naming its file and the real reason: a non-finite affine, an empty
axis, a voxel limit named by the setting the caller uses."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from segshare.data.discovery import Case
from segshare.data.preprocessing import preprocess_case
from segshare.data.validation import check_case, open_headers

from .conftest import ONE_LABEL_PLAN, write_nifti

PLAN = ONE_LABEL_PLAN


def _nan_sform_scan(path: Path) -> Path:
    """A scan whose sform (used as its affine) holds a NaN, as a broken converter writes it."""
    img = nib.Nifti1Image(np.ones((5, 6, 7), np.float32), np.eye(4))
    img.header["srow_x"] = [np.nan, 0.0, 0.0, 0.0]
    img.header["sform_code"] = 1
    nib.save(nib.Nifti1Image(img.dataobj, None, img.header), str(path))
    assert not np.isfinite(nib.load(str(path)).affine).all()
    return path


def test_a_nan_in_the_sform_is_named_as_a_non_finite_affine(tmp_path):
    path = _nan_sform_scan(tmp_path / "nan_sform.nii.gz")
    result = check_case(Case("nan_sform", (path,)), None)
    assert [Path(p.path).name for p in result.problems] == ["nan_sform.nii.gz"]
    assert "affine" in result.problems[0].message
    assert "not finite" in result.problems[0].message
    with pytest.raises(ValueError, match=r"nan_sform\.nii\.gz: .*affine.*not finite"):
        preprocess_case([path], None, PLAN)


@pytest.mark.parametrize("shape", [(5, 0, 7), (5, 6, 7, 0), (0, 6, 7, 1)])
def test_an_empty_axis_is_named_as_such(tmp_path, shape):
    path = write_nifti(tmp_path / "empty.nii.gz", np.ones(shape, np.float32))
    result = check_case(Case("empty", (path,)), None)  # no exception from the check itself
    assert [Path(p.path).name for p in result.problems] == ["empty.nii.gz"]
    assert "empty axis" in result.problems[0].message
    with pytest.raises(ValueError, match=r"empty\.nii\.gz: .*empty axis"):
        preprocess_case([path], None, PLAN)


def test_the_voxel_limit_names_the_callers_setting(tmp_path):
    path = write_nifti(tmp_path / "big.nii.gz", np.ones((10, 10, 10), np.float32))
    case = Case("big", (path,))
    problems: list = []
    assert open_headers(case, 999, problems) == []  # the call predictor.py makes still works
    assert "data.max_voxels=999" in problems[0].message
    problems = []
    open_headers(case, 999, problems, setting="inference.max_voxels")
    assert "inference.max_voxels=999" in problems[0].message
    assert "data.max_voxels" not in problems[0].message
    assert "big.nii.gz" in problems[0].path
