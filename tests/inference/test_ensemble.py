"""Ensembles: several runs' softmax averaged on each case's grid, one buffer, clear refusals."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from segshare.inference.ensemble import load_ensemble, mean_predict_fn, resolve_run_paths
from segshare.inference.sliding_window import WindowSettings
from tests.inference.conftest import make_run_dir, random_scan, threshold_model, write_scan

WINDOW = WindowSettings(roi_size=None, overlap=0.5, sw_batch_size=2, sigma_scale=0.125)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three runs of one task: two on a 1 mm plan (different gains, so different
    probabilities), one on a 2 mm plan."""
    root = tmp_path_factory.mktemp("ensemble")
    return {
        "a": make_run_dir(root / "a", threshold_model(gain=0.5)),
        "b": make_run_dir(root / "b", threshold_model(gain=3.0)),
        "coarse": make_run_dir(root / "coarse", threshold_model(gain=1.0), spacing=(2, 2, 2)),
    }


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    """A scan with a zero border, so preprocessing crops it (probabilities outside the crop box
    are restored as background)."""
    folder = tmp_path_factory.mktemp("scans")
    data = np.zeros((20, 18, 22))
    data[3:17, 2:16, 4:19] = random_scan((14, 14, 15))
    return write_scan(folder / "case.nii.gz", data, np.eye(4))


def _probabilities(model_path, scan, out):
    from segshare.data.discovery import discover_images
    from segshare.inference.predictor import predict_cases

    predictor, _ = load_ensemble(model_path, WINDOW)
    cases = discover_images(str(scan), 1)
    report = predict_cases(predictor, cases, out, save_probabilities=True, progress=False)
    assert report.written == ["case"], report.failed
    labels = np.asarray(nib.load(out / "case.nii.gz").dataobj)
    return np.load(out / "case.npz")["probabilities"], labels


@pytest.mark.parametrize("members", [("a", "b"), ("a", "b", "coarse")], ids=["one plan", "two"])
def test_an_ensemble_is_the_mean_of_its_members_probabilities(runs, scan, tmp_path, members):
    singles = [_probabilities(runs[m], scan, tmp_path / m)[0] for m in members]
    got, labels = _probabilities([runs[m] for m in members], scan, tmp_path / "ensemble")
    expected = np.mean(singles, axis=0)
    assert got.shape == (20, 18, 22, 2)
    np.testing.assert_allclose(got, expected, atol=2e-5)
    assert not np.allclose(singles[0], singles[1], atol=1e-3)  # the members differ
    np.testing.assert_array_equal(labels, got.argmax(-1))
    np.testing.assert_allclose(got[0, 0, 0], [1.0, 0.0], atol=1e-6)  # outside the crop box
    np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5)


def test_members_sharing_a_plan_share_one_window_function(runs):
    from segshare.inference.predictor import Predictor

    one_plan, _ = load_ensemble([runs["a"], runs["b"]], WINDOW)
    assert isinstance(one_plan, Predictor)  # one sliding window, one buffer per case
    x = np.random.default_rng(0).normal(size=(2, 4, 4, 4, 1)).astype(np.float32)
    fa, fb = (load_ensemble(runs[m], WINDOW)[0].predict_fn for m in ("a", "b"))
    np.testing.assert_allclose(one_plan.predict_fn(x), (fa(x) + fb(x)) / 2, atol=1e-6)
    assert mean_predict_fn([fa]) is fa


def test_members_of_another_task_are_refused_naming_both(runs, tmp_path):
    other = make_run_dir(tmp_path / "two_channels", in_channels=2)
    with pytest.raises(ValueError, match=r"two_channels has in_channels=2 but .*a has 1"):
        load_ensemble([runs["a"], other], WINDOW)
    relabelled = make_run_dir(tmp_path / "relabelled")
    plan = json.loads((relabelled / "plan.json").read_text())
    plan["labels"] = {"background": 0, "tumour": 1}
    (relabelled / "plan.json").write_text(json.dumps(plan))
    info = json.loads((relabelled / "run.json").read_text())
    info["labels"] = plan["labels"]
    (relabelled / "run.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match=r"relabelled predicts labels .*tumour.* but"):
        load_ensemble([runs["a"], relabelled], WINDOW)
    t1, flair = make_run_dir(tmp_path / "t1"), make_run_dir(tmp_path / "flair")
    for folder, name in ((t1, "T1"), (flair, "FLAIR")):
        plan = json.loads((folder / "plan.json").read_text())
        plan["channel_names"] = {"0": name}
        (folder / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(ValueError, match=r"flair takes channels \{'0': 'FLAIR'\} but"):
        load_ensemble([t1, flair], WINDOW)
    with pytest.raises(ValueError, match=r"model_path=\[\]"):
        resolve_run_paths([])


def test_a_crossval_folder_stands_for_its_runs(runs, tmp_path):
    crossval = tmp_path / "crossval"
    crossval.mkdir()
    folds = [{"fold": i, "run": str(runs[m])} for i, m in enumerate(("a", "b"))]
    (crossval / "folds.json").write_text(json.dumps({"folds": folds}))
    assert resolve_run_paths(str(crossval)) == [runs["a"], runs["b"]]
    assert resolve_run_paths(str(runs["a"])) == [runs["a"]]


def test_segshare_predict_takes_a_list_of_runs(runs, scan, tmp_path, compose_cfg, capsys):
    from segshare.predict import run

    cfg = compose_cfg(
        f"model_path=[{runs['a']},{runs['b']}]", f"input={scan}", f"output={tmp_path / 'p'}"
    )
    report = run(cfg)
    assert report.written == ["case"] and not report.failed
    assert "ensemble of 2 models" in capsys.readouterr().out
