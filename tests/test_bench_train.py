"""scripts/bench_train.py runs on TensorFlow and on JAX (the GPU machines have JAX only)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_train.py"


@pytest.mark.parametrize(
    "backend",
    # the JAX row is slow (compiles per scheme); JAX training has its own default tests
    ["tensorflow", pytest.param("jax", marks=pytest.mark.slow)],
)
def test_bench_train_prints_a_row_per_scheme(backend):
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
    args = ["--patch", "16", "16", "16", "--features", "4", "8", "--rounds", "2", "--steps", "1"]
    args += ["--warmup", "1", "--schemes", "reference", "none", "global", "none@mixed_bfloat16"]
    args += ["none+groupnorm", "none+autodiff"]
    out = subprocess.run(
        [sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert lines[0].startswith(f"backend={backend} ") and "block=plain" in lines[0]
    rows = {line.split()[0]: line.split()[1:] for line in lines[2:]}
    assert list(rows) == [
        "reference", "none", "global", "none@mixed_bfloat16", "none+groupnorm", "none+autodiff",
    ]  # fmt: skip
    assert rows["none+groupnorm"][0] == rows["none"][0]  # the same parameters, another norm
    assert rows["none+autodiff"][0] == rows["none"][0]
    assert rows["reference"][-1] == "1.00"  # the speed relative to the first entry
    assert rows["reference"][0] == rows["none"][0]  # the same architecture, the same parameters
    assert int(rows["global"][0].replace(",", "")) < int(rows["none"][0].replace(",", ""))
    for values in rows.values():
        assert all(float(v) > 0 for v in values[1:])
