"""The U-Net encoder: stages of conv-norm-act units whose kernels come from shared banks.

The encoder is one registered Keras layer that creates its banks *and* every conv that uses them
in ``__init__``. Its config holds only hyperparameters, so ``from_config`` (which Keras calls on
load) rebuilds exactly the same wiring: a ``.keras`` round trip keeps every tie.

Stage ``s`` (width ``features[s]``) is an *entry* conv (stage 0: from the input channels, stride 1;
later stages: from ``features[s-1]``, stride 2) followed by ``blocks_per_stage[s]`` blocks whose
convs are all ``features[s] -> features[s]``. A block is either

- ``residual`` (default): a basic block ``act(x + norm(conv(act(norm(conv(x))))))``, two convs,
  as in nnU-Net's ResEnc U-Net and ShaResNet; or
- ``plain``: one conv-norm-act unit, the block structure of nnU-Net's default PlainConvUNet (one
  plain block per stage gives its two convs per stage).

Sharing schemes pick the bank of each conv:

- ``none``: every conv owns a bank (baseline).
- ``stage``: the block convs of a stage share one kernel; entry convs own theirs (so a stage
  needs two block convs or more to save anything).
- ``global``: one bank at the widest width; every conv but the stem uses its
  ``[:c_in, :c_out]`` slice.
- ``template``: the block convs of a stage mix ``num_templates`` templates owned by the stage,
  each with its own coefficients.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras

from segshare.models.layers import PACKAGE, KernelBank, SharedConv, TemplateBank

SHARING_SCHEMES = ("none", "stage", "global", "template")
NORMS = ("instance", "batch")
BLOCKS = ("residual", "plain")


def make_norm(kind: str, name: str) -> keras.layers.Layer:
    """Instance (one group per channel) or batch normalisation, channels last."""
    if kind == "instance":
        return keras.layers.GroupNormalization(groups=-1, epsilon=1e-5, name=name)
    if kind == "batch":
        return keras.layers.BatchNormalization(epsilon=1e-5, name=name)
    raise ValueError(f"norm must be one of {NORMS}, got {kind!r}.")


def make_activation(kind: str, negative_slope: float, name: str) -> keras.layers.Layer:
    """LeakyReLU (default), ReLU or any Keras activation name."""
    if kind == "leaky_relu":
        return keras.layers.LeakyReLU(negative_slope=negative_slope, name=name)
    try:
        keras.activations.get(kind)
    except ValueError as err:
        raise ValueError(f"Unknown activation {kind!r}.") from err
    return keras.layers.Activation(kind, name=name)


def validate_encoder_args(
    features: Sequence[int],
    blocks_per_stage: Sequence[int],
    sharing: str,
    num_templates: int,
    block: str = "residual",
) -> None:
    """Raise ``ValueError`` quoting the bad value for inconsistent encoder settings."""
    if sharing not in SHARING_SCHEMES:
        raise ValueError(f"sharing must be one of {SHARING_SCHEMES}, got {sharing!r}.")
    if block not in BLOCKS:
        raise ValueError(f"block must be one of {BLOCKS}, got {block!r}.")
    if len(features) < 1 or any(int(f) < 1 for f in features):
        raise ValueError(f"features must be a non-empty list of widths >= 1, got {features!r}.")
    if len(features) != len(blocks_per_stage):
        raise ValueError(
            f"features and blocks_per_stage must have the same length, got {len(features)} "
            f"({list(features)!r}) and {len(blocks_per_stage)} ({list(blocks_per_stage)!r})."
        )
    if any(int(b) < 0 for b in blocks_per_stage):
        raise ValueError(f"blocks_per_stage must be >= 0, got {blocks_per_stage!r}.")
    if sharing == "template" and int(num_templates) < 1:
        raise ValueError(f"num_templates must be >= 1, got {num_templates!r}.")


class ConvUnit(keras.layers.Layer):
    """conv -> norm [-> activation]; built only by :class:`SharedEncoder` (never from config)."""

    def __init__(self, conv: SharedConv, norm: str, act: keras.layers.Layer | None, **kwargs):
        super().__init__(**kwargs)
        self.conv = conv
        self.norm = make_norm(norm, f"{conv.name}_norm")
        self.act = act

    def build(self, input_shape):
        self.norm.build(self.conv.compute_output_shape(input_shape))
        self.built = True

    def call(self, inputs, training=None):
        x = self.norm(self.conv(inputs), training=training)
        return x if self.act is None else self.act(x)

    def compute_output_shape(self, input_shape):
        return self.conv.compute_output_shape(input_shape)


class ResidualBlock(keras.layers.Layer):
    """act(x + unit2(unit1(x))): two same-width conv units; built only by :class:`SharedEncoder`."""

    def __init__(self, unit1: ConvUnit, unit2: ConvUnit, act: keras.layers.Layer, **kwargs):
        super().__init__(**kwargs)
        self.unit1, self.unit2, self.act = unit1, unit2, act

    def build(self, input_shape):
        self.unit1.build(input_shape)
        self.unit2.build(input_shape)
        self.built = True

    def call(self, inputs, training=None):
        return self.act(
            inputs + self.unit2(self.unit1(inputs, training=training), training=training)
        )

    def compute_output_shape(self, input_shape):
        return input_shape


@keras.saving.register_keras_serializable(package=PACKAGE)
class SharedEncoder(keras.layers.Layer):
    """U-Net encoder with kernel sharing. Input ``(B, *spatial, C)``; returns one feature map per
    stage, ``[(B, *spatial, features[0]), (B, *spatial/2, features[1]), ...]``.

    Args:
        spatial_dims: 2 or 3.
        in_channels: Input channels.
        features: Width of each stage.
        blocks_per_stage: Blocks after each stage's entry conv.
        block: ``"residual"`` (two convs with a skip) or ``"plain"`` (one conv-norm-act).
        sharing: ``"none" | "stage" | "global" | "template"``.
        num_templates: Templates per stage for ``template``.
        kernel_size: Conv kernel size.
        norm: ``"instance" | "batch"``.
        activation: ``"leaky_relu"`` or a Keras activation name.
        negative_slope: LeakyReLU slope.
        use_bias: Whether every conv has its own bias.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        features: Sequence[int] = (16, 32, 64, 128, 256),
        blocks_per_stage: Sequence[int] = (1, 2, 2, 2, 2),
        block: str = "residual",
        sharing: str = "none",
        num_templates: int = 2,
        kernel_size: int = 3,
        norm: str = "instance",
        activation: str = "leaky_relu",
        negative_slope: float = 0.01,
        use_bias: bool = True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        validate_encoder_args(features, blocks_per_stage, sharing, num_templates, block)
        self.spatial_dims = int(spatial_dims)
        self.in_channels = int(in_channels)
        self.features = tuple(int(f) for f in features)
        self.blocks_per_stage = tuple(int(b) for b in blocks_per_stage)
        self.block = block
        self.sharing = sharing
        self.num_templates = int(num_templates)
        self.kernel_size = int(kernel_size)
        self.norm_kind = norm
        self.activation = activation
        self.negative_slope = float(negative_slope)
        self.use_bias = bool(use_bias)
        self.banks: list[KernelBank] = []
        self.stages: list[list[ConvUnit | ResidualBlock]] = []
        self._wire()

    def _bank(self, name: str, c_in: int, c_out: int, templates: bool = False) -> KernelBank:
        args = (self.spatial_dims, self.kernel_size, c_in, c_out)
        if templates:
            bank = TemplateBank(*args, num_templates=self.num_templates, name=name)
        else:
            bank = KernelBank(*args, name=name)
        self.banks.append(bank)
        return bank

    def _act(self, name: str) -> keras.layers.Layer:
        return make_activation(self.activation, self.negative_slope, name)

    def _unit(
        self, name: str, bank: KernelBank, c_in: int, c_out: int, stride: int, act: bool = True
    ) -> ConvUnit:
        conv = SharedConv(c_out, bank, c_in, strides=stride, use_bias=self.use_bias, name=name)
        activation = self._act(f"{name}_act") if act else None
        return ConvUnit(conv, self.norm_kind, activation, name=f"{name}_unit")

    def _block_unit(
        self, prefix: str, j: int, width: int, bank: KernelBank | None, act: bool = True
    ) -> ConvUnit:
        """Block conv ``j`` of a stage, from the stage's shared bank or (``None``) its own."""
        if bank is None:
            bank = self._bank(f"{prefix}_conv{j}_kernel", width, width)
        return self._unit(f"{prefix}_conv{j}", bank, width, width, 1, act)

    def _wire(self) -> None:
        widest = max(self.features)
        global_bank = None
        if self.sharing == "global" and (len(self.features) > 1 or self.blocks_per_stage[0] > 0):
            global_bank = self._bank("encoder_global_bank", widest, widest)
        for s, width in enumerate(self.features):
            c_in = self.in_channels if s == 0 else self.features[s - 1]
            prefix = f"encoder_stage{s}"
            entry_bank = global_bank if (global_bank is not None and s > 0) else None
            if entry_bank is None:
                entry_bank = self._bank(f"{prefix}_conv1_kernel", c_in, width)
            units = [self._unit(f"{prefix}_conv1", entry_bank, c_in, width, 1 if s == 0 else 2)]
            stage_bank = global_bank
            if self.sharing in ("stage", "template") and self.blocks_per_stage[s] > 0:
                stage_bank = self._bank(
                    f"{prefix}_bank", width, width, templates=self.sharing == "template"
                )
            for b in range(1, self.blocks_per_stage[s] + 1):
                if self.block == "plain":
                    units.append(self._block_unit(prefix, b + 1, width, stage_bank))
                    continue
                pair = (
                    self._block_unit(prefix, 2 * b, width, stage_bank),
                    self._block_unit(prefix, 2 * b + 1, width, stage_bank, act=False),
                )
                act = self._act(f"{prefix}_block{b}_act")
                units.append(ResidualBlock(*pair, act, name=f"{prefix}_block{b}"))
            self.stages.append(units)

    def build(self, input_shape):
        shape = tuple(input_shape)
        for units in self.stages:
            for unit in units:
                unit.build(shape)
                shape = unit.compute_output_shape(shape)
        self.built = True

    def call(self, inputs, training=None):
        outputs = []
        x = inputs
        for units in self.stages:
            for unit in units:
                x = unit(x, training=training)
            outputs.append(x)
        return outputs

    def compute_output_shape(self, input_shape):
        shapes = []
        shape = tuple(input_shape)
        for units in self.stages:
            for unit in units:
                shape = unit.compute_output_shape(shape)
            shapes.append(shape)
        return shapes

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            spatial_dims=self.spatial_dims,
            in_channels=self.in_channels,
            features=list(self.features),
            blocks_per_stage=list(self.blocks_per_stage),
            block=self.block,
            sharing=self.sharing,
            num_templates=self.num_templates,
            kernel_size=self.kernel_size,
            norm=self.norm_kind,
            activation=self.activation,
            negative_slope=self.negative_slope,
            use_bias=self.use_bias,
        )
        return config
