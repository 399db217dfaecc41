"""The folder evaluation, its outputs, and the Hydra app composed from the real config."""

from __future__ import annotations

import csv
import json
import math
import shutil

import nibabel as nib
import numpy as np
import pytest
from hydra import compose, initialize_config_module

from segshare.evaluate import run
from segshare.evaluation import evaluate_folders
from segshare.evaluation.metrics import compute_case_metrics

from .conftest import HIPPOCAMPUS, SPACING, blob_labels, save_label


def _evaluate(folders, out, **kwargs):
    """evaluate_folders on the fixture folders, serial and quiet unless told otherwise."""
    kwargs = {"num_workers": 1, "progress": False, **kwargs}
    return evaluate_folders(folders["pred"], folders["ref"], out, **kwargs)


def test_outputs_match_direct_metrics(label_folders, tmp_path):
    out = tmp_path / "out"
    summary = _evaluate(
        label_folders,
        out,
        images_dir=label_folders["images"],
    )
    for name in ("summary.json", "metrics.csv", "report.md", "report.html"):
        assert (out / name).is_file(), name
    assert summary["labels"] == {"1": "left", "2": "right"}
    assert summary["num_missing_predictions"] == 1
    assert summary["missing_predictions"][0]["case_id"] == "case_3"
    assert [c["case_id"] for c in summary["metric_per_case"]] == ["case_0", "case_1", "case_2"]
    direct = compute_case_metrics(
        blob_labels(seed=1, shift=(1, 0, -1)), blob_labels(seed=1), [1, 2], SPACING
    )
    on_disk = json.loads((out / "summary.json").read_text())
    for label in (1, 2):
        got = on_disk["metric_per_case"][1]["metrics"][str(label)]
        for metric, value in direct[label].items():
            assert got[metric] == pytest.approx(value), (label, metric)
    dice_1 = [c["metrics"]["1"]["Dice"] for c in on_disk["metric_per_case"]]
    assert on_disk["mean"]["1"]["Dice"] == pytest.approx(np.mean(dice_1))
    assert on_disk["foreground_mean"]["Dice"] == pytest.approx(
        (on_disk["mean"]["1"]["Dice"] + on_disk["mean"]["2"]["Dice"]) / 2
    )
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * 2 * 13
    assert {r["metric"] for r in rows} >= {"Dice", "HD95", "NSD", "VolDiff_pct"}
    md = (out / "report.md").read_text()
    assert "case_3" in md and "Missing predictions (1)" in md
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2  # box plots + overlays
    assert "src='http" not in html and 'src="http' not in html


