"""Model loading (safe mode, the trained-run loader) and the batched predict_fn."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from segshare.data.preprocessing import Plan
from segshare.inference.model_io import (
    load_model_safely,
    make_predict_fn,
    mirror_axes_combinations,
)
from segshare.inference.sliding_window import WindowSettings
from segshare.inference.trained_run import load_trained_run

from .conftest import PATCH, asymmetric_model, make_run_dir, mirrored_mean, threshold_model

EXECUTED = []


def _side_effect(x):
    EXECUTED.append(True)  # would run only if the file's code were executed
    return x * 2


@pytest.mark.parametrize("fn", [lambda x: x * 2, _side_effect], ids=["lambda", "function"])
def test_model_with_lambda_is_refused_and_never_run(tmp_path, fn):
    inputs = keras.Input((None, None, None, 1))
    layer = keras.layers.Lambda(fn, name="evil_code")
    model = keras.Model(inputs, keras.layers.Conv3D(2, 1)(layer(inputs)))
    path = tmp_path / "model.keras"
    model.save(path)
    EXECUTED.clear()
    with pytest.raises(ValueError, match=r"refused to load.*Lambda layer 'evil_code'") as err:
        load_model_safely(path)
    assert str(path) in str(err.value)
    assert EXECUTED == []


def test_not_a_model_file(tmp_path):
    path = tmp_path / "model.keras"
    path.write_bytes(b"not a zip archive")
    with pytest.raises(ValueError, match="not a readable .keras model archive"):
        load_model_safely(path)


def test_load_trained_run_from_the_folder_or_the_model_file(tmp_path):
    run = make_run_dir(tmp_path / "run")
    for given in (run, run / "model.keras"):
        trained = load_trained_run(given)
        assert trained.model_file == run / "model.keras" and trained.folder == run
        assert trained.patch_size == PATCH and trained.info["format"] == 1
        assert (trained.in_channels, trained.num_classes) == (1, 2)
        assert trained.plan == Plan.load(run / "plan.json")
    with pytest.raises(ValueError, match="no model found"):
        load_trained_run(tmp_path / "missing")
    (run / "plan.json").unlink()
    with pytest.raises(ValueError, match="no plan.json beside it"):
        load_trained_run(run)


def test_a_run_written_before_run_json_still_loads_and_predicts_the_same(tmp_path):
    """Runs of segshare 0.1 (model.keras, plan.json, config.yaml; no run.json) keep working."""
    legacy = load_trained_run(make_run_dir(tmp_path / "old", legacy=True))
    current = load_trained_run(make_run_dir(tmp_path / "new"))
    assert legacy.patch_size == current.patch_size == PATCH and legacy.info == {}
    window = WindowSettings(roi_size=None, overlap=0.5, sw_batch_size=2, sigma_scale=0.125)
    image = np.random.default_rng(0).normal(size=(20, 17, 23, 1)).astype(np.float32)
    old, new = (t.predictor(window).predict_array(image) for t in (legacy, current))
    np.testing.assert_array_equal(old, new)
    (tmp_path / "old" / "config.yaml").unlink()
    with pytest.raises(ValueError, match="no run.json beside it .* is unknown"):
        load_trained_run(tmp_path / "old")


def test_a_run_json_that_contradicts_the_plan_is_refused(tmp_path):
    run = make_run_dir(tmp_path / "run")
    info = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**info, "num_classes": 3}))
    with pytest.raises(ValueError, match=r"run.json: num_classes is 3 but .*plan.json says 2"):
        load_trained_run(run)
    (run / "run.json").write_text(json.dumps({**info, "format": 99}))
    with pytest.raises(ValueError, match="run format 99, this segshare reads 1"):
        load_trained_run(run)
    (run / "run.json").write_text(json.dumps({**info, "patch_size": [16, 0, 16]}))
    with pytest.raises(ValueError, match="no valid patch_size"):
        load_trained_run(run)


def test_import_segshare_is_enough_for_plain_keras_load_model(tmp_path):
    """In fresh processes, ``import segshare`` (before or after ``import keras``) registers the
    layers: a saved kernel-sharing model loads with plain ``keras.models.load_model``, ties
    intact; ``import keras`` alone cannot. ``import segshare`` alone imports no Keras."""
    from segshare.models import build_unet, count_unique_params

    model = build_unet(features=(4, 8), blocks_per_stage=(1, 2), sharing="stage")
    model.save(tmp_path / "model.keras")
    code = (
        "import sys\n"
        "{imports}\n"
        "m = keras.models.load_model({path!r})\n"
        "from segshare.models import count_unique_params\n"
        "print('UNIQUE', count_unique_params(m))\n"
    )
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    path = str(tmp_path / "model.keras")
    imports = {
        "segshare first": "import segshare\nassert 'keras' not in sys.modules\nimport keras",
        "keras first": "import keras, segshare",
        "keras alone": "import keras",
    }
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-c", code.format(imports=lines, path=path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for name, lines in imports.items()
    }
    out = {name: (p.communicate(timeout=300), p.returncode) for name, p in procs.items()}
    for name in ("segshare first", "keras first"):
        (stdout, stderr), code_ = out[name]
        assert code_ == 0, (name, stderr[-2000:])
        assert f"UNIQUE {count_unique_params(model)}" in stdout, name
    (_, stderr), code_ = out["keras alone"]
    assert code_ != 0 and "SharedEncoder" in stderr


def test_a_2d_model_predicts_3d_windows_slice_by_slice():
    from segshare.inference.model_io import slice_predict_fn

    inputs = keras.Input((None, None, 1))
    model = keras.Model(inputs, keras.layers.Conv2D(3, 3, padding="same")(inputs))
    predict_2d = make_predict_fn(model)
    window = np.random.default_rng(0).normal(size=(4, 9, 1, 7, 1)).astype(np.float32)
    got = slice_predict_fn(predict_2d, slice_axis=1)(window)
    assert got.shape == (4, 9, 1, 7, 3)
    np.testing.assert_allclose(got[:, :, 0], predict_2d(window[:, :, 0]), rtol=1e-6)
    thick = np.random.default_rng(1).normal(size=(2, 9, 3, 7, 1)).astype(np.float32)
    got = slice_predict_fn(predict_2d, slice_axis=1)(thick)  # an ensemble's 3D window
    assert got.shape == (2, 9, 3, 7, 3)
    for t in range(3):
        np.testing.assert_allclose(got[:, :, t], predict_2d(thick[:, :, t]), rtol=1e-5)


def test_loaded_model_predicts_like_the_original(tmp_path):
    model = threshold_model()
    path = tmp_path / "m.keras"
    model.save(path)
    x = np.random.default_rng(0).normal(size=(2, 8, 9, 10, 1)).astype(np.float32)
    expected = keras.ops.convert_to_numpy(keras.ops.softmax(model(x), axis=-1))
    got = make_predict_fn(load_model_safely(path))(x)
    assert got.dtype == np.float32 and got.shape == (2, 8, 9, 10, 2)
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_tta_averages_over_all_mirrorings():
    assert mirror_axes_combinations((1, 2, 3)) == [
        (),
        (1,),
        (2,),
        (3,),
        (1, 2),
        (1, 3),
        (2, 3),
        (1, 2, 3),
    ]
    model = asymmetric_model()
    x = np.random.default_rng(1).normal(size=(1, 6, 5, 4, 1)).astype(np.float32)
    plain = make_predict_fn(model)
    got = make_predict_fn(model, tta=True)(x)
    np.testing.assert_allclose(got, mirrored_mean(plain, x), atol=1e-6)
    assert not np.allclose(got, plain(x), atol=1e-3)


JAX_CHECK = """
import keras, numpy as np
from segshare.inference.model_io import make_predict_fn
from tests.inference.conftest import asymmetric_model, mirrored_mean
assert keras.backend.backend() == "jax"
model = asymmetric_model()
x = np.random.default_rng(1).normal(size=(3, 6, 5, 4, 1)).astype(np.float32)
plain = make_predict_fn(model)
expected = keras.ops.convert_to_numpy(keras.ops.softmax(model(x), axis=-1))
np.testing.assert_allclose(plain(x), expected, atol=1e-6)
tta = make_predict_fn(model, tta=True)
got = np.concatenate([tta(x[:2]), tta(x[2:])])  # the last batch is smaller (padded inside)
assert got.shape == x.shape[:4] + (2,) and got.dtype == np.float32
np.testing.assert_allclose(got, mirrored_mean(plain, x), atol=1e-5)
print("jax ok")
"""


def test_predict_fn_under_the_jax_backend():
    repo = str(Path(__file__).resolve().parents[2])  # after any PYTHONPATH already set
    path = os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), repo]))
    env = {**os.environ, "KERAS_BACKEND": "jax", "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": path}
    proc = subprocess.run(
        [sys.executable, "-c", JAX_CHECK], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and "jax ok" in proc.stdout, proc.stderr[-3000:]
