"""Shared kernels: gradient sums, ties that survive a .keras round trip."""

import keras
import numpy as np
import pytest

from segshare.models import build_unet, count_unique_params

ARGS = dict(in_channels=1, num_classes=2, features=(4, 8, 8), blocks_per_stage=(1, 2, 1))
# Geometry -> (build_unet arguments, input spatial size). Under ``global`` the anisotropic 3D
# network's bank is 3x3x3 and the 1x3x3 convs of stages 0-1 use its centred slice; the 2D one's
# bank is (5, 3), used as (3, 3), (1, 3) and (5, 3).
GEOMETRIES = {
    "default": ({}, (8, 8, 8)),
    "aniso3d": (
        dict(kernel_sizes=[[1, 3, 3], [1, 3, 3], [3, 3, 3]], strides=[1, [1, 2, 2], [2, 2, 2]]),
        (4, 8, 8),
    ),
    "strides2d": (
        dict(spatial_dims=2, kernel_sizes=[3, [1, 3], [5, 3]], strides=[1, [2, 1], 2]),
        (8, 6),
    ),
}


def _data(geometry, seed=0, batch=2):
    spatial = GEOMETRIES[geometry][1]
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, *spatial, 1)).astype("float32")
    return x, rng.integers(0, 2, size=(batch, *spatial)).astype("int32")


def _build(geometry, **kwargs):
    return build_unet(**ARGS, **GEOMETRIES[geometry][0], **kwargs)


def _centre(conv):
    """Index of ``conv``'s kernel in its bank: centred spatial slice, then the channel corner."""
    spatial = tuple(
        slice((big - k) // 2, (big - k) // 2 + k)
        for big, k in zip(conv.bank.kernel_size, conv.kernel_size, strict=True)
    )
    return (Ellipsis, *spatial, slice(0, conv.in_channels), slice(0, conv.filters))


def _conv_pairs(model_a, model_b):
    """Matching SharedConv layers of two models built from the same settings."""
    convs = []
    for model in (model_a, model_b):
        enc = model.get_layer("encoder")
        convs.append([layer for layer in enc._flatten_layers() if hasattr(layer, "bank")])
    return list(zip(*convs, strict=True))


def _make_twin(shared, block="residual", geometry="default"):
    """An unshared model whose every conv starts with the kernel its shared counterpart uses."""
    twin = _build(geometry, block=block, sharing="none")
    for conv_s, conv_t in _conv_pairs(shared, twin):
        conv_t.bank.kernel.assign(conv_s.kernel())
        conv_t.bias.assign(conv_s.bias)
    enc_s, enc_t = shared.get_layer("encoder"), twin.get_layer("encoder")
    norms = lambda enc: [x for x in enc._flatten_layers() if "norm" in x.name]  # noqa: E731
    for n_s, n_t in zip(norms(enc_s), norms(enc_t), strict=True):
        n_t.set_weights(n_s.get_weights())
    for layer in shared.layers:
        if layer.name not in ("encoder", "image"):
            twin.get_layer(layer.name).set_weights(layer.get_weights())
    return twin


def _sgd_step(model, x, y, lr=0.1):
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=lr),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.train_on_batch(x, y)


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("block", ["residual", "plain"])
@pytest.mark.parametrize("scheme", ["stage", "global", "template"])
def test_shared_update_is_sum_of_separate_updates(scheme, block, geometry):
    keras.utils.set_random_seed(3)
    shared = _build(geometry, block=block, sharing=scheme, num_templates=2)
    twin = _make_twin(shared, block, geometry)
    x, y = _data(geometry)
    np.testing.assert_allclose(np.asarray(shared(x)), np.asarray(twin(x)), atol=1e-5)
    pairs = _conv_pairs(shared, twin)
    before_twin = [np.asarray(t.bank.kernel).copy() for _, t in pairs]
    banks = {id(s.bank): s.bank for s, _ in pairs}
    before_banks = {k: [np.asarray(w).copy() for w in b.weights] for k, b in banks.items()}
    coeffs = [
        None if s.coefficients is None else np.asarray(s.coefficients).copy() for s, _ in pairs
    ]
    _sgd_step(shared, x, y)
    _sgd_step(twin, x, y)
    max_users, centred = 0, 0
    for key, bank in banks.items():
        users = [i for i, (s, _) in enumerate(pairs) if id(s.bank) == key]
        max_users = max(max_users, len(users))
        expected = before_banks[key][0].copy()
        for i in users:
            delta = np.asarray(pairs[i][1].bank.kernel) - before_twin[i]
            where = _centre(pairs[i][0])
            centred += pairs[i][0].kernel_size != bank.kernel_size
            if coeffs[i] is not None:  # d template_t = sum_i coeff_i[t] * (update of use i)
                expected[where] += np.multiply.outer(coeffs[i], delta)
            else:
                expected[where] += delta
        np.testing.assert_allclose(np.asarray(bank.weights[0]), expected, atol=2e-5, rtol=1e-4)
    assert max_users >= 2  # some bank really is used more than once
    assert (centred > 0) == (scheme == "global" and geometry != "default")


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("block", ["residual", "plain"])
@pytest.mark.parametrize("scheme", ["none", "stage", "global", "template"])
def test_keras_round_trip_keeps_outputs_counts_and_ties(tmp_path, scheme, block, geometry):
    model = _build(geometry, block=block, sharing=scheme)
    x, _ = _data(geometry, seed=1, batch=1)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)  # no custom_objects: the layers are registered
    np.testing.assert_allclose(np.asarray(loaded(x)), np.asarray(model(x)), atol=1e-6)
    assert count_unique_params(loaded) == count_unique_params(model)
    assert len(loaded.weights) == len(model.weights)
    encoder = loaded.get_layer("encoder")
    assert encoder.get_config() == model.get_layer("encoder").get_config()
    convs = [c for c, _ in _conv_pairs(loaded, loaded)]
    assert all(any(c.bank is b for b in encoder.banks) for c in convs)
    originals = [c for c, _ in _conv_pairs(model, model)]
    assert [(c.kernel_size, c.strides) for c in convs] == [
        (c.kernel_size, c.strides) for c in originals
    ]
    # Changing a bank in the loaded model changes every conv that uses it, and only those.
    bank = max(encoder.banks, key=lambda b: sum(c.bank is b for c in convs))
    users = [c for c in convs if c.bank is bank]
    others = [c for c in convs if c.bank is not bank]
    before = [np.asarray(c.kernel()).copy() for c in convs]
    bank.weights[0].assign(np.asarray(bank.weights[0]) + 1.0)
    for conv, old in zip(convs, before, strict=True):
        changed = not np.allclose(np.asarray(conv.kernel()), old)
        assert changed == (conv in users)
    assert len(users) >= (1 if scheme == "none" else 2)
    assert others or scheme == "global"
    assert not np.allclose(np.asarray(loaded(x)), np.asarray(model(x)))
