"""Feeding training batches: a ``tf.data`` pipeline (TensorFlow backend) or a
``keras.utils.PyDataset`` (any backend, e.g. JAX); :class:`TrainingFeed` gives the training loop
one fold's batches and validation cases.

Batch ``i`` is drawn with the generator ``numpy.random.default_rng([seed, i])``, so the stream of
batches is reproducible whatever the number of parallel workers and their scheduling.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from segshare.data.augment import AugmentSettings, augment, augmentation_for, spatial_margin
from segshare.data.cache import load_cached_case
from segshare.data.prepare import DataSettings, PreparedData
from segshare.data.sampling import PatchSampler


def volume_patch(patch_size: Sequence[int], slice_axis: int | None) -> tuple[int, ...]:
    """The 3D patch drawn from the volumes: ``patch_size`` itself, or for a 2D patch of the
    in-plane axes a slice one voxel thick across ``slice_axis``."""
    patch = [int(p) for p in patch_size]
    if slice_axis is None:
        return tuple(patch)
    if len(patch) != 2:
        raise ValueError(f"a 2D patch needs two sizes, got {list(patch_size)}")
    patch.insert(int(slice_axis), 1)
    return tuple(patch)


class BatchMaker:
    """Makes batch ``index``: sample ``batch_size`` patches, augment each; returns
    x ``(B, *patch, C)`` float32 and y ``(B, *patch)`` int32. With ``slice_axis`` the sampler's
    patches are slices one voxel thick (augmented in-plane, as anisotropic patches are) and the
    batch is 2D: that axis is squeezed out."""

    def __init__(
        self,
        sampler: PatchSampler,
        batch_size: int,
        augmentation: AugmentSettings | None,
        seed: int,
        slice_axis: int | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.sampler, self.batch_size, self.seed = sampler, int(batch_size), int(seed)
        self.augmentation, self.slice_axis = augmentation, slice_axis
        self.margin = spatial_margin(augmentation, sampler.patch_size)
        if slice_axis is not None:  # never draw neighbouring slices
            self.margin = tuple(0 if a == slice_axis else m for a, m in enumerate(self.margin))

    @property
    def patch_size(self) -> tuple[int, ...]:
        """The batch's spatial shape (2D without the slice axis)."""
        patch = self.sampler.patch_size
        if self.slice_axis is None:
            return tuple(patch)
        return tuple(p for a, p in enumerate(patch) if a != self.slice_axis)

    def __call__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, int(index)])
        x, y = self.sampler.sample_batch(self.batch_size, rng, self.margin)
        if self.augmentation is not None:
            pairs = [
                augment(x[b], y[b], self.augmentation, rng, self.sampler.patch_size)
                for b in range(len(x))
            ]
            x, y = np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
        if self.slice_axis is not None:
            x, y = np.squeeze(x, 1 + self.slice_axis), np.squeeze(y, 1 + self.slice_axis)
        return x, y


def _tf_dataset(maker: BatchMaker, patch_size: Sequence[int], channels: int, workers: int):
    import tensorflow as tf

    def load(i):
        x, y = tf.numpy_function(maker, [i], [tf.float32, tf.int32], stateful=False)
        x.set_shape((maker.batch_size, *patch_size, channels))
        y.set_shape((maker.batch_size, *patch_size))
        return x, y

    calls = workers if workers > 0 else tf.data.AUTOTUNE
    ds = tf.data.Dataset.counter().map(load, num_parallel_calls=calls, deterministic=True)
    return ds.prefetch(tf.data.AUTOTUNE)


def _py_dataset(maker: BatchMaker, steps_per_epoch: int, workers: int, multiprocessing: bool):
    import keras

    class PatchDataset(keras.utils.PyDataset):
        """Endless-by-epochs patch batches; epoch ``e`` step ``s`` is batch ``e * steps + s``."""

        def __init__(self):
            super().__init__(
                workers=max(1, workers),
                use_multiprocessing=multiprocessing,
                max_queue_size=max(2, 2 * workers),
            )
            self.epoch = 0

        def __len__(self) -> int:
            return steps_per_epoch

        def __getitem__(self, idx: int):
            return maker(self.epoch * steps_per_epoch + int(idx))

        def on_epoch_end(self) -> None:
            self.epoch += 1

    return PatchDataset()


