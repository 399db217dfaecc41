"""GPU training under JAX, measured: throughput per sharing scheme and a short hippocampus run.

On a machine with an NVIDIA GPU, JAX (with CUDA) and no TensorFlow, after installing the wheels
this script lists (no network needed there):

    pip install --no-index --find-links WHEELS keras nibabel hydra-core omegaconf \\
        antlr4-python3-runtime tqdm segshare
    python scripts/gpu_check.py --data DIR/Task04_Hippocampus --out /tmp/gpu_check

1. Throughput of the train step (``segshare.training.steps.JaxSteps``, the step segshare-train
   runs) at patch 64^3 per sharing scheme: patches/s and Mvoxels/s over ``--steps`` steps after
   two compiling ones, in ``--precision`` (default ``mixed_bfloat16``).
2. ``segshare-train`` on the hippocampus for ``--budget-minutes`` (default 4) in that precision:
   the validation Dice reached, the time per epoch, and the final evaluation, which predicts every
   validation case on its original grid.

It must finish inside 8 minutes on one H200. On a CPU it runs too (slowly); ``--tiny`` shrinks it
to seconds on synthetic data (the test suite runs that). XLA is always on under JAX
(``trainer.jit_compile`` switches TensorFlow's); the numbers go into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")


def throughput(scheme: str, patch: int, batch: int, steps: int, features: list[int]) -> dict:
    """Patches/s and Mvoxels/s of the JAX train step of the U-Net with ``scheme``."""
    import keras
    import numpy as np

    from segshare.losses import DiceCELoss
    from segshare.models import build_unet
    from segshare.training.steps import JaxSteps
    from segshare.training.strategy import JaxStrategy

    keras.utils.set_random_seed(0)
    model = build_unet(
        in_channels=1, num_classes=3, features=features, sharing=scheme, patch_size=[patch] * 3
    )
    optimizer = keras.optimizers.AdamW(learning_rate=1e-3, global_clipnorm=12.0)
    optimizer.build(model.trainable_variables)
    rng = np.random.default_rng(0)
    batches = [
        (
            rng.normal(size=(batch, patch, patch, patch, 1)).astype("float32"),
            rng.integers(0, 3, size=(batch, patch, patch, patch)).astype("int32"),
        )
        for _ in range(4)
    ]
    loader = [batches[i % 4] for i in range(steps + 2)]
    runner = JaxSteps(model, optimizer, DiceCELoss(), JaxStrategy(data_parallel=False), 1)
    runner.start(loader)
    t0 = time.perf_counter()
    runner.step(), runner.step()  # compile
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = runner.step()  # float(): waits for the device
    seconds = time.perf_counter() - t0
    runner.finish()
    patches = steps * batch / seconds
    return {
        "scheme": scheme,
        "patches_per_s": round(patches, 2),
        "mvoxels_per_s": round(patches * patch**3 / 1e6, 2),
        "step_s": round(seconds / steps, 4),
        "compile_s": round(compile_s, 1),
        "loss": round(float(loss), 4),
        "unique_parameters": int(sum(np.prod(v.shape) for v in model.trainable_variables)),
    }


def train_run(args: argparse.Namespace) -> dict:
    """segshare-train for the budget; its last row and the epoch times."""
    from hydra import compose, initialize_config_module

    from segshare.train import train

    run = Path(args.out) / "run"
    overrides = [
        f"paths.root_dir={Path.cwd()}",
        f"paths.output_dir={run}",
        f"paths.data_dir={Path(args.out) / 'data'}",
        f"trainer.budget_minutes={args.budget_minutes}",
        f"trainer.precision={args.precision}",
        "trainer.progress=false",
    ]
    if args.tiny:
        overrides += [
            "debug=fast",
            "model=unet_small",
            "model.features=[4,8]",
            "model.blocks_per_stage=[1,1]",
        ]
    else:
        overrides += [
            f"data.root={args.data}",
            f"data.preprocessed_dir={Path(args.out) / 'preprocessed'}",
            "data=hippocampus",
        ]
    with initialize_config_module(version_base="1.3", config_module="segshare.conf"):
        cfg = compose("train", overrides=overrides)
    t0 = time.perf_counter()
    last, _ = train(cfg)
    with open(run / "train_log.csv") as fh:
        rows = fh.read().splitlines()[1:]
    seconds = [float(r.split(",")[-1]) for r in rows]
    return {
        "wall_s": round(time.perf_counter() - t0, 1),
        "epochs": len(rows),
        "median_epoch_s": round(sorted(seconds)[len(seconds) // 2], 2) if seconds else None,
        "best_val_dice_fg_mean": last.get("best_val_dice_fg_mean"),
        "final_val_dice_fg_mean": last.get("final_val_dice_fg_mean"),
        "run": str(run),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="the Task04_Hippocampus folder (not with --tiny)")
    parser.add_argument("--out", required=True, help="folder for the run and results.json")
    parser.add_argument("--budget-minutes", type=float, default=4.0)
    parser.add_argument("--precision", default="mixed_bfloat16")
    parser.add_argument("--patch", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--schemes", default="none,stage,global,template")
    parser.add_argument("--tiny", action="store_true", help="seconds on a CPU: synthetic data")
    args = parser.parse_args(argv)
    if not args.tiny and not (args.data and (Path(args.data) / "dataset.json").is_file()):
        parser.error(f"--data must be the Task04_Hippocampus folder, got {args.data!r}")
    import jax
    import keras

    keras.mixed_precision.set_global_policy(args.precision)
    features = [4, 8] if args.tiny else [32, 64, 128, 256]
    patch = 16 if args.tiny else args.patch
    results: dict = {
        "devices": [str(d) for d in jax.devices()],
        "jax": jax.__version__,
        "keras": keras.__version__,
        "python": platform.python_version(),
        "precision": args.precision,
        "patch": patch,
        "batch": args.batch,
        "throughput": [],
    }
    print(f"devices: {results['devices']}", flush=True)
    for scheme in args.schemes.split(","):
        row = throughput(scheme, patch, args.batch, 2 if args.tiny else args.steps, features)
        results["throughput"].append(row)
        print(json.dumps(row), flush=True)
    keras.mixed_precision.set_global_policy("float32")  # segshare-train sets its own
    results["training"] = train_run(args)
    print(json.dumps(results["training"]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"results in {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
