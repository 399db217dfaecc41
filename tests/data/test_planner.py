"""The experiment planner: nnU-Net's rules on fabricated fingerprints, refusals, overrides, and the
plan written by preprocessing."""

from __future__ import annotations

import dataclasses

import pytest

from segshare.data.planner import (
    CPU_STEP_GFLOPS,
    MIN_BASE_FEATURES,
    PlannerSettings,
    apply_configuration,
    estimate_memory_gb,
    estimate_step_gflops,
    format_configurations,
    plan_configurations,
    plan_topology,
)

SETTINGS = PlannerSettings(
    memory_gb=8.0,
    base_features=32,
    max_features_3d=320,
    max_features_2d=512,
    block="plain",
    decoder_blocks=2,
)


def _fingerprint(shape, spacing, cases=20):
    ids = [f"c{i:03d}" for i in range(cases)]
    return {
        "cropped_shapes": dict.fromkeys(ids, list(shape)),
        "spacings": dict.fromkeys(ids, list(spacing)),
    }


def test_hippocampus_like_data_get_nnunets_patch_and_topology():
    """195 cases of 35x50x36 voxels at 1 mm (the hippocampus medians): nnU-Net's 40x56x40."""
    plans = plan_configurations(
        _fingerprint((35, 50, 36), (1, 1, 1), 195), [1, 1, 1], 1, 3, SETTINGS
    )
    full = plans["3d_fullres"]
    assert full.patch_size == (40, 56, 40) and full.median_shape == (35, 50, 36)
    assert full.strides == [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]]
    assert full.kernel_sizes == [[3, 3, 3]] * 4 and full.features == [32, 64, 128, 256]
    # batch: at most the patches covering 5 % of the voxels (195 * 35*50*36 * 0.05 / 40*56*40)
    assert full.batch_size == round(0.05 * 195 * 35 * 50 * 36 / (40 * 56 * 40)) == 7
    assert full.estimated_memory_gb <= SETTINGS.memory_gb
    assert plans["2d"].patch_size == (56, 40) and plans["2d"].slice_axis == 0
    assert "3d_lowres" not in plans  # the patch covers the whole median case
    assert "3d_fullres: patch [40, 56, 40], batch 7" in format_configurations(plans)


def test_thick_slices_pool_that_axis_late_with_kernel_1_first():
    fingerprint = _fingerprint((200, 210, 20), (0.7, 0.7, 4.0))
    plans = plan_configurations(fingerprint, [0.7, 0.7, 4.0], 1, 3, SETTINGS)
    full = plans["3d_fullres"]
    z_strides = [s[2] for s in full.strides]
    z_kernels = [k[2] for k in full.kernel_sizes]
    assert z_kernels[:2] == [1, 1] and z_kernels[-1] == 3  # 1 along z while z is > 2x finer
    first_z_pool = z_strides.index(2)
    assert first_z_pool >= 3 and all(s[:2] == [2, 2] for s in full.strides[1:first_z_pool])
    assert full.patch_size[2] == 20 and full.patch_size[2] % (2 ** z_strides.count(2)) == 0
    assert plans["2d"].slice_axis == 2 and len(plans["2d"].patch_size) == 2


def test_topology_rules_and_patch_rounding():
    strides, kernels, patch = plan_topology([1.0, 1.0, 1.0], [33, 17, 9])
    assert strides == [[1, 1, 1], [2, 2, 2], [2, 2, 1], [2, 1, 1]]
    assert kernels == [[3, 3, 3]] * 4
    assert patch == [40, 20, 10]  # multiples of 8, 4, 2
    _, kernels, _ = plan_topology([1.0, 1.0, 2.5], [64, 64, 32])
    assert kernels[0] == [3, 3, 1] and kernels[-1] == [3, 3, 3]


