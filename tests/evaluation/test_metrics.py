"""Metric values against hand-computed cases and a brute-force surface distance."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from segshare.evaluation.metrics import (
    SegmentationMetrics,
    aggregate_means,
    compute_case_metrics,
    global_overlap,
)
from segshare.evaluation.overlap import confusion_matrix, overlap_metrics
from segshare.evaluation.surface import hd95, surface_distances, surface_metrics, surface_voxels


def brute_surface(mask: np.ndarray) -> np.ndarray:
    """Foreground voxels with a 6-neighbour outside the mask or outside the image."""
    padded = np.pad(mask, 1)
    inner = np.ones_like(mask)
    for axis in range(3):
        for step in (-1, 1):
            inner &= np.roll(padded, step, axis=axis)[1:-1, 1:-1, 1:-1]
    return mask & ~inner


def brute_distances(pred: np.ndarray, ref: np.ndarray, spacing) -> tuple[np.ndarray, np.ndarray]:
    sp, sr = brute_surface(pred), brute_surface(ref)
    cp, cr = np.argwhere(sp) * spacing, np.argwhere(sr) * spacing
    d = cdist(cp, cr)
    return d.min(axis=1), d.min(axis=0)


def test_confusion_matrix_counts_every_pair():
    ref = np.array([0, 1, 1, 2, 2, 2, 0])
    pred = np.array([0, 1, 2, 2, 2, 0, 1])
    cm = confusion_matrix(pred, ref)
    expected = np.array([[1, 1, 0], [0, 1, 1], [1, 0, 2]])
    np.testing.assert_array_equal(cm, expected)


def test_overlap_hand_computed():
    ref = np.zeros((5, 6, 7), np.uint8)
    ref[1:3, 1:3, 1:3] = 1  # 8 voxels
    pred = np.zeros_like(ref)
    pred[1:3, 1:3, 1] = 1  # 4 voxels inside
    pred[4, 5, 6] = 1  # 1 false positive
    m = overlap_metrics(pred, ref, [1], voxel_volume_mm3=2.0)[1]
    assert (m["TP"], m["FP"], m["FN"], m["TN"]) == (4, 1, 4, 5 * 6 * 7 - 9)
    assert m["Dice"] == pytest.approx(8 / 13)
    assert m["IoU"] == pytest.approx(4 / 9)
    assert m["VolDiff_ml"] == pytest.approx(-3 * 2.0 / 1000)
    assert m["VolDiff_pct"] == pytest.approx(-37.5)


def test_two_voxels_anisotropic_hand_computed():
    ref = np.zeros((3, 4, 5), np.uint8)
    pred = np.zeros_like(ref)
    ref[1, 1, 0] = 1
    pred[1, 1, 3] = 1
    m = compute_case_metrics(pred, ref, [1], spacing=(1.0, 1.0, 2.0), nsd_tolerance_mm=5.9)[1]
    assert m["HD95"] == pytest.approx(6.0)
    assert m["ASSD"] == pytest.approx(6.0)
    assert m["NSD"] == 0.0
    assert m["Dice"] == 0.0
    m = compute_case_metrics(pred, ref, [1], spacing=(1.0, 1.0, 2.0), nsd_tolerance_mm=6.0)[1]
    assert m["NSD"] == 1.0


def test_empty_conventions():
    ref = np.zeros((9, 10, 11), np.uint8)
    ref[2:5, 2:5, 2:5] = 1
    empty = np.zeros_like(ref)
    both = compute_case_metrics(empty, empty, [1])[1]
    assert all(math.isnan(both[k]) for k in ("Dice", "IoU", "HD95", "ASSD", "NSD", "VolDiff_pct"))
    assert both["VolDiff_ml"] == 0.0
    missing = compute_case_metrics(empty, ref, [1])[1]
    assert missing["Dice"] == 0.0 and missing["NSD"] == 0.0
    assert math.isinf(missing["HD95"]) and math.isinf(missing["ASSD"])
    assert missing["VolDiff_pct"] == -100.0
    spurious = compute_case_metrics(ref, empty, [1])[1]
    assert math.isinf(spurious["HD95"]) and math.isinf(spurious["VolDiff_pct"])


def test_surface_voxels_match_brute_force():
    rng = np.random.default_rng(1)
    mask = rng.random((13, 14, 15)) < 0.6
    np.testing.assert_array_equal(surface_voxels(mask), brute_surface(mask))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_distances_match_brute_force_anisotropic(seed):
    rng = np.random.default_rng(seed)
    spacing = np.array([0.7, 1.3, 2.1])
    ref = np.zeros((13, 14, 15), bool)
    pred = np.zeros_like(ref)
    ref[2:10, 3:11, 4:12] = rng.random((8, 8, 8)) < 0.8
    pred[3:12, 2:9, 5:14] = rng.random((9, 7, 9)) < 0.7
    d_pr, d_rp = surface_distances(pred, ref, spacing)
    b_pr, b_rp = brute_distances(pred, ref, spacing)
    np.testing.assert_allclose(d_pr, b_pr, rtol=1e-12)
    np.testing.assert_allclose(d_rp, b_rp, rtol=1e-12)
    monai = max(np.percentile(b_pr, 95), np.percentile(b_rp, 95))
    medpy = np.percentile(np.concatenate([b_pr, b_rp]), 95)
    assert hd95(pred, ref, spacing) == pytest.approx(monai)
    assert hd95(pred, ref, spacing, variant="medpy") == pytest.approx(medpy)
    m = surface_metrics(
        pred.astype(np.uint8), ref.astype(np.uint8), [1], spacing, nsd_tolerance_mm=1.5
    )[1]
    pooled = np.concatenate([b_pr, b_rp])
    assert m["ASSD"] == pytest.approx(pooled.mean())
    assert m["NSD"] == pytest.approx((pooled <= 1.5).mean())


def test_bbox_crop_equals_full_volume_at_image_border():
    rng = np.random.default_rng(3)
    ref = (rng.random((11, 12, 13)) < 0.5).astype(np.uint8) * 2
    pred = np.roll(ref, 1, axis=0)
    spacing = (1.0, 0.5, 3.0)
    labelled = surface_metrics(pred, ref, [2], spacing)[2]["HD95"]
    full = hd95(pred == 2, ref == 2, spacing)
    b_pr, b_rp = brute_distances(pred == 2, ref == 2, np.array(spacing))
    assert labelled == pytest.approx(full)
    assert full == pytest.approx(max(np.percentile(b_pr, 95), np.percentile(b_rp, 95)))


def test_bad_inputs_raise_with_value():
    ref = np.zeros((4, 5, 6), np.uint8)
    with pytest.raises(ValueError, match="pred holds non-integer"):
        compute_case_metrics(ref + 0.5, ref, [1])
    with pytest.raises(ValueError, match=r"\(4, 5, 6\)"):
        compute_case_metrics(ref[:3], ref, [1])
    with pytest.raises(ValueError, match="spacing"):
        compute_case_metrics(ref, ref, [1], spacing=(1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="'hausdorff'"):
        compute_case_metrics(ref, ref, [1], hd95="hausdorff")


def test_accumulator_nanmean_and_foreground_mean():
    ref = np.zeros((6, 7, 8), np.uint8)
    ref[1:3, 1:3, 1:3] = 1
    metric = SegmentationMetrics(labels=[1, 2])
    metric(ref, ref)  # label 1 perfect, label 2 empty on both sides -> NaN
    metric(np.zeros_like(ref), ref)  # label 1 missed
    mean, fg = metric.aggregate()
    assert mean[1]["Dice"] == pytest.approx(0.5)
    assert math.isnan(mean[2]["Dice"])
    assert math.isnan(fg["Dice"])  # nnU-Net: plain mean over label means
    mean, fg = aggregate_means(metric.results[:1], [1])
    assert fg["Dice"] == 1.0


def test_directed_distances_bit_identical_to_scipy_edt():
    from scipy import ndimage

    from segshare.evaluation.surface import directed_distances

    rng = np.random.default_rng(5)
    a = surface_voxels(rng.random((17, 18, 19)) < 0.3)
    b = surface_voxels(rng.random((17, 18, 19)) < 0.05)
    spacing = (0.9, 1.7, 2.3)
    expected = ndimage.distance_transform_edt(~b, sampling=spacing)[a]
    assert np.array_equal(directed_distances(a, b, spacing), expected)


def test_identical_to_medpy_when_installed():
    binary = pytest.importorskip("medpy.metric.binary")
    rng = np.random.default_rng(7)
    ref = np.zeros((21, 22, 23), np.uint8)
    ref[3:15, 4:18, 5:20] = 1
    pred = np.roll(ref, 2, axis=1) * (rng.random(ref.shape) < 0.9)
    spacing = (0.7, 1.1, 2.4)
    m = compute_case_metrics(pred, ref, [1], spacing, hd95="medpy")[1]
    assert m["Dice"] == binary.dc(pred, ref)
    assert m["HD95"] == binary.hd95(pred, ref, voxelspacing=spacing)


def test_global_dice_differs_from_case_average():
    big = np.zeros((10, 10, 10), np.uint8)
    big[:8] = 1  # 800 voxels, predicted perfectly
    small = np.zeros_like(big)
    small[0, 0, :2] = 1  # 2 voxels, missed
    cases = [
        compute_case_metrics(big, big, [1]),
        compute_case_metrics(np.zeros_like(small), small, [1]),
    ]
    mean, _ = aggregate_means(cases, [1])
    assert mean[1]["Dice"] == pytest.approx(0.5)
    assert global_overlap(cases, [1])[1]["Dice"] == pytest.approx(1600 / 1602)


def test_large_label_values_use_the_wide_path():
    ref = np.zeros((7, 8, 9), np.int16)
    ref[1:4, 1:4, 1:4] = 300
    ref[5, 5, 5] = 17
    pred = ref.copy()
    pred[1, 1, 1] = 0
    m = compute_case_metrics(pred, ref, [17, 300], spacing=(1.0, 2.0, 3.0))
    assert m[17]["Dice"] == 1.0 and m[17]["HD95"] == 0.0
    assert (m[300]["TP"], m[300]["FN"], m[300]["FP"]) == (26, 1, 0)
    assert m[300]["VolDiff_ml"] == pytest.approx(-6.0 / 1000)


def test_the_ignore_label_counts_nowhere():
    ref = np.zeros((6, 6, 6), np.uint8)
    ref[1:3, 1:3, 1:3] = 1
    ref[:, :, 4:] = 9  # not annotated
    pred = np.zeros_like(ref)
    pred[1:3, 1:3, 1:3] = 1
    pred[:, :, 5] = 1  # inside the ignored region: no false positive
    got = compute_case_metrics(pred, ref, [1, 9], ignore_label=9)
    assert list(got) == [1]  # the ignore label is never scored
    m = got[1]
    assert (m["TP"], m["FP"], m["FN"]) == (8, 0, 0) and m["Dice"] == 1.0
    assert m["TN"] == 6 * 6 * 4 - 8  # the 72 ignored voxels are not negatives either
    assert m["HD95"] == 0.0 and m["n_pred"] == 8
    plain = compute_case_metrics(pred, np.where(ref == 9, 0, ref), [1])[1]
    assert plain["FP"] == 36 and plain["Dice"] < 0.5  # without the rule: counted as errors
