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


def test_model_trains_under_jax_backend():
    if importlib.util.find_spec("jax") is None:
        if os.environ.get("CI"):
            pytest.fail(
                "jax is not installed, but CI installs it (.[dev]): the backend test must run"
            )
        pytest.skip("jax not installed (pip install -e '.[dev]' brings it)")
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))
    result = json.loads(line[len("RESULT") :])
    for scheme, r in result.items():
        assert r["shape"] == [2, 8, 8, 8, 2], scheme
        assert r["loss"] == pytest.approx(r["loss"]) and r["loss"] > 0  # finite
        assert r["bank_moved"] > 0, f"{scheme}: shared bank did not receive gradients under JAX"
    assert set(result) == {"global", "template"}
