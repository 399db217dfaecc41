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


GRADIENT_SCRIPT = """
import json, sys, numpy as np, keras
from segshare.models.norm import InstanceNormalization
assert keras.backend.backend() == sys.argv[1], keras.backend.backend()
rng = np.random.default_rng(0)
out = {}
for dtype, offset in (("float32", 1.0), ("float32", 40.0), ("mixed_bfloat16", 1.0)):
    x = (rng.normal(size=(2, 9, 8, 7, 3)) * 3 + offset).astype("float32")
    w = rng.normal(size=x.shape).astype("float32")
    layer = InstanceNormalization(dtype=dtype)
    layer.build(x.shape)
    layer.set_weights([rng.normal(size=3).astype("float32"), rng.normal(size=3).astype("float32")])

    def loss(values, x, training):
        y, _ = layer.stateless_call(values, [], x, training=training)
        return keras.ops.sum(keras.ops.cast(y, "float32") * w)

    if keras.backend.backend() == "jax":
        import jax
        grads = [jax.grad(loss, argnums=(0, 1))([v.value for v in layer.trainable_variables],
                                                x, t) for t in (True, False)]
        grads = [[*g[0], g[1]] for g in grads]
    else:
        import tensorflow as tf
        grads = []
        for t in (True, False):
            values, xt = [tf.Variable(v.value) for v in layer.trainable_variables], tf.constant(x)
            with tf.GradientTape() as tape:
                tape.watch(xt)
                value = loss(values, xt, t)
            grads.append(tape.gradient(value, [*values, xt]))
    closed, auto = ([np.asarray(keras.ops.convert_to_numpy(g), np.float32) for g in gs]
                    for gs in grads)
    out[f"{dtype}@{offset}"] = [float(np.abs(a - b).max() / np.abs(b).max())
                                for a, b in zip(closed, auto)]
print("RESULT" + json.dumps(out))
"""


@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
def test_the_closed_form_gradient_equals_automatic_differentiation(backend):
    """In training the norm's gradient (gamma, beta, inputs) is its closed form: the same as
    differentiating the forward ops, in float32 (also for activations far from zero mean) and in
    mixed_bfloat16 (to bfloat16 round-off)."""
    import json
    import os
    import subprocess
    import sys

    if backend == "jax":
        pytest.importorskip("jax")
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run(
        [sys.executable, "-c", GRADIENT_SCRIPT, backend],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(ln for ln in done.stdout.splitlines() if ln.startswith("RESULT"))
    errors = json.loads(line[len("RESULT") :])
    for case, relative in errors.items():
        bound = 2e-2 if case.startswith("mixed") else 1e-5
        assert len(relative) == 3 and max(relative) < bound, (case, relative)
