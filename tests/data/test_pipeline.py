from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from segshare.data.augment import AugmentSettings
from segshare.data.pipeline import make_training_data

from .conftest import data_settings

AUG = AugmentSettings(
    p_flip=0.5, p_rotation=0.5, rotation_deg=15.0, p_noise=0.5, noise_std=(0, 0.1)
)


def test_tf_and_pydataset_give_the_same_seeded_batches(prepared):
    kw = dict(oversample_foreground=0.5, augmentation=AUG, seed=11)
    tf_ds = make_training_data(
        prepared.cache_dir, prepared.train_ids, (15, 16, 17), 2, backend="tf", **kw
    )
    batches = [(np.asarray(x), np.asarray(y)) for x, y in tf_ds.take(3)]
    x, y = batches[0]
    assert x.shape == (2, 15, 16, 17, 1) and x.dtype == np.float32
    assert y.shape == (2, 15, 16, 17) and y.dtype == np.int32
    again = next(
        iter(
            make_training_data(
                prepared.cache_dir, prepared.train_ids, (15, 16, 17), 2, backend="tf", **kw
            )
        )
    )
    np.testing.assert_array_equal(np.asarray(again[0]), x)
    py_ds = make_training_data(
        prepared.cache_dir,
        prepared.train_ids,
        (15, 16, 17),
        2,
        backend="pydataset",
        steps_per_epoch=7,
        **kw,
    )
    assert len(py_ds) == 7
    for i, (bx, by) in enumerate(batches):
        px, py = py_ds[i]
        np.testing.assert_array_equal(px, bx)
        np.testing.assert_array_equal(py, by)
    py_ds.on_epoch_end()
    assert not np.array_equal(py_ds[0][0], batches[0][0])  # a new epoch draws new patches


def test_bad_backend(prepared):
    with pytest.raises(ValueError, match="backend"):
        make_training_data(prepared.cache_dir, prepared.train_ids, (8, 8, 8), 2, backend="torch")


def test_the_feed_augments_by_the_run_length():
    from segshare.data.augment import AugmentByLength, AugmentSettings, augmentation_for
    from segshare.data.pipeline import TrainingFeed

    full, light = AugmentSettings(p_flip=0.5), AugmentSettings(p_flip=0.1)
    choice = AugmentByLength(full, light, light_below_steps=1000)
    data = dataclasses.replace(data_settings(), augment=choice)
    feed = TrainingFeed(prepared=None, data=data, seed=0, steps_per_epoch=50)
    assert feed.augmentation(999) is light and feed.augmentation(1000) is full
    assert augmentation_for(full, 10) is full and augmentation_for(None, 10) is None
    with pytest.raises(ValueError, match="light_below_steps must be >= 0"):
        AugmentByLength(full, light, light_below_steps=-1)
