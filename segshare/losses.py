"""Segmentation losses in ``keras.ops``: soft Dice, cross-entropy, their sum, deep supervision.

Pure functions take integer labels ``(B, *spatial)`` and logits ``(B, *spatial, K)`` and return a
scalar; thin ``keras.losses.Loss`` classes wrap them. Softmax is applied inside (the network
outputs logits).

A label value ``>= K`` is the ignore label (the dataset's ``ignore``, above every class: the
plan's ``ignore_label``): such voxels are masked out of every sum, so the loss of a patch equals
the loss of its annotated voxels alone.

Region-based training (nnU-Net's BraTS setup; the plan's ``regions``): the network has one
output per region, each a sigmoid; the target of region ``r`` is 1 where the label is one of the
region's values, and the loss is binary cross-entropy + soft Dice over the regions. A label above
every region value is the ignore label there, masked out the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
from keras import ops


def soft_dice_loss(labels, logits, include_background: bool = False, smooth: float = 1e-5):
    """1 - mean soft Dice over classes (and over the batch: "batch Dice", as nnU-Net's default
    for 3D full resolution). Classes absent from both labels and prediction score ~1 via ``smooth``.

    Args:
        labels: Integer labels ``(B, *spatial)``.
        logits: ``(B, *spatial, K)``.
        include_background: Whether class 0 enters the mean.
        smooth: Added to numerator and denominator.
    """
    logits = ops.cast(logits, "float32")
    num_classes = ops.shape(logits)[-1]
    classes, mask = _classes_and_mask(labels, num_classes)
    probs = ops.softmax(logits, axis=-1) * mask[..., None]
    onehot = ops.one_hot(classes, num_classes, dtype="float32") * mask[..., None]
    axes = tuple(range(len(logits.shape) - 1))
    intersection = ops.sum(probs * onehot, axis=axes)
    denominator = ops.sum(probs, axis=axes) + ops.sum(onehot, axis=axes)
    dice = (2.0 * intersection + smooth) / (denominator + smooth)
    if not include_background:
        dice = dice[1:]
    return 1.0 - ops.mean(dice)


def cross_entropy_loss(labels, logits):
    """Mean softmax cross-entropy over the annotated voxels (0 when none is)."""
    logits = ops.cast(logits, "float32")
    classes, mask = _classes_and_mask(labels, ops.shape(logits)[-1])
    ce = ops.sparse_categorical_crossentropy(classes, logits, from_logits=True)
    return ops.sum(ce * mask) / ops.maximum(ops.sum(mask), 1.0)


def _classes_and_mask(labels, num_classes):
    """The labels with ignored voxels (values ``>= num_classes``) set to class 0, and the
    float mask of the annotated voxels (1) and the ignored ones (0)."""
    labels = ops.cast(labels, "int32")
    annotated = ops.less(labels, num_classes)
    return ops.where(annotated, labels, ops.zeros_like(labels)), ops.cast(annotated, "float32")


def region_targets(labels, regions: Sequence[Sequence[int]]):
    """``(B, *spatial, R)`` float32 targets: 1 where the label is one of region ``r``'s values."""
    labels = ops.cast(labels, "int32")
    channels = [
        sum(ops.cast(ops.equal(labels, int(v)), "float32") for v in values) for values in regions
    ]
    return ops.stack(channels, axis=-1)


def region_dice_bce_loss(
    labels,
    logits,
    regions: Sequence[Sequence[int]],
    dice_weight: float = 1.0,
    bce_weight: float = 1.0,
    smooth: float = 1e-5,
):
    """``dice_weight * (1 - mean soft Dice over regions) + bce_weight * mean BCE`` on sigmoid
    outputs (nnU-Net's ``DC_and_BCE_loss``; batch Dice), over the annotated voxels: labels above
    every region value (the ignore label) are masked out.

    Args:
        labels: Integer labels ``(B, *spatial)``.
        logits: ``(B, *spatial, R)``, one per region.
        regions: the values of each region, in output order.
    """
    logits = ops.cast(logits, "float32")
    top = max(int(v) for values in regions for v in values)
    mask = ops.cast(ops.less_equal(ops.cast(labels, "int32"), top), "float32")[..., None]
    targets = region_targets(labels, regions) * mask
    total = 0.0
    if bce_weight:
        bce = ops.binary_crossentropy(targets, logits, from_logits=True) * mask
        count = ops.maximum(ops.sum(mask) * len(regions), 1.0)
        total = total + bce_weight * ops.sum(bce) / count
    if dice_weight:
        probs = ops.sigmoid(logits) * mask
        axes = tuple(range(len(logits.shape) - 1))
        intersection = ops.sum(probs * targets, axis=axes)
        denominator = ops.sum(probs, axis=axes) + ops.sum(targets, axis=axes)
        dice = (2.0 * intersection + smooth) / (denominator + smooth)
        total = total + dice_weight * (1.0 - ops.mean(dice))
    return total


