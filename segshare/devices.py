"""What accelerator this process trains on: the one question the planner's compute budget and
the runtime's XLA default ask, answered by the active Keras backend without importing another."""

from __future__ import annotations

import functools


@functools.cache
def accelerator_present() -> bool:
    """True when the Keras backend (``KERAS_BACKEND`` or ``~/.keras/keras.json``, default
    TensorFlow) sees a GPU."""
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return any(d.platform != "cpu" for d in jax.devices())
    if backend == "torch":
        import torch

        return bool(torch.cuda.is_available())
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))
