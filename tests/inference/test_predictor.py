"""End-to-end prediction: geometry of the outputs, probabilities, failures, skipping, shards."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from segshare.data.discovery import Case, discover_images
from segshare.inference.predictor import select_shard
from segshare.predict import run

from .conftest import assert_same_geometry, oblique_affine, random_scan, write_scan

LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
LPS[:3, 3] = [20.0, -5.0, 3.0]
GEOMETRIES = {
    "ras": (np.diag([1.0, 1.0, 1.0, 1.0]), (33, 34, 35)),
    "lps": (LPS, (21, 30, 17)),
    "oblique": (oblique_affine(), (25, 19, 31)),
    "anisotropic": (np.diag([0.8, 0.8, 3.0, 1.0]), (37, 29, 9)),
}


def _expected_labels(data: np.ndarray) -> np.ndarray:
    """What the threshold model predicts: above the scan's mean intensity."""
    return (data > data.astype(np.float32).mean()).astype(np.uint8)


@pytest.fixture()
def geometry_inputs(tmp_path):
    folder = tmp_path / "scans"
    folder.mkdir()
    data = {}
    for i, (name, (affine, shape)) in enumerate(GEOMETRIES.items()):
        data[name] = random_scan(shape, seed=i).astype(np.int16)
        qcode = 2 if name == "oblique" else 1  # aligned vs scanner: the codes must survive
        write_scan(folder / f"{name}.nii.gz", data[name], affine, qform_code=qcode, sform_code=1)
    return folder, data


def test_outputs_keep_the_input_geometry(run_dir, geometry_inputs, compose_cfg, tmp_path):
    folder, data = geometry_inputs
    out = tmp_path / "pred"
    report = run(compose_cfg(f"model_path={run_dir}", f"input={folder}", f"output={out}"))
    assert sorted(report.written) == sorted(GEOMETRIES) and not report.failed
    assert json.loads((out / "failures.json").read_text()) == []
    for name in GEOMETRIES:
        pred = nib.load(str(out / f"{name}.nii.gz"))
        assert_same_geometry(pred, nib.load(str(folder / f"{name}.nii.gz")))
        labels = np.asarray(pred.dataobj)
        assert labels.dtype == np.uint8 and set(np.unique(labels)) <= {0, 1}
        agreement = (labels == _expected_labels(data[name])).mean()
        # Voxel-for-voxel where no resampling happens; the anisotropic scan is resampled 3 mm->1 mm
        # and back, which moves a few boundary voxels.
        assert agreement > (0.999 if name != "anisotropic" else 0.9), (name, agreement)


def test_probabilities_are_saved_on_the_scan_grid(run_dir, geometry_inputs, compose_cfg, tmp_path):
    folder, _ = geometry_inputs
    out = tmp_path / "pred"
    report = run(
        compose_cfg(
            f"model_path={run_dir / 'model.keras'}",
            f"input={folder / 'lps.nii.gz'}",
            f"output={out}",
            "save_probabilities=true",
            "tta=true",
            "window.overlap=0.25",
            "window.sw_batch_size=3",
        )
    )
    assert report.written == ["lps"]
    probs = np.load(out / "lps.npz")["probabilities"]
    labels = np.asarray(nib.load(str(out / "lps.nii.gz")).dataobj)
    assert probs.shape == (*labels.shape, 2) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(probs.argmax(-1), labels)
    # Without probabilities the argmax is taken before restoring (no resampling here): same labels.
    out2 = tmp_path / "pred2"
    run(
        compose_cfg(
            f"model_path={run_dir}",
            f"input={folder / 'lps.nii.gz'}",
            f"output={out2}",
            "tta=true",
            "window.overlap=0.25",
            "window.sw_batch_size=3",
        )
    )
    np.testing.assert_array_equal(np.asarray(nib.load(str(out2 / "lps.nii.gz")).dataobj), labels)


