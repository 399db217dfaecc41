"""Region-based training (nnU-Net's BraTS setup): the loss, the reconstruction rule, restoring
region probabilities to the scan, ensembles, region metrics, and a BraTS-like synthetic run end to
end (train, predict with TTA and an ensemble, evaluate per region)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from segshare.data.preprocessing import Plan, preprocess_case, restore_to_original
from segshare.inference.predictor import (
    REGION_THRESHOLD,
    probabilities_to_labels,
    regions_to_labels,
    restore_output,
    restored_labels,
)

REGIONS = [[1, 2, 3], [2, 3], [3]]  # whole tumor, tumor core, enhancing
ORDER = [1, 2, 3]


def _region_plan(spacing=(1.0, 1.0, 1.5)) -> Plan:
    return Plan(
        target_spacing=tuple(spacing),
        normalization=["zscore"],
        ct_stats=None,
        labels={"background": 0, "label 1": 1, "label 2": 2},
        in_channels=1,
        num_classes=2,
        regions={"a": [1, 2], "b": [2]},
        regions_class_order=[1, 2],
    )


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def test_region_loss_is_bce_plus_dice_over_the_annotated_voxels():
    from segshare.losses import DiceCELoss

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, (2, 5, 6, 7))
    labels[:, :2] = 4  # the ignore label: above every region value
    logits = rng.normal(size=(2, 5, 6, 7, 3)).astype(np.float32)
    loss = float(DiceCELoss(regions=REGIONS, smooth=1e-5)(labels, logits))
    mask = (labels <= 3)[..., None].astype(np.float64)
    targets = np.stack([np.isin(labels, r) for r in REGIONS], -1) * mask
    p = _sigmoid(logits.astype(np.float64))
    bce = -(targets * np.log(p) + (1 - targets) * np.log(1 - p)) * mask
    bce = bce.sum() / (mask.sum() * 3)
    pm = p * mask
    axes = (0, 1, 2, 3)
    dice = (2 * (pm * targets).sum(axes) + 1e-5) / (pm.sum(axes) + targets.sum(axes) + 1e-5)
    np.testing.assert_allclose(loss, bce + 1 - dice.mean(), rtol=1e-4)
    # the ignored voxels are out of every term: any logits there leave the loss unchanged
    other = logits.copy()
    other[:, :2] = rng.normal(size=other[:, :2].shape) * 10
    np.testing.assert_allclose(float(DiceCELoss(regions=REGIONS)(labels, other)), loss, rtol=1e-5)


def test_region_loss_under_deep_supervision_uses_every_level():
    from segshare.losses import DiceCELoss, deep_supervision_weights, region_dice_bce_loss

    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, (1, 8, 8, 8))
    full = rng.normal(size=(1, 8, 8, 8, 3)).astype(np.float32)
    half = rng.normal(size=(1, 4, 4, 4, 3)).astype(np.float32)
    got = float(DiceCELoss(regions=REGIONS)(labels, [full, half]))
    w = deep_supervision_weights(2)
    want = w[0] * float(region_dice_bce_loss(labels, full, REGIONS)) + w[1] * float(
        region_dice_bce_loss(labels[:, ::2, ::2, ::2], half, REGIONS)
    )
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_regions_to_labels_follows_the_class_order_and_the_threshold():
    probs = np.zeros((1, 2, 5, 3), np.float32)
    probs[0, 0, :, 0] = [0.9, 0.9, 0.9, REGION_THRESHOLD, 0.1]  # whole tumor
    probs[0, 0, :, 1] = [0.1, 0.8, 0.8, 0.1, 0.1]  # tumor core
    probs[0, 0, :, 2] = [0.1, 0.1, 0.7, 0.1, 0.9]  # enhancing, alone in the last voxel
    labels = regions_to_labels(probs, ORDER)
    assert labels.dtype == np.uint8
    # later regions overwrite earlier ones; exactly 0.5 is not above the threshold
    np.testing.assert_array_equal(labels[0, 0], [1, 2, 3, 0, 3])
    np.testing.assert_array_equal(labels[0, 1], [0] * 5)


def test_region_probabilities_restore_to_the_scan_absent_outside_the_crop(tmp_path):
    from tests.inference.conftest import random_scan, write_scan
    from tests.inference.test_predictor import LPS

    data = np.zeros((23, 30, 9))
    data[3:20, 4:27, 1:8] = random_scan((17, 23, 7))  # zero border: the crop is undone too
    affine = LPS.copy()
    affine[:3, :3] = affine[:3, :3] @ np.diag([0.8, 0.9, 3.0])
    scan = write_scan(tmp_path / "a.nii.gz", data, affine)
    plan = _region_plan()
    image, _, props = preprocess_case([scan], None, plan)
    assert props["resampled_shape"] != props["cropped_shape"]
    probs = np.random.default_rng(0).random((*image.shape[:3], 2)).astype(np.float32)
    restored = restore_output(probs, props, plan)
    assert restored.shape == (*data.shape, 2)
    outside = data == 0
    outside[3:20, 4:27, 1:8] = False
    assert np.all(restored[outside] == 0)  # no region outside the crop box
    # inside, the channels are each restored as a plain (linear) restore would
    plain = restore_to_original(np.concatenate([1 - probs[..., :1], probs], -1), props, False)
    np.testing.assert_allclose(restored[~outside], plain[..., 1:][~outside], atol=1e-6)
    labels = restored_labels(probs, props, plan)  # one channel on the scan's grid at a time
    np.testing.assert_array_equal(labels, probabilities_to_labels(restored, plan))
    assert set(np.unique(labels)) == {0, 1, 2}


def _region_run(folder: Path, spacing) -> Path:
    """A run whose 1x1x1 conv predicts region a where the z-scored image > 0, b where > 1."""
    import keras

    from segshare.inference.trained_run import write_run_info

    inputs = keras.Input((None, None, None, 1))
    conv = keras.layers.Conv3D(2, 1, name="head")
    model = keras.Model(inputs, conv(inputs))
    conv.set_weights([np.full((1, 1, 1, 1, 2), 20.0, np.float32), np.array([0.0, -20.0])])
    folder.mkdir(parents=True)
    model.save(folder / "model.keras")
    plan = _region_plan(spacing)
    plan.save(folder / "plan.json")
    write_run_info(folder, plan, (16, 16, 16), sharing="none")
    return folder


def test_an_ensemble_of_region_models_with_different_plans_averages_on_the_scan(tmp_path):
    from segshare.data.discovery import discover_images
    from segshare.inference.ensemble import load_ensemble
    from segshare.inference.predictor import predict_cases
    from segshare.inference.sliding_window import WindowSettings
    from tests.inference.conftest import random_scan, write_scan
    from tests.inference.test_predictor import LPS

    runs = [_region_run(tmp_path / "r1", (1.0, 1.0, 1.0)), _region_run(tmp_path / "r2", (1.6,) * 3)]
    scans = tmp_path / "scans"
    scans.mkdir()
    data = np.zeros((22, 24, 20))
    data[2:20, 3:21, 2:18] = random_scan((18, 18, 16), seed=3)
    write_scan(scans / "s.nii.gz", data, LPS)
    cases = discover_images(scans)
    window = WindowSettings(None, 0.5, 2, 0.125)
    member_probs = []
    for run in runs:
        predictor, _ = load_ensemble(run, window)
        predict_cases(
            predictor, cases, tmp_path / run.name, save_probabilities=True, progress=False
        )
        with np.load(tmp_path / run.name / "s.npz") as npz:
            member_probs.append(npz["probabilities"])
    predictor, _ = load_ensemble(runs, window)
    predict_cases(predictor, cases, tmp_path / "ens", save_probabilities=True, progress=False)
    with np.load(tmp_path / "ens" / "s.npz") as npz:
        mean = npz["probabilities"]
    np.testing.assert_allclose(mean, np.mean(member_probs, axis=0), atol=1e-5)
    labels = np.asarray(nib.load(tmp_path / "ens" / "s.nii.gz").dataobj)
    np.testing.assert_array_equal(labels, regions_to_labels(mean, [1, 2]))
    assert labels[0, 0, 0] == 0 and set(np.unique(labels)) == {0, 1, 2}


def test_region_metrics_score_the_union_of_values_and_skip_ignored_voxels():
    from segshare.evaluation.metrics import compute_region_metrics

    ref = np.zeros((4, 4, 4), np.uint8)
    ref[0] = 1
    ref[1] = 2
    ref[3] = 9  # ignored
    pred = np.zeros_like(ref)
    pred[0] = 2  # right region "whole", wrong label
    pred[1] = 2
    pred[3] = 1  # inside the ignored slab: counted nowhere
    out = compute_region_metrics(
        pred, ref, {"whole": [1, 2], "core": [2]}, ignore_label=9, hd95="monai"
    )
    assert out["whole"]["Dice"] == 1.0 and out["whole"]["FP"] == 0
    assert out["core"]["TP"] == 16 and out["core"]["FP"] == 16
    assert out["core"]["Dice"] == pytest.approx(2 * 16 / (2 * 16 + 16))


def test_a_brats_like_synthetic_run_trains_predicts_and_evaluates_per_region(make_cfg, tmp_path):
    from segshare.data.synthetic import BRATS_CHANNELS
    from segshare.evaluation import evaluate_folders
    from segshare.inference.ensemble import load_ensemble
    from segshare.inference.predictor import predict_cases
    from segshare.inference.sliding_window import WindowSettings
    from segshare.train import train

    run = tmp_path / "run"
    last, objects = train(
        make_cfg("data=synthetic_brats", "data.synthetic.shape_range=[24,28]", run_dir=run)
    )
    root = Path(objects["prepared"].dataset.root)
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["regions_class_order"] == [1, 2, 3]
    assert list(meta["channel_names"].values()) == list(BRATS_CHANNELS)
    plan = Plan.load(run / "plan.json")
    assert plan.regions == {"whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing": [3]}
    assert plan.num_classes == 3 and plan.in_channels == 4
    assert {"val_dice_whole tumor", "val_dice_tumor core", "val_dice_enhancing"} <= set(last)
    # TTA, and an ensemble of the run with itself, saving the probabilities
    predictor, _ = load_ensemble([run, run], WindowSettings(None, 0.5, 2, 0.125), tta=True)
    images = sorted((root / "imagesTs").glob("*.nii.gz"))
    assert len(images) == 4 * 6  # 6 test cases of 4 channel files
    from segshare.data.discovery import discover_images

    out = tmp_path / "pred"
    report = predict_cases(
        predictor, discover_images(root / "imagesTs"), out, save_probabilities=True, progress=False
    )
    assert not report.failed
    for npz in sorted(out.glob("*.npz")):
        with np.load(npz) as data:
            probs = data["probabilities"]
        assert probs.shape[-1] == 3 and probs.min() >= 0 and probs.max() <= 1
        labels = np.asarray(nib.load(npz.with_suffix(".nii.gz")).dataobj)
        np.testing.assert_array_equal(labels, regions_to_labels(probs, [1, 2, 3]))
    summary = evaluate_folders(
        out,
        root / "labelsTs",
        tmp_path / "eval",
        dataset_json=root / "dataset.json",
        progress=False,
    )
    assert set(summary["regions"]) == {"whole tumor", "tumor core", "enhancing"}
    assert set(summary["labels"]) == {"1", "2", "3"}
    whole = summary["region_mean"]["whole tumor"]["Dice"]
    assert np.isfinite(whole) and whole >= summary["mean"]["1"]["Dice"]  # a union is easier
    rows = (tmp_path / "eval" / "metrics.csv").read_text().splitlines()
    assert any(",region,whole tumor,Dice," in r for r in rows)
    assert "## Regions" in (tmp_path / "eval" / "report.md").read_text()