def test_missing_as_empty_and_strict_json(label_folders, tmp_path):
    out = tmp_path / "strict"
    summary = _evaluate(
        label_folders,
        out,
        labels=[1, 2, 3],
        missing_as_empty=True,
        strict_json=True,
        num_workers=2,
        progress=False,
        report=False,
    )
    case3 = [c for c in summary["metric_per_case"] if c["case_id"] == "case_3"][0]
    assert case3["prediction_missing"] is True
    assert case3["metrics"]["1"]["Dice"] == 0.0 and math.isinf(case3["metrics"]["1"]["HD95"])
    text = (out / "summary.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    data = json.loads(text)
    assert data["mean"]["3"]["Dice"] is None  # label 3 absent everywhere: NaN -> null
    assert data["num_missing_predictions"] == 1


def test_nnunet_nan_tokens_by_default(label_folders, tmp_path):
    summary = _evaluate(
        label_folders,
        tmp_path / "o",
        labels=[2, 5],
        report=False,
    )
    assert math.isnan(summary["mean"]["5"]["Dice"])
    text = (tmp_path / "o" / "summary.json").read_text()
    assert '"Dice": NaN' in text
    assert list(json.loads(text)["mean"]) == ["2", "5"]


def test_mismatched_affine_names_both_files(label_folders, tmp_path):
    bad = label_folders["pred"] / "case_0.nii.gz"
    save_label(blob_labels(), bad, spacing=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="affines") as info:
        _evaluate(
            label_folders,
            tmp_path / "x",
        )
    assert str(bad) in str(info.value) and "labelsTr/case_0.nii.gz" in str(info.value)
    save_label(blob_labels(shape=(33, 34, 36)), bad)
    with pytest.raises(ValueError, match=r"\(33, 34, 36\)"):
        _evaluate(
            label_folders,
            tmp_path / "x",
        )


def _compose(folders, tmp_path, *extra, ref=None):
    """The real evaluate.yaml with pred/ref/output pointed at the test folders."""
    overrides = [
        f"pred={folders['pred']}",
        f"ref={ref or folders['ref']}",
        f"output={tmp_path / 'app'}",
        "progress=false",
        *extra,
    ]
    with initialize_config_module(version_base="1.3", config_module="segshare.conf"):
        return compose(config_name="evaluate", overrides=overrides)


def test_hydra_app_overrides(label_folders, tmp_path):
    cfg = _compose(
        label_folders, tmp_path, "labels=[2]", "nsd_tolerance_mm=2.5", "hd95=medpy", "num_workers=1"
    )
    summary = run(cfg)
    assert list(summary["mean"]) == ["2"]
    assert summary["settings"]["nsd_tolerance_mm"] == 2.5
    assert summary["settings"]["hd95"] == "medpy"
    assert (tmp_path / "app" / "report.html").is_file()


def test_hydra_app_bad_values(label_folders, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        run(_compose(label_folders, tmp_path, ref=tmp_path / "nope"))
    with pytest.raises(ValueError, match="'max'"):
        run(_compose(label_folders, tmp_path, "hd95=max"))
    with pytest.raises(ValueError, match="-1"):
        run(_compose(label_folders, tmp_path, "labels=[1,-1]"))


@pytest.mark.realdata
def test_hippocampus_against_perturbed_copy(tmp_path):
    refs = HIPPOCAMPUS / "labelsTr"
    if not refs.is_dir():
        pytest.skip(f"real data not found at {HIPPOCAMPUS}")
    ref_dir, pred_dir = tmp_path / "labelsTr", tmp_path / "pred"
    ref_dir.mkdir()
    pred_dir.mkdir()
    shutil.copy(HIPPOCAMPUS / "dataset.json", tmp_path / "dataset.json")
    names = sorted(p.name for p in refs.glob("*.nii.gz"))[:4]
    for i, name in enumerate(names):
        shutil.copy(refs / name, ref_dir / name)
        if i == 3:
            continue  # a missing prediction
        img = nib.load(str(refs / name))
        lab = np.asanyarray(img.dataobj)
        pred = lab if i == 0 else np.roll(lab, i, axis=0)
        nib.save(nib.Nifti1Image(pred, img.affine, img.header), str(pred_dir / name))
    summary = evaluate_folders(
        pred_dir,
        ref_dir,
        tmp_path / "out",
        images_dir=HIPPOCAMPUS / "imagesTr",
    )
    assert summary["labels"] == {"1": "Anterior", "2": "Posterior"}
    first = summary["metric_per_case"][0]["metrics"]
    assert first["1"]["Dice"] == 1.0 and first["2"]["HD95"] == 0.0
    assert summary["metric_per_case"][2]["metrics"]["1"]["Dice"] < 1.0
    assert summary["num_missing_predictions"] == 1


def test_cli_error_is_one_line_without_traceback(label_folders, tmp_path):
    import subprocess
    import sys

    # A real process: Hydra's logging setup inside pytest's captured streams is not the CLI.
    argv = [
        sys.executable,
        "-m",
        "segshare.evaluate",
        f"pred={label_folders['pred']}",
        f"ref={tmp_path / 'nope'}",
        f"output={tmp_path / 'o'}",
        f"hydra.run.dir={tmp_path / 'h'}",
    ]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "segshare-evaluate: error: folder not found" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_report_with_a_label_absent_everywhere(label_folders, tmp_path):
    out = tmp_path / "absent"
    _evaluate(label_folders, out, labels=[1, 7], images_dir=label_folders["images"])
    md = (out / "report.md").read_text()
    assert "| Dice | 7 (7) | NaN | NaN | NaN | 0 | 0 |" in md
    assert (out / "overlays.png").stat().st_size > 0


def test_matching_by_case_id_and_unmatched_predictions(label_folders, tmp_path):
    pred = label_folders["pred"]
    nib.save(nib.load(str(pred / "case_2.nii.gz")), str(pred / "case_2.nii"))
    (pred / "case_2.nii.gz").unlink()
    save_label(blob_labels(), pred / "extra.nii.gz")
    summary = _evaluate(label_folders, tmp_path / "m", report=False)
    files = {c["case_id"]: c["prediction_file"] for c in summary["metric_per_case"]}
    assert files["case_2"].endswith("case_2.nii")
    assert summary["unmatched_predictions"] == [str(pred / "extra.nii.gz")]
    assert summary["num_missing_predictions"] == 1


def test_unreadable_or_non_integer_prediction_names_the_file(label_folders, tmp_path):
    bad = label_folders["pred"] / "case_1.nii.gz"
    ref_img = nib.load(str(label_folders["ref"] / "case_1.nii.gz"))
    values = np.asanyarray(ref_img.dataobj).astype(np.float32) + 0.25
    nib.save(nib.Nifti1Image(values, ref_img.affine), str(bad))
    with pytest.raises(ValueError, match="non-integer") as info:
        _evaluate(label_folders, tmp_path / "x")
    assert str(bad) in str(info.value)
    bad.write_bytes(b"not a nifti")
    with pytest.raises(ValueError, match="cannot read NIfTI file") as info:
        _evaluate(label_folders, tmp_path / "x")
    assert str(bad) in str(info.value)
