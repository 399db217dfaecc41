"""The U-Net encoder: stages of conv-norm-act units whose kernels come from shared banks.

The encoder is one registered Keras layer that creates its banks *and* every conv that uses them
in ``__init__``. Its config holds only hyperparameters, so ``from_config`` (which Keras calls on
load) rebuilds exactly the same wiring: a ``.keras`` round trip keeps every tie.

Stage ``s`` (width ``features[s]``) is an *entry* conv (stage 0: from the input channels; later
stages: from ``features[s-1]``) of stride ``strides[s]`` (default 1 for stage 0, 2 after)
followed by ``blocks_per_stage[s]`` blocks whose convs are all ``features[s] -> features[s]``.
Every conv of stage ``s`` has kernel size ``kernel_sizes[s]`` (default 3); strides and kernel
sizes are per axis, so stages may be anisotropic (``1x3x3`` kernels, ``1x2x2`` strides), as in
MONAI's DynUNet and nnU-Net's plans. A block is either

- ``residual`` (default): a basic block ``act(x + norm(conv(act(norm(conv(x))))))``, two convs,
  as in nnU-Net's ResEnc U-Net and ShaResNet; or
- ``plain``: one conv-norm-act unit, the block structure of nnU-Net's default PlainConvUNet (one
  plain block per stage gives its two convs per stage).

Sharing schemes pick the bank of each conv:

- ``none``: every conv owns a bank (baseline).
- ``stage``: the block convs of a stage share one kernel of the stage's kernel size; entry convs
  own theirs (so a stage needs two block convs or more to save anything).
- ``global``: one bank at the widest width whose kernel size is, per axis, the largest kernel
  size of its users; every conv but the stem uses its ``[:c_in, :c_out]`` slice, centred along
  any axis where the conv's kernel is smaller (a ``1x3x3`` conv uses ``kernel[1:2]`` of a
  ``3x3x3`` bank).
- ``template``: the block convs of a stage mix ``num_templates`` templates of the stage's kernel
  size, owned by the stage, each conv with its own coefficients.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import keras

from segshare.models.layers import PACKAGE, KernelBank, SharedConv, TemplateBank
from segshare.models.norm import InstanceNormalization

SHARING_SCHEMES = ("none", "stage", "global", "template")
NORMS = ("instance", "batch")
BLOCKS = ("residual", "plain")


def make_norm(kind: str, name: str) -> keras.layers.Layer:
    """Instance (:class:`~segshare.models.norm.InstanceNormalization`) or batch normalisation,
    channels last."""
    if kind == "instance":
        return InstanceNormalization(epsilon=1e-5, name=name)
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


def default_strides(num_stages: int) -> tuple[int, ...]:
    """Stride 1 for the first stage, 2 for every later one (halving the resolution)."""
    return (1,) + (2,) * (num_stages - 1)


def per_stage(
    values: int | Sequence | None,
    num_stages: int,
    spatial_dims: int,
    name: str,
    default: Sequence[int | Sequence[int]],
    odd: bool = False,
) -> tuple[tuple[int, ...], ...]:
    """Per-stage, per-axis values (``kernel_sizes``, ``strides``) as a tuple of tuples.

    Args:
        values: One entry per stage, each an int (every axis) or a per-axis sequence; ``None``
            takes ``default``.
        num_stages: Stages (``len(features)``).
        spatial_dims: Axes per entry.
        name: Argument name for messages.
        default: Entries used when ``values`` is ``None``.
        odd: Whether entries must be odd (kernel sizes: 1, 3, 5, ...).

    Raises:
        ValueError: quoting the bad value (wrong length, a non-positive or even entry).
    """
    values = default if values is None else values
    if isinstance(values, (numbers.Integral, str)) or len(values) != num_stages:
        raise ValueError(
            f"{name} must have one entry per stage ({num_stages}, the length of features), "
            f"got {values!r}."
        )
    result = []
    for s, entry in enumerate(values):
        axes = (entry,) * spatial_dims if isinstance(entry, numbers.Integral) else tuple(entry)
        if len(axes) != spatial_dims:
            raise ValueError(
                f"{name}[{s}] must be an int or have {spatial_dims} entries (spatial_dims), "
                f"got {entry!r} in {values!r}."
            )
        if any(int(a) != a or a < 1 for a in axes):
            raise ValueError(f"{name} must be positive integers, got {entry!r} in {values!r}.")
        if odd and any(a % 2 == 0 for a in axes):
            raise ValueError(
                f"{name} must be odd (1, 3, 5, ...), got {entry!r} at stage {s} in {values!r}."
            )
        result.append(tuple(int(a) for a in axes))
    return tuple(result)


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
    stage, ``[(B, *spatial/strides[0], features[0]), (B, *spatial/(strides[0]*strides[1]),
    features[1]), ...]`` (per axis; by default ``[(B, *spatial, f0), (B, *spatial/2, f1), ...]``).

    Args:
        spatial_dims: 2 or 3.
        in_channels: Input channels.
        features: Width of each stage.
        blocks_per_stage: Blocks after each stage's entry conv.
        block: ``"residual"`` (two convs with a skip) or ``"plain"`` (one conv-norm-act).
        sharing: ``"none" | "stage" | "global" | "template"``.
        num_templates: Templates per stage for ``template``.
        kernel_size: Kernel size of every conv when ``kernel_sizes`` is ``None`` (the only
            form configs saved before ``kernel_sizes`` existed have).
        norm: ``"instance" | "batch"``.
        activation: ``"leaky_relu"`` or a Keras activation name.
        negative_slope: LeakyReLU slope.
        use_bias: Whether every conv has its own bias.
        kernel_sizes: Kernel size of each stage's convs, one entry per stage, an int or one
            odd size per axis (e.g. ``[[1, 3, 3], [1, 3, 3], [3, 3, 3]]``); ``None`` =
            ``kernel_size`` everywhere.
        strides: Stride of each stage's entry conv, an int or one per axis; ``None`` =
            ``[1, 2, 2, ...]``.
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
        kernel_sizes: Sequence[int | Sequence[int]] | None = None,
        strides: Sequence[int | Sequence[int]] | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        validate_encoder_args(features, blocks_per_stage, sharing, num_templates, block)
        n = len(features)
        self.kernel_sizes = per_stage(
            kernel_sizes, n, spatial_dims, "kernel_sizes", (kernel_size,) * n, odd=True
        )
        self.strides = per_stage(strides, n, spatial_dims, "strides", default_strides(n))
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

    def _bank(
        self,
        name: str,
        c_in: int,
        c_out: int,
        kernel_size: tuple[int, ...],
        templates: bool = False,
    ) -> KernelBank:
        args = (self.spatial_dims, kernel_size, c_in, c_out)
        if templates:
            bank = TemplateBank(*args, num_templates=self.num_templates, name=name)
        else:
            bank = KernelBank(*args, name=name)
        self.banks.append(bank)
        return bank

    def _act(self, name: str) -> keras.layers.Layer:
        return make_activation(self.activation, self.negative_slope, name)

    def _unit(
        self,
        name: str,
        bank: KernelBank,
        c_in: int,
        c_out: int,
        stage: int,
        stride: tuple[int, ...] | int = 1,
        act: bool = True,
    ) -> ConvUnit:
        conv = SharedConv(
            c_out,
            bank,
            c_in,
            strides=stride,
            use_bias=self.use_bias,
            kernel_size=self.kernel_sizes[stage],
            name=name,
        )
        activation = self._act(f"{name}_act") if act else None
        return ConvUnit(conv, self.norm_kind, activation, name=f"{name}_unit")

    def _block_unit(
        self, stage: int, j: int, bank: KernelBank | None, act: bool = True
    ) -> ConvUnit:
        """Block conv ``j`` of a stage, from the stage's shared bank or (``None``) its own."""
        prefix, width = f"encoder_stage{stage}", self.features[stage]
        if bank is None:
            bank = self._bank(f"{prefix}_conv{j}_kernel", width, width, self.kernel_sizes[stage])
        return self._unit(f"{prefix}_conv{j}", bank, width, width, stage, act=act)

    def _global_bank(self) -> KernelBank | None:
        """The ``global`` scheme's bank: widest width, per-axis largest kernel of its users
        (every conv but the stem); ``None`` for other schemes or when the stem is alone."""
        users = [s for s in range(len(self.features)) if s > 0 or self.blocks_per_stage[0] > 0]
        if self.sharing != "global" or not users:
            return None
        size = tuple(max(axis) for axis in zip(*(self.kernel_sizes[s] for s in users), strict=True))
        widest = max(self.features)
        return self._bank("encoder_global_bank", widest, widest, size)

    def _wire(self) -> None:
        global_bank = self._global_bank()
        for s, width in enumerate(self.features):
            c_in = self.in_channels if s == 0 else self.features[s - 1]
            prefix, kernel_size = f"encoder_stage{s}", self.kernel_sizes[s]
            entry_bank = global_bank if (global_bank is not None and s > 0) else None
            if entry_bank is None:
                entry_bank = self._bank(f"{prefix}_conv1_kernel", c_in, width, kernel_size)
            units = [self._unit(f"{prefix}_conv1", entry_bank, c_in, width, s, self.strides[s])]
            stage_bank = global_bank
            if self.sharing in ("stage", "template") and self.blocks_per_stage[s] > 0:
                stage_bank = self._bank(
                    f"{prefix}_bank", width, width, kernel_size, self.sharing == "template"
                )
            for b in range(1, self.blocks_per_stage[s] + 1):
                if self.block == "plain":
                    units.append(self._block_unit(s, b + 1, stage_bank))
                    continue
                pair = (
                    self._block_unit(s, 2 * b, stage_bank),
                    self._block_unit(s, 2 * b + 1, stage_bank, act=False),
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
            kernel_sizes=[list(k) for k in self.kernel_sizes],
            strides=[list(t) for t in self.strides],
        )
        return config
