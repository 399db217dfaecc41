"""runtime=openvino: the IR is converted once and cached by the model's digest; its probabilities
equal the Keras runtime's (float32) and stay close in bfloat16; TTA and 2D as with Keras."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("openvino")  # a dev dependency: installed in CI

from segshare.inference.openvino_runtime import converted_ir, file_digest  # noqa: E402
from segshare.inference.sliding_window import WindowSettings  # noqa: E402
from segshare.inference.trained_run import load_trained_run  # noqa: E402

from .conftest import asymmetric_model, make_run_dir  # noqa: E402


@pytest.fixture(scope="module")
def tta_run(tmp_path_factory):
    return make_run_dir(tmp_path_factory.mktemp("ov") / "run", model=asymmetric_model())


def _predict(run_dir, runtime, precision="float32", tta=False):
    run = load_trained_run(run_dir)
    predictor = run.predictor(
        WindowSettings(None, 0.5, 2, 0.125), runtime=runtime, precision=precision, tta=tta
    )
    x = np.random.default_rng(0).normal(size=(2, 16, 16, 16, 1)).astype(np.float32)
    return predictor.predict_fn(x)


def test_openvino_equals_keras_in_float32_with_and_without_tta(tta_run):
    plain, mirrored = (_predict(tta_run, "openvino", tta=tta) for tta in (False, True))
    for tta, ours in ((False, plain), (True, mirrored)):
        keras_probs = _predict(tta_run, "keras", tta=tta)
        assert ours.dtype == np.float32 and ours.shape == keras_probs.shape
        np.testing.assert_allclose(ours, keras_probs, atol=1e-5)
    assert not np.allclose(plain, mirrored)  # the model is not flip-equivariant: TTA counts


def test_bfloat16_stays_close(tta_run):
    ours = _predict(tta_run, "openvino", precision="bfloat16")
    np.testing.assert_allclose(ours, _predict(tta_run, "keras"), atol=0.02)


def test_the_conversion_is_cached_by_digest_and_redone_for_a_new_model(tmp_path):
    run = make_run_dir(tmp_path / "run", model=asymmetric_model())
    model = load_trained_run(run).load_model()
    xml = converted_ir(run / "model.keras", model)
    assert xml == run / "openvino" / file_digest(run / "model.keras") / "model.xml"
    stamp = xml.stat().st_mtime_ns
    assert converted_ir(run / "model.keras", model) == xml and xml.stat().st_mtime_ns == stamp
    assert not [p for p in (run / "openvino").iterdir() if p.name.startswith(".")]
    make_run_dir(run, model=asymmetric_model())  # another model file in the same folder
    assert converted_ir(run / "model.keras", model) != xml


def test_an_unknown_runtime_is_refused(tta_run):
    with pytest.raises(ValueError, match=r"runtime must be one of \('keras', 'openvino'\)"):
        _predict(tta_run, "onnx")


def test_sigmoid_outputs_and_consecutive_batches_are_independent(tmp_path):
    """Region models: the sigmoid is appended in the IR; each returned batch is its own array
    (the request's output buffer is reused by the next call)."""
    import keras

    from segshare.inference.openvino_runtime import openvino_predict_fn

    model = asymmetric_model()
    model.save(tmp_path / "model.keras")
    predict = openvino_predict_fn(tmp_path / "model.keras", model, activation="sigmoid")
    rng = np.random.default_rng(1)
    a, b = (rng.normal(size=(2, 16, 16, 16, 1)).astype(np.float32) for _ in range(2))
    first, second = predict(a), predict(b)
    expected = keras.ops.convert_to_numpy(keras.ops.sigmoid(model(a)))
    np.testing.assert_allclose(first, expected, atol=1e-5)
    assert not np.allclose(first, second)


@pytest.mark.parametrize("shape", [(2, 5, 6, 7, 3), (3, 9, 8, 4)])
def test_the_softmax_is_over_the_class_axis_for_3d_and_2d_windows(shape):
    """The appended softmax moves the classes to axis 1 and back (a faster kernel): the values
    and the layout are those of a softmax over the last axis."""
    import openvino
    from openvino import opset13 as ops

    from segshare.inference.openvino_runtime import _channels_first_softmax

    logits = np.random.default_rng(2).normal(scale=4, size=shape).astype(np.float32)
    parameter = ops.parameter(list(shape), openvino.Type.f32)
    model = openvino.Model([_channels_first_softmax(parameter.output(0))], [parameter])
    compiled = openvino.Core().compile_model(model, "CPU")
    ours = compiled([logits])[compiled.outputs[0]]
    e = np.exp(logits - logits.max(-1, keepdims=True))
    np.testing.assert_allclose(ours, e / e.sum(-1, keepdims=True), atol=1e-6)
