"""What this process computes on: whether the Keras backend sees an accelerator (the planner's
compute budget and the runtime's XLA default ask it, answered without importing another
backend), and whether the CPU computes bfloat16 natively (``precision=auto``)."""

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


#: CPU flags (``/proc/cpuinfo``) of native bfloat16 arithmetic: AVX-512 BF16, AMX.
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")

#: The ``precision`` settings of prediction; training's are Keras dtype policies plus ``auto``.
PREDICT_PRECISIONS = ("auto", "float32", "bfloat16")
TRAIN_PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")


@functools.cache
def cpu_bf16_flags(cpuinfo: str = "/proc/cpuinfo") -> tuple[str, ...]:
    """The :data:`BF16_CPU_FLAGS` this CPU has (none when ``cpuinfo`` cannot be read)."""
    try:
        text = open(cpuinfo, encoding="utf-8", errors="replace").read()
    except OSError:
        return ()
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[-1].split())
    return tuple(f for f in BF16_CPU_FLAGS if f in flags)


def _keras_backend() -> str:
    import keras

    return keras.backend.backend()


def resolve_precision(setting: str, training: bool = False) -> tuple[str, str]:
    """``precision=auto`` (or an explicit setting) -> ``(precision, why)``.

    ``auto`` is bfloat16 (training: ``mixed_bfloat16``, float32 variables) with an accelerator
    or on a CPU with native bfloat16 (:data:`BF16_CPU_FLAGS`) under the TensorFlow backend,
    float32 elsewhere (JAX's CPU convolutions gain nothing from bfloat16: docs/benchmarks.md).

    Raises:
        ValueError: a setting that is not one of :data:`PREDICT_PRECISIONS` (prediction) or
            :data:`TRAIN_PRECISIONS` (training).
    """
    allowed = TRAIN_PRECISIONS if training else PREDICT_PRECISIONS
    key = "trainer.precision" if training else "precision"
    if setting not in allowed:
        raise ValueError(f"{key} must be one of {allowed}, got {setting!r}.")
    if setting != "auto":
        return setting, "as set"
    bf16 = "mixed_bfloat16" if training else "bfloat16"
    if accelerator_present():
        return bf16, "auto: an accelerator"
    flags = cpu_bf16_flags()
    if flags:
        backend = _keras_backend()
        if backend != "tensorflow":  # XLA's CPU convolutions measured no faster in bf16
            return "float32", (
                f"auto: the CPU has {', '.join(flags)}, but only TensorFlow's CPU kernels were "
                f"measured faster in bfloat16, not {backend}'s (docs/benchmarks.md)"
            )
        return bf16, f"auto: the CPU has {', '.join(flags)}"
    return "float32", "auto: the CPU has no native bfloat16 (avx512_bf16 or AMX)"
