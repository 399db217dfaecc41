"""The runtime of training: where it runs (one device, local devices, several machines), seeds,
determinism, precision and XLA, for the TensorFlow and the JAX backend.

TensorFlow: ``auto`` picks ``MultiWorkerMirroredStrategy`` when a cluster is described
(``TF_CONFIG`` with more than one worker, or a SLURM job of several tasks), ``MirroredStrategy``
with several local GPUs, and the default strategy otherwise. JAX: ``auto`` (or ``mirrored``) is
data parallel over the local devices (``keras.distribution.DataParallel``) when there are several;
when the same variables describe a cluster (or Keras' own ``KERAS_DISTRIBUTION_JOB_ADDRESSES``,
``_NUM_PROCESSES``, ``_PROCESS_ID``), ``auto`` and ``multi_worker`` first join it with
``keras.distribution.initialize`` (JAX's distributed runtime) and then run data parallel over the
devices of every process. TensorFlow is imported only under its backend.
"""

from __future__ import annotations

import contextlib
import json
import os
import types
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


def jax_cluster() -> dict[str, Any] | None:
    """How this process joins a JAX cluster, from the variables the TensorFlow path reads: the
    arguments of ``keras.distribution.initialize``, or None when no cluster is described.

    * ``TF_CONFIG`` with several workers: every address of ``cluster`` (``chief`` first, then
      ``worker``; the first is JAX's coordinator), their count, and this task's position;
    * ``KERAS_DISTRIBUTION_JOB_ADDRESSES`` or a SLURM job of several tasks: no argument (Keras
      reads its variables, JAX detects SLURM itself).

    Raises:
        ValueError: ``TF_CONFIG`` is not valid JSON or names no task of its cluster.
    """
    if _tf_config_workers() > 1:
        config = json.loads(os.environ["TF_CONFIG"])
        cluster = config["cluster"]
        addresses = [*cluster.get("chief", []), *cluster.get("worker", [])]
        task = config.get("task", {})
        kind, index = task.get("type"), task.get("index")
        if kind not in ("chief", "worker") or not isinstance(index, int):
            raise ValueError(f"TF_CONFIG names no task of its cluster (task: {task!r}).")
        position = index + (len(cluster.get("chief", [])) if kind == "worker" else 0)
        return {
            "job_addresses": ",".join(addresses),
            "num_processes": len(addresses),
            "process_id": position,
        }
    if os.environ.get("KERAS_DISTRIBUTION_JOB_ADDRESSES") or _slurm_tasks() > 1:
        return {}
    return None


def make_strategy(name: str = "auto") -> Any:
    """The strategy named ``name`` (one of :data:`STRATEGIES`) for the Keras backend: a
    ``tf.distribute.Strategy``, or a :class:`JaxStrategy`."""
    if name not in STRATEGIES:
        raise ValueError(f"trainer.strategy must be one of {STRATEGIES}, got {name!r}.")
    if keras.backend.backend() != "tensorflow":
        cluster = jax_cluster() if name in ("auto", "multi_worker") else None
        if name == "multi_worker" and cluster is None:
            raise ValueError(_NO_JAX_CLUSTER)
        return JaxStrategy(data_parallel=name != "default", cluster=cluster)
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
    if strategy == "multi_worker" and jax_cluster() is None:
        raise ValueError(_NO_JAX_CLUSTER)
    if precision == "mixed_float16":
        raise ValueError(
            "trainer.precision=mixed_float16 needs loss scaling, which segshare's JAX step does "
            "not do; use trainer.precision=mixed_bfloat16 (no loss scaling needed) under "
            "KERAS_BACKEND=jax, or mixed_float16 with KERAS_BACKEND=tensorflow."
        )


_NO_JAX_CLUSTER = (
    "trainer.strategy=multi_worker under KERAS_BACKEND=jax needs a cluster: TF_CONFIG with "
    "several workers, a SLURM job of several tasks, or KERAS_DISTRIBUTION_JOB_ADDRESSES; on one "
    "machine use trainer.strategy=auto (data parallel over the local devices)."
)


class JaxStrategy:
    """What the loop needs of a strategy under JAX: its scope (the Keras distribution over the
    devices, if several), the replica count, and which process is the chief.

    Args:
        data_parallel: split each batch over the devices (when there are several).
        cluster: :func:`jax_cluster`'s arguments: join that cluster first (once per process);
            the devices are then those of every process, and process 0 is the chief.
    """

    def __init__(self, data_parallel: bool, cluster: dict[str, Any] | None = None):
        import jax

        if cluster is not None and not jax.distributed.is_initialized():
            keras.distribution.initialize(**cluster)  # before JAX touches a device
        self.devices = jax.devices()
        self.distribution = (
            keras.distribution.DataParallel(devices=self.devices)
            if data_parallel and len(self.devices) > 1
            else None
        )
        self.num_replicas_in_sync = len(self.devices) if self.distribution else 1
        # is_chief reads it as it reads TensorFlow's resolver; one process: always the chief
        self.cluster_resolver = (
            types.SimpleNamespace(task_type="worker", task_id=jax.process_index())
            if jax.process_count() > 1
            else None
        )

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
