"""InstanceNormalization: GroupNormalization(groups=-1)'s maths without the 6-D reshape; old models
and checkpoints load into the new norm unchanged."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from segshare.models.norm import InstanceNormalization


def _pair(shape, dtype="float32"):
    rng = np.random.default_rng(0)
    x = (rng.normal(size=shape) * 3 + 1).astype(np.float32)
    old = keras.layers.GroupNormalization(groups=-1, epsilon=1e-5, dtype=dtype)
    new = InstanceNormalization(epsilon=1e-5, dtype=dtype)
    old.build(shape)
    new.build(shape)
    gamma, beta = rng.normal(size=shape[-1]), rng.normal(size=shape[-1])
    for layer in (old, new):
        layer.set_weights([gamma.astype(np.float32), beta.astype(np.float32)])
    return x, old, new


@pytest.mark.parametrize("shape", [(2, 6, 7, 5, 4), (3, 9, 8, 3)])
def test_equals_group_normalization_with_one_group_per_channel(shape):
    x, old, new = _pair(shape)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(new(x)), keras.ops.convert_to_numpy(old(x)), atol=1e-5
    )
    out = keras.ops.convert_to_numpy(new(x))
    # per sample and channel: zero mean and unit variance before gamma/beta
    gamma, beta = (np.asarray(w) for w in new.get_weights())
    z = (out - beta) / gamma
    axes = tuple(range(1, len(shape) - 1))
    np.testing.assert_allclose(z.mean(axes), 0, atol=1e-4)
    np.testing.assert_allclose(z.std(axes), 1, atol=1e-3)


def test_mixed_bfloat16_upcasts_its_moments():
    x, old, new = _pair((2, 6, 6, 6, 3), dtype="mixed_bfloat16")
    a, b = (keras.ops.convert_to_numpy(keras.ops.cast(m(x), "float32")) for m in (new, old))
    assert keras.backend.standardize_dtype(new(x).dtype) == "bfloat16"
    np.testing.assert_allclose(a, b, atol=3e-2)  # both are bfloat16 outputs of float32 maths


def test_models_and_checkpoints_of_the_old_norm_load_unchanged(tmp_path):
    from segshare.models.unet import build_unet

    model = build_unet(spatial_dims=3, in_channels=1, num_classes=2, features=(4, 8))
    norms = [layer for layer in model._flatten_layers() if isinstance(layer, InstanceNormalization)]
    assert norms  # the planned and default networks use the new norm
    x = np.random.default_rng(1).normal(size=(1, 16, 16, 16, 1)).astype(np.float32)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(loaded(x)), keras.ops.convert_to_numpy(model(x)), atol=1e-6
    )
    # a model of the old norm (GroupNormalization) still saves, loads and predicts as it did
    inputs = keras.Input((None, None, None, 1))
    old = keras.Model(inputs, keras.layers.GroupNormalization(groups=-1)(inputs))
    old.save(tmp_path / "old.keras")
    again = keras.models.load_model(tmp_path / "old.keras")
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(again(x)), keras.ops.convert_to_numpy(old(x)), atol=1e-6
    )
    # a checkpoint written with the old norm loads into the new one (same variables, same maths)
    a = keras.Sequential(
        [
            keras.Input((8, 8, 8, 2)),
            keras.layers.GroupNormalization(groups=-1, epsilon=1e-5, name="norm"),
        ]
    )
    a.layers[0].set_weights([np.array([2.0, 0.5], np.float32), np.array([1.0, -1.0], np.float32)])
    a.save_weights(tmp_path / "a.weights.h5")
    b = keras.Sequential([keras.Input((8, 8, 8, 2)), InstanceNormalization(name="norm")])
    b.load_weights(tmp_path / "a.weights.h5")
    y = np.random.default_rng(2).normal(size=(2, 8, 8, 8, 2)).astype(np.float32)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(b(y)), keras.ops.convert_to_numpy(a(y)), atol=1e-5
    )
