"""The ignore label end to end: a dataset whose labels leave a slab unannotated (nnU-Net's
``"ignore"``, the highest value) trains, validates and evaluates without ever learning it."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

from segshare.data.preprocessing import Plan
from segshare.data.synthetic import generate_synthetic_dataset
from segshare.evaluation import evaluate_folders
from segshare.train import train

IGNORE = 3  # the synthetic data's labels are 0, 1, 2


def _sparse_dataset(root: Path) -> Path:
    """The synthetic phantoms with the first third of every label map's first axis ignored."""
    generate_synthetic_dataset(root, num_cases=6, seed=5, shape_range=(18, 22))
    for path in sorted((root / "labelsTr").glob("*.nii.gz")):
        img = nib.load(path)
        label = np.asarray(img.dataobj).astype(np.uint8)
        label[: label.shape[0] // 3] = IGNORE
        nib.save(nib.Nifti1Image(label, img.affine, img.header), path)
    meta = json.loads((root / "dataset.json").read_text())
    meta["labels"]["ignore"] = IGNORE
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def test_a_sparse_dataset_trains_validates_and_evaluates_without_the_ignore_label(
    make_cfg, tmp_path
):
    root = _sparse_dataset(tmp_path / "sparse")
    run = tmp_path / "run"
    last, objects = train(
        make_cfg(
            f"data.root={root}",
            f"data.preprocessed_dir={tmp_path / 'pre'}",
            "final_evaluation=true",
            run_dir=run,
        )
    )
    plan = Plan.load(run / "plan.json")
    assert plan.ignore_label == IGNORE and plan.num_classes == IGNORE
    assert "ignore" not in plan.labels
    cache = objects["prepared"].cache_dir
    located = [json.loads(p.read_text()).get("class_locations") for p in cache.glob("*.json")]
    located = [loc for loc in located if loc is not None]
    assert len(located) == 6 and all("1" in loc for loc in located)
    assert not any(str(IGNORE) in loc for loc in located)  # no patch centred on unannotated
    assert np.isfinite(last["val_dice_fg_mean"])
    predictions = sorted((run / "validation" / "predictions").glob("*.nii.gz"))
    assert predictions
    for path in predictions:
        assert IGNORE not in np.unique(np.asarray(nib.load(path).dataobj))
    summary = json.loads((run / "validation" / "summary.json").read_text())
    assert sorted(summary["labels"]) == ["1", "2"] and summary["settings"]["ignore_label"] == 3
    assert summary["unknown_labels"] == []
    # segshare-evaluate finds the ignore label in dataset.json on its own
    again = evaluate_folders(
        run / "validation" / "predictions",
        run / "validation" / "references",
        tmp_path / "eval",
        dataset_json=root / "dataset.json",
        num_workers=1,
        progress=False,
        report=False,
    )
    assert again["settings"]["ignore_label"] == IGNORE
    assert again["foreground_mean"]["Dice"] == summary["foreground_mean"]["Dice"]
    case = again["metric_per_case"][0]
    ref = np.asarray(nib.load(case["reference_file"]).dataobj)
    assert case["metrics"]["1"]["TN"] + case["metrics"]["1"]["TP"] + case["metrics"]["1"][
        "FP"
    ] + case["metrics"]["1"]["FN"] == int(np.count_nonzero(ref != IGNORE))
