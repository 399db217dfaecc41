"""Instance normalisation as one reduction over the spatial axes of the 5-D (or 4-D) tensor.

Keras' ``GroupNormalization(groups=-1)`` (one group per channel), which segshare's models used
until now, reshapes the tensor to 6-D to form its groups; some runtimes (OpenVINO's CPU plugin)
run those 6-D reductions with a slow reference kernel. :class:`InstanceNormalization` computes the
same moments on the tensor as it is (per sample and channel, over the spatial axes), with the same
``gamma``/``beta`` variables, epsilon and float32 upcast, so its outputs equal those of
``GroupNormalization(groups=-1)`` to float32 round-off and a checkpoint of either loads into the
other. Models saved with ``GroupNormalization`` load (and predict) unchanged.

In training (``training=True``) its gradient is the closed form of the normalisation's backward
pass (:func:`instance_norm_with_gradient`) instead of the automatic differentiation of the forward
ops: two reductions and seven elementwise passes over the activations instead of about a dozen
float32 passes: on a 2-core CPU, where the norm was a quarter of a ``mixed_bfloat16`` training
step, the step got 6-10 % faster (docs/benchmarks.md, issue 15). The forward values come from the
same ops either way, so inference (and the IR an optimized runtime converts) is unchanged.
"""

from __future__ import annotations

import keras
from keras import ops

from segshare.models.layers import PACKAGE


@keras.saving.register_keras_serializable(package=PACKAGE, name="InstanceNormalization")
class GroupNormalization(keras.layers.GroupNormalization):
    """``GroupNormalization(groups=-1)`` without the reshape into groups (module docstring).

    Serialised as ``segshare>InstanceNormalization``; the Python class keeps the name
    ``GroupNormalization`` because Keras addresses a layer's variables in weight files by its
    class name (``.../group_normalization/vars``): so checkpoints written before this layer
    existed resume into it, and its checkpoints into older code. Use it as
    :data:`InstanceNormalization`.
    """

    def __init__(self, epsilon: float = 1e-5, **kwargs):
        kwargs.pop("groups", None)  # always one group per channel (configs record groups=-1)
        super().__init__(groups=-1, epsilon=epsilon, **kwargs)

    def call(self, inputs, training=None):
        # float16/bfloat16 moments overflow or lose precision: upcast, as GroupNormalization does
        upcast = keras.backend.result_type(inputs.dtype, "float32")
        channels = inputs.shape[-1]
        gamma = ops.cast(self.gamma, upcast) if self.scale else ops.ones((channels,), upcast)
        beta = ops.cast(self.beta, upcast) if self.center else ops.zeros((channels,), upcast)
        if training:
            return instance_norm_with_gradient(
                inputs, gamma, beta, self.epsilon, self.compute_dtype
            )
        return _normalize(inputs, gamma, beta, self.epsilon, self.compute_dtype)[0]


def _normalize(inputs, gamma, beta, epsilon: float, dtype: str):
    """``(outputs in ``dtype``, x in float32, mean, 1/std)``: the moments per sample and
    channel over the spatial axes of a channels-last ``inputs``, in float32."""
    x = ops.cast(inputs, keras.backend.result_type(inputs.dtype, "float32"))
    axes = list(range(1, len(x.shape) - 1))
    mean, variance = ops.moments(x, axes=axes, keepdims=True)
    inv = ops.rsqrt(variance + epsilon)
    scale = inv * gamma
    shift = beta - mean * scale
    return ops.cast(x * scale + shift, dtype), x, mean, inv


def instance_norm_with_gradient(inputs, gamma, beta, epsilon: float, dtype: str):
    """Instance normalisation of channels-last ``inputs`` (any float dtype; moments in float32)
    with ``gamma``/``beta`` of shape ``(channels,)``, outputs in ``dtype``, and its closed-form
    gradient.

    With ``x_hat = (x - mean) / std`` over the ``n`` spatial voxels of a sample and channel and
    upstream ``g``: ``d beta = sum g``, ``d gamma = sum g * x_hat``, and
    ``d x = gamma / std * (g - mean(g) - x_hat * mean(g * x_hat))``.
    """

    @ops.custom_gradient
    def normalize(inputs, gamma, beta):
        outputs, x, mean, inv = _normalize(inputs, gamma, beta, epsilon, dtype)

        def grad(*args, upstream=None):
            g = ops.cast(args[0] if upstream is None else upstream, x.dtype)
            axes = list(range(1, len(x.shape) - 1))
            mean_g = ops.mean(g, axis=axes, keepdims=True)
            # mean(g * x_hat) = (mean(g x) - mean(g) mean) / std: no centred copy of x
            mean_g_xhat = (ops.mean(g * x, axis=axes, keepdims=True) - mean_g * mean) * inv
            scale = inv * gamma
            slope = -scale * inv * mean_g_xhat  # d x = scale g + slope (x - mean) - scale mean(g)
            d_x = scale * g + slope * x + (-scale * mean_g - slope * mean)
            voxels = ops.cast(ops.prod(ops.shape(x)[1:-1]), x.dtype)
            batch_axes = list(range(len(x.shape) - 1))
            d_gamma = ops.sum(mean_g_xhat, axis=batch_axes) * voxels
            d_beta = ops.sum(mean_g, axis=batch_axes) * voxels
            return ops.cast(d_x, inputs.dtype), d_gamma, d_beta

        return outputs, grad

    return normalize(inputs, gamma, beta)


#: The name to use: one group per channel.
InstanceNormalization = GroupNormalization

__all__ = ["GroupNormalization", "InstanceNormalization", "instance_norm_with_gradient"]
