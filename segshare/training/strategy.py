"""The runtime of training: where it runs (one device, local devices, several machines), seeds,
determinism, precision and XLA, for the TensorFlow and the JAX backend.

TensorFlow: ``auto`` picks ``MultiWorkerMirroredStrategy`` when a cluster is described
(``TF_CONFIG`` with more than one worker, or a SLURM job of several tasks), ``MirroredStrategy``
with several local GPUs, and the default strategy otherwise. JAX: ``auto`` (or ``mirrored``) is
data parallel over the local devices (``keras.distribution.DataParallel``) when there are several;
``multi_worker`` is refused. TensorFlow is imported only under its backend.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

import keras

from segshare.devices import accelerator_present

STRATEGIES = ("auto", "default", "mirrored", "multi_worker")


def _tf_config_workers() -> int:
    try:
        config = json.loads(os.environ.get("TF_CONFIG", "") or "{}")
    except json.JSONDecodeError as err:
        raise ValueError(f"TF_CONFIG is not valid JSON: {err}") from err
    cluster = config.get("cluster", {})
    return len(cluster.get("worker", [])) + len(cluster.get("chief", []))


def _slurm_tasks() -> int:
    return int(os.environ.get("SLURM_NTASKS", "1") or 1)


def make_strategy(name: str = "auto") -> Any:
    """The strategy named ``name`` (one of :data:`STRATEGIES`) for the Keras backend: a
    ``tf.distribute.Strategy``, or a :class:`JaxStrategy`."""
    if name not in STRATEGIES:
        raise ValueError(f"trainer.strategy must be one of {STRATEGIES}, got {name!r}.")
    if keras.backend.backend() != "tensorflow":
        return JaxStrategy(data_parallel=name in ("auto", "mirrored"))
    import tensorflow as tf

    multi = _tf_config_workers() > 1 or _slurm_tasks() > 1
    if name == "auto":
        gpus = tf.config.list_physical_devices("GPU")
        name = "multi_worker" if multi else ("mirrored" if len(gpus) > 1 else "default")
    if name == "multi_worker":
        resolver = None
        if _tf_config_workers() <= 1 and _slurm_tasks() > 1:
            resolver = tf.distribute.cluster_resolver.SlurmClusterResolver()
        return tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver)
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def check_backend(strategy: str, precision: str) -> None:
    """Refuse, before any work, what the current backend cannot train.

    Raises:
        ValueError: an unsupported backend, or a strategy or precision it lacks, naming what to
            use instead.
    """
    name = keras.backend.backend()
    if strategy not in STRATEGIES:
        raise ValueError(f"trainer.strategy must be one of {STRATEGIES}, got {strategy!r}.")
    if name == "tensorflow":
        return
    if name != "jax":
        raise ValueError(
            f"segshare-train runs under KERAS_BACKEND=tensorflow or jax, not {name!r} (the model "
            f"and segshare-predict run under {name}); train with KERAS_BACKEND=jax or tensorflow."
        )
    if strategy == "multi_worker":
        raise ValueError(
            "trainer.strategy=multi_worker is TensorFlow's MultiWorkerMirroredStrategy; under "
            "KERAS_BACKEND=jax use trainer.strategy=auto (data parallel over the local devices), "
            "or train on several machines with KERAS_BACKEND=tensorflow."
        )
    if precision == "mixed_float16":
        raise ValueError(
            "trainer.precision=mixed_float16 needs loss scaling, which segshare's JAX step does "
            "not do; use trainer.precision=mixed_bfloat16 (no loss scaling needed) under "
            "KERAS_BACKEND=jax, or mixed_float16 with KERAS_BACKEND=tensorflow."
        )


class JaxStrategy:
    """What the loop needs of a strategy under JAX: its scope (the Keras distribution over the
    local devices, if several) and the replica count."""

    def __init__(self, data_parallel: bool):
        import jax

        self.devices = jax.devices()
        self.distribution = (
            keras.distribution.DataParallel(devices=self.devices)
            if data_parallel and len(self.devices) > 1
            else None
        )
        self.num_replicas_in_sync = len(self.devices) if self.distribution else 1
        self.cluster_resolver = None  # one process: always the chief

    def scope(self):
        """Variables created inside are replicated over the devices (data parallel)."""
        if self.distribution is None:
            return contextlib.nullcontext()
        return self.distribution.scope()


def check_batch_split(strategy: Any, batch_size: int) -> None:
    """Refuse a batch that JAX's data parallelism cannot split evenly over its devices.

    Raises:
        ValueError: naming the batch, the devices and the two ways out.
    """
    n = int(getattr(strategy, "num_replicas_in_sync", 1))
    if isinstance(strategy, JaxStrategy) and n > 1 and int(batch_size) % n:
        raise ValueError(
            f"data.batch_size={batch_size} does not split over the {n} local devices that "
            f"trainer.strategy=auto trains on under JAX; set data.batch_size to a multiple of {n}, "
            f"or trainer.strategy=default for one device."
        )


def is_chief(strategy: Any) -> bool:
    """Whether this process writes the run's files (worker 0 of a cluster, else always)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not getattr(resolver, "task_type", None):
        return True
    return resolver.task_type == "chief" or (
        resolver.task_type == "worker" and resolver.task_id == 0
    )


def configure_runtime(seed: int, precision: str, deterministic: bool) -> None:
    """Seed every generator (Python, NumPy, Keras/TensorFlow), optionally make TensorFlow's ops
    deterministic, and set the Keras dtype policy (``float32 | mixed_float16 | mixed_bfloat16``).
    """
    keras.utils.set_random_seed(int(seed))
    if deterministic and keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()  # JAX on CPU is deterministic as it is
    keras.mixed_precision.set_global_policy(str(precision))


def resolve_jit_compile(setting: bool | str) -> bool:
    """``trainer.jit_compile``: True/False as given; ``"auto"`` = on with a GPU, off on a CPU
    (where XLA made the 3D U-Net step 10x slower)."""
    if setting == "auto":
        return accelerator_present()
    if not isinstance(setting, bool):
        raise ValueError(f"trainer.jit_compile must be true, false or 'auto', got {setting!r}.")
    return setting


def with_loss_scaling(optimizer, precision: str):
    """The optimizer, wrapped in Keras' dynamic loss scaling when ``precision`` is float16."""
    if precision == "mixed_float16":
        return keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer
