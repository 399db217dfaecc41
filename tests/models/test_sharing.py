"""Shared kernels: gradient sums, ties that survive a .keras round trip."""

import keras
import numpy as np
import pytest

from segshare.models import build_unet, count_unique_params

ARGS = dict(in_channels=1, num_classes=2, features=(4, 8, 8), blocks_per_stage=(1, 2, 1))


def _conv_pairs(model_a, model_b):
    """Matching SharedConv layers of two models built from the same settings."""
    convs = []
    for model in (model_a, model_b):
        enc = model.get_layer("encoder")
        convs.append([layer for layer in enc._flatten_layers() if hasattr(layer, "bank")])
    return list(zip(*convs, strict=True))


def _make_twin(shared, block="residual"):
    """An unshared model whose every conv starts with the kernel its shared counterpart uses."""
    twin = build_unet(**ARGS, block=block, sharing="none")
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


@pytest.mark.parametrize("block", ["residual", "plain"])
@pytest.mark.parametrize("scheme", ["stage", "global", "template"])
def test_shared_update_is_sum_of_separate_updates(scheme, block):
    keras.utils.set_random_seed(3)
    shared = build_unet(**ARGS, block=block, sharing=scheme, num_templates=2)
    twin = _make_twin(shared, block)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 8, 8, 8, 1)).astype("float32")
    y = rng.integers(0, 2, size=(2, 8, 8, 8)).astype("int32")
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
    max_users = 0
    for key, bank in banks.items():
        users = [i for i, (s, _) in enumerate(pairs) if id(s.bank) == key]
        max_users = max(max_users, len(users))
        expected = before_banks[key][0].copy()
        for i in users:
            delta = np.asarray(pairs[i][1].bank.kernel) - before_twin[i]
            c_in, c_out = delta.shape[-2:]
            if (
                coeffs[i] is not None
            ):  # d template_t = sum_i coeff_i[t] * (separate update of use i)
                expected[..., :c_in, :c_out] += np.multiply.outer(coeffs[i], delta)
            else:
                expected[..., :c_in, :c_out] += delta
        np.testing.assert_allclose(np.asarray(bank.weights[0]), expected, atol=2e-5, rtol=1e-4)
    assert max_users >= 2  # some bank really is used more than once


@pytest.mark.parametrize("block", ["residual", "plain"])
@pytest.mark.parametrize("scheme", ["none", "stage", "global", "template"])
def test_keras_round_trip_keeps_outputs_counts_and_ties(tmp_path, scheme, block):
    model = build_unet(**ARGS, block=block, sharing=scheme)
    x = np.random.default_rng(1).normal(size=(1, 8, 8, 8, 1)).astype("float32")
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)  # no custom_objects: the layers are registered
    np.testing.assert_allclose(np.asarray(loaded(x)), np.asarray(model(x)), atol=1e-6)
    assert count_unique_params(loaded) == count_unique_params(model)
    assert len(loaded.weights) == len(model.weights)
    encoder = loaded.get_layer("encoder")
    convs = [c for c, _ in _conv_pairs(loaded, loaded)]
    assert all(any(c.bank is b for b in encoder.banks) for c in convs)
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