def test_large_volumes_get_a_lowres_configuration_and_a_patch_within_budget():
    plans = plan_configurations(
        _fingerprint((512, 512, 400), (0.8, 0.8, 1.0)), [0.8, 0.8, 1.0], 1, 3, SETTINGS
    )
    full, low = plans["3d_fullres"], plans["3d_lowres"]
    assert full.batch_size == 2 and full.estimated_memory_gb <= 8.0
    assert all(p < m for p, m in zip(full.patch_size, full.median_shape, strict=True))
    assert all(lo > fu for lo, fu in zip(low.spacing, full.spacing, strict=True))
    smaller = plan_configurations(
        _fingerprint((512, 512, 400), (0.8, 0.8, 1.0)),
        [0.8, 0.8, 1.0],
        1,
        3,
        dataclasses.replace(SETTINGS, memory_gb=4.0),
    )["3d_fullres"]
    assert smaller.estimated_memory_gb <= 4.0 and smaller.patch_size < full.patch_size


def test_memory_estimate_grows_with_batch_and_patch():
    args = ([[1, 1, 1], [2, 2, 2]], [[3, 3, 3]] * 2, [8, 16], [1, 1], "plain", 2, 1, 2)
    one = estimate_memory_gb([32, 32, 32], *args, 1)
    assert estimate_memory_gb([32, 32, 32], *args, 2) > one
    assert estimate_memory_gb([64, 32, 32], *args, 1) > one


def test_too_small_cases_and_budgets_are_refused_with_the_reason():
    with pytest.raises(ValueError, match=r"median case is \[6, 6, 2\] voxels .* too small"):
        plan_configurations(_fingerprint((6, 6, 2), (1, 1, 1)), [1, 1, 1], 1, 2, SETTINGS)
    tiny_budget = dataclasses.replace(SETTINGS, memory_gb=0.001)
    with pytest.raises(ValueError, match=r"plan.memory_gb=0.001 does not fit a batch of 2"):
        plan_configurations(_fingerprint((64, 64, 64), (1, 1, 1)), [1, 1, 1], 1, 2, tiny_budget)
    with pytest.raises(ValueError, match="plan.memory_gb must be > 0"):
        dataclasses.replace(SETTINGS, memory_gb=0)


def test_explicit_settings_win_and_are_reported():
    plans = plan_configurations(
        _fingerprint((35, 50, 36), (1, 1, 1), 195), [1, 1, 1], 1, 3, SETTINGS
    )
    full = plans["3d_fullres"]
    chosen, overrides = apply_configuration(full, {"data.patch_size": [32, 32, 32]})
    assert chosen["data.patch_size"] == [32, 32, 32] and chosen["data.batch_size"] == 7
    assert chosen["model.strides"] == full.strides and chosen["model.features"] == full.features
    assert overrides == ["data.patch_size=[32, 32, 32] (planned [40, 56, 40])"]
    chosen, _ = apply_configuration(full, {"model.features": [8, 16]})
    assert chosen["model.strides"] is None and chosen["model.kernel_sizes"] is None


def test_preprocessing_writes_the_plan_outside_the_cache_key(synthetic_root, tmp_path):
    from segshare.data.prepare import prepare_dataset

    from .conftest import data_settings

    settings = data_settings(
        f"data.root={synthetic_root}", f"data.preprocessed_dir={tmp_path}", "data.num_workers=1"
    )
    first = prepare_dataset(settings, progress=False, planner=SETTINGS)
    assert set(first.plan.configurations) >= {"3d_fullres", "2d"}
    again = prepare_dataset(
        settings, progress=False, planner=dataclasses.replace(SETTINGS, memory_gb=0.5)
    )
    assert again.cache_dir == first.cache_dir  # the network plan is not preprocessing
    from segshare.data.preprocessing import Plan

    saved = Plan.load(tmp_path / "plan.json")
    assert saved.configurations == again.plan.configurations


