"""Mixed precision reaches the Dice of float32 on a short run: ``mixed_float16`` (with Keras' loss
scaling) and ``mixed_bfloat16`` under TensorFlow, ``mixed_bfloat16`` under JAX. The mechanics on
a CPU (slow: a few minutes); on a GPU scripts/gpu_check.py measures the speed."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from segshare.train import train

SHORT = [
    "model.features=[8,16]",
    "trainer.max_epochs=8",
    "trainer.steps_per_epoch=8",
    "trainer.max_val_cases=2",
    "trainer.deterministic=false",
]


def _dice(run: Path) -> tuple[float, float]:
    """(first epoch's, best) validation foreground-mean Dice of a run."""
    with open(run / "train_log.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    return float(rows[0]["val_dice_fg_mean"]), float(rows[-1]["best_val_dice_fg_mean"])


@pytest.mark.slow
def test_mixed_precision_reaches_the_float32_dice(make_cfg, tiny_data_root, tmp_path):
    runs = {}
    for precision in ("float32", "mixed_bfloat16", "mixed_float16"):
        run = tmp_path / precision
        train(make_cfg(*SHORT, f"trainer.precision={precision}", run_dir=run))
        runs[precision] = _dice(run)
    script = textwrap.dedent(
        f"""
        import sys
        from hydra import compose, initialize_config_module
        from segshare.train import train
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from conftest import TINY
        with initialize_config_module(version_base="1.3", config_module="segshare.conf"):
            cfg = compose("train", overrides=[*TINY, *{SHORT!r},
                "trainer.precision=mixed_bfloat16", "paths.root_dir={tiny_data_root}",
                "paths.data_dir={tiny_data_root}", "paths.output_dir={tmp_path / "jax_bf16"}"])
        train(cfg)
        """
    )
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=1800
    )
    assert done.returncode == 0, done.stderr[-3000:]
    runs["jax mixed_bfloat16"] = _dice(tmp_path / "jax_bf16")
    first, reference = runs["float32"]
    assert reference > first + 0.1, runs  # the short run learns
    for name, (_, best) in runs.items():
        assert abs(best - reference) < 0.1, (name, runs)
