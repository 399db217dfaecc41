"""The backend-specific part of training: the optimizer step and where it runs.

The loop (:mod:`segshare.training.loop`) sees only :class:`Steps`: ``start(dataset)`` an epoch,
``step()`` one optimizer step (its loss), ``finish()`` the epoch. Between ``finish`` and the next
``start`` the model's and the optimizer's variables hold the whole state, so validation,
checkpoints, ``model.keras`` and resumption are the same on every backend.

* TensorFlow: ``strategy.run`` of a ``GradientTape`` step in one ``tf.function`` (XLA by
  ``trainer.jit_compile``), over a ``tf.distribute`` strategy: one device, ``MirroredStrategy``,
  ``MultiWorkerMirroredStrategy``.
* JAX: one ``jax.jit`` of Keras' stateless API (``stateless_call``, ``stateless_apply``); during an
  epoch the variables travel as arrays and are written back at ``finish``. Batches come from the
  ``keras.utils.PyDataset`` of :mod:`segshare.data.pipeline`, ``num_workers`` at a time from a
  thread pool, and never touch TensorFlow. With several local devices the batch is split across
  them (``keras.distribution.DataParallel``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import keras
import numpy as np


class Steps(Protocol):
    """One epoch of optimizer steps."""

    def start(self, dataset: Any) -> None:
        """Begin an epoch over ``dataset`` (:func:`segshare.data.pipeline.make_training_data`)."""

    def step(self) -> float:
        """One optimizer step; its loss."""

    def finish(self) -> None:
        """End the epoch: the model and optimizer variables hold the state."""

    def abort(self) -> None:
        """Stop an epoch that failed: release its workers; the variables are left as they were
        at its start or last ``finish`` (the last checkpoint's state is what a resume uses)."""


def make_steps(
    model: keras.Model,
    optimizer: keras.optimizers.Optimizer,
    loss_fn: Callable,
    strategy: Any,
    *,
    jit_compile: bool,
    num_workers: int,
) -> Steps:
    """The :class:`Steps` of the current backend (``jit_compile``: TensorFlow's XLA switch; the
    JAX step is always compiled)."""
    if keras.backend.backend() == "tensorflow":
        return TensorFlowSteps(model, optimizer, loss_fn, strategy, jit_compile)
    return JaxSteps(model, optimizer, loss_fn, strategy, num_workers)


class TensorFlowSteps:
    """``strategy.run`` of a ``GradientTape`` step, in one ``tf.function``."""

    def __init__(self, model, optimizer, loss_fn, strategy, jit_compile: bool):
        import tensorflow as tf

        self._tf = tf
        self.model, self.optimizer, self.loss_fn, self.strategy = (
            model,
            optimizer,
            loss_fn,
            strategy,
        )
        self._step = tf.function(self._distributed_step, jit_compile=jit_compile)
        self._iterator: Iterator | None = None

    def _replica_step(self, x, y):
        with self._tf.GradientTape() as tape:
            outputs = self.model(x, training=True)
            loss = self.loss_fn(y, outputs)
            scaled = self.optimizer.scale_loss(loss / self.strategy.num_replicas_in_sync)
        grads = tape.gradient(scaled, self.model.trainable_variables)
        self.optimizer.apply(grads, self.model.trainable_variables)
        return loss

    def _distributed_step(self, iterator):
        x, y = next(iterator)
        per_replica = self.strategy.run(self._replica_step, args=(x, y))
        return self.strategy.reduce(self._tf.distribute.ReduceOp.MEAN, per_replica, axis=None)

    def start(self, dataset) -> None:
        self._iterator = iter(self.strategy.experimental_distribute_dataset(dataset))

    def step(self) -> float:
        return float(self._step(self._iterator))

    def finish(self) -> None:
        self._iterator = None

    def abort(self) -> None:
        self._iterator = None


class JaxSteps:
    """One ``jax.jit`` of Keras' stateless step; the variables as arrays during an epoch."""

    def __init__(self, model, optimizer, loss_fn, strategy: Any, num_workers: int):
        import jax

        self.model, self.optimizer, self.strategy = model, optimizer, strategy
        self.num_workers = max(1, int(num_workers))

        def loss_and_state(trainable, non_trainable, x, y):
            outputs, non_trainable = model.stateless_call(
                trainable, non_trainable, x, training=True
            )
            loss = loss_fn(y, outputs)
            return loss, non_trainable

        grad_fn = jax.value_and_grad(loss_and_state, has_aux=True)

        def train_step(state, x, y):
            trainable, non_trainable, optimizer_vars = state
            (loss, non_trainable), grads = grad_fn(trainable, non_trainable, x, y)
            trainable, optimizer_vars = optimizer.stateless_apply(optimizer_vars, grads, trainable)
            return loss, (trainable, non_trainable, optimizer_vars)

        self._jax = jax
        self._step = jax.jit(train_step)
        self._state: tuple | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._pending: deque = deque()  # batches being made, in order
        self._next, self._dataset = 0, None

    def _place(self, array: np.ndarray):
        """A batch on the devices: split along the batch axis when data parallel. Every process
        of a cluster makes the same global batch (the feed is seeded by seed and epoch) and
        supplies the shards of its own devices."""
        distribution = self.strategy.distribution
        if distribution is None:
            return array
        sharding = distribution.get_data_layout(array.shape).backend_layout
        return self._jax.make_array_from_callback(array.shape, sharding, lambda i: array[i])

    def start(self, dataset) -> None:
        self._state = (
            [v.value for v in self.model.trainable_variables],
            [v.value for v in self.model.non_trainable_variables],
            [v.value for v in self.optimizer.variables],
        )
        self._pool = ThreadPoolExecutor(self.num_workers, thread_name_prefix="segshare-batch")
        self._dataset, self._next = dataset, 0
        for _ in range(2 * self.num_workers):  # a few batches ahead, never the whole epoch
            self._submit()

    def _submit(self) -> None:
        if self._next < len(self._dataset):
            self._pending.append(self._pool.submit(self._dataset.__getitem__, self._next))
            self._next += 1

    def step(self) -> float:
        x, y = self._pending.popleft().result()
        self._submit()
        loss, self._state = self._step(self._state, self._place(x), self._place(y))
        return float(loss)

    def abort(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._pool, self._dataset, self._state = None, None, None
        self._pending.clear()

    def finish(self) -> None:
        state = self._state
        self.abort()
        if state is None:
            return
        trainable, non_trainable, optimizer_vars = state
        for variable, value in zip(self.model.trainable_variables, trainable, strict=True):
            variable.assign(value)
        for variable, value in zip(self.model.non_trainable_variables, non_trainable, strict=True):
            variable.assign(value)
        for variable, value in zip(self.optimizer.variables, optimizer_vars, strict=True):
            variable.assign(value)


__all__ = ["JaxSteps", "Steps", "TensorFlowSteps", "make_steps"]
