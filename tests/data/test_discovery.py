from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from segshare.data.discovery import discover_dataset, discover_images
from segshare.data.io import NiftiReadError, load_nifti, save_nifti_atomic

from .conftest import make_msd_dataset, write_nifti


def test_nnunet_layout_groups_channels(tmp_path):
    for cid in ("b", "a"):
        for ch in range(2):
            write_nifti(
                tmp_path / "imagesTr" / f"{cid}_{ch:04d}.nii.gz", np.zeros((3, 4, 5), np.float32)
            )
        write_nifti(tmp_path / "labelsTr" / f"{cid}.nii.gz", np.zeros((3, 4, 5), np.uint8))
    meta = {
        "channel_names": {"0": "CT", "1": "PET"},
        "labels": {"background": 0, "tumour": 1},
        "file_ending": ".nii.gz",
    }
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    ds = discover_dataset(tmp_path)
    assert ds.case_ids == ["a", "b"]
    assert [p.name for p in ds.cases[0].images] == ["a_0000.nii.gz", "a_0001.nii.gz"]
    assert ds.cases[0].label.name == "a.nii.gz"
    assert ds.labels == {"background": 0, "tumour": 1}
    assert ds.channel_names == {"0": "CT", "1": "PET"}
    assert ds.problems == []


def test_msd_layout_labels_converted(tmp_path):
    ds = discover_dataset(make_msd_dataset(tmp_path, num_cases=3))
    assert ds.case_ids == ["case_00", "case_01", "case_02"]
    assert ds.labels == {"background": 0, "a": 1, "b": 2}
    assert ds.channel_names == {"0": "MRI"}


def test_plain_pair_uncompressed_and_orphans(tmp_path):
    write_nifti(tmp_path / "imagesTr" / "x.nii", np.zeros((3, 3, 3), np.float32))
    write_nifti(tmp_path / "imagesTr" / "y.nii", np.zeros((3, 3, 3), np.float32))
    write_nifti(tmp_path / "labelsTr" / "x.nii", np.zeros((3, 3, 3), np.uint8))
    write_nifti(tmp_path / "labelsTr" / "z.nii", np.zeros((3, 3, 3), np.uint8))
    ds = discover_dataset(tmp_path)
    assert ds.case_ids == ["x", "y"]
    assert ds.labels == {}
    msgs = " ".join(f"{p} {m}" for p, m in ds.problems)
    assert "y.nii" in msgs and "z.nii" in msgs


def test_discover_images_file_folder_and_dataset(tmp_path):
    f = write_nifti(tmp_path / "imagesTs" / "scan_0000.nii.gz", np.zeros((2, 2, 2), np.float32))
    write_nifti(tmp_path / "imagesTs" / "scan_0001.nii.gz", np.zeros((2, 2, 2), np.float32))
    assert discover_images(f)[0].case_id == "scan_0000"
    cases = discover_images(tmp_path)
    assert len(cases) == 1 and cases[0].case_id == "scan" and len(cases[0].images) == 2
    with pytest.raises(ValueError, match="does not exist"):
        discover_images(tmp_path / "nope")


@pytest.mark.parametrize(
    ("names", "in_channels", "expected"),
    [
        (["patient_2019", "patient_2020"], None, ["patient_2019", "patient_2020"]),  # years
        (["scan_0001", "scan_0002"], None, ["scan_0001", "scan_0002"]),  # no channel 0000
        (
            ["scan_0001", "scan_0002", "scan_0003", "scan_0004"],
            4,
            ["scan_0001", "scan_0002", "scan_0003", "scan_0004"],
        ),  # numbered scans, not a 4-channel case
        (["img_0000", "img_0001"], 1, ["img_0000", "img_0001"]),  # the model takes 1 channel
        (["img_0000", "img_0001"], 2, ["img"]),
        (["a_0000", "b_0000"], 1, ["a", "b"]),  # nnU-Net single-channel names
        (["a_0000", "a_0001", "b_0000"], None, ["a", "b"]),  # b's missing channel: b's problem
        (["a_0000", "a_0001", "b_0000"], 2, ["a", "b"]),
        (["a_0000", "b_0000", "c_0000", "c_0001"], 1, ["a", "b", "c"]),  # c's stray _0001
    ],
)
def test_numbered_scans_are_not_taken_for_channels(tmp_path, names, in_channels, expected):
    for name in names:
        write_nifti(tmp_path / f"{name}.nii.gz", np.zeros((2, 2, 2), np.float32))
    cases = discover_images(tmp_path, in_channels)
    assert [c.case_id for c in cases] == expected
    n = in_channels or 2
    for c in cases:  # a grouped case is flagged exactly when its channel run is not 0000..n-1
        run = [int(p.name.split("_")[-1][:4]) for p in c.images]
        assert (c.problem is not None) == (c.case_id in ("a", "b", "c") and run != list(range(n)))


def test_wrong_channel_run_is_reported_not_used(tmp_path):
    for name in ("a_0000", "a_0002", "b_0000", "b_0001", "c_0000", "c_0001"):
        write_nifti(tmp_path / f"{name}.nii.gz", np.zeros((2, 2, 2), np.float32))
    cases = {c.case_id: c for c in discover_images(tmp_path, 2)}
    assert sorted(cases) == ["a", "b", "c"]
    assert cases["a"].problem == "case 'a' has channel files _0000, _0002, expected _0000, _0001"
    assert cases["b"].problem is None and cases["c"].problem is None