def dice_ce_loss(
    labels,
    logits,
    dice_weight: float = 1.0,
    ce_weight: float = 1.0,
    include_background: bool = False,
    smooth: float = 1e-5,
):
    """``dice_weight * soft Dice loss + ce_weight * cross-entropy`` (nnU-Net's default loss)."""
    total = 0.0
    if ce_weight:
        total = total + ce_weight * cross_entropy_loss(labels, logits)
    if dice_weight:
        total = total + dice_weight * soft_dice_loss(labels, logits, include_background, smooth)
    return total


def deep_supervision_weights(num_outputs: int) -> list[float]:
    """nnU-Net's weights: halved per coarser level, normalised to sum to one."""
    raw = [0.5**i for i in range(num_outputs)]
    return [w / sum(raw) for w in raw]


def downsample_labels(labels, factors: int | Sequence[int]):
    """Nearest-neighbour labels at ``1/factor`` resolution per spatial axis (strided; patches
    divide evenly). One int applies to every axis."""
    spatial = len(labels.shape) - 1
    factors = (factors,) * spatial if isinstance(factors, int) else tuple(factors)
    if all(f == 1 for f in factors):
        return labels
    return labels[(slice(None), *(slice(None, None, int(f)) for f in factors))]


def _level_factors(labels, logits, level: int) -> tuple[int, ...] | int:
    """How much coarser a deep-supervision output is than the labels, per axis: from the static
    shapes (anisotropic strides pool axes differently), else ``2**level``."""
    label_shape, out_shape = tuple(labels.shape[1:]), tuple(logits.shape[1:-1])
    if None in label_shape or None in out_shape or len(label_shape) != len(out_shape):
        return 2**level
    return tuple(int(a) // int(b) for a, b in zip(label_shape, out_shape, strict=True))


@keras.saving.register_keras_serializable(package="segshare")
class DiceCELoss(keras.losses.Loss):
    """Soft Dice + cross-entropy; with a list of logits (deep supervision, full resolution first)
    each level is compared with labels downsampled to it and weighted by
    :func:`deep_supervision_weights`. With ``regions`` (the plan's region values), soft Dice +
    binary cross-entropy on sigmoid outputs (:func:`region_dice_bce_loss`; ``ce_weight`` weighs
    the BCE, ``include_background`` does not apply)."""

    def __init__(
        self,
        dice_weight: float = 1.0,
        ce_weight: float = 1.0,
        include_background: bool = False,
        smooth: float = 1e-5,
        regions: Sequence[Sequence[int]] | None = None,
        name: str = "dice_ce",
        **kwargs,
    ):
        super().__init__(name=name, **kwargs)
        self.dice_weight = float(dice_weight)
        self.ce_weight = float(ce_weight)
        self.include_background = bool(include_background)
        self.smooth = float(smooth)
        self.regions = [[int(v) for v in r] for r in regions] if regions else None

    def _single(self, labels, logits):
        if self.regions:
            return region_dice_bce_loss(
                labels, logits, self.regions, self.dice_weight, self.ce_weight, self.smooth
            )
        return dice_ce_loss(
            labels, logits, self.dice_weight, self.ce_weight, self.include_background, self.smooth
        )

    def __call__(self, y_true, y_pred, sample_weight=None):
        if isinstance(y_pred, Sequence):
            weights = deep_supervision_weights(len(y_pred))
            return sum(
                w * self._single(downsample_labels(y_true, _level_factors(y_true, out, i)), out)
                for i, (w, out) in enumerate(zip(weights, y_pred, strict=True))
            )
        return self._single(y_true, y_pred)

    def call(self, y_true, y_pred):
        return self._single(y_true, y_pred)

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "dice_weight": self.dice_weight,
            "ce_weight": self.ce_weight,
            "include_background": self.include_background,
            "smooth": self.smooth,
            "regions": self.regions,
        }
