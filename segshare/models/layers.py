"""Kernel banks and the convolutions that draw their kernels from them.

One mechanism serves every sharing scheme: a *bank* layer owns the kernel variable(s); a
:class:`SharedConv` holds a reference to its bank layer (never a raw variable) and keeps its own
bias. An unshared conv is simply a conv whose bank nobody else uses.

- :class:`KernelBank` owns one kernel ``(*kernel_size, in_channels, out_channels)``; a conv of
  narrower width uses the ``[..., :c_in, :c_out]`` slice, so convs of different widths can share.
  A conv with a smaller kernel along an axis uses the *centred* slice along that axis (a 1 of a
  3 is ``kernel[1:2]``), so a 1x3x3 conv can draw from a 3x3x3 bank.
- :class:`TemplateBank` owns ``num_templates`` kernels; each conv that uses it owns a vector of
  mixing coefficients and gets ``sum_t coeff[t] * template[t]`` (Savarese & Maire, ICLR 2019).

A conv's reference to its bank cannot be written into a config, so :class:`SharedConv` is only
ever built by the layer that owns the bank (see ``segshare.models.encoder``), whose config
recreates the same wiring on load. All computation uses ``keras.ops`` only.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import keras
from keras import ops

PACKAGE = "segshare"


def _as_tuple(value: int | Sequence[int], spatial_dims: int, name: str) -> tuple[int, ...]:
    """``value`` per spatial axis (an int repeats); every entry must be >= 1."""
    if isinstance(value, numbers.Integral):
        value = (value,) * spatial_dims
    value = tuple(int(v) for v in value)
    if len(value) != spatial_dims:
        raise ValueError(f"{name} must have {spatial_dims} entries, got {value!r}.")
    if any(v < 1 for v in value):
        raise ValueError(f"{name} must be >= 1 on every axis, got {value!r}.")
    return value


def slice_kernel(
    kernel,
    bank_kernel_size: tuple[int, ...],
    kernel_size: tuple[int, ...],
    in_channels: int,
    out_channels: int,
):
    """The ``kernel_size`` centre and ``[:in_channels, :out_channels]`` corner of a kernel.

    Args:
        kernel: ``(*lead, *bank_kernel_size, C_in, C_out)``; leading axes (templates) are kept.
        bank_kernel_size: The kernel's spatial extent.
        kernel_size: The extent wanted, per axis ``<=`` the bank's and of the same parity, so
            that the slice is centred (``kernel[1:2]`` for 1 of 3, ``kernel[1:4]`` for 3 of 5).
        in_channels: Input width wanted.
        out_channels: Output width wanted.

    Returns:
        ``(*lead, *kernel_size, in_channels, out_channels)``; ``kernel`` itself when nothing
        is cut.
    """
    kernel_size, bank_kernel_size = tuple(kernel_size), tuple(bank_kernel_size)
    if kernel_size == bank_kernel_size and tuple(kernel.shape[-2:]) == (in_channels, out_channels):
        return kernel
    if kernel_size == bank_kernel_size:  # the channel corner only
        return kernel[..., :in_channels, :out_channels]
    centre = tuple(
        slice((big - k) // 2, (big - k) // 2 + k)
        for big, k in zip(bank_kernel_size, kernel_size, strict=True)
    )  # static Python slices: a variable's __getitem__ takes them on every backend
    return kernel[(Ellipsis, *centre, slice(0, in_channels), slice(0, out_channels))]


def _check_spatial_dims(spatial_dims: int) -> int:
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}.")
    return int(spatial_dims)


@keras.saving.register_keras_serializable(package=PACKAGE)
class KernelBank(keras.layers.Layer):
    """Owns one convolution kernel that any number of :class:`SharedConv` layers use.

    Args:
        spatial_dims: 2 or 3.
        kernel_size: Kernel extent per spatial axis.
        in_channels: Widest input width any user needs.
        out_channels: Widest output width any user needs.
        kernel_initializer: Initializer of the kernel.
    """

    def __init__(
        self,
        spatial_dims: int,
        kernel_size: int | Sequence[int],
        in_channels: int,
        out_channels: int,
        kernel_initializer: str = "he_normal",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.spatial_dims = _check_spatial_dims(spatial_dims)
        self.kernel_size = _as_tuple(kernel_size, self.spatial_dims, "kernel_size")
        if in_channels < 1 or out_channels < 1:
            raise ValueError(
                f"Bank widths must be >= 1, got in_channels={in_channels!r}, "
                f"out_channels={out_channels!r}."
            )
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self._create_weights()
        self.built = True

    def _create_weights(self) -> None:
        self.kernel = self.add_weight(
            name="kernel",
            shape=(*self.kernel_size, self.in_channels, self.out_channels),
            initializer=self.kernel_initializer,
            trainable=True,
        )

    def get_kernel(
        self,
        in_channels: int,
        out_channels: int,
        coefficients=None,
        kernel_size: Sequence[int] | None = None,
    ):
        """The kernel for a conv of the given widths and kernel size.

        Args:
            in_channels: The conv's input width (``<=`` the bank's).
            out_channels: The conv's output width (``<=`` the bank's).
            coefficients: Unused here (see :class:`TemplateBank`).
            kernel_size: The conv's kernel extent per axis; ``None`` = the bank's. A smaller
                extent takes the centred slice along that axis.

        Returns:
            ``(*kernel_size, in_channels, out_channels)``, a slice of the bank's kernel.
        """
        del coefficients
        size = self.kernel_size if kernel_size is None else tuple(kernel_size)
        return slice_kernel(self.kernel, self.kernel_size, size, in_channels, out_channels)

    def check_widths(self, in_channels: int, out_channels: int) -> None:
        """Raise if a conv of these widths cannot draw from this bank."""
        if in_channels > self.in_channels or out_channels > self.out_channels:
            raise ValueError(
                f"Bank {self.name!r} holds kernels up to {self.in_channels}->{self.out_channels} "
                f"channels; a conv {in_channels}->{out_channels} cannot use it."
            )

    def check_kernel_size(self, kernel_size: tuple[int, ...]) -> None:
        """Raise unless a conv of this kernel size has a centred slice in this bank."""
        fits = len(kernel_size) == self.spatial_dims and all(
            k <= big and (big - k) % 2 == 0
            for k, big in zip(kernel_size, self.kernel_size, strict=True)
        )
        if not fits:
            raise ValueError(
                f"Bank {self.name!r} holds {self.kernel_size} kernels; a conv of kernel size "
                f"{kernel_size!r} has no centred slice in it (each axis must be at most the "
                f"bank's and differ from it by an even number)."
            )

    def call(self, inputs=None):  # A bank is not applied to data.
        raise TypeError(f"Bank {self.name!r} is not called on data; use it from a SharedConv.")

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            spatial_dims=self.spatial_dims,
            kernel_size=self.kernel_size,
            in_channels=self.in_channels,
            out_channels=self.out_channels,
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
        )
        return config


@keras.saving.register_keras_serializable(package=PACKAGE)
class TemplateBank(KernelBank):
    """Owns ``num_templates`` kernels; each user mixes them with its own coefficients.

    Args:
        num_templates: Number of templates (>= 1).
        (others as :class:`KernelBank`)
    """

    def __init__(
        self,
        spatial_dims: int,
        kernel_size: int | Sequence[int],
        in_channels: int,
        out_channels: int,
        num_templates: int = 2,
        kernel_initializer: str = "he_normal",
        **kwargs,
    ):
        if int(num_templates) < 1:
            raise ValueError(f"num_templates must be >= 1, got {num_templates!r}.")
        self.num_templates = int(num_templates)
        super().__init__(
            spatial_dims, kernel_size, in_channels, out_channels, kernel_initializer, **kwargs
        )

    def _create_weights(self) -> None:
        self.templates = self.add_weight(
            name="templates",
            shape=(self.num_templates, *self.kernel_size, self.in_channels, self.out_channels),
            initializer=self._template_initializer,
            trainable=True,
        )

    def _template_initializer(self, shape, dtype=None):
        # Each template initialised like an ordinary kernel (fan-in of one kernel).
        return ops.stack([self.kernel_initializer(shape[1:], dtype=dtype) for _ in range(shape[0])])

    def get_kernel(
        self,
        in_channels: int,
        out_channels: int,
        coefficients=None,
        kernel_size: Sequence[int] | None = None,
    ):
        """``sum_t coefficients[t] * template[t]``, sliced as :meth:`KernelBank.get_kernel`."""
        if coefficients is None:
            raise ValueError(f"TemplateBank {self.name!r} needs the conv's mixing coefficients.")
        templates = ops.cast(self.templates, coefficients.dtype)
        size = self.kernel_size if kernel_size is None else tuple(kernel_size)
        templates = slice_kernel(templates, self.kernel_size, size, in_channels, out_channels)
        return ops.tensordot(coefficients, templates, axes=1)

    def get_config(self) -> dict:
        config = super().get_config()
        config["num_templates"] = self.num_templates
        return config


@keras.saving.register_keras_serializable(package=PACKAGE)
class SharedConv(keras.layers.Layer):
    """A convolution whose kernel comes from a bank layer; bias (and coefficients) are its own.

    Input ``(B, *spatial, in_channels)``, output ``(B, *spatial', filters)``, channels last.

    Args:
        filters: Output width.
        bank: The :class:`KernelBank` (or :class:`TemplateBank`) layer to draw the kernel from.
        in_channels: Input width (must fit the bank).
        strides: Stride per spatial axis.
        use_bias: Whether the conv adds its own bias.
        kernel_size: Kernel extent per spatial axis; ``None`` = the bank's. A smaller extent
            along an axis uses the bank's centred slice there (1 of 3: ``kernel[1:2]``), so it
            must differ from the bank's by an even number.
    """

    def __init__(
        self,
        filters: int,
        bank: KernelBank,
        in_channels: int,
        strides: int | Sequence[int] = 1,
        use_bias: bool = True,
        kernel_size: int | Sequence[int] | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not isinstance(bank, KernelBank):
            raise TypeError(
                f"SharedConv {self.name!r} needs a KernelBank layer, got {type(bank).__name__}."
            )
        bank.check_widths(in_channels, filters)
        self.kernel_size = bank.kernel_size
        if kernel_size is not None:
            self.kernel_size = _as_tuple(kernel_size, bank.spatial_dims, "kernel_size")
            bank.check_kernel_size(self.kernel_size)
        self.filters = int(filters)
        self.in_channels = int(in_channels)
        self.bank = bank
        self.strides = _as_tuple(strides, bank.spatial_dims, "strides")
        self.use_bias = bool(use_bias)
        self.coefficients = None
        if isinstance(bank, TemplateBank):
            self.coefficients = self.add_weight(
                name="coefficients",
                shape=(bank.num_templates,),
                initializer=keras.initializers.RandomNormal(stddev=bank.num_templates**-0.5),
            )
        self.bias = None
        if self.use_bias:
            self.bias = self.add_weight(name="bias", shape=(self.filters,), initializer="zeros")
        self.built = True

    def kernel(self):
        """The kernel this conv applies, ``(*kernel_size, in_channels, filters)``."""
        return self.bank.get_kernel(
            self.in_channels, self.filters, self.coefficients, kernel_size=self.kernel_size
        )

    def call(self, inputs):
        kernel = ops.cast(self.kernel(), self.compute_dtype)
        outputs = ops.conv(inputs, kernel, strides=self.strides, padding="same")
        if self.bias is not None:
            outputs = outputs + ops.cast(self.bias, self.compute_dtype)
        return outputs

    def compute_output_shape(self, input_shape):
        spatial = [
            None if size is None else -(-size // stride)
            for size, stride in zip(input_shape[1:-1], self.strides, strict=True)
        ]
        return (input_shape[0], *spatial, self.filters)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            filters=self.filters,
            bank=self.bank.name,
            in_channels=self.in_channels,
            strides=self.strides,
            use_bias=self.use_bias,
            kernel_size=self.kernel_size,
        )
        return config

    @classmethod
    def from_config(cls, config):
        raise TypeError(
            f"SharedConv {config.get('name')!r} cannot be rebuilt on its own: its tie to bank "
            f"{config.get('bank')!r} would be lost. It is rebuilt by the layer that owns the bank."
        )
