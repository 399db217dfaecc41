"""The usual answers to "how do I share one weight between two layers?", tried on Keras 3.

Each test backs one claim of ``docs/sharing.md``: what a raw variable handed to two layers, a
``Lambda`` closing over a variable and a ``get_weights``/``set_weights`` copy do on save, reload
and training, and why segshare's bank layer (one owner, references rebuilt by the composite
encoder) keeps the tie through all three.
"""

import json
import zipfile

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import ops

from segshare.models import KernelBank, SharedConv, build_unet, count_unique_params

UNET = dict(spatial_dims=2, in_channels=1, num_classes=2, features=(4, 8), blocks_per_stage=(1, 2))


def _unique_ids(variables):
    return {id(v) for v in variables}


def _saved_variable_paths(path):
    """Dataset paths inside the weights file of a ``.keras`` archive."""
    names = []

    def collect(name, obj):
        if isinstance(obj, h5py.Dataset):
            names.append(name)

    with zipfile.ZipFile(path) as archive, archive.open("model.weights.h5") as handle:
        with h5py.File(handle, "r") as weights:
            weights.visititems(collect)
    return names


def _encoder_convs(model):
    """Every SharedConv of the model's encoder, in wiring order."""
    convs = []
    for units in model.get_layer("encoder").stages:
        for unit in units:
            for conv_unit in (unit.unit1, unit.unit2) if hasattr(unit, "unit1") else (unit,):
                convs.append(conv_unit.conv)
    return convs


def _fit_one_batch(model, x, y, lr=0.1):
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=lr),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(x, y, batch_size=len(x), epochs=1, verbose=0)


def _data(n=2, size=8, channels=1, classes=2):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, size, size, channels)).astype("float32")
    y = rng.integers(0, classes, size=(n, size, size)).astype("int32")
    return x, y


def test_these_tests_run_under_the_tensorflow_backend():
    assert keras.backend.backend() == "tensorflow"


# 1. A raw variable handed to two custom layers' __init__.


class UsesVariable(keras.layers.Layer):
    """A layer that takes its kernel as an ``__init__`` argument (the usual first answer)."""

    def __init__(self, kernel, **kwargs):
        super().__init__(**kwargs)
        self.kernel = kernel

    def call(self, inputs):
        return ops.matmul(inputs, self.kernel)


