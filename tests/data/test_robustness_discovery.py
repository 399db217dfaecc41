"""Discovery never loses or silently drops an input: duplicate case ids are refused, inputs that
are not files are listed as failing cases, a malformed dataset.json is one problem naming the key
(issue #16)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from segshare.data.discovery import discover_dataset, discover_images

from .conftest import make_msd_dataset, write_nifti


def _scan(path):
    return write_nifti(path, np.ones((3, 4, 5), np.float32))


def test_two_files_of_one_case_id_in_a_predict_input_are_refused_naming_both(tmp_path):
    _scan(tmp_path / "case.nii")
    _scan(tmp_path / "case.nii.gz")
    _scan(tmp_path / "other.nii.gz")
    with pytest.raises(ValueError, match=r"case\.nii\b.*case\.nii\.gz") as info:
        discover_images(tmp_path)
    assert "'case'" in str(info.value) and "\n" not in str(info.value)


def test_two_files_of_one_channel_are_refused(tmp_path):
    for name in ("a_0000.nii", "a_0000.nii.gz", "a_0001.nii.gz", "b_0000.nii.gz", "b_0001.nii.gz"):
        _scan(tmp_path / name)
    with pytest.raises(ValueError, match=r"a_0000\.nii\b.*a_0000\.nii\.gz"):
        discover_images(tmp_path, in_channels=2)


def test_two_label_files_of_one_case_are_a_dataset_problem(tmp_path):
    for cid in ("x", "y"):
        _scan(tmp_path / "imagesTr" / f"{cid}.nii.gz")
        write_nifti(tmp_path / "labelsTr" / f"{cid}.nii.gz", np.zeros((3, 4, 5), np.uint8))
    write_nifti(tmp_path / "labelsTr" / "x.nii", np.zeros((3, 4, 5), np.uint8))
    ds = discover_dataset(tmp_path)
    messages = [f"{p}: {m}" for p, m in ds.problems]
    assert any("x.nii" in m and "x.nii.gz" in m and "'x'" in m for m in messages), messages


@pytest.mark.parametrize("kind", ["dangling", "loop", "folder"])
def test_inputs_that_are_not_files_are_cases_with_a_problem(tmp_path, kind):
    _scan(tmp_path / "good.nii.gz")
    bad = tmp_path / "bad.nii.gz"
    if kind == "dangling":
        bad.symlink_to(tmp_path / "gone.nii.gz")
    elif kind == "loop":
        os.symlink(tmp_path / "bad2.nii.gz", bad)
        os.symlink(bad, tmp_path / "bad2.nii.gz")
    else:
        bad.mkdir()
    cases = {c.case_id: c for c in discover_images(tmp_path)}
    assert cases["good"].problem is None
    expected = {"dangling": "gone.nii.gz", "loop": "loop", "folder": "folder"}[kind]
    assert expected in cases["bad"].problem
    assert cases["bad"].images == (bad,)


def test_a_broken_channel_file_fails_its_case_only(tmp_path):
    for cid in ("a", "b"):
        _scan(tmp_path / f"{cid}_0000.nii.gz")
    _scan(tmp_path / "a_0001.nii.gz")
    (tmp_path / "b_0001.nii.gz").symlink_to(tmp_path / "moved.nii.gz")
    cases = {c.case_id: c for c in discover_images(tmp_path, in_channels=2)}
    assert cases["a"].problem is None
    assert "b_0001.nii.gz" in cases["b"].problem and "moved.nii.gz" in cases["b"].problem


def test_a_folder_of_only_broken_links_lists_them(tmp_path):
    (tmp_path / "x.nii.gz").symlink_to(tmp_path / "nowhere.nii.gz")
    (cases,) = [discover_images(tmp_path)]
    assert [c.case_id for c in cases] == ["x"] and cases[0].problem


def _meta(root):
    return json.loads((root / "dataset.json").read_text())


@pytest.mark.parametrize("key", ["channel_names", "modality"])
def test_channel_names_that_are_not_a_mapping_are_one_problem_naming_the_key(tmp_path, key):
    root = make_msd_dataset(tmp_path, num_cases=2)
    meta = _meta(root)
    meta.pop("modality")
    meta[key] = "CT"
    (root / "dataset.json").write_text(json.dumps(meta))
    ds = discover_dataset(root)
    assert [(p, m) for p, m in ds.problems if key in m] != [], ds.problems
    path, message = next((p, m) for p, m in ds.problems if key in m)
    assert path.endswith("dataset.json") and "'CT'" in message


@pytest.mark.parametrize("field", ["image", "label"])
@pytest.mark.parametrize("value", [3, ["a.nii.gz"], {"x": 1}])
def test_paths_that_are_not_strings_are_one_problem_naming_the_key(tmp_path, field, value):
    root = make_msd_dataset(tmp_path, num_cases=2)
    meta = _meta(root)
    meta["training"][1][field] = value
    (root / "dataset.json").write_text(json.dumps(meta))
    ds = discover_dataset(root)
    messages = [m for p, m in ds.problems if p.endswith("dataset.json")]
    assert any("training[1]" in m and repr(field) in m for m in messages), ds.problems
    assert "case_00" in ds.case_ids


def test_a_file_ending_that_is_not_a_string_is_a_problem(tmp_path):
    root = make_msd_dataset(tmp_path, num_cases=2)
    meta = _meta(root)
    meta["file_ending"] = 5
    (root / "dataset.json").write_text(json.dumps(meta))
    ds = discover_dataset(root)
    assert any("file_ending" in m for _, m in ds.problems), ds.problems
    assert ds.file_ending == ".nii.gz"