def test_bad_inputs_do_not_stop_the_batch(run_dir, tmp_path, compose_cfg):
    folder = tmp_path / "scans"
    folder.mkdir()
    good = random_scan((20, 21, 22)).astype(np.int16)
    write_scan(folder / "a_good.nii.gz", good, np.eye(4))
    write_scan(folder / "z_good.nii.gz", good, np.eye(4))
    (folder / "b_corrupt.nii.gz").write_bytes(b"\x1f\x8b\x08\x00 this is not a gzip stream")
    nan = random_scan((20, 21, 22)).astype(np.float32)
    nan[3, 4, 5] = np.nan
    write_scan(folder / "c_nan.nii.gz", nan, np.eye(4), dtype=np.float32)
    two = np.stack([good, good], axis=-1)  # two channels, the plan expects one
    write_scan(folder / "d_twochannels.nii.gz", two, np.eye(4))
    write_scan(folder / "e_2d.nii.gz", good[:, :, 0], np.eye(4))
    out = tmp_path / "pred"
    report = run(compose_cfg(f"model_path={run_dir}", f"input={folder}", f"output={out}"))
    assert sorted(report.written) == ["a_good", "z_good"]
    failures = json.loads((out / "failures.json").read_text())
    assert [f["case_id"] for f in failures] == ["b_corrupt", "c_nan", "d_twochannels", "e_2d"]
    reasons = {f["case_id"]: f for f in failures}
    assert "NaN or Inf" in reasons["c_nan"]["reason"]
    assert "c_nan.nii.gz" in reasons["c_nan"]["reason"]
    assert "b_corrupt.nii.gz" in reasons["b_corrupt"]["reason"]
    assert "channels" in reasons["d_twochannels"]["reason"]
    assert reasons["d_twochannels"]["file"].endswith("d_twochannels.nii.gz")
    assert "must be 3D" in reasons["e_2d"]["reason"]
    assert sorted(p.name for p in out.iterdir()) == [
        "a_good.nii.gz",
        "failures.json",
        "inputs.json",
        "z_good.nii.gz",
    ]


def test_existing_outputs_are_skipped(run_dir, tmp_path, compose_cfg):
    folder = tmp_path / "scans"
    folder.mkdir()
    for name in ("a", "b"):
        write_scan(folder / f"{name}.nii.gz", random_scan((18, 19, 20)), np.eye(4))
    out = tmp_path / "pred"
    out.mkdir()
    (out / "a.nii.gz").write_bytes(b"already here")
    report = run(compose_cfg(f"model_path={run_dir}", f"input={folder}", f"output={out}"))
    assert report.skipped == ["a"] and report.written == ["b"]
    assert (out / "a.nii.gz").read_bytes() == b"already here"


def test_output_folder_must_not_be_the_input_folder(run_dir, tmp_path, compose_cfg):
    write_scan(tmp_path / "a.nii.gz", random_scan((8, 9, 10)), np.eye(4))
    with pytest.raises(ValueError, match="is the folder of the input scans"):
        run(compose_cfg(f"model_path={run_dir}", f"input={tmp_path}", f"output={tmp_path}/."))


def test_a_window_the_model_cannot_take_is_refused_up_front(tmp_path, compose_cfg):
    import keras

    from .conftest import make_run_dir

    inputs = keras.Input((None, None, None, 1))
    x = keras.layers.MaxPooling3D(2)(inputs)
    x = keras.layers.UpSampling3D(2)(x)
    model = keras.Model(inputs, keras.layers.Conv3D(2, 1)(keras.layers.Concatenate()([x, inputs])))
    run2 = make_run_dir(tmp_path / "run2", model=model)
    write_scan(tmp_path / "a.nii.gz", random_scan((8, 9, 10)), np.eye(4))
    cfg = compose_cfg(
        f"model_path={run2}", f"input={tmp_path / 'a.nii.gz'}", "window.roi_size=[9,8,8]"
    )
    with pytest.raises(ValueError, match=r"roi_size=\[9, 8, 8\]: the model cannot predict"):
        run(cfg)
    three = make_run_dir(
        tmp_path / "run3", model=keras.Sequential([inputs, keras.layers.Conv3D(3, 1)])
    )
    cfg = compose_cfg(f"model_path={three}", f"input={tmp_path / 'a.nii.gz'}")
    with pytest.raises(ValueError, match=r"expected \(1, 16, 16, 16, 2\) \(plan.json\)"):
        run(cfg)


def test_restoring_one_class_at_a_time_gives_the_same_labels(tmp_path):
    from segshare.data.preprocessing import Plan, preprocess_case, restore_to_original
    from segshare.inference.predictor import argmax_labels, restored_argmax

    data = np.zeros((23, 30, 9))
    data[3:20, 4:27, 1:8] = random_scan((17, 23, 7))  # zero border: the crop is undone too
    affine = LPS.copy()
    affine[:3, :3] = affine[:3, :3] @ np.diag([0.8, 0.9, 3.0])
    scan = write_scan(tmp_path / "a.nii.gz", data, affine)
    plan = Plan((1.0, 1.0, 1.5), ["zscore"], None, {"background": 0, "a": 1, "b": 2}, 1, 3)
    image, _, props = preprocess_case([scan], None, plan)
    assert props["resampled_shape"] != props["cropped_shape"]
    logits = np.random.default_rng(0).normal(size=(*image.shape[:3], 3))
    probs = (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).astype(np.float32)
    probs[..., 2] = probs[..., 1]  # exact ties must go to the lower class, as np.argmax
    expected = argmax_labels(restore_to_original(probs, props, is_label=False))
    labels = restored_argmax(probs, props)
    assert labels.shape == data.shape and labels.dtype == np.uint8
    np.testing.assert_array_equal(labels, expected)
    assert set(np.unique(labels)) == {0, 1}


