"""The same network runs under KERAS_BACKEND=jax: forward, a gradient step, shared banks move."""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import json, numpy as np, keras
    from segshare.models import build_unet, count_unique_params
    assert keras.backend.backend() == "jax", keras.backend.backend()
    out = {}
    for scheme in ("global", "template"):
        model = build_unet(in_channels=1, num_classes=2, features=(4, 8), blocks_per_stage=(1, 2),
                           sharing=scheme)
        x = np.random.default_rng(0).normal(size=(2, 8, 8, 8, 1)).astype("float32")
        y = np.random.default_rng(1).integers(0, 2, size=(2, 8, 8, 8)).astype("int32")
        bank = model.get_layer("encoder").banks[-1]
        before = np.asarray(bank.weights[0]).copy()
        model.compile(optimizer=keras.optimizers.SGD(0.1),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        loss = float(model.train_on_batch(x, y))
        out[scheme] = {
            "shape": list(model(x).shape), "loss": loss,
            "bank_moved": float(np.abs(np.asarray(bank.weights[0]) - before).max()),
            "unique": count_unique_params(model),
        }
    print("RESULT" + json.dumps(out))
    """
)


ANISO_SCRIPT = textwrap.dedent(
    """
    import json, sys, numpy as np, keras
    from segshare.models import count_unique_params
    assert keras.backend.backend() == "jax", keras.backend.backend()
    folder = sys.argv[1]
    model = keras.models.load_model(folder + "/model.keras")
    x = np.load(folder + "/x.npy")
    diff = float(np.abs(np.asarray(model(x)) - np.load(folder + "/y.npy")).max())
    bank = model.get_layer("encoder").banks[0]
    before = np.asarray(bank.weights[0]).copy()
    model.compile(optimizer=keras.optimizers.SGD(0.1),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    labels = np.random.default_rng(1).integers(0, 2, size=x.shape[:-1]).astype("int32")
    loss = float(model.train_on_batch(x, labels))
    print("RESULT" + json.dumps({
        "shape": list(model(x).shape), "diff": diff, "loss": loss, "bank": bank.name,
        "bank_moved": float(np.abs(np.asarray(bank.weights[0]) - before).max()),
        "unique": count_unique_params(model),
    }))
    """
)


def _run_under_jax(script: str, *args: str) -> dict:
    if importlib.util.find_spec("jax") is None:
        if os.environ.get("CI"):
            pytest.fail(
                "jax is not installed, but CI installs it (.[dev]): the backend test must run"
            )
        pytest.skip("jax not installed (pip install -e '.[dev]' brings it)")
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))
    return json.loads(line[len("RESULT") :])


def test_model_trains_under_jax_backend():
    result = _run_under_jax(SCRIPT)
    for scheme, r in result.items():
        assert r["shape"] == [2, 8, 8, 8, 2], scheme
        assert r["loss"] == pytest.approx(r["loss"]) and r["loss"] > 0  # finite
        assert r["bank_moved"] > 0, f"{scheme}: shared bank did not receive gradients under JAX"
    assert set(result) == {"global", "template"}


def test_anisotropic_model_saved_here_runs_and_trains_under_jax(tmp_path):
    """An anisotropic global-sharing model saved on this process's backend (TensorFlow) reloads
    under JAX with the same outputs; its bank (3x3x3, used 1x3x3 by stages 0-1) trains there."""
    import keras
    import numpy as np

    from segshare.models import build_unet, count_unique_params

    model = build_unet(
        features=(4, 8, 8),
        blocks_per_stage=(1, 1, 1),
        sharing="global",
        kernel_sizes=[[1, 3, 3], [1, 3, 3], [3, 3, 3]],
        strides=[1, [1, 2, 2], [2, 2, 2]],
    )
    x = np.random.default_rng(0).normal(size=(2, 4, 8, 12, 1)).astype("float32")
    model.save(tmp_path / "model.keras")
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", np.asarray(model(x)))
    result = _run_under_jax(ANISO_SCRIPT, str(tmp_path))
    assert keras.backend.backend() != "jax" or result["diff"] == 0.0
    assert result["diff"] < 1e-4, result
    assert result["shape"] == [2, 4, 8, 12, 2]
    assert result["bank"] == "encoder_global_bank" and result["bank_moved"] > 0
    assert result["unique"] == count_unique_params(model)
