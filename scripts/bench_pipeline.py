"""Benchmark of the data pipeline: preprocessing throughput, patches/s, peak memory per worker.

Usage::

    TF_CPP_MIN_LOG_LEVEL=2 python scripts/bench_pipeline.py [--hippocampus DIR] \
        [--workers 2] [--batches 40] [--train-step]

Prints:
* preprocessing of the hippocampus dataset (``preprocess_dataset``, ``--workers`` processes):
  cases/s, MB/s (float32 voxels of the input images), peak RSS of a worker;
* preprocessing of one synthetic CT-like 256x256x200 case (0.78x0.78x2.5 mm -> 1x1x2 mm, so the
  anisotropic path runs): seconds, MB/s, peak RSS of the worker process;
* patches/s of the training pipeline (tf.data and PyDataset) with the default augmentation;
* with ``--train-step``: the training-step rate of the default U-Net on the same batches.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from segshare.data.cache import preprocess_dataset
from segshare.data.discovery import Case, discover_dataset
from segshare.data.preprocessing import Plan, preprocess_case

REPO = Path(__file__).resolve().parents[1]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _plan(in_channels: int, spacing, norm: str, ct_stats=None) -> Plan:
    return Plan(
        tuple(spacing),
        [norm],
        ct_stats,
        {"background": 0, "a": 1, "b": 2},
        in_channels=in_channels,
        num_classes=3,
    )


def _worker_case(args) -> tuple[float, float, float]:
    """In a fresh worker: (seconds, baseline RSS MB, peak RSS MB) of preprocessing one case."""
    case, plan_dict = args
    base = _peak_rss_mb()
    t = time.perf_counter()
    preprocess_case(case.images, case.label, Plan.from_dict(plan_dict))
    return time.perf_counter() - t, base, _peak_rss_mb()


def _worker_peak(_) -> float:
    return _peak_rss_mb()


def bench_hippocampus(root: Path, workers: int, tmp: Path) -> None:
    ds = discover_dataset(root)
    vox_mb = (
        sum(int(np.prod(__import__("nibabel").load(c.images[0]).shape)) * 4 for c in ds.cases) / 1e6
    )
    plan = _plan(1, (1.0, 1.0, 1.0), "zscore")
    t = time.perf_counter()
    preprocess_dataset(ds, tmp / "hippo", plan, num_workers=workers, progress=False)
    dt = time.perf_counter() - t
    print(
        f"hippocampus preprocessing: {len(ds.cases)} cases in {dt:.2f} s with {workers} workers"
        f" -> {len(ds.cases) / dt:.1f} cases/s, {vox_mb / dt:.1f} MB/s (float32 voxels, "
        f"{vox_mb:.1f} MB in total)"
    )
    with ProcessPoolExecutor(1) as pool:
        sec, base, peak = pool.submit(_worker_case, (ds.cases[0], plan.to_dict())).result()
    print(
        f"hippocampus one case in a worker: {sec * 1000:.0f} ms, worker RSS {base:.0f} MB before,"
        f" {peak:.0f} MB peak (+{peak - base:.0f} MB for the case)"
    )


def bench_ct_case(tmp: Path) -> None:
    import nibabel as nib

    from segshare.data.synthetic import make_phantom

    rng = np.random.default_rng(0)
    img, lbl = make_phantom((256, 256, 200), rng, num_organs=2, ct_like=True)
    aff = np.diag([0.78, 0.78, 2.5, 1.0])
    nib.save(nib.Nifti1Image(img, aff), str(tmp / "ct.nii.gz"))
    nib.save(nib.Nifti1Image(lbl, aff), str(tmp / "ct_label.nii.gz"))
    del img, lbl
    case = Case("ct", (tmp / "ct.nii.gz",), tmp / "ct_label.nii.gz")
    stats = [{"p005": -1000.0, "p995": 200.0, "mean": 50.0, "std": 30.0}]
    plan = _plan(1, (1.0, 1.0, 2.0), "ct", stats)
    mb = 256 * 256 * 200 * 4 / 1e6
    with ProcessPoolExecutor(1) as pool:
        sec, base, peak = pool.submit(_worker_case, (case, plan.to_dict())).result()
    print(
        f"CT-like 256x256x200 (0.78x0.78x2.5 mm -> 1x1x2 mm): {sec:.2f} s -> {1 / sec:.2f} "
        f"cases/s, {mb / sec:.1f} MB/s; worker RSS {base:.0f} MB before, {peak:.0f} MB peak "
        f"(+{peak - base:.0f} MB; the float32 image is {mb:.0f} MB)"
    )


def augmentation(name: str):
    """The shipped ``conf/data/augment/<name>.yaml`` as an ``AugmentSettings``."""
    from hydra import compose, initialize_config_module

    from segshare.cli import instantiate

    with initialize_config_module(version_base="1.3", config_module="segshare.conf"):
        cfg = compose("preprocess", overrides=["paths.root_dir=/", f"data/augment={name}"])
    return instantiate(cfg.data.augment)


def bench_patches(
    cache_dir: Path, ids: list[str], patch, batch: int, n: int, workers: int, sets, rounds: int
) -> dict[str, float]:
    """Patches/s per backend and augmentation set, the sets interleaved in ``rounds`` rounds so
    the machine's drift hits all alike; prints the median and each set's ratio to the first."""
    from segshare.data.pipeline import make_training_data

    augments = {name: augmentation(name) for name in sets}
    rates: dict[tuple[str, str], list[float]] = {}
    for _ in range(rounds):
        for backend in ("tf", "pydataset"):
            for name, aug in augments.items():
                ds = make_training_data(
                    cache_dir,
                    ids,
                    patch,
                    batch,
                    augmentation=aug,
                    seed=0,
                    backend=backend,
                    num_workers=workers,
                    steps_per_epoch=n + 5,
                )
                it = iter(ds) if backend == "tf" else (ds[i] for i in range(n + 5))
                for _ in range(3):
                    next(it)
                t = time.perf_counter()
                for _ in range(n):
                    next(it)
                rates.setdefault((backend, name), []).append(n * batch / (time.perf_counter() - t))
    out = {}
    for (backend, name), values in rates.items():
        median = float(np.median(values))
        ref = float(np.median(rates[(backend, sets[0])]))
        out[backend if name == sets[0] else f"{backend}:{name}"] = median
        print(
            f"patches/s ({backend}, augment={name}, patch {list(patch)}, batch {batch}, "
            f"{workers} parallel calls, median of {rounds}): {median:.1f} "
            f"({median / ref:.2f}x {sets[0]})"
        )
    return out


def bench_train_step(patch, batch: int, steps: int) -> float:
    import keras

    from segshare.models import build_unet

    model = build_unet(in_channels=1, num_classes=3)
    model.compile(
        optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    x = np.random.default_rng(0).normal(size=(batch, *patch, 1)).astype(np.float32)
    y = np.zeros((batch, *patch), np.int32)
    model.train_on_batch(x, y)
    t = time.perf_counter()
    for _ in range(steps):
        model.train_on_batch(x, y)
    rate = steps / (time.perf_counter() - t)
    print(f"default U-Net training steps/s (patch {list(patch)}, batch {batch}): {rate:.2f}")
    return rate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--hippocampus", type=Path, default=REPO.parent / "shared/data/Task04_Hippocampus"
    )
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--train-step", action="store_true", help="also time the default U-Net step")
    p.add_argument("--skip-ct", action="store_true")
    p.add_argument(
        "--augment", nargs="+", default=["default", "light"], help="conf/data/augment sets"
    )
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the sets")
    args = p.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        if not args.skip_ct:
            bench_ct_case(tmp)
        if not (args.hippocampus / "dataset.json").exists():
            print(f"hippocampus data not found at {args.hippocampus}: skipped")
            return
        bench_hippocampus(args.hippocampus, args.workers, tmp)
        cache = next((tmp / "hippo").glob("cache_*"))
        ids = sorted(p.name[: -len("_image.npy")] for p in cache.glob("*_image.npy"))
        patch, batch = (48, 64, 48), 2
        rates = bench_patches(
            cache, ids, patch, batch, args.batches, args.workers, args.augment, args.rounds
        )
        if args.train_step:
            steps = bench_train_step(patch, batch, 5)
            print(f"input pipeline / training step: {rates['tf'] / batch / steps:.1f}x (tf.data)")


if __name__ == "__main__":
    main()
