"""What segshare-predict writes besides the labels: the crossval's postprocessing applied before
writing (postprocessing=FILE), and the record of its inputs that gives evaluations overlays."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from segshare.evaluation.postprocessing import PostprocessingStep, save_postprocessing
from tests.inference.conftest import write_scan


def _two_blobs(folder):
    """A bright 6^3 blob and a bright 2^3 blob on a dark background (the threshold model
    predicts both)."""
    data = np.full((20, 20, 20), 100.0)
    data[2:8, 2:8, 2:8] = 2000.0
    data[14:16, 14:16, 14:16] = 2000.0
    return write_scan(folder / "case.nii.gz", data, np.eye(4))


def test_predictions_are_postprocessed_as_the_file_says(run_dir, tmp_path, compose_cfg):
    from segshare.predict import run

    scan = _two_blobs(tmp_path)
    step = PostprocessingStep("largest_component", (1,))
    rule = save_postprocessing({"format": 1, "labels": [1], "steps": [step.to_dict()]},
                               tmp_path / "postprocessing.json")  # fmt: skip
    outputs = {}
    for name, extra in (("plain", []), ("post", [f"postprocessing={rule}"])):
        out = tmp_path / name
        report = run(compose_cfg(f"model_path={run_dir}", f"input={scan}", f"output={out}", *extra))
        assert report.written == ["case"], report.failed
        outputs[name] = np.asarray(nib.load(tmp_path / name / "case.nii.gz").dataobj)
    assert outputs["plain"][15, 15, 15] == 1 and outputs["plain"][4, 4, 4] == 1
    assert outputs["post"][15, 15, 15] == 0 and outputs["post"][4, 4, 4] == 1  # island removed
    assert int(outputs["post"].sum()) == int((outputs["plain"][:10, :10, :10]).sum())


def test_a_bad_postprocessing_file_is_a_setup_error_naming_it(run_dir, tmp_path, compose_cfg):
    from segshare.predict import run

    scan = _two_blobs(tmp_path)
    bad = tmp_path / "pp.json"
    bad.write_text(json.dumps({"format": 1, "steps": [{"kind": "dilate", "labels": [1]}]}))
    cfg = compose_cfg(f"model_path={run_dir}", f"input={scan}", f"output={tmp_path / 'o'}",
                      f"postprocessing={bad}")  # fmt: skip
    with pytest.raises(ValueError, match="pp.json"):
        run(cfg)


def test_the_recorded_inputs_give_the_evaluation_report_overlays(run_dir, tmp_path, compose_cfg):
    """segshare-predict records its scans (inputs.json); segshare-evaluate, given no images=,
    finds them and draws the overlays of the worst, median and best cases."""
    from segshare.evaluation import evaluate_folders
    from segshare.predict import run

    scans, refs = tmp_path / "scans", tmp_path / "refs"
    refs.mkdir()
    for i in range(3):
        scans.mkdir(exist_ok=True)
        scan = _two_blobs(tmp_path)
        scan.rename(scans / f"case{i}.nii.gz")
        ref = np.zeros((20, 20, 20), np.uint8)
        ref[2 : 8 - i, 2:8, 2:8] = 1
        nib.save(nib.Nifti1Image(ref, np.eye(4)), str(refs / f"case{i}.nii.gz"))
    preds = tmp_path / "preds"
    run(compose_cfg(f"model_path={run_dir}", f"input={scans}", f"output={preds}"))
    recorded = json.loads((preds / "inputs.json").read_text())
    assert recorded == {f"case{i}": [str((scans / f"case{i}.nii.gz").resolve())] for i in range(3)}
    evaluate_folders(preds, refs, tmp_path / "eval", num_workers=1, progress=False)
    assert (tmp_path / "eval" / "overlays.png").is_file()
    assert "overlays.png" in (tmp_path / "eval" / "report.md").read_text()


def test_cases_left_to_another_run_make_the_exit_status_1(capsys):
    """A case claimed by another run is not written yet: the run must not report success."""
    from segshare.inference.predictor import PredictReport
    from segshare.predict import finish

    assert finish(PredictReport(written=["a"])) == 0
    assert finish(PredictReport(written=["a"], busy=["case_7"])) == 1
    err = capsys.readouterr().err
    assert "1 case(s) not written yet, being predicted by another run (case_7)" in err


def test_a_window_wider_than_the_training_patch_needs_fewer_windows(tmp_path, run_dir):
    """The network is fully convolutional: window.roi_size may exceed the training patch (16^3
    here); a pointwise model then gives the same labels from fewer windows."""
    from segshare.data.discovery import discover_images
    from segshare.inference.predictor import predict_cases
    from segshare.inference.sliding_window import WindowSettings
    from segshare.inference.trained_run import load_trained_run

    from .conftest import random_scan, write_scan

    scans = tmp_path / "scans"
    scans.mkdir()
    write_scan(scans / "a.nii.gz", random_scan((40, 36, 30)), np.eye(4))
    labels, calls = {}, {}
    for roi in ([16, 16, 16], [48, 48, 32]):
        predictor = load_trained_run(run_dir).predictor(WindowSettings(roi, 0.5, 1, 0.125))
        inner, count = predictor.predict_fn, []

        def counted(batch, inner=inner, count=count):
            count.append(len(batch))
            return inner(batch)

        predictor.predict_fn = counted
        out = tmp_path / f"roi{roi[0]}"
        assert not predict_cases(predictor, discover_images(scans), out, progress=False).failed
        labels[roi[0]] = np.asarray(nib.load(out / "a.nii.gz").dataobj)
        calls[roi[0]] = sum(count)
    np.testing.assert_array_equal(labels[48], labels[16])
    assert calls[48] == 1 and calls[16] > 20


def test_a_run_fits_wide_windows_in_steps_of_its_network_stride(tmp_path):
    """run.json's strides give the step of a fitted window (total stride 4 x 2 x 1 here)."""
    import json

    from segshare.inference.sliding_window import WindowSettings
    from segshare.inference.trained_run import RUN_FILE, load_trained_run

    from .conftest import make_run_dir

    run_dir = make_run_dir(tmp_path / "run")
    assert load_trained_run(run_dir).window_stride is None  # not recorded: gcd steps
    info = json.loads((run_dir / RUN_FILE).read_text())
    info["network"] = {"strides": [[1, 1, 1], [2, 2, 1], [2, 1, 1]]}
    (run_dir / RUN_FILE).write_text(json.dumps(info))
    run = load_trained_run(run_dir)
    assert run.window_stride == (4, 2, 1)
    predictor = run.predictor(WindowSettings([32, 32, 32], 0.5, 1, 0.125))
    assert predictor.window.roi_for((17, 17, 40)) == (20, 18, 32)
    info["network"] = {"features": [8, 16, 32]}  # strides not recorded: the encoder's default
    (run_dir / RUN_FILE).write_text(json.dumps(info))
    assert load_trained_run(run_dir).window_stride == (4, 4, 4)
