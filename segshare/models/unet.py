"""The U-Net: a kernel-sharing encoder, an unshared decoder, optional deep supervision.

``build_unet`` returns a functional ``keras.Model`` mapping ``(B, *spatial, in_channels)`` to logits
``(B, *spatial, num_classes)`` (a list of logits, full resolution first, with deep supervision).
Layer names are deterministic (``encoder_stage2_conv1``, ``decoder_stage1_concat``, ``head``).

Per-stage ``kernel_sizes`` and ``strides`` (MONAI DynUNet's names, nnU-Net's plan entries) make
the network anisotropic: stage ``s``'s convs have kernel ``kernel_sizes[s]`` and its entry conv
stride ``strides[s]``; decoder stage ``s`` upsamples by ``strides[s + 1]`` with a transposed conv
of kernel = stride (as nnU-Net) and its convs use ``kernel_sizes[s]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import keras

from segshare.data.planner import blocks_for
from segshare.models.encoder import (
    SharedEncoder,
    default_strides,
    make_activation,
    make_norm,
    per_stage,
)

DEFAULT_FEATURES = (16, 32, 64, 128, 256)
DEFAULT_BLOCKS = (1, 2, 2, 2, 2)


def check_patch_size(
    patch_size: Sequence[int],
    num_stages: int,
    spatial_dims: int,
    strides: Sequence[int | Sequence[int]] | None = None,
) -> None:
    """Raise ``ValueError`` unless every patch axis divides by the product of its strides.

    Args:
        patch_size: Spatial patch size, one entry per axis.
        num_stages: Encoder stages (``len(features)``).
        spatial_dims: 2 or 3.
        strides: Per-stage strides as :func:`build_unet` takes them; ``None`` = ``[1, 2, 2, ...]``
            (every axis then divides by ``2 ** (num_stages - 1)``).
    """
    patch_size = tuple(int(p) for p in patch_size)
    if len(patch_size) != spatial_dims:
        raise ValueError(f"patch_size must have {spatial_dims} entries, got {patch_size!r}.")
    strides = per_stage(strides, num_stages, spatial_dims, "strides", default_strides(num_stages))
    factor = total_stride(num_stages, spatial_dims, strides)
    if any(p < 1 or p % f for p, f in zip(patch_size, factor, strict=True)):
        raise ValueError(
            f"patch_size {patch_size!r} must be divisible on each axis by the product of that "
            f"axis's strides, {factor!r}, for {num_stages} stages with strides "
            f"{[list(t) for t in strides]!r}."
        )


def total_stride(
    num_stages: int, spatial_dims: int, strides: Sequence[int | Sequence[int]] | None = None
) -> tuple[int, ...]:
    """The product of the strides along each axis: what every input size must divide by.

    Args:
        num_stages: Encoder stages (``len(features)``).
        spatial_dims: 2 or 3.
        strides: Per-stage strides as :func:`build_unet` takes them; ``None`` = ``[1, 2, 2, ...]``.
    """
    strides = per_stage(strides, num_stages, spatial_dims, "strides", default_strides(num_stages))
    return tuple(math.prod(axis) for axis in zip(*strides, strict=True))


def build_unet(
    spatial_dims: int = 3,
    in_channels: int = 1,
    num_classes: int = 2,
    features: Sequence[int] = DEFAULT_FEATURES,
    blocks_per_stage: Sequence[int] | None = None,
    block: str = "residual",
    sharing: str = "none",
    num_templates: int = 2,
    norm: str = "instance",
    activation: str = "leaky_relu",
    negative_slope: float = 0.01,
    decoder_blocks: int = 2,
    deep_supervision: bool = False,
    use_bias: bool = True,
    kernel_sizes: Sequence[int | Sequence[int]] | None = None,
    strides: Sequence[int | Sequence[int]] | None = None,
    patch_size: Sequence[int] | None = None,
    name: str | None = None,
) -> keras.Model:
    """Build the kernel-sharing U-Net.

    Args:
        spatial_dims: 2 or 3.
        in_channels: Input channels ``C``.
        num_classes: Output classes ``K`` (background included).
        features: Width of each encoder stage, e.g. ``(16, 32, 64, 128, 256)``.
        blocks_per_stage: Blocks after each stage's entry conv; default for residual blocks
            ``1`` for the first stage and ``2`` for the others (``(1, 2, 2, 2, 2)`` for five
            stages), for plain blocks ``1`` everywhere (two convs per stage).
        block: ``"residual"`` (two convs with a skip, as nnU-Net's ResEnc) or ``"plain"`` (one
            conv-norm-act unit; ``blocks_per_stage`` of 1 gives the block structure of nnU-Net's
            PlainConvUNet, two convs per stage).
        sharing: ``"none" | "stage" | "global" | "template"`` (see ``segshare.models.encoder``;
            under ``global`` a conv whose kernel is smaller than the bank's along an axis uses
            the bank's centred slice there).
        num_templates: Templates per stage for ``template`` sharing.
        norm: ``"instance" | "batch"``.
        activation: ``"leaky_relu"`` (default) or a Keras activation name.
        negative_slope: LeakyReLU slope.
        decoder_blocks: conv-norm-act units per decoder stage (after upsampling and concat).
        deep_supervision: Also output logits at every coarser decoder resolution.
        use_bias: Whether convs have a bias.
        kernel_sizes: Kernel size of each stage's convs (encoder stage ``s`` and decoder stage
            ``s``), one entry per stage, an int or one odd size per axis, e.g.
            ``[[1, 3, 3], [1, 3, 3], [3, 3, 3]]``; ``None`` = 3 everywhere.
        strides: Stride of each stage's entry conv, one entry per stage, an int or one per axis,
            e.g. ``[1, [1, 2, 2], [2, 2, 2]]``; the first must be 1 (logits keep the input's
            size). Decoder stage ``s`` upsamples by ``strides[s + 1]``. ``None`` =
            ``[1, 2, 2, ...]``.
        patch_size: Fixed spatial input size (validated against ``strides``); ``None`` accepts
            any size that divides by the product of each axis's strides.
        name: Model name (default ``unet_<sharing>``).

    Returns:
        A ``keras.Model`` from ``(B, *spatial, C)`` to logits ``(B, *spatial, K)``; with deep
        supervision a list ``[full, 1/strides[1], 1/(strides[1]*strides[2]), ...]`` of logits.
    """
    _check_sizes(spatial_dims, in_channels, num_classes, decoder_blocks)
    features = tuple(int(f) for f in features)
    n = len(features)
    if blocks_per_stage is None:
        blocks_per_stage = tuple(blocks_for(n, block))
    kernel_sizes = per_stage(kernel_sizes, n, spatial_dims, "kernel_sizes", (3,) * n, odd=True)
    strides = per_stage(strides, n, spatial_dims, "strides", default_strides(n))
    if any(t != 1 for t in strides[0]):
        raise ValueError(
            f"strides[0] must be 1 on every axis (the decoder never undoes it, so the logits "
            f"would be smaller than the input), got {list(strides[0])!r}."
        )
    if patch_size is not None:
        check_patch_size(patch_size, n, spatial_dims, strides)
    encoder = SharedEncoder(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        features=features,
        blocks_per_stage=blocks_per_stage,
        block=block,
        sharing=sharing,
        num_templates=num_templates,
        norm=norm,
        activation=activation,
        negative_slope=negative_slope,
        use_bias=use_bias,
        kernel_sizes=kernel_sizes,
        strides=strides,
        name="encoder",
    )
    spatial = tuple(patch_size) if patch_size is not None else (None,) * spatial_dims
    inputs = keras.Input((*spatial, in_channels), name="image")
    decoder_outputs = _decoder(
        encoder(inputs), encoder, decoder_blocks, norm, activation, negative_slope, use_bias
    )
    conv = keras.layers.Conv3D if spatial_dims == 3 else keras.layers.Conv2D
    logits = conv(num_classes, 1, name="head", dtype="float32")(decoder_outputs[0])
    outputs = logits
    if deep_supervision:
        outputs = [logits] + [
            conv(num_classes, 1, name=f"head_ds{i}", dtype="float32")(feat)
            for i, feat in enumerate(decoder_outputs[1:], start=1)
        ]
    return keras.Model(inputs, outputs, name=name or f"unet_{sharing}")


def _check_sizes(
    spatial_dims: int, in_channels: int, num_classes: int, decoder_blocks: int
) -> None:
    """Raise ``ValueError`` quoting the value for an impossible size argument."""
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}.")
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels!r}.")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes!r}.")
    if decoder_blocks < 1:
        raise ValueError(f"decoder_blocks must be >= 1, got {decoder_blocks!r}.")


def _decoder(
    skips: list,
    encoder: SharedEncoder,
    decoder_blocks: int,
    norm: str,
    activation: str,
    negative_slope: float,
    use_bias: bool,
) -> list:
    """The unshared decoder: per stage ``s`` a transposed-conv up by ``strides[s + 1]`` (kernel =
    stride), the skip concat and conv-norm-act units with ``kernel_sizes[s]``, mirroring the
    encoder. Returns each stage's output, full resolution first."""
    features, dims = encoder.features, encoder.spatial_dims
    conv = keras.layers.Conv3D if dims == 3 else keras.layers.Conv2D
    up = keras.layers.Conv3DTranspose if dims == 3 else keras.layers.Conv2DTranspose
    x = skips[-1]
    outputs = []
    for s in range(len(features) - 2, -1, -1):
        prefix, factor = f"decoder_stage{s}", encoder.strides[s + 1]
        x = up(features[s], factor, strides=factor, use_bias=use_bias, name=f"{prefix}_upconv")(x)
        x = keras.layers.Concatenate(name=f"{prefix}_concat")([x, skips[s]])
        for j in range(1, decoder_blocks + 1):
            x = conv(
                features[s],
                encoder.kernel_sizes[s],
                padding="same",
                use_bias=use_bias,
                name=f"{prefix}_conv{j}",
            )(x)
            x = make_norm(norm, f"{prefix}_conv{j}_norm")(x)
            x = make_activation(activation, negative_slope, f"{prefix}_conv{j}_act")(x)
        outputs.append(x)
    if not outputs:  # a single stage: the encoder output feeds the head
        outputs.append(x)
    return outputs[::-1]


