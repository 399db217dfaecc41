"""KernelBank / TemplateBank / SharedConv: numerics against NumPy, configs, misuse."""

import keras
import numpy as np
import pytest

from segshare.models.layers import KernelBank, SharedConv, TemplateBank


def _numpy_conv2d_same(x, kernel, stride=1):
    """Brute-force channels-last 2D cross-correlation with 'same' padding (Keras semantics)."""
    b, h, w, _ = x.shape
    kh, kw, _, c_out = kernel.shape
    out_h, out_w = -(-h // stride), -(-w // stride)
    pad_h = max((out_h - 1) * stride + kh - h, 0)
    pad_w = max((out_w - 1) * stride + kw - w, 0)
    xp = np.pad(
        x, ((0, 0), (pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0))
    )
    out = np.zeros((b, out_h, out_w, c_out))
    for i in range(out_h):
        for j in range(out_w):
            patch = xp[:, i * stride : i * stride + kh, j * stride : j * stride + kw, :]
            out[:, i, j, :] = np.tensordot(patch, kernel, axes=([1, 2, 3], [0, 1, 2]))
    return out


@pytest.mark.parametrize("stride", [1, 2])
def test_shared_conv_matches_numpy_on_bank_slice(stride):
    bank = KernelBank(2, 3, in_channels=5, out_channels=6, name="bank")
    conv = SharedConv(4, bank, in_channels=3, strides=stride, name="conv")
    conv.bias.assign(np.arange(4, dtype="float32"))
    x = np.random.default_rng(0).normal(size=(2, 7, 9, 3)).astype("float32")
    expected = _numpy_conv2d_same(x, np.asarray(bank.kernel)[..., :3, :4], stride) + np.arange(4)
    np.testing.assert_allclose(np.asarray(conv(x)), expected, rtol=1e-4, atol=1e-4)


def test_template_conv_mixes_templates_with_its_coefficients():
    bank = TemplateBank(2, 3, in_channels=3, out_channels=2, num_templates=3, name="templates")
    conv = SharedConv(2, bank, in_channels=3, use_bias=False, name="conv")
    coeffs = np.array([0.5, -1.0, 2.0], dtype="float32")
    conv.coefficients.assign(coeffs)
    kernel = np.tensordot(coeffs, np.asarray(bank.templates), axes=1)
    x = np.random.default_rng(1).normal(size=(1, 6, 5, 3)).astype("float32")
    np.testing.assert_allclose(np.asarray(conv(x)), _numpy_conv2d_same(x, kernel), atol=1e-4)


def test_bank_config_round_trip():
    for bank in (
        KernelBank(3, 3, 4, 8, name="k"),
        TemplateBank(3, (3, 3, 1), 4, 8, num_templates=3, name="t"),
    ):
        clone = type(bank).from_config(bank.get_config())
        assert clone.get_config() == bank.get_config()
        assert [tuple(w.shape) for w in clone.weights] == [tuple(w.shape) for w in bank.weights]


def test_shared_conv_refuses_rebuild_from_config_and_bad_banks():
    bank = KernelBank(3, 3, 4, 4, name="bank")
    conv = SharedConv(4, bank, in_channels=4, name="conv")
    assert conv.get_config()["bank"] == "bank"
    with pytest.raises(TypeError, match="tie to bank 'bank' would be lost"):
        SharedConv.from_config(conv.get_config())
    with pytest.raises(ValueError, match="4->4 channels; a conv 8->4"):
        SharedConv(4, bank, in_channels=8)
    with pytest.raises(TypeError, match="needs a KernelBank"):
        SharedConv(4, keras.layers.Dense(3), in_channels=4)
    with pytest.raises(ValueError, match="num_templates must be >= 1, got 0"):
        TemplateBank(3, 3, 4, 4, num_templates=0)
    with pytest.raises(ValueError, match="spatial_dims must be 2 or 3, got 4"):
        KernelBank(4, 3, 4, 4)


def test_smaller_kernel_uses_the_centred_slice_of_the_bank():
    bank = KernelBank(2, (3, 5), in_channels=4, out_channels=5, name="bank")
    full = np.asarray(bank.kernel)
    cases = {(1, 3): full[1:2, 1:4], (3, 1): full[:, 2:3], (1, 5): full[1:2], (3, 5): full}
    x = np.random.default_rng(2).normal(size=(2, 6, 7, 3)).astype("float32")
    for size, centre in cases.items():
        conv = SharedConv(2, bank, in_channels=3, kernel_size=size, use_bias=False, name="c")
        assert conv.kernel_size == size and conv.get_config()["kernel_size"] == size
        expected = centre[..., :3, :2]
        np.testing.assert_array_equal(np.asarray(conv.kernel()), expected)
        np.testing.assert_array_equal(np.asarray(bank.get_kernel(3, 2, kernel_size=size)), expected)
        np.testing.assert_allclose(
            np.asarray(conv(x)), _numpy_conv2d_same(x, expected), rtol=1e-4, atol=1e-4
        )
    assert SharedConv(2, bank, in_channels=3).kernel_size == (3, 5)  # default: the bank's


def test_template_conv_with_a_smaller_kernel_mixes_centred_templates():
    bank = TemplateBank(3, 3, in_channels=2, out_channels=2, num_templates=2, name="t")
    conv = SharedConv(2, bank, in_channels=2, kernel_size=(1, 3, 3), use_bias=False, name="c")
    coeffs = np.array([0.25, -2.0], dtype="float32")
    conv.coefficients.assign(coeffs)
    expected = np.tensordot(coeffs, np.asarray(bank.templates)[:, 1:2], axes=1)
    np.testing.assert_allclose(np.asarray(conv.kernel()), expected, rtol=1e-6, atol=1e-6)
    x = np.random.default_rng(3).normal(size=(1, 3, 5, 4, 2)).astype("float32")
    assert tuple(conv(x).shape) == (1, 3, 5, 4, 2)


def test_centred_slice_gradient_lands_in_the_centre_of_the_bank():
    bank = KernelBank(2, 3, in_channels=2, out_channels=2, name="bank")
    wide = SharedConv(2, bank, in_channels=2, use_bias=False, name="wide")
    thin = SharedConv(2, bank, in_channels=2, kernel_size=(1, 3), use_bias=False, name="thin")
    x = keras.ops.convert_to_tensor(
        np.random.default_rng(4).normal(size=(1, 5, 6, 2)).astype("float32")
    )
    grads = {}
    for key, convs in {"both": (wide, thin), "wide": (wide,), "thin": (thin,)}.items():
        grads[key] = _kernel_gradient(bank, lambda c=convs: sum(keras.ops.sum(v(x)) for v in c))
    expected = grads["wide"].copy()
    expected[1:2] += grads["thin"][1:2]
    np.testing.assert_allclose(grads["both"], expected, rtol=1e-5, atol=1e-5)
    assert np.all(grads["thin"][[0, 2]] == 0)  # the thin conv never sees the outer rows


def _kernel_gradient(bank, loss_fn):
    """d loss / d bank.kernel on the TensorFlow backend (the test suite's default)."""
    if keras.backend.backend() != "tensorflow":
        pytest.skip("gradient taken with tf.GradientTape")
    import tensorflow as tf

    with tf.GradientTape() as tape:
        loss = loss_fn()
    return np.asarray(tape.gradient(loss, bank.kernel.value))


def test_shared_conv_refuses_a_kernel_with_no_centred_slice():
    bank = KernelBank(3, (1, 3, 3), 4, 4, name="bank")
    with pytest.raises(ValueError, match=r"\(1, 3, 3\) kernels; a conv of kernel size \(3, 3, 3\)"):
        SharedConv(4, bank, in_channels=4, kernel_size=3)
    with pytest.raises(ValueError, match=r"kernel size \(1, 2, 3\) has no centred slice"):
        SharedConv(4, bank, in_channels=4, kernel_size=(1, 2, 3))
    with pytest.raises(ValueError, match=r"kernel_size must have 3 entries, got \(1, 3\)"):
        SharedConv(4, bank, in_channels=4, kernel_size=(1, 3))
    with pytest.raises(ValueError, match=r"kernel_size must be >= 1 on every axis, got \(0, 3\)"):
        KernelBank(2, (0, 3), 4, 4)
