from __future__ import annotations

import gzip
import json
import shutil

import numpy as np

from segshare.data.discovery import discover_dataset
from segshare.data.validation import validate_dataset

from .conftest import make_msd_dataset, write_nifti


def plant_faults(root):
    """Plant one fault per case of a tiny MSD dataset; return {file name: expected words}."""
    lab, img = root / "labelsTr", root / "imagesTr"
    (img / "case_00.nii.gz").unlink()  # missing file
    raw = (img / "case_01.nii.gz").read_bytes()
    (img / "case_01.nii.gz").write_bytes(raw[: len(raw) // 2])  # truncated gzip
    (img / "case_02.nii.gz").write_bytes(gzip.compress(b"hello, not a nifti" * 30))
    write_nifti(lab / "case_03.nii.gz", np.zeros((13, 14, 16), np.uint8))  # shape mismatch
    write_nifti(lab / "case_04.nii.gz", np.zeros((13, 14, 15), np.uint8), np.diag([1, 1, 1.5, 1]))
    write_nifti(lab / "case_05.nii.gz", np.full((13, 14, 15), 7, np.uint8))  # label not declared
    write_nifti(lab / "case_06.nii.gz", np.full((13, 14, 15), 0.5, np.float32))  # non-integer
    nan = np.ones((13, 14, 15), np.float32)
    nan[1, 2, 3] = np.nan
    write_nifti(img / "case_07.nii.gz", nan)
    write_nifti(img / "case_08.nii.gz", np.ones((13, 14), np.float32))  # 2D
    write_nifti(img / "case_09.nii.gz", np.ones((40, 40, 40), np.float32))  # over voxel limit
    meta = json.loads((root / "dataset.json").read_text())
    shutil.copy(img / "case_10.nii.gz", root.parent / "outside.nii.gz")
    meta["training"][10]["image"] = "../outside.nii.gz"
    (root / "dataset.json").write_text(json.dumps(meta))
    return {
        "case_00.nii.gz": "does not exist",
        "case_01.nii.gz": "gzip",
        "case_02.nii.gz": "not a nifti",
        "case_03.nii.gz": "shape",
        "case_04.nii.gz": "affine",
        "case_05.nii.gz": "[7]",
        "case_06.nii.gz": "integers",
        "case_07.nii.gz": "nan/inf",
        "case_08.nii.gz": "3d",
        "case_09.nii.gz": "max_voxels",
        "outside.nii.gz": "outside",
    }


def test_every_planted_fault_is_reported(tmp_path):
    root = make_msd_dataset(tmp_path / "ds", num_cases=12)
    expected = plant_faults(root)
    problems, stats = validate_dataset(discover_dataset(root), max_voxels=20_000, progress=False)
    text = [str(p).lower() for p in problems]
    for name, words in expected.items():
        hits = [t for t in text if name in t]
        assert hits, f"{name} not reported in {text}"
        assert any(words in t for t in hits), f"{name}: {words!r} not in {hits}"
    assert "case_11" in stats and "case_05" not in stats  # stats only for clean cases


def test_clean_dataset_has_no_problems_and_stats(synthetic_root):
    problems, stats = validate_dataset(
        discover_dataset(synthetic_root), progress=False, num_workers=2
    )
    assert problems == []
    assert len(stats) == 8
    st = next(iter(stats.values()))
    assert set(st["class_counts"]) <= {0, 1, 2} and len(st["fg_samples"]) == 1


def test_channels_that_disagree(tmp_path):
    write_nifti(tmp_path / "imagesTr" / "a_0000.nii.gz", np.ones((5, 6, 7), np.float32))
    write_nifti(tmp_path / "imagesTr" / "a_0001.nii.gz", np.ones((5, 6, 8), np.float32))
    write_nifti(tmp_path / "labelsTr" / "a.nii.gz", np.zeros((5, 6, 7), np.uint8))
    meta = {"channel_names": {"0": "T1", "1": "T2"}, "labels": {"background": 0, "x": 1}}
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    problems, _ = validate_dataset(discover_dataset(tmp_path), progress=False)
    assert (
        len(problems) == 1 and "a_0001.nii.gz" in str(problems[0]) and "channel" in str(problems[0])
    )


def test_brats_regions_without_class_order_are_refused_before_any_case_is_read(tmp_path):
    """nnU-Net's BraTS regions once failed as "label values [1] are not in dataset.json labels
    [0, 2]"; now the dataset.json itself is named, with the key and what would be accepted."""
    root = make_msd_dataset(tmp_path / "ds", num_cases=2)
    meta = json.loads((root / "dataset.json").read_text())
    meta["labels"] = {"background": 0, "whole tumor": [1, 2], "enhancing": 2}
    (root / "dataset.json").write_text(json.dumps(meta))
    problems, stats = validate_dataset(discover_dataset(root), progress=False)
    assert stats == {}  # no case was read against a refused dataset.json
    text = [str(p) for p in problems]
    assert any(
        "dataset.json" in t
        and "'whole tumor': [1, 2] is a region" in t
        and "needs 'regions_class_order'" in t
        for t in text
    ), text
    assert not any("are not in dataset.json labels" in t for t in text), text


def test_brats_regions_with_class_order_validate_against_their_values(tmp_path):
    root = make_msd_dataset(tmp_path / "ds", num_cases=2)
    meta = json.loads((root / "dataset.json").read_text())
    meta["labels"] = {"background": 0, "whole tumor": [1, 2], "enhancing": 2}
    meta["regions_class_order"] = [1, 2]
    (root / "dataset.json").write_text(json.dumps(meta))
    dataset = discover_dataset(root)
    assert dataset.regions == {"whole tumor": [1, 2], "enhancing": [2]}
    problems, stats = validate_dataset(dataset, progress=False)
    assert problems == [] and len(stats) == 2


def test_ignored_voxels_are_no_foreground_intensities():
    from segshare.data.fingerprint import case_statistics

    image = np.zeros((6, 6, 6, 1), np.float32)
    image[:3] = 100.0  # the annotated foreground
    image[3:] = -50.0  # the ignored region
    label = np.zeros((6, 6, 6), np.uint8)
    label[:3, :3] = 1
    label[3:] = 2
    stats = case_statistics(image, label, np.eye(4), ignore_label=2)
    assert set(np.unique(stats["fg_samples"][0])) == {100.0}
    assert -50.0 in case_statistics(image, label, np.eye(4))["fg_samples"][0]
