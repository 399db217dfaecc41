"""Benchmark: the cost of fsync in segshare's atomic writes, on small NIfTI label maps.

Writes ``--n`` label maps the size of hippocampus predictions (36x50x35 uint8, ``.nii.gz``) with
``segshare.data.io.save_nifti_atomic`` as it is (the temporary's data fsync-ed before the rename,
the folder after it) and with ``fsync_path`` replaced by a no-op (what the writers did before), in
interleaved rounds (the order alternates per round; ``os.sync()`` between batches, untimed, so
one batch's dirty pages do not land in the next one's time). Prints each batch, the best and
median per mode, the ratio, the CPU model and the file system of ``--dir``.

    python scripts/bench_fsync.py [--n 200] [--rounds 5] [--dir FOLDER]

``--dir`` must be on the disk you care about (the default, a temporary folder in the current
directory, usually is; ``/tmp`` may be a tmpfs, where fsync costs nothing).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from benchlib import cpu_model

from segshare.data import io

SHAPE = (36, 50, 35)


def file_system(path: Path) -> str:
    """``type (device)`` of the mount holding ``path``, from ``/proc/mounts`` (else unknown)."""
    best, found = "", "unknown"
    try:
        with open("/proc/mounts") as fh:
            for line in fh:
                device, mount, kind = line.split()[:3]
                inside = str(path) == mount or str(path).startswith(mount.rstrip("/") + "/")
                if inside and len(mount) > len(best):
                    best, found = mount, f"{kind} ({device} on {mount})"
    except OSError:
        pass
    return found


def label_map(seed: int) -> nib.Nifti1Image:
    """A hippocampus-like prediction: two adjacent ellipsoids (labels 1, 2) in 36x50x35 uint8."""
    rng = np.random.default_rng(seed)
    grid = np.ogrid[tuple(slice(0, s) for s in SHAPE)]
    centre = np.asarray(SHAPE) / 2 + rng.uniform(-2, 2, 3)
    d = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, (8, 14, 7), strict=True))
    labels = np.zeros(SHAPE, np.uint8)
    labels[d <= 1] = 1
    labels[(d <= 1) & (grid[1] > centre[1])] = 2
    return nib.Nifti1Image(labels, np.eye(4))


def write_batch(folder: Path, images: list[nib.Nifti1Image], fsync: bool) -> float:
    """Seconds to write every image atomically into an empty ``folder``, with or without fsync."""
    real = io.fsync_path
    if not fsync:
        io.fsync_path = lambda path: None
    try:
        folder.mkdir(parents=True)
        start = time.perf_counter()
        for i, img in enumerate(images):
            io.save_nifti_atomic(img, folder / f"case_{i:04d}.nii.gz")
        return time.perf_counter() - start
    finally:
        io.fsync_path = real


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="label maps per batch")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=None, help="where to write (deleted after)")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix=".bench_fsync_", dir=args.dir or Path.cwd())).resolve()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"CPU: {cpu_model()} ({cores} usable cores), load average {os.getloadavg()[0]:.2f}")
    print(f"writing into {base}: {file_system(base)}")
    images = [label_map(i) for i in range(args.n)]
    print(f"{args.n} label maps per batch, {'x'.join(map(str, SHAPE))} uint8 .nii.gz")
    times: dict[str, list[float]] = {"fsync": [], "no fsync": []}
    try:
        for r in range(args.rounds):
            order = ["fsync", "no fsync"] if r % 2 == 0 else ["no fsync", "fsync"]
            line = []
            for mode in order:
                os.sync()
                seconds = write_batch(
                    base / f"{r}_{mode.replace(' ', '_')}", images, mode == "fsync"
                )
                times[mode].append(seconds)
                line.append(f"{mode} {seconds:.3f} s ({1000 * seconds / args.n:.2f} ms/file)")
            print(f"round {r + 1}: " + ", ".join(line))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print("best / median of the rounds:")
    for mode, values in times.items():
        best, median = min(values), statistics.median(values)
        print(f"  {mode:9s} {best:8.3f} s  {median:8.3f} s  ({1000 * median / args.n:.2f} ms/file)")
    ratio = statistics.median(times["fsync"]) / statistics.median(times["no fsync"])
    print(f"ratio fsync / no fsync (medians): {ratio:.2f}")


if __name__ == "__main__":
    main()