def test_step_gflops_counts_every_conv_forward_and_backward():
    """Two stages of widths 4 and 8 on a 4x4x4 patch, 3x3x3 kernels, one input channel, 2 classes,
    plain blocks (one conv each), one decoder conv: the multiply-adds by hand, x2 x3 x batch."""
    patch, strides, kernels = [4, 4, 4], [[1, 1, 1], [2, 2, 2]], [[3, 3, 3]] * 2
    macs = (
        64 * 27 * (1 * 4 + 1 * 4 * 4)  # stage 0: entry conv 1->4, one block conv 4->4
        + 8 * 27 * (4 * 8 + 1 * 8 * 8)  # stage 1 at 2x2x2: entry 4->8, block 8->8
        + 64 * 8 * 4  # transposed conv 8->4 (kernel = stride: one tap per output voxel)
        + 64 * 27 * 4 * (2 * 4)  # decoder conv on the concatenation 8->4
        + 64 * 4 * 2  # 1x1 head
    )
    args = (patch, strides, kernels, [4, 8], [1, 1], "plain", 1, 1, 2)
    assert estimate_step_gflops(*args, 1) == pytest.approx(6 * macs / 1e9)
    assert estimate_step_gflops(*args, 3) == pytest.approx(3 * estimate_step_gflops(*args, 1))


def test_a_compute_budget_lowers_the_batch_then_the_widths_then_the_patch():
    """The CPU budget keeps nnU-Net's patch for the hippocampus and pays with batch and widths."""
    fingerprint = _fingerprint((35, 50, 36), (1, 1, 1), 195)
    residual = dataclasses.replace(SETTINGS, block="residual")
    free = plan_configurations(fingerprint, [1, 1, 1], 1, 3, residual)["3d_fullres"]
    assert free.batch_size == 7 and free.features[0] == 32
    assert free.estimated_step_gflops > 1000  # nnU-Net's network: ~20x the CPU budget

    cpu = dataclasses.replace(residual, compute_gflops=CPU_STEP_GFLOPS)
    full = plan_configurations(fingerprint, [1, 1, 1], 1, 3, cpu)["3d_fullres"]
    assert full.patch_size == free.patch_size and full.strides == free.strides
    assert full.batch_size == 2 and full.features == [16, 32, 64, 128]
    assert full.estimated_step_gflops <= CPU_STEP_GFLOPS
    assert "GFLOP per step" in format_configurations({"3d_fullres": full})

    # a budget just under the free plan's step lowers only the batch
    nearly = dataclasses.replace(residual, compute_gflops=0.9 * free.estimated_step_gflops)
    batch_only = plan_configurations(fingerprint, [1, 1, 1], 1, 3, nearly)["3d_fullres"]
    assert batch_only.features == free.features and 2 <= batch_only.batch_size < 7

    # below what the narrowest network costs on this patch, the patch shrinks
    small = dataclasses.replace(residual, compute_gflops=2.0)
    shrunk = plan_configurations(fingerprint, [1, 1, 1], 1, 3, small)["3d_fullres"]
    assert shrunk.features[0] == MIN_BASE_FEATURES and shrunk.estimated_step_gflops <= 2.0
    assert shrunk.patch_size < free.patch_size

    hopeless = dataclasses.replace(residual, compute_gflops=0.01)
    with pytest.raises(ValueError, match=r"plan.compute_gflops=0.01 does not fit a batch of 2"):
        plan_configurations(fingerprint, [1, 1, 1], 1, 3, hopeless)


def test_compute_budget_auto_is_the_cpu_budget_without_a_gpu_and_unbounded_with_one(monkeypatch):
    import segshare.devices

    monkeypatch.setattr(segshare.devices, "accelerator_present", lambda: False)
    assert dataclasses.replace(SETTINGS, compute_gflops="auto").compute_gflops == CPU_STEP_GFLOPS
    monkeypatch.setattr(segshare.devices, "accelerator_present", lambda: True)
    assert dataclasses.replace(SETTINGS, compute_gflops="auto").compute_gflops is None
    for bad in (0, -1.0, "fast"):
        with pytest.raises(ValueError, match="plan.compute_gflops must be > 0"):
            dataclasses.replace(SETTINGS, compute_gflops=bad)