def count_unique_params(model: keras.Model, trainable_only: bool = True) -> int:
    """Parameters counted once per variable (a shared kernel counts once)."""
    variables = model.trainable_weights if trainable_only else model.weights
    seen, total = set(), 0
    for v in variables:
        key = id(v)
        if key not in seen:
            seen.add(key)
            total += int(keras.ops.size(v))
    return total


def parameter_report(model: keras.Model) -> dict:
    """Total, unique trainable and saved parameters versus ``sharing="none"`` at the same widths.

    The baseline is built from the model's own encoder config with ``sharing="none"``.
    """
    encoder = model.get_layer("encoder")
    config = encoder.get_config()
    unique = count_unique_params(model)
    baseline = unique
    if config["sharing"] != "none":
        twin = SharedEncoder(**{**config, "sharing": "none", "name": "encoder_none"})
        twin.build((None,) + (8,) * config["spatial_dims"] + (config["in_channels"],))
        baseline += _layer_params(twin) - _layer_params(encoder)
    return {
        "sharing": config["sharing"],
        "total": count_unique_params(model, trainable_only=False),
        "unique_trainable": unique,
        "baseline_unique_trainable": baseline,
        "saved": baseline - unique,
        "saved_percent": round(100.0 * (baseline - unique) / baseline, 2) if baseline else 0.0,
    }


def _layer_params(layer: keras.layers.Layer) -> int:
    return sum(int(keras.ops.size(v)) for v in layer.trainable_weights)  # weights are deduplicated


def format_parameter_report(report: dict) -> str:
    """One line for logs and the training app's start-up banner."""
    return (
        f"parameters [{report['sharing']}]: total {report['total']:,}, unique trainable "
        f"{report['unique_trainable']:,}, baseline (none) {report['baseline_unique_trainable']:,}, "
        f"saved {report['saved']:,} ({report['saved_percent']:.1f}%)"
    )