def test_paired_numbered_names_match_their_labels(tmp_path):
    for cid in ("patient_0000", "patient_0001"):
        write_nifti(tmp_path / "imagesTr" / f"{cid}.nii.gz", np.zeros((2, 2, 2), np.float32))
        write_nifti(tmp_path / "labelsTr" / f"{cid}.nii.gz", np.zeros((2, 2, 2), np.uint8))
    ds = discover_dataset(tmp_path)
    assert ds.case_ids == ["patient_0000", "patient_0001"]
    assert all(c.label is not None for c in ds.cases) and ds.problems == []


def test_stray_channel_file_fails_its_case_only(tmp_path):
    for cid in ("a", "b", "c"):
        write_nifti(tmp_path / "imagesTr" / f"{cid}_0000.nii.gz", np.zeros((2, 2, 2), np.float32))
        write_nifti(tmp_path / "labelsTr" / f"{cid}.nii.gz", np.zeros((2, 2, 2), np.uint8))
    write_nifti(tmp_path / "imagesTr" / "c_0001.nii.gz", np.zeros((2, 2, 2), np.float32))
    meta = {"channel_names": {"0": "MR"}, "labels": {"background": 0, "x": 1}}
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    ds = discover_dataset(tmp_path)
    assert ds.case_ids == ["a", "b", "c"]
    assert all(c.label is not None for c in ds.cases)
    assert [(Path(f).name, m) for f, m in ds.problems] == [
        ("c_0000.nii.gz", "case 'c' has channel files _0000, _0001, expected _0000")
    ]


def test_load_nifti_errors_name_file(tmp_path):
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not gzip at all")
    with pytest.raises(NiftiReadError, match="bad.nii.gz"):
        load_nifti(bad)
    with pytest.raises(NiftiReadError, match="does not exist"):
        load_nifti(tmp_path / "missing.nii")


def test_save_nifti_atomic_roundtrip_leaves_no_temp(tmp_path):
    data = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    out = save_nifti_atomic(nib.Nifti1Image(data, np.diag([2.0, 1, 1, 1])), tmp_path / "o.nii.gz")
    np.testing.assert_array_equal(np.asarray(nib.load(out).dataobj), data)
    assert [p.name for p in tmp_path.iterdir()] == ["o.nii.gz"]


def test_symlinked_dataset_is_inside_but_dotdot_is_not(tmp_path):
    from segshare.data.discovery import is_inside

    store = write_nifti(tmp_path / "store" / "a.nii.gz", np.zeros((2, 2, 2), np.float32))
    (tmp_path / "ds" / "imagesTr").mkdir(parents=True)
    link = tmp_path / "ds" / "imagesTr" / "a.nii.gz"
    link.symlink_to(store)
    assert is_inside(tmp_path / "ds", link)
    assert not is_inside(tmp_path / "ds", tmp_path / "ds" / ".." / "store" / "a.nii.gz")
    assert not is_inside(tmp_path / "ds", tmp_path / "ds2" / "x.nii.gz")  # not a prefix match


def test_synthetic_held_out_test_cases_do_not_change_training_cases(tmp_path):
    from segshare.data.synthetic import generate_synthetic_dataset

    plain = generate_synthetic_dataset(tmp_path / "a", num_cases=3, seed=5, shape_range=(18, 20))
    held = generate_synthetic_dataset(
        tmp_path / "b", num_cases=3, seed=5, shape_range=(18, 20), num_test_cases=2
    )
    assert [c.case_id for c in discover_dataset(held).cases] == ["case_000", "case_001", "case_002"]
    tests = discover_images(held / "imagesTs")
    assert [c.case_id for c in tests] == ["case_003", "case_004"]
    assert sorted(p.name for p in (held / "labelsTs").iterdir()) == [
        "case_003.nii.gz",
        "case_004.nii.gz",
    ]
    for name in ("imagesTr/case_002_0000.nii.gz", "labelsTr/case_002.nii.gz"):
        np.testing.assert_array_equal(
            np.asarray(nib.load(plain / name).dataobj), np.asarray(nib.load(held / name).dataobj)
        )
    assert not (plain / "imagesTs").exists()


def test_synthetic_generation_never_clobbers_a_folder_another_process_made(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from segshare.data.synthetic import generate_synthetic_dataset

    out = tmp_path / "syn"
    args = dict(num_cases=2, seed=1, shape_range=(16, 18))
    (out / "imagesTr").mkdir(parents=True)
    (out / "imagesTr" / "sentinel.txt").write_text("being read by another run")
    assert generate_synthetic_dataset(out, overwrite=False, **args) == out
    assert (out / "imagesTr" / "sentinel.txt").exists()  # kept, not replaced under its reader
    generate_synthetic_dataset(out, **args)  # the default replaces it
    assert not (out / "imagesTr" / "sentinel.txt").exists()
    # Four runs that all found the folder missing generate it at once: one wins, all succeed.
    race = tmp_path / "race"
    with ThreadPoolExecutor(4) as pool:
        done = list(
            pool.map(lambda _: generate_synthetic_dataset(race, overwrite=False, **args), range(4))
        )
    assert done == [race] * 4
    ds = discover_dataset(race)
    assert ds.case_ids == ["case_000", "case_001"] and ds.problems == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["race", "syn"]  # no temporaries left
