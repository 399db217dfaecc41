"""The experiment planner: a network topology, patch and batch for every configuration, derived
from the dataset's fingerprint and a memory budget by nnU-Net's rules (ExperimentPlanner v2).

For a configuration (``3d_fullres``, ``2d``, and ``3d_lowres`` where the data are large), on the
grid of its target spacing:

1. **Median shape** of the cases after cropping and resampling to the target spacing.
2. **Patch**: the shape of a cube of ``256**3`` voxels (``2048**2`` in 2D) made isotropic in
   millimetres (so a thick axis gets fewer voxels), clipped to the median shape.
3. **Topology** (:func:`plan_topology`): stage 0 has stride 1; a stage pools an axis (stride 2)
   while that axis's current spacing is within 2x of the finest current spacing and its feature
   map stays >= 4 voxels (``MIN_FEATURE_MAP``) after pooling; an axis whose current spacing is
   more than 2x the finest gets kernel 1 (e.g. 1x3x3 in the first stages of thick-slice data),
   and keeps kernel 3 once it has it; stages stop when no axis can be pooled. The patch is then
   rounded up to a multiple of each axis's total stride.
4. **Widths** double per stage from ``base_features`` up to ``max_features`` (nnU-Net: 32 and
   320 in 3D, 512 in 2D); blocks per stage as the model's block kind has them.
5. **Memory budget** (:func:`estimate_memory_gb`): while a batch of 2 does not fit
   ``memory_gb``, the axis whose patch is largest relative to the median shape is shrunk by its
   stride divisor and the topology is planned anew. The estimate counts the activations a
   training step keeps for the backward pass (per conv: its output, the normalised and the
   activated map; per decoder stage also the upsampled map and the concatenation), in 16-bit
   values (mixed precision, as nnU-Net trains), plus parameters, gradients and two optimizer
   slots in float32. It is an estimate, not a measurement; nnU-Net's 8 GB reference budget gives
   patches of the size nnU-Net plans.
6. **Batch**: as many patches as fit the budget, at least 2, and at most the number of patches
   that cover 5 % of the dataset's voxels.
7. **Compute budget** (``compute_gflops``; :func:`estimate_step_gflops`): where a training step
   may cost at most that many GFLOP (``auto``: :data:`CPU_STEP_GFLOPS` when the backend sees no
   GPU, unbounded with one), the step is brought under it by, in this order, lowering the batch
   (not below 2), narrowing the widths (``base_features`` in steps of :data:`MIN_BASE_FEATURES`:
   32, 24, 16, 8), then shrinking the patch as the memory rule does. On a GPU memory binds; on a
   CPU time does: ``trainer.budget_minutes`` buys ``budget / step time`` steps, and nnU-Net's
   network for the hippocampus (~1,200 GFLOP per step) would get ~14x fewer steps than the
   planned 16-128 widths at batch 2 (85 GFLOP), too few to converge (``docs/planning.md``).

``3d_lowres`` is planned only when the 3d_fullres patch covers less than a quarter of the median
volume (nnU-Net's rule): its spacing grows by 1.01x per step (the coarser axes first held back)
until the patch covers at least a quarter of its median shape, or the spacing doubled.

``2d`` plans slices across the thick axis: the slice axis is the axis of largest spacing (the
first, for isotropic data), and the 2D topology is planned on the other two.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

MIN_FEATURE_MAP = 4
#: The compute budget (GFLOP per training step) of ``compute_gflops=auto`` without a GPU:
#: ~1 s per step on 2 cores of an AMD EPYC (~100 GFLOP/s in TensorFlow float32), so ~2,500 steps
#: in 45 minutes.
CPU_STEP_GFLOPS = 100.0
#: The compute budget narrows the first stage's width in steps of this, down to it.
MIN_BASE_FEATURES = 8
BLOCKS = ("residual", "plain")
CONFIGURATIONS = ("3d_fullres", "2d", "3d_lowres")


@dataclass(frozen=True)
class PlannerSettings:
    """The budget and limits of planning (``conf/planner/default.yaml``).

    Attributes:
        memory_gb: device memory a training step may use (nnU-Net's reference: 8).
        base_features: width of the first stage.
        max_features_3d: width cap of 3D networks (nnU-Net: 320).
        max_features_2d: width cap of 2D networks (nnU-Net: 512).
        block: the model's block kind (``residual`` or ``plain``), for the blocks per stage.
        decoder_blocks: conv units per decoder stage.
        compute_gflops: GFLOP one training step may cost (forward and backward); None =
            unbounded; ``"auto"`` = :data:`CPU_STEP_GFLOPS` when the Keras backend sees no GPU,
            else None (resolved on construction).
    """

    memory_gb: float
    base_features: int
    max_features_3d: int
    max_features_2d: int
    block: str
    decoder_blocks: int
    compute_gflops: float | str | None = None

    def __post_init__(self) -> None:
        if self.compute_gflops == "auto":
            from segshare.devices import accelerator_present

            budget = None if accelerator_present() else CPU_STEP_GFLOPS
            object.__setattr__(self, "compute_gflops", budget)
        if self.compute_gflops is not None and not (
            isinstance(self.compute_gflops, int | float) and self.compute_gflops > 0
        ):
            raise ValueError(
                f"plan.compute_gflops must be > 0, null or 'auto', got {self.compute_gflops!r}."
            )
        if not float(self.memory_gb) > 0:
            raise ValueError(f"plan.memory_gb must be > 0, got {self.memory_gb!r}.")
        if self.block not in BLOCKS:
            raise ValueError(f"plan.block must be one of {BLOCKS}, got {self.block!r}.")
        if int(self.base_features) < 1 or int(self.decoder_blocks) < 1:
            raise ValueError(
                f"plan.base_features and plan.decoder_blocks must be >= 1, got "
                f"{self.base_features!r} and {self.decoder_blocks!r}."
            )


@dataclass(frozen=True)
class Configuration:
    """Everything the network and the sampler need for one configuration.

    Attributes:
        name: ``3d_fullres``, ``2d`` or ``3d_lowres``.
        spacing: target spacing (mm, RAS) of this configuration's grid.
        median_shape: median case shape on that grid (3D, RAS).
        patch_size: training patch (``spatial_dims`` entries; 2D: the two in-plane axes).
        slice_axis: for ``2d``, the RAS axis the slices are taken across; None in 3D.
        strides: per stage, per axis.
        kernel_sizes: per stage, per axis.
        features: width per stage.
        blocks_per_stage: blocks after each stage's entry conv.
        batch_size: patches per batch.
        estimated_memory_gb: the estimate for ``batch_size`` patches.
        estimated_step_gflops: GFLOP of one training step of ``batch_size`` patches.
    """

    name: str
    spacing: tuple[float, ...]
    median_shape: tuple[int, ...]
    patch_size: tuple[int, ...]
    slice_axis: int | None
    strides: list[list[int]]
    kernel_sizes: list[list[int]]
    features: list[int]
    blocks_per_stage: list[int]
    batch_size: int
    estimated_memory_gb: float
    estimated_step_gflops: float | None = None

    @property
    def spatial_dims(self) -> int:
        """2 or 3."""
        return len(self.patch_size)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (``plan.json``'s ``configurations`` entry), lists for tuples."""
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Configuration:
        """Inverse of :meth:`to_dict`."""
        d = dict(d)
        for key in ("spacing", "median_shape", "patch_size"):
            d[key] = tuple(d[key])
        return cls(**d)


def plan_topology(
    spacing: Sequence[float], patch_size: Sequence[int]
) -> tuple[list[list[int]], list[list[int]], list[int]]:
    """Per-stage strides and kernel sizes for a patch on a grid of ``spacing`` (see module doc).

    Returns:
        ``(strides, kernel_sizes, patch)``: ``patch`` is ``patch_size`` rounded up to a multiple
        of each axis's total stride.
    """
    current = [float(s) for s in spacing]
    size = [int(p) for p in patch_size]
    dims = len(size)
    kernel = [3 if s <= 2 * min(current) else 1 for s in current]
    strides, kernels = [[1] * dims], [kernel[:]]
    while True:
        finest = min(current)
        pool = [current[a] <= 2 * finest and size[a] >= 2 * MIN_FEATURE_MAP for a in range(dims)]
        if not any(pool):
            break
        strides.append([2 if p else 1 for p in pool])
        size = [s // 2 if p else s for s, p in zip(size, pool, strict=True)]
        current = [s * 2 if p else s for s, p in zip(current, pool, strict=True)]
        finest = min(current)
        kernel = [
            3 if k == 3 or c <= 2 * finest else 1 for k, c in zip(kernel, current, strict=True)
        ]
        kernels.append(kernel[:])
    divisor = [math.prod(st[a] for st in strides) for a in range(dims)]
    patch = [int(math.ceil(p / d) * d) for p, d in zip(patch_size, divisor, strict=True)]
    return strides, kernels, patch


def stage_widths(num_stages: int, base: int, cap: int) -> list[int]:
    """``base * 2**s`` per stage, at most ``cap``."""
    return [min(int(base) * 2**s, int(cap)) for s in range(num_stages)]


def blocks_for(num_stages: int, block: str) -> list[int]:
    """Default blocks per stage (the planner's and :func:`segshare.models.build_unet`'s): residual
    ``1`` for the first stage and ``2`` for the others; plain ``1`` everywhere (two convs per
    stage)."""
    if block == "residual":
        return [1] + [2] * (num_stages - 1)
    return [1] * num_stages


def _stages(
    patch_size: Sequence[int],
    strides: Sequence[Sequence[int]],
    kernel_sizes: Sequence[Sequence[int]],
    features: Sequence[int],
    blocks_per_stage: Sequence[int],
    block: str,
    decoder_blocks: int,
    in_channels: int,
) -> list[tuple[float, int, int, float, float]]:
    """The U-Net stage by stage, as the estimates count it: per stage ``(voxels, width, convs,
    encoder weights, decoder weights)``: the voxels of its feature map (after its stride), its
    width, its encoder convs (the entry conv and the blocks' convs), the weights of those convs,
    and of the convs of the decoder stage at its resolution (0 for the deepest stage). A conv's
    weights are also its multiply-adds per output voxel."""
    shape, c_in, stages = np.asarray(patch_size, dtype=float), in_channels, []
    for s, width in enumerate(features):
        shape = shape / np.asarray(strides[s])
        taps = float(np.prod(kernel_sizes[s]))
        block_convs = int(blocks_per_stage[s]) * (2 if block == "residual" else 1)
        encoder = taps * (c_in * width + block_convs * width * width)
        decoder = 0.0
        if s < len(features) - 1:  # the first decoder conv takes the concatenation (2 x width)
            decoder = taps * width * (2 * width + (decoder_blocks - 1) * width)
        stages.append((float(np.prod(shape)), int(width), 1 + block_convs, encoder, decoder))
        c_in = width
    return stages


def estimate_memory_gb(
    patch_size: Sequence[int],
    strides: Sequence[Sequence[int]],
    kernel_sizes: Sequence[Sequence[int]],
    features: Sequence[int],
    blocks_per_stage: Sequence[int],
    block: str,
    decoder_blocks: int,
    in_channels: int,
    num_classes: int,
    batch_size: int,
) -> float:
    """Estimated memory (GB) of one training step (see the module docstring for what counts)."""
    values, params = float(np.prod(patch_size)) * (in_channels + 2 * num_classes), 0.0
    network = (patch_size, strides, kernel_sizes, features, blocks_per_stage, block)
    stages = _stages(*network, decoder_blocks, in_channels)
    for s, (voxels, width, convs, encoder, decoder) in enumerate(stages):
        values += voxels * width * 3 * convs
        params += encoder + decoder
        if s < len(stages) - 1:  # the decoder stage at this resolution
            values += voxels * width * (3 + 3 * decoder_blocks)
    activations = values * int(batch_size) * 2  # 16-bit values
    return (activations + params * 4 * 4) / 1024**3


def estimate_step_gflops(
    patch_size: Sequence[int],
    strides: Sequence[Sequence[int]],
    kernel_sizes: Sequence[Sequence[int]],
    features: Sequence[int],
    blocks_per_stage: Sequence[int],
    block: str,
    decoder_blocks: int,
    in_channels: int,
    num_classes: int,
    batch_size: int,
) -> float:
    """GFLOP of one training step: the convolutions' multiply-adds of the forward pass (encoder
    entry and block convs, each decoder stage's transposed conv and its convs, the 1x1 head), x2
    for FLOPs and x3 for forward plus backward, per patch, times the batch. Norms, activations
    and the optimizer are left out (a few percent)."""
    network = (patch_size, strides, kernel_sizes, features, blocks_per_stage, block)
    stages = _stages(*network, decoder_blocks, in_channels)
    macs = stages[0][0] * stages[0][1] * num_classes  # the 1x1 head
    for s, (voxels, width, _, encoder, decoder) in enumerate(stages):
        macs += voxels * (encoder + decoder)
        if s < len(stages) - 1:  # transposed conv from the stage below, kernel = stride
            macs += voxels * stages[s + 1][1] * width
    return 6.0 * macs * int(batch_size) / 1e9


def _initial_patch(spacing: Sequence[float], median_shape: Sequence[int]) -> list[int]:
    """A patch of 256**3 (3D) or 2048**2 (2D) voxels, isotropic in mm, clipped to the median."""
    inverse = 1.0 / np.asarray(spacing, dtype=float)
    volume = 256.0**3 if len(spacing) == 3 else 2048.0**2
    patch = inverse * (volume / np.prod(inverse)) ** (1.0 / len(spacing))
    return [int(min(round(p), m)) for p, m in zip(patch, median_shape, strict=True)]


def plan_configuration(
    name: str,
    spacing: Sequence[float],
    median_shape: Sequence[int],
    dataset_voxels: float,
    in_channels: int,
    num_classes: int,
    settings: PlannerSettings,
    slice_axis: int | None = None,
) -> Configuration:
    """Plan one configuration on the grid of ``spacing`` (see the module docstring).

    Args:
        name: the configuration's name.
        spacing: target spacing, one entry per network axis.
        median_shape: median case shape on that grid, one entry per network axis.
        dataset_voxels: voxels of the whole dataset on that grid (for the 5 % batch cap).
        in_channels: image channels.
        num_classes: classes (background included).
        settings: budget and limits.
        slice_axis: for 2D, the RAS axis the slices are taken across (recorded only).

    Raises:
        ValueError: the cases are too small for any network (no axis can be pooled even once),
            or the budget does not fit a batch of 2 of the smallest patch.
    """
    median = [max(int(m), 1) for m in median_shape]
    cap = settings.max_features_3d if len(median) == 3 else settings.max_features_2d
    patch = _initial_patch(spacing, median)
    base = int(settings.base_features)

    def layout(patch_, base_):
        strides_, kernels_, rounded = plan_topology(spacing, patch_)
        widths = stage_widths(len(strides_), base_, cap)
        blocks = blocks_for(len(strides_), settings.block)
        return strides_, kernels_, rounded, widths, blocks

    def cost(estimate, net, batch):
        return estimate(
            net[2], net[0], net[1], net[3], net[4], settings.block, settings.decoder_blocks,
            in_channels, num_classes, batch,
        )  # fmt: skip

    def shrunk(net, setting, estimate):
        """The patch shrunk along its axis largest relative to the median, re-laid out."""
        divisor = [math.prod(st[a] for st in net[0]) for a in range(len(patch))]
        axis = int(np.argmax([p / m for p, m in zip(patch, median, strict=True)]))
        if patch[axis] - divisor[axis] < 2 * MIN_FEATURE_MAP:
            lower = (
                "lower plan.base_features"
                if base > MIN_BASE_FEATURES
                else f"the widths are at their minimum ({MIN_BASE_FEATURES})"
            )
            raise ValueError(
                f"{name}: {setting} does not fit a batch of 2 patches of {net[2]} voxels "
                f"(estimated {estimate}); raise it ({lower})."
            )
        patch[axis] -= divisor[axis]
        return layout(patch, base)

    net = layout(patch, base)
    if len(net[0]) < 2:
        raise ValueError(
            f"{name}: the median case is {median} voxels on a {list(spacing)} mm grid: too small "
            f"for any U-Net (an axis needs >= {2 * MIN_FEATURE_MAP} voxels to be pooled once)."
        )
    while (needed := cost(estimate_memory_gb, net, 2)) > settings.memory_gb:
        net = shrunk(net, f"plan.memory_gb={settings.memory_gb}", f"{needed:.2f} GB")
    fits = int(settings.memory_gb // cost(estimate_memory_gb, net, 1))
    covers = int(round(0.05 * dataset_voxels / float(np.prod(net[2]))))
    batch = max(2, min(fits, covers))
    budget = settings.compute_gflops
    if budget is not None:
        while batch > 2 and cost(estimate_step_gflops, net, batch) > budget:
            batch -= 1
        while base > MIN_BASE_FEATURES and cost(estimate_step_gflops, net, batch) > budget:
            base = max(base - MIN_BASE_FEATURES, MIN_BASE_FEATURES)
            net = layout(patch, base)
        while (flops := cost(estimate_step_gflops, net, batch)) > budget:
            net = shrunk(net, f"plan.compute_gflops={budget}", f"{flops:.1f} GFLOP per step")
    strides, kernels, rounded, widths, blocks = net
    return Configuration(
        name=name,
        spacing=tuple(float(s) for s in spacing),
        median_shape=tuple(median),
        patch_size=tuple(rounded),
        slice_axis=slice_axis,
        strides=strides,
        kernel_sizes=kernels,
        features=widths,
        blocks_per_stage=blocks,
        batch_size=batch,
        estimated_memory_gb=round(cost(estimate_memory_gb, net, batch), 3),
        estimated_step_gflops=round(cost(estimate_step_gflops, net, batch), 1),
    )


def resampled_shapes(fingerprint: dict[str, Any], spacing: Sequence[float]) -> np.ndarray:
    """Every case's cropped shape on the grid of ``spacing`` (RAS), ``(cases, 3)``."""
    ids = sorted(fingerprint["cropped_shapes"])
    shapes = np.array([fingerprint["cropped_shapes"][i] for i in ids], dtype=float)
    spacings = np.array([fingerprint["spacings"][i] for i in ids], dtype=float)
    return np.maximum(np.round(shapes * spacings / np.asarray(spacing, dtype=float)), 1)


def plan_configurations(
    fingerprint: dict[str, Any],
    target_spacing: Sequence[float],
    in_channels: int,
    num_classes: int,
    settings: PlannerSettings,
) -> dict[str, Configuration]:
    """``3d_fullres`` and ``2d`` (and ``3d_lowres`` where needed) for a dataset; ``2d`` is left
    out when its slices are too small for a 2D U-Net.

    Raises:
        ValueError: naming the reason when ``3d_fullres`` cannot be planned.
    """
    spacing = [float(s) for s in target_spacing]
    shapes = resampled_shapes(fingerprint, spacing)
    median = np.median(shapes, axis=0).astype(int).tolist()
    voxels = float(np.prod(shapes, axis=1).sum())
    args = (in_channels, num_classes, settings)
    full = plan_configuration("3d_fullres", spacing, median, voxels, *args)
    plans = {"3d_fullres": full}
    slice_axis = int(np.argmax(spacing)) if max(spacing) > min(spacing) else 0
    plane = [a for a in range(3) if a != slice_axis]
    try:  # slices can be too small where volumes are not (e.g. 200x6x6): then no 2d
        plans["2d"] = plan_configuration(
            "2d",
            [spacing[a] for a in plane],
            [median[a] for a in plane],
            voxels,
            *args,
            slice_axis=slice_axis,
        )
    except ValueError:
        pass
    if np.prod(full.patch_size) < 0.25 * np.prod(median):
        plans["3d_lowres"] = _plan_lowres(fingerprint, spacing, full, *args)
    return plans


def _plan_lowres(
    fingerprint: dict[str, Any],
    spacing: list[float],
    full: Configuration,
    in_channels: int,
    num_classes: int,
    settings: PlannerSettings,
) -> Configuration:
    """nnU-Net's 3d_lowres: coarsen the spacing (finest axes first) by 1.01x per step until the
    planned patch covers a quarter of the median shape, or the spacing doubled."""
    low = list(spacing)
    plan = full
    while True:
        finest = min(low)
        low = [s * 1.01 if s < 2 * finest else s for s in low]
        shapes = resampled_shapes(fingerprint, low)
        median = np.median(shapes, axis=0).astype(int).tolist()
        voxels = float(np.prod(shapes, axis=1).sum())
        plan = plan_configuration(
            "3d_lowres", low, median, voxels, in_channels, num_classes, settings
        )
        covered = np.prod(plan.patch_size) >= 0.25 * np.prod(median)
        if covered or max(low) >= 2 * max(spacing):
            return plan


def format_configurations(plans: dict[str, Configuration | dict]) -> str:
    """The plan as a short table: one block per configuration (objects or ``plan.json`` dicts)."""
    lines = []
    for plan in plans.values():
        plan = Configuration.from_dict(plan) if isinstance(plan, dict) else plan
        axis = f", slices across RAS axis {plan.slice_axis}" if plan.slice_axis is not None else ""
        lines += [
            f"{plan.name}: patch {list(plan.patch_size)}, batch {plan.batch_size}, spacing "
            f"{[round(s, 3) for s in plan.spacing]} mm, median shape {list(plan.median_shape)}"
            f"{axis}, ~{plan.estimated_memory_gb:.2f} GB, "
            f"~{plan.estimated_step_gflops or float('nan'):.0f} GFLOP per step",
            f"  stages {len(plan.strides)}: widths {plan.features}, blocks {plan.blocks_per_stage}",
            f"  strides {plan.strides}",
            f"  kernels {plan.kernel_sizes}",
        ]
    return "\n".join(lines)


#: The settings a configuration fills when they are left null, by config key.
PLANNED_SETTINGS = {
    "data.patch_size": "patch_size",
    "data.batch_size": "batch_size",
    "model.features": "features",
    "model.blocks_per_stage": "blocks_per_stage",
    "model.kernel_sizes": "kernel_sizes",
    "model.strides": "strides",
}


def apply_configuration(
    configuration: Configuration, given: dict[str, Any]
) -> tuple[dict[str, Any], list[str]]:
    """Fill the settings left null (None) in ``given`` from the configuration; a value that is
    set is an explicit override and wins.

    The topology (``model.kernel_sizes``, ``model.strides``) is the plan's only when the network
    has the planned number of stages (``model.features`` planned, or as many stages); otherwise
    it stays None (the model's own default: 3x3x3 kernels, stride 2 per stage).

    Args:
        configuration: the planned configuration.
        given: ``{key: value or None}`` for the keys of :data:`PLANNED_SETTINGS`.

    Returns:
        ``(chosen, overrides)``: every key's value, and one line per explicit override
        (``"data.patch_size=[32, 32, 32] (planned [40, 56, 40])"``).
    """
    chosen, overrides = {}, []
    for key, attr in PLANNED_SETTINGS.items():
        planned = getattr(configuration, attr)
        planned = list(planned) if isinstance(planned, tuple) else planned
        value = given.get(key)
        if value is None:
            chosen[key] = planned
        else:
            chosen[key] = value
            if value != planned:
                overrides.append(f"{key}={value} (planned {planned})")
    stages = len(configuration.strides)
    if len(chosen["model.features"]) != stages:
        for key in ("model.kernel_sizes", "model.strides"):
            if given.get(key) is None:
                chosen[key] = None
    return chosen, overrides