@keras.saving.register_keras_serializable(package="test_sharing_alternatives")
class RebuildsVariable(keras.layers.Layer):
    """The same layer made serialisable: its config holds the width, ``from_config`` (which Keras
    calls on load) creates a fresh kernel because the shared variable cannot be in the config."""

    def __init__(self, units, kernel=None, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        if kernel is None:
            kernel = self.add_weight(shape=(units, units), name="kernel")
        self.kernel = kernel

    def call(self, inputs):
        return ops.matmul(inputs, self.kernel)

    def get_config(self):
        return {**super().get_config(), "units": self.units}


def test_raw_keras_variable_is_tracked_once_but_model_save_fails_in_get_config(tmp_path):
    shared = keras.Variable(np.eye(3, dtype="float32"), name="shared")
    first, second = UsesVariable(shared, name="first"), UsesVariable(shared, name="second")
    inputs = keras.Input((3,))
    model = keras.Model(inputs, second(first(inputs)))
    assert first.kernel is second.kernel
    assert [w.path for w in model.weights] == ["shared"]  # both layers track it, listed once
    with pytest.raises(NotImplementedError, match="non-serializable argument values"):
        first.get_config()
    with pytest.raises(NotImplementedError, match="must override `get_config"):
        model.save(tmp_path / "raw.keras")
    assert (tmp_path / "raw.keras").stat().st_size == 0  # an empty file is left behind
    with pytest.raises(ValueError, match="accessible `.keras` zip file"):
        keras.models.load_model(tmp_path / "raw.keras")


def test_raw_tf_variable_is_invisible_to_keras_weights_and_training(tmp_path):
    shared = tf.Variable(np.eye(3, dtype="float32"), name="shared")
    inputs = keras.Input((3,))
    hidden = UsesVariable(shared, name="second")(UsesVariable(shared, name="first")(inputs))
    model = keras.Model(inputs, keras.layers.Dense(1, name="dense")(hidden))
    names = [w.path for w in model.weights]
    assert names == ["dense/kernel", "dense/bias"]  # the tf.Variable is not tracked at all
    dense_before = np.asarray(model.get_layer("dense").kernel).copy()
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    rng = np.random.default_rng(0)
    model.fit(rng.normal(size=(4, 3)), rng.normal(size=(4, 1)), verbose=0)
    np.testing.assert_array_equal(shared.numpy(), np.eye(3, dtype="float32"))  # never trained
    assert not np.allclose(np.asarray(model.get_layer("dense").kernel), dense_before)
    with pytest.raises(NotImplementedError, match="non-serializable argument values"):
        model.save(tmp_path / "raw_tf.keras")


def test_rebuilt_from_config_saves_but_reload_unties_the_variable(tmp_path):
    first = RebuildsVariable(3, name="first")
    second = RebuildsVariable(3, kernel=first.kernel, name="second")
    inputs = keras.Input((3,))
    model = keras.Model(inputs, second(first(inputs)))
    assert first.kernel is second.kernel
    assert len(model.weights) == 1 and count_unique_params(model) == 9

    path = tmp_path / "rebuilt.keras"
    model.save(path)
    # The archive stores the one variable twice, once under each layer.
    assert len(_saved_variable_paths(path)) == 2
    reloaded = keras.models.load_model(path)
    x = np.random.default_rng(0).normal(size=(2, 3)).astype("float32")
    np.testing.assert_allclose(np.asarray(reloaded(x)), np.asarray(model(x)), rtol=1e-6)
    r_first, r_second = reloaded.get_layer("first"), reloaded.get_layer("second")
    assert r_first.kernel is not r_second.kernel  # two independent variables now
    assert len(reloaded.weights) == 2 and count_unique_params(reloaded) == 18
    r_first.kernel.assign(r_first.kernel * 2.0)  # a change to one no longer changes the other
    assert not np.allclose(np.asarray(r_first.kernel), np.asarray(r_second.kernel))
    first.kernel.assign(first.kernel * 2.0)  # while in the original both uses moved together
    np.testing.assert_array_equal(np.asarray(first.kernel), np.asarray(second.kernel))


# 2. A Lambda layer closing over a variable.


def _lambda_model():
    scale = keras.Variable(np.full((3,), 2.0, dtype="float32"), name="scale")
    inputs = keras.Input((3,))
    outputs = keras.layers.Lambda(lambda t: t * scale, output_shape=(3,), name="scaled")(inputs)
    return keras.Model(inputs, outputs), scale


def test_lambda_closure_is_refused_by_safe_mode_and_its_variable_is_not_a_weight(tmp_path):
    model, scale = _lambda_model()
    assert model.weights == [] and model.get_layer("scaled").weights == []
    path = tmp_path / "lambda.keras"
    model.save(path)
    assert _saved_variable_paths(path) == []  # nothing in the weights file
    # The closure's value at save time is written into config.json as a literal instead.
    config = json.loads(zipfile.ZipFile(path).read("config.json"))
    function = config["config"]["layers"][1]["config"]["function"]["config"]
    assert function["closure"] == [
        {"class_name": "__tensor__", "config": {"value": [2.0, 2.0, 2.0], "dtype": "float32"}}
    ]
    with pytest.raises(ValueError, match="deserialization of a `Lambda` layer"):
        keras.models.load_model(path)  # safe_mode=True is the default

    reloaded = keras.models.load_model(path, safe_mode=False)
    assert reloaded.weights == []
    cell = reloaded.get_layer("scaled").function.__closure__[0].cell_contents
    assert isinstance(cell, dict) and cell["class_name"] == "__tensor__"  # not a variable
    x = np.ones((2, 3), dtype="float32")
    np.testing.assert_allclose(np.asarray(model(x)), 2.0 * x)
    with pytest.raises(ValueError, match="unsupported type"):
        reloaded(x)  # the reloaded closure holds the serialised dict, not a tensor
    scale.assign(np.zeros(3, dtype="float32"))
    np.testing.assert_allclose(np.asarray(model(x)), 0.0)  # the original reads the live variable


# 3. Copying with get_weights / set_weights.


def test_set_weights_copies_and_one_training_step_makes_the_copies_differ():
    inputs = keras.Input((3,))
    first = keras.layers.Dense(3, name="first")
    second = keras.layers.Dense(3, name="second")
    model = keras.Model(inputs, keras.layers.Dense(1, name="out")(second(first(inputs))))
    second.set_weights(first.get_weights())
    np.testing.assert_array_equal(np.asarray(first.kernel), np.asarray(second.kernel))
    assert first.kernel is not second.kernel
    assert count_unique_params(model) == 2 * (3 * 3 + 3) + 4  # both kernels count
    rng = np.random.default_rng(0)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    model.fit(rng.normal(size=(4, 3)), rng.normal(size=(4, 1)), batch_size=4, verbose=0)
    assert not np.allclose(np.asarray(first.kernel), np.asarray(second.kernel))


# 4. segshare's bank layer with references.


def test_bank_model_lists_shared_kernel_once_with_per_use_bias_and_norm():
    model = build_unet(**UNET, sharing="stage")
    assert len(_unique_ids(model.weights)) == len(model.weights)
    encoder = model.get_layer("encoder")
    stage_bank = next(b for b in encoder.banks if b.name == "encoder_stage1_bank")
    users = [c for c in _encoder_convs(model) if c.bank is stage_bank]
    assert len(users) == 4  # the four block convs of stage 1
    assert sum(w is stage_bank.kernel for w in model.weights) == 1
    assert sum(w is stage_bank.kernel for w in model.trainable_weights) == 1
    assert len(_unique_ids(c.bias for c in users)) == 4  # each use keeps its own bias
    units = [u for b in encoder.stages[1][1:] for u in (b.unit1, b.unit2)]
    assert len(_unique_ids(u.norm.gamma for u in units)) == 4  # and its own normalisation
    unshared = build_unet(**UNET, sharing="none")
    saved = 3 * (3 * 3 * 8 * 8) + 1 * (3 * 3 * 4 * 4)  # stage 1: 4 uses of one kernel; stage 0: 2
    assert count_unique_params(unshared) - count_unique_params(model) == saved


def test_bank_gradient_is_the_sum_of_the_gradients_of_its_uses():
    keras.utils.set_random_seed(0)
    bank = KernelBank(2, 3, in_channels=3, out_channels=3, name="bank")
    narrow = SharedConv(3, bank, in_channels=2, name="narrow")  # uses kernel[..., :2, :3]
    wide = SharedConv(3, bank, in_channels=3, name="wide")  # uses the whole kernel
    x = tf.constant(np.random.default_rng(0).normal(size=(1, 5, 5, 2)).astype("float32"))

    with tf.GradientTape() as tape:
        loss = ops.sum(ops.square(wide(narrow(x))))
    shared_grad = tape.gradient(loss, bank.kernel).numpy()

    k_narrow = tf.Variable(np.asarray(bank.kernel)[..., :2, :3])
    k_wide = tf.Variable(np.asarray(bank.kernel))
    with tf.GradientTape() as tape:
        h = ops.conv(x, k_narrow, padding="same") + narrow.bias
        loss = ops.sum(ops.square(ops.conv(h, k_wide, padding="same") + wide.bias))
    g_narrow, g_wide = (g.numpy() for g in tape.gradient(loss, [k_narrow, k_wide]))
    expected = g_wide.copy()
    expected[..., :2, :3] += g_narrow
    np.testing.assert_allclose(shared_grad, expected, rtol=1e-4, atol=1e-5)
    assert np.abs(g_narrow).max() > 0 and np.abs(g_wide).max() > 0


@pytest.mark.parametrize("scheme", ["stage", "global"])
def test_bank_round_trip_keeps_outputs_ties_and_training_keeps_the_tie(tmp_path, scheme):
    keras.utils.set_random_seed(1)
    model = build_unet(**UNET, sharing=scheme)
    x, y = _data()
    path = tmp_path / f"{scheme}.keras"
    model.save(path)
    reloaded = keras.models.load_model(path)  # safe_mode=True: no unsafe code involved
    np.testing.assert_array_equal(np.asarray(reloaded(x)), np.asarray(model(x)))
    assert count_unique_params(reloaded) == count_unique_params(model)

    encoder = reloaded.get_layer("encoder")
    convs = _encoder_convs(reloaded)
    banks_by_id = {id(b): b for b in encoder.banks}
    assert all(id(c.bank) in banks_by_id for c in convs)  # conv.bank is one of encoder.banks
    ties = [[c.name for c in convs if c.bank is b] for b in encoder.banks]
    old = model.get_layer("encoder")
    assert ties == [[c.name for c in _encoder_convs(model) if c.bank is b] for b in old.banks]
    bank = max(encoder.banks, key=lambda b: sum(c.bank is b for c in convs))
    users = [c for c in convs if c.bank is bank]
    assert len(users) >= 4

    before = np.asarray(bank.kernel).copy()
    _fit_one_batch(reloaded, x, y)
    assert np.abs(np.asarray(bank.kernel) - before).max() > 0  # the step moved the bank
    c_in = min(c.in_channels for c in users)
    c_out = min(c.filters for c in users)
    seen = [np.asarray(c.kernel())[..., :c_in, :c_out] for c in users]
    for kernel in seen[1:]:
        np.testing.assert_array_equal(kernel, seen[0])  # every use still sees the same kernel
