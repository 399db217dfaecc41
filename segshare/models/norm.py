"""Instance normalisation as one reduction over the spatial axes of the 5-D (or 4-D) tensor.

Keras' ``GroupNormalization(groups=-1)`` (one group per channel), which segshare's models used
until now, reshapes the tensor to 6-D to form its groups; some runtimes (OpenVINO's CPU plugin)
run those 6-D reductions with a slow reference kernel. :class:`InstanceNormalization` computes the
same moments on the tensor as it is (per sample and channel, over the spatial axes), with the same
``gamma``/``beta`` variables, epsilon and float32 upcast, so its outputs equal those of
``GroupNormalization(groups=-1)`` to float32 round-off and a checkpoint of either loads into the
other. Models saved with ``GroupNormalization`` load (and predict) unchanged.
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

    def call(self, inputs):
        dtype = inputs.dtype
        # float16/bfloat16 moments overflow or lose precision: upcast, as GroupNormalization does
        x = ops.cast(inputs, keras.backend.result_type(dtype, "float32"))
        axes = list(range(1, len(x.shape) - 1))
        mean, variance = ops.moments(x, axes=axes, keepdims=True)
        inv = ops.rsqrt(variance + self.epsilon)
        if self.scale:
            inv = inv * ops.cast(self.gamma, x.dtype)
        shift = -mean * inv
        if self.center:
            shift = shift + ops.cast(self.beta, x.dtype)
        return ops.cast(x * inv + shift, self.compute_dtype)


#: The name to use: one group per channel.
InstanceNormalization = GroupNormalization

__all__ = ["GroupNormalization", "InstanceNormalization"]