def make_training_data(
    cache_dir: str | os.PathLike,
    case_ids: Sequence[str],
    patch_size: Sequence[int],
    batch_size: int,
    *,
    oversample_foreground: float = 1 / 3,
    augmentation: AugmentSettings | None = None,
    seed: int = 0,
    backend: str = "auto",
    num_workers: int = 2,
    steps_per_epoch: int = 250,
    use_multiprocessing: bool = False,
    slice_axis: int | None = None,
):
    """Training batches ``(x, y)``: x ``(B, *patch, C)`` float32, y ``(B, *patch)`` int32.

    Args:
        cache_dir: the cache folder (``PreparedData.cache_dir``).
        case_ids: cases to draw from (``PreparedData.train_ids``).
        patch_size: ``(D, H, W)``; with ``slice_axis`` the two in-plane sizes of 2D patches.
        batch_size: patches per batch.
        oversample_foreground: share of each batch forced onto foreground.
        augmentation: the augmentation of each patch; None disables it.
        seed: seed of the batch stream.
        backend: ``"tf"`` (``tf.data.Dataset``: parallel map, prefetch, endless), ``"pydataset"``
            (``keras.utils.PyDataset`` with ``steps_per_epoch`` batches per epoch), or
            ``"auto"``: tf when the Keras backend is TensorFlow, else pydataset.
        num_workers: parallel map calls / PyDataset workers.
        steps_per_epoch: PyDataset length.
        use_multiprocessing: PyDataset workers as processes instead of threads.
        slice_axis: draw 2D patches: slices across this axis of the (RAS) volumes.
    """
    volume = volume_patch(patch_size, slice_axis)
    sampler = PatchSampler(cache_dir, case_ids, volume, oversample_foreground)
    maker = BatchMaker(sampler, batch_size, augmentation, seed, slice_axis)
    if backend == "auto":
        import keras

        backend = "tf" if keras.backend.backend() == "tensorflow" else "pydataset"
    if backend == "tf":
        return _tf_dataset(maker, maker.patch_size, sampler.num_channels, num_workers)
    if backend == "pydataset":
        return _py_dataset(maker, int(steps_per_epoch), int(num_workers), use_multiprocessing)
    raise ValueError(f"backend must be 'auto', 'tf' or 'pydataset', got {backend!r}")


@dataclass(frozen=True)
class TrainingFeed:
    """The training batches and the validation cases of one fold of a prepared dataset.

    Attributes:
        prepared: the prepared dataset (cache, fold split).
        data: the data settings (patch, batch, oversampling, augmentation, workers).
        seed: the run's seed; epoch ``e`` draws batches from ``seed * 10007 + e``.
        steps_per_epoch: batches per epoch (the PyDataset's length).
        max_val_cases: validate on at most this many of the fold's validation cases (None: all).
        slice_axis: train a 2D network on slices across this axis (None: 3D).
    """

    prepared: PreparedData
    data: DataSettings
    seed: int
    steps_per_epoch: int
    max_val_cases: int | None = None
    slice_axis: int | None = None

    @property
    def patch_size(self) -> tuple[int, ...]:
        """The network's training patch (3D, or the two in-plane sizes in 2D)."""
        return tuple(int(p) for p in self.data.patch_size)

    @property
    def window_size(self) -> tuple[int, ...]:
        """The 3D window over a volume that the patch is (one voxel thick in 2D)."""
        return volume_patch(self.patch_size, self.slice_axis)

    def augmentation(self, total_steps: int) -> AugmentSettings | None:
        """The augmentation of a run of ``total_steps`` optimizer steps."""
        return augmentation_for(self.data.augment, total_steps)

    def batches(self, epoch: int, total_steps: int):
        """The batches of ``epoch`` of a run of ``total_steps`` steps (see
        :func:`make_training_data`)."""
        return make_training_data(
            self.prepared.cache_dir,
            self.prepared.train_ids,
            self.patch_size,
            int(self.data.batch_size),
            oversample_foreground=float(self.data.oversample_foreground),
            augmentation=self.augmentation(total_steps),
            seed=int(self.seed) * 10007 + epoch,
            num_workers=int(self.data.num_workers),
            steps_per_epoch=int(self.steps_per_epoch),
            slice_axis=self.slice_axis,
        )

    def validation_cases(self) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
        """``(case_id, image (D, H, W, C), label (D, H, W))`` of the validated cases, cached."""
        ids = list(self.prepared.val_ids)[: self.max_val_cases]
        for case_id in ids:
            image, label, _ = load_cached_case(self.prepared.cache_dir, case_id)
            yield case_id, image, label