def test_select_shard_deals_every_case_once():
    cases = [Case(f"case{i:02d}", ()) for i in (7, 3, 9, 1, 4)]
    shards = [select_shard(cases, k, 3) for k in range(3)]
    ids = [c.case_id for shard in shards for c in shard]
    assert sorted(ids) == sorted(c.case_id for c in cases) and len(ids) == len(set(ids))
    assert [c.case_id for c in shards[0]] == ["case01", "case07"]
    assert [len(s) for s in shards] == [2, 2, 1]
    with pytest.raises(ValueError, match=r"shard.index must be in \[0, 2\], got 3"):
        select_shard(cases, 3, 3)
    with pytest.raises(ValueError, match="shard.count"):
        select_shard(cases, 0, 0)


def test_channels_with_different_geometry_are_refused(tmp_path, compose_cfg):
    from .conftest import make_run_dir

    run2 = make_run_dir(tmp_path / "run2", in_channels=2)
    folder = tmp_path / "scans"
    folder.mkdir()
    data = random_scan((17, 18, 19))
    shifted = np.eye(4)
    shifted[0, 3] = 5.0
    for case, second in (("good", np.eye(4)), ("moved", shifted)):
        write_scan(folder / f"{case}_0000.nii.gz", data, np.eye(4))
        write_scan(folder / f"{case}_0001.nii.gz", data, second)
    write_scan(folder / "small_0000.nii.gz", data, np.eye(4))
    write_scan(folder / "small_0001.nii.gz", data[:-1], np.eye(4))
    out = tmp_path / "pred"
    report = run(compose_cfg(f"model_path={run2}", f"input={folder}", f"output={out}"))
    assert report.written == ["good"]
    reasons = {f["case_id"]: f["reason"] for f in report.failed}
    assert "moved_0001.nii.gz: channel affine differs" in reasons["moved"]
    assert "small_0001.nii.gz: channel shape (16, 18, 19)" in reasons["small"]


def test_discovered_multichannel_case_is_predicted(tmp_path, compose_cfg):
    from .conftest import make_run_dir

    run2 = make_run_dir(tmp_path / "run2", in_channels=2)
    folder = tmp_path / "imagesTs"
    folder.mkdir()
    data = random_scan((17, 18, 19)).astype(np.int16)
    for c in range(2):
        write_scan(folder / f"pat_{c:04d}.nii.gz", data, np.eye(4))
    assert [c.case_id for c in discover_images(tmp_path)] == ["pat"]
    write_scan(folder / "lone_0000.nii.gz", data, np.eye(4))  # its channel 0001 is missing
    out = tmp_path / "pred"
    report = run(compose_cfg(f"model_path={run2}", f"input={tmp_path}", f"output={out}"))
    assert report.written == ["pat"]
    assert [f["case_id"] for f in report.failed] == ["lone"]
    assert (
        "lone_0000.nii.gz: case 'lone' has channel files _0000, expected _0000, _0001"
        in (report.failed[0]["reason"])
    )
    assert nib.load(str(out / "pat.nii.gz")).shape == data.shape


HIPPOCAMPUS = Path(__file__).resolve().parents[3] / "shared" / "data" / "Task04_Hippocampus"


@pytest.mark.realdata
@pytest.mark.skipif(not HIPPOCAMPUS.is_dir(), reason="Task04_Hippocampus not available")
def test_hippocampus_scans_keep_their_geometry(run_dir, compose_cfg, tmp_path):
    scans = tmp_path / "scans"
    scans.mkdir()
    sources = sorted((HIPPOCAMPUS / "imagesTr").glob("*.nii.gz"))[:6]
    for src in sources:  # a folder of real scans (links: the data stays read-only, uncopied)
        (scans / src.name).symlink_to(src)
    out = tmp_path / "pred"
    report = run(compose_cfg(f"model_path={run_dir}", f"input={scans}", f"output={out}"))
    assert len(report.written) == len(sources) and not report.failed
    for src in sources:
        assert_same_geometry(nib.load(str(out / src.name)), nib.load(str(src)))
