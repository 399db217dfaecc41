"""The cross-validation merge (segshare.evaluation.crossval) and the segshare-crossval app, on fake
run folders: a plan, run.json with its split, and 8x8x8 validation label maps whose Dice is known.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hydra import compose, initialize_config_module

from segshare.crossval import format_results, run
from segshare.data.preprocessing import Plan
from segshare.evaluation.crossval import merge_folds
from segshare.inference.trained_run import RUN_FILE, RUN_FORMAT

#: case -> shift of its prediction (a 4x4x4 cube moved by k voxels): Dice (4 - k) / 4.
SHIFTS = {"case_0": 0, "case_1": 2, "case_2": 1, "case_3": 1, "case_4": 0, "case_5": 2, "case_6": 3}
#: fold -> its validation cases (a partition of the 7 cases, folds of unequal size).
FOLDS = {0: ["case_0", "case_3", "case_6"], 1: ["case_1", "case_4"], 2: ["case_2", "case_5"]}
LABELS = {"background": 0, "bright": 1}


def dice(case: str) -> float:
    return (4 - SHIFTS[case]) / 4


def cube(shift: int = 0) -> np.ndarray:
    out = np.zeros((8, 8, 8), np.uint8)
    out[shift : 4 + shift, 2:6, 2:6] = 1
    return out


def save(array: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.eye(4)), str(path))
    return path


def write_run(folder: Path, fold: int, labels=LABELS, spacing=(1.0, 1.0, 1.0), split=True):
    """A run folder as segshare-train leaves it (the model file is a stand-in: never loaded)."""
    plan = Plan(spacing, ["zscore"], None, dict(labels), in_channels=1, num_classes=2)
    folder.mkdir(parents=True)
    (folder / "model.keras").write_bytes(b"")
    plan.save(folder / "plan.json")
    val = FOLDS[fold]
    info = {
        "format": RUN_FORMAT, "model_file": "model.keras", "plan_file": "plan.json",
        "patch_size": [8, 8, 8], "slice_axis": None, "in_channels": 1, "num_classes": 2,
        "labels": dict(labels), "trained_with": {"segshare": "test"},
        "split": {
            "fold": fold, "num_folds": len(FOLDS),
            "train_cases": sorted(set(SHIFTS) - set(val)), "validation_cases": val,
        } if split else None,
    }  # fmt: skip
    (folder / RUN_FILE).write_text(json.dumps(info))
    labels_tr = folder.parent / "raw" / "labelsTr"
    for case in val:
        save(cube(SHIFTS[case]), folder / "validation" / "predictions" / f"{case}.nii.gz")
        label = labels_tr / f"{case}.nii.gz"
        if not label.exists():
            save(cube(), label)
        ref = folder / "validation" / "references" / f"{case}.nii.gz"
        ref.parent.mkdir(exist_ok=True)
        ref.symlink_to(label)
    return folder


@pytest.fixture
def runs(tmp_path) -> list[Path]:
    return [write_run(tmp_path / "folds" / str(k), k) for k in FOLDS]


def merge(runs, out, **kwargs):
    return merge_folds(runs, out, num_workers=1, progress=False, **kwargs)


def test_merge_scores_every_case_once(runs, tmp_path):
    out = tmp_path / "cv"
    summary = merge(runs[::-1], out)  # any order
    assert summary["num_cases"] == 7 and summary["num_missing_predictions"] == 0
    per_case = {c["case_id"]: c["metrics"]["1"]["Dice"] for c in summary["metric_per_case"]}
    assert per_case == {c: dice(c) for c in SHIFTS}
    expected = sum(dice(c) for c in SHIFTS) / 7  # 4.75 / 7
    assert summary["foreground_mean"]["Dice"] == pytest.approx(expected)
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["foreground_mean"]["Dice"] == pytest.approx(expected)
    assert on_disk["labels"] == {"1": "bright"}
    for name in ("metrics.csv", "report.md", "report.html", "folds.json", "dataset.json"):
        assert (out / name).is_file(), name
    assert (out / "folds.png").is_file() and "## Dice per fold" in (out / "report.md").read_text()
    pred = out / "predictions" / "case_3.nii.gz"
    assert pred.is_symlink() and pred.resolve() == (runs[0] / "validation/predictions" / pred.name)
    ref = out / "references" / "case_3.nii.gz"
    assert ref.resolve() == (tmp_path / "folds/raw/labelsTr/case_3.nii.gz").resolve()
    assert not list(out.glob("*.tmp*")) and not list(out.glob("*.old"))


def test_folds_json_per_fold_dice_from_the_merged_metrics(runs, tmp_path):
    summary = merge(runs, tmp_path / "cv")
    folds = json.loads((tmp_path / "cv" / "folds.json").read_text())
    assert folds == summary["folds"]
    per_fold = [np.mean([dice(c) for c in FOLDS[k]]) for k in FOLDS]  # 2/3, 3/4, 5/8
    assert [r["fold"] for r in folds["folds"]] == [0, 1, 2]
    assert [r["run"] for r in folds["folds"]] == [str(r.resolve()) for r in runs]
    assert [r["num_cases"] for r in folds["folds"]] == [3, 2, 2]
    for row, value in zip(folds["folds"], per_fold, strict=True):
        assert row["foreground_dice"] == pytest.approx(value)
        assert row["dice"] == {"1": pytest.approx(value)}
    fg = folds["foreground_dice"]
    assert fg["mean_over_folds"] == pytest.approx(np.mean(per_fold))
    assert fg["sd_over_folds"] == pytest.approx(np.std(per_fold, ddof=1))
    assert fg["all_cases"] == pytest.approx(4.75 / 7)
    assert folds["num_folds"] == 3 and folds["labels"] == {"1": "bright"}
    table = format_results(summary, "cv")
    assert "   0      3  0.6667" in table and "foreground-mean Dice 0.6786" in table


def test_a_rerun_replaces_the_previous_merge(runs, tmp_path, monkeypatch):
    out = tmp_path / "cv"
    merge(runs, out)
    save(cube(), out / "predictions" / "stale.nii.gz")
    save(cube(), out / "references" / "stale.nii.gz")
    monkeypatch.setattr(Path, "symlink_to", _no_links)  # a file system without links: copies
    summary = merge(runs, out)
    assert sorted(p.name for p in (out / "predictions").iterdir()) == [
        *(f"{c}.nii.gz" for c in SHIFTS),
        "inputs.json",  # the folds' recorded scans (none here), for the report's overlays
    ]
    assert not (out / "references" / "stale.nii.gz").exists()
    assert not any(p.is_symlink() for p in (out / "predictions").iterdir())
    assert summary["num_cases"] == 7 and summary["unmatched_predictions"] == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cv", "folds"]  # no temporary left


def _no_links(self, target):
    raise OSError("links not supported")


def _refused(runs, out, *patterns):
    with pytest.raises(ValueError) as info:
        merge(runs, out)
    for pattern in patterns:
        assert pattern in str(info.value), (pattern, str(info.value))
    assert not out.exists()  # refused before writing anything
    return str(info.value)


def test_overlapping_folds_and_a_fold_given_twice_are_refused(runs, tmp_path):
    info = json.loads((runs[1] / RUN_FILE).read_text())
    info["split"]["validation_cases"] = ["case_1", "case_4", "case_0"]
    (runs[1] / RUN_FILE).write_text(json.dumps(info))
    save(cube(), runs[1] / "validation/predictions/case_0.nii.gz")
    (runs[1] / "validation/references/case_0.nii.gz").symlink_to(
        runs[0].parent / "raw/labelsTr/case_0.nii.gz"
    )
    out = tmp_path / "cv"
    _refused(runs, out, f"{runs[0]} (fold 0) and {runs[1]} (fold 1)", "1 case (case_0)", "overlap")
    _refused([runs[0], runs[0], runs[2]], out, f"{runs[0]} is given twice (fold 0)")
    twin = write_run(tmp_path / "twin" / "0", 0)
    _refused([runs[0], twin, *runs[1:]], out, f"{runs[0]} and {twin} are both (fold 0)")


def test_cases_in_no_fold_are_refused(runs, tmp_path):
    message = _refused(runs[:2], tmp_path / "cv", "2 cases (case_2, case_5) of the 7")
    assert "folds [2] of 3 are not given" in message


def test_runs_with_other_labels_or_plan_are_refused(runs, tmp_path):
    other = write_run(tmp_path / "other" / "2", 2, labels={"background": 0, "dark": 1})
    _refused([*runs[:2], other], tmp_path / "cv", f"labels differ: {runs[0]} has", str(other))
    coarse = write_run(tmp_path / "coarse" / "2", 2, spacing=(2.0, 1.0, 1.0))
    _refused(
        [*runs[:2], coarse],
        tmp_path / "cv",
        f"{coarse}/plan.json differs",
        "(target_spacing: [1.0, 1.0, 1.0] vs [2.0, 1.0, 1.0])",
    )


def test_a_missing_validation_prediction_is_refused(runs, tmp_path):
    (runs[1] / "validation/predictions/case_4.nii.gz").unlink()
    _refused(runs, tmp_path / "cv", f"{runs[1]}: no validation prediction", "1 case (case_4)")


def test_runs_without_split_or_final_evaluation_are_refused(runs, tmp_path):
    old = write_run(tmp_path / "old" / "2", 2, split=False)
    _refused([*runs[:2], old], tmp_path / "cv", f"{old}: its run.json records no", "re-train")
    for path in (runs[2] / "validation" / "predictions").iterdir():
        path.unlink()
    (runs[2] / "validation" / "predictions").rmdir()
    _refused(runs, tmp_path / "cv", f"{runs[2]}: no validation/predictions", "final evaluation")


def test_every_problem_is_listed_at_once(runs, tmp_path):
    (runs[1] / "validation/predictions/case_4.nii.gz").unlink()
    other = write_run(tmp_path / "other" / "2", 2, labels={"background": 0, "dark": 1})
    message = _refused([runs[0], runs[1], other, tmp_path / "nope"], tmp_path / "cv")
    assert message.startswith("cannot merge these 4 runs:\n")
    assert "case_4" in message and "labels differ" in message and "nope: no such run" in message


def _compose(*overrides: str):
    with initialize_config_module(version_base="1.3", config_module="segshare.conf"):
        return compose("crossval", overrides=["progress=false", "num_workers=1", *overrides])


def test_the_app_composes_the_real_config(runs, tmp_path):
    summary = run(_compose(f"runs=[{','.join(map(str, runs))}]", f"output={tmp_path / 'cv'}"))
    assert summary["folds"]["foreground_dice"]["all_cases"] == pytest.approx(4.75 / 7)
    assert (tmp_path / "cv" / "folds.json").is_file()
    with pytest.raises(ValueError, match="runs is required"):
        run(_compose(f"output={tmp_path / 'x'}"))
    with pytest.raises(ValueError, match="runs must list"):
        run(_compose("runs=[]", f"output={tmp_path / 'x'}"))
    with pytest.raises(ValueError, match="output is required"):
        run(_compose(f"runs=[{runs[0]}]"))
    assert not (tmp_path / "x").exists()


def test_cli_bad_run_list_exits_1_without_traceback(runs, tmp_path):
    argv = [
        sys.executable, "-m", "segshare.crossval", f"runs=[{runs[0]},{tmp_path / 'nope'}]",
        f"output={tmp_path / 'cv'}", f"hydra.run.dir={tmp_path / 'h'}",
    ]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("segshare-crossval: error: ")
    assert f"{tmp_path / 'nope'}: no such run folder" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_an_output_inside_a_run_is_refused(runs, tmp_path):
    with pytest.raises(ValueError, match="overlaps the run"):
        merge(runs, runs[1] / "validation")
    assert (runs[1] / "validation" / "predictions" / "case_1.nii.gz").is_file()


def test_postprocessing_is_decided_on_the_merge_kept_only_where_it_helps(runs, tmp_path):
    """Single-cube predictions: no step helps. Spurious islands in two folds: keeping the largest
    component is kept, applied in postprocessed/, and raises the merged Dice."""
    clean = merge(runs, tmp_path / "clean")["folds"]["postprocessing"]
    assert clean["steps"] == []
    assert clean["foreground_dice_after"] == pytest.approx(clean["foreground_dice_before"])
    for run_dir, case in ((runs[0], "case_0"), (runs[1], "case_4")):
        noisy = cube(SHIFTS[case])
        noisy[7, 7, 7] = noisy[0, 0, 7] = 1  # two one-voxel islands
        pred = run_dir / "validation" / "predictions" / f"{case}.nii.gz"
        pred.unlink()
        save(noisy, pred)
    out = tmp_path / "noisy"
    folds = merge(runs, out)["folds"]
    post = folds["postprocessing"]
    assert post["steps"] and post["steps"][0]["kind"] == "largest_component"
    assert post["foreground_dice_after"] > post["foreground_dice_before"]
    decision = json.loads((out / "postprocessing.json").read_text())
    assert decision["steps"] == post["steps"]
    fixed = nib.load(out / "postprocessed" / "predictions" / "case_0.nii.gz")
    np.testing.assert_array_equal(np.asarray(fixed.dataobj), cube(0))
    np.testing.assert_array_equal(fixed.affine, np.eye(4))
    after = json.loads((out / "postprocessed" / "summary.json").read_text())
    assert after["foreground_mean"]["Dice"] == pytest.approx(post["foreground_dice_after"])
    assert "postprocessing (postprocessing.json): largest_component" in format_results(
        merge(runs, out), str(out)
    )


def _with_probabilities(run_dir: Path, confidence: float, shifts=None) -> Path:
    """Give a fake run's validation cases saved probabilities (as training's final evaluation
    writes them) of the given confidence, optionally re-predicting with other shifts."""
    for pred in sorted((run_dir / "validation" / "predictions").glob("*.nii.gz")):
        case = pred.name[: -len(".nii.gz")]
        labels = cube((shifts or SHIFTS)[case])
        if shifts:
            pred.unlink()
            save(labels, pred)
        p1 = np.where(labels == 1, confidence, 1 - confidence).astype(np.float32)
        np.savez_compressed(pred.with_name(f"{case}.npz"), probabilities=np.stack([1 - p1, p1], -1))
    return run_dir


def test_configurations_and_their_ensembles_are_ranked_by_crossval_dice(tmp_path):
    from segshare.evaluation.configurations import find_best_configuration

    other = dict.fromkeys(SHIFTS, 0) | {"case_6": 1}  # B is better than A, except nowhere worse
    by_config = {
        "a": [_with_probabilities(write_run(tmp_path / "a" / str(k), k), 0.7) for k in FOLDS],
        "b": [
            _with_probabilities(write_run(tmp_path / "b" / str(k), k), 0.9, other) for k in FOLDS
        ],
    }
    (by_config["b"][0] / "parameters.json").write_text(json.dumps({"unique_trainable": 1234}))
    out = tmp_path / "compare"
    best = find_best_configuration(by_config, out, num_workers=1, progress=False)
    scores = {row["name"]: row["foreground_dice"] for row in best["ranking"]}
    assert scores["a"] == pytest.approx(4.75 / 7)
    assert scores["b"] == pytest.approx((6 + 3 / 4) / 7)
    # the more confident b wins every disagreement: the ensemble labels are b's
    assert scores["a+b"] == pytest.approx(scores["b"])
    assert [row["name"] for row in best["ranking"]][-1] == "a"
    # b against the reference a, case by case: better on 5 cases, worse on none
    rows = {row["name"]: row for row in best["ranking"]}
    versus = rows["b"]["versus_reference"]
    assert best["reference"] == "a" and "versus_reference" not in rows["a"]
    assert versus["mean_difference"] == pytest.approx(2.0 / 7)
    assert (versus["num_cases"], versus["better_cases"], versus["worse_cases"]) == (7, 5, 0)
    assert 0 < versus["ci95"][0] < versus["ci95"][1]
    assert rows["b"]["unique_parameters"] == 1234 and rows["a"]["unique_parameters"] is None
    assert rows["a"]["fold_dice"]["sd"] > 0 and "fold_dice" not in rows["a+b"]
    assert best["best"]["name"] in ("b", "a+b")
    ensemble = nib.load(out / "ensembles" / "a+b" / "predictions" / "case_1.nii.gz")
    np.testing.assert_array_equal(np.asarray(ensemble.dataobj), cube(0))
    on_disk = json.loads((out / "best_configuration.json").read_text())
    assert on_disk["predict_command"].startswith("segshare-predict model_path=[")
    assert all(run in on_disk["predict_command"] for run in on_disk["best"]["runs"])
    assert (
        out / best["best"]["name"].replace("a+b", "ensembles/a+b") / "postprocessing.json"
    ).is_file()

    (by_config["a"][0] / "validation" / "predictions" / "case_0.npz").unlink()
    with pytest.raises(ValueError, match=r"configuration 'a': no saved probabilities .*case_0"):
        find_best_configuration(by_config, tmp_path / "again", num_workers=1, progress=False)
    with pytest.raises(ValueError, match="at least two configurations"):
        find_best_configuration({"a": by_config["a"]}, tmp_path / "one", num_workers=1)


def test_the_app_compares_configurations_given_as_runs_by_config(tmp_path):
    from segshare.crossval import format_ranking

    runs = {
        name: [_with_probabilities(write_run(tmp_path / name / str(k), k), c) for k in FOLDS]
        for name, c in (("none", 0.8), ("stage", 0.7))
    }
    listing = ",".join(f"{n}:[{','.join(map(str, r))}]" for n, r in runs.items())
    best = run(_compose(f"runs_by_config={{{listing}}}", f"output={tmp_path / 'cmp'}"))
    names = sorted(row["name"] for row in best["ranking"])
    assert names == ["none", "none+stage", "stage"]  # equal labels: every candidate ties
    assert (tmp_path / "cmp" / "best_configuration.json").is_file()
    assert (tmp_path / "cmp" / "configurations.png").is_file()
    assert "none+stage" in (tmp_path / "cmp" / "report.html").read_text()
    text = format_ranking(best, str(tmp_path / "cmp"))
    assert "predict with: segshare-predict model_path=[" in text
    assert "vs none: difference [95 % CI], Wilcoxon p" in text and "(reference)" in text
    assert "+0.0000 [+0.0000, +0.0000], p 1" in text  # stage predicts what none predicts
    with pytest.raises(ValueError, match="not both"):
        run(_compose(f"runs=[{runs['none'][0]}]", f"runs_by_config={{{listing}}}", "output=x"))


def test_a_foreign_predictions_folder_is_never_replaced_and_stale_decisions_go(runs, tmp_path):
    foreign = tmp_path / "predict_run"
    save(cube(), foreign / "predictions" / "mine.nii.gz")
    with pytest.raises(ValueError, match="already holds predictions/ that segshare-crossval did"):
        merge(runs, foreign)
    assert (foreign / "predictions" / "mine.nii.gz").is_file()
    out = tmp_path / "cv"
    merge(runs, out)
    assert (out / "postprocessing.json").is_file()
    merge(runs, out, postprocessing=False)  # a re-merge replaces the earlier one, decision too
    assert not (out / "postprocessing.json").exists() and not (out / "postprocessed").exists()


def test_configuration_comparisons_refuse_unequal_folds_and_name_the_configuration(tmp_path):
    from segshare.evaluation.configurations import find_best_configuration

    a = [_with_probabilities(write_run(tmp_path / "a" / str(k), k), 0.7) for k in FOLDS]
    with pytest.raises(ValueError, match=r"configuration 'b': .*in no run's validation"):
        find_best_configuration({"a": a, "b": a[:2]}, tmp_path / "x", num_workers=1)
    with pytest.raises(ValueError, match="runs_by_config must map each configuration"):
        run(_compose("runs_by_config=foo", f"output={tmp_path / 'y'}"))


def test_a_merge_of_region_runs_is_scored_per_region(tmp_path):
    """Runs trained with regions: the merge's dataset.json carries them, and the merged summary
    scores every region as well as every value."""
    runs = [write_run(tmp_path / "folds" / str(k), k) for k in FOLDS]
    for run_dir in runs:
        plan = Plan.load(run_dir / "plan.json")
        plan.regions, plan.regions_class_order, plan.num_classes = {"bright region": [1]}, [1], 1
        plan.save(run_dir / "plan.json")
        info = json.loads((run_dir / RUN_FILE).read_text())
        info["num_classes"] = 1
        (run_dir / RUN_FILE).write_text(json.dumps(info))
    summary = merge(runs, tmp_path / "cv", postprocessing=False)
    meta = json.loads((tmp_path / "cv" / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "bright region": [1]}
    assert meta["regions_class_order"] == [1]
    want = np.mean([dice(c) for c in SHIFTS])
    assert summary["region_mean"]["bright region"]["Dice"] == pytest.approx(want)
    assert summary["foreground_mean"]["Dice"] == pytest.approx(want)  # the one value, label 1
