"""Benchmark of 3D connected-component labelling (26-connectivity) on a large label volume.

Times ``scipy.ndimage.label`` (what ``segshare.evaluation.postprocessing`` uses: scipy is a
dependency), ``skimage.measure.label(connectivity=3)`` and ``cc3d.connected_components``
(connected-components-3d, ``connectivity=26``) on the binary foreground of a synthetic uint8
volume with a few ellipsoid blobs and many small noise islands, in interleaved rounds (each round
runs every method once, so a load change on the machine hits all of them alike). skimage and cc3d
are optional: a missing one is reported and skipped. Also times segshare's
``keep_largest_component`` (and ``cc3d.largest_k`` when present) on the same mask.

    python scripts/bench_components.py [--shape 512 512 300] [--rounds 3] [--islands 5000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from importlib import metadata

import numpy as np
from benchlib import cpu_model
from scipy import ndimage

from segshare.evaluation.postprocessing import keep_largest_component

#: (label, centre as a fraction of the shape, radii as a fraction of the shape) of the blobs.
BLOBS = (
    (1, (0.40, 0.45, 0.50), (0.20, 0.18, 0.15)),
    (2, (0.70, 0.30, 0.45), (0.08, 0.07, 0.10)),
    (3, (0.70, 0.70, 0.45), (0.08, 0.07, 0.10)),
    (1, (0.25, 0.75, 0.60), (0.10, 0.08, 0.07)),
)


def make_volume(shape: tuple[int, int, int], islands: int, seed: int = 0) -> np.ndarray:
    """A uint8 label volume: ellipsoid blobs plus ``islands`` boxes of 1-3 voxels a side."""
    rng = np.random.default_rng(seed)
    vol = np.zeros(shape, np.uint8)
    for label, centre, radii in BLOBS:
        c = [f * s for f, s in zip(centre, shape, strict=True)]
        r = [f * s for f, s in zip(radii, shape, strict=True)]
        box = tuple(
            slice(max(0, int(ci - ri)), min(s, int(ci + ri) + 1))
            for ci, ri, s in zip(c, r, shape, strict=True)
        )
        grid = np.ogrid[box]
        d = sum(((g - ci) / ri) ** 2 for g, ci, ri in zip(grid, c, r, strict=True))
        vol[box][d <= 1.0] = label
    starts = rng.integers(0, np.asarray(shape) - 3, (islands, 3))
    sizes = rng.integers(1, 4, (islands, 3))
    labels = rng.integers(1, 4, islands)
    for start, size, label in zip(starts, sizes, labels, strict=True):
        vol[tuple(slice(a, a + n) for a, n in zip(start, size, strict=True))] = label
    return vol


def methods() -> tuple[dict[str, Callable[[np.ndarray], int]], list[str]]:
    """The labelling functions available (each returns the number of components), warmed up on a
    tiny mask (skimage imports its submodules lazily, on the first call), and notes with versions.
    """
    import scipy

    structure = ndimage.generate_binary_structure(3, 3)
    found: dict[str, Callable[[np.ndarray], int]] = {
        "scipy": lambda m: int(ndimage.label(m, structure=structure)[1])
    }
    notes = [f"scipy {scipy.__version__}"]
    try:
        import skimage
        from skimage.measure import label as sk_label

        notes.append(f"scikit-image {skimage.__version__}")

        found["skimage"] = lambda m: int(sk_label(m, connectivity=3, return_num=True)[1])
    except ImportError:
        notes.append("scikit-image not installed: skimage.measure.label not timed")
    try:
        import cc3d

        notes.append(f"cc3d {metadata.version('connected-components-3d')}")
        found["cc3d"] = lambda m: int(cc3d.connected_components(m, connectivity=26).max())
    except ImportError:
        notes.append("connected-components-3d (cc3d) not installed: cc3d not timed")
    tiny = np.zeros((4, 4, 4), bool)
    tiny[1, 1, 1] = True
    for fn in found.values():
        fn(tiny)
    return found, notes


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(512, 512, 300))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--islands", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    shape = tuple(args.shape)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"CPU: {cpu_model()} ({cores} usable cores), load average {os.getloadavg()[0]:.2f}")
    t_make, vol = timed(lambda: make_volume(shape, args.islands, args.seed))
    mask = vol > 0
    print(
        f"volume {'x'.join(map(str, shape))} uint8 ({vol.nbytes / 2**20:.0f} MiB, made in "
        f"{t_make:.1f} s): {len(BLOBS)} blobs, {args.islands} noise islands, foreground "
        f"{int(mask.sum())} voxels ({100 * mask.mean():.2f}%); labelling its binary foreground, "
        "26-connectivity"
    )
    found, notes = methods()
    for note in notes:
        print(note)
    times: dict[str, list[float]] = {name: [] for name in found}
    times["keep_largest_component"] = []
    counts: dict[str, int] = {}
    extra: dict[str, Callable[[], object]] = {
        "keep_largest_component": lambda: keep_largest_component(mask)
    }
    if "cc3d" in found:
        import cc3d

        times["cc3d.largest_k"] = []
        extra["cc3d.largest_k"] = lambda: cc3d.largest_k(mask, k=1, connectivity=26)
    for r in range(1, args.rounds + 1):
        line = []
        for name, fn in found.items():
            seconds, counts[name] = timed(lambda fn=fn: fn(mask))
            times[name].append(seconds)
            line.append(f"{name} {seconds:.3f} s")
        for name, fn in extra.items():
            seconds, out = timed(fn)
            times[name].append(seconds)
            line.append(f"{name} {seconds:.3f} s ({int(np.count_nonzero(out))} voxels kept)")
            del out
        print(f"round {r}: " + ", ".join(line))
    print("components found: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    print("best / median of the rounds:")
    for name, values in times.items():
        print(f"  {name:24s} {min(values):8.3f} s  {statistics.median(values):8.3f} s")
    base = min(times["scipy"])
    for name in ("skimage", "cc3d"):
        if name in found:
            print(f"ratio {name}/scipy (best): {min(times[name]) / base:.2f}")


if __name__ == "__main__":
    main()
