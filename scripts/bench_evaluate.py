"""Benchmark of the evaluation metrics on a 256x256x200 pair with 5 labels (4 foreground).

Prints the time of one ``np.bincount`` pass (the floor for overlap counts), of segshare's Dice for
all labels, of segshare's HD95/ASSD/NSD for the 4 labels (bounding boxes), and of a full-volume
implementation that follows MONAI's code step by step (erosion, EDT on the whole volume, float32
distances, ``quantile``), and checks that the HD95 values agree.

    python scripts/bench_evaluate.py [--repeats 5] [--shape 256 256 200]

When medpy is importable, its ``dc`` and ``hd95`` are timed and compared as well.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from scipy import ndimage

from segshare.evaluation.overlap import overlap_metrics
from segshare.evaluation.surface import surface_metrics

SPACING = (0.8, 0.8, 1.5)
#: (label, centre as a fraction of the shape, radii in voxels) of four ellipsoid "organs".
ORGANS = (
    (1, (0.40, 0.45, 0.50), (60, 50, 40)),
    (2, (0.70, 0.30, 0.45), (22, 18, 30)),
    (3, (0.70, 0.70, 0.45), (22, 18, 30)),
    (4, (0.35, 0.75, 0.60), (30, 25, 20)),
)


def make_pair(shape: tuple[int, int, int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A reference with four ellipsoids and a prediction that is shifted, dilated and noisy."""
    rng = np.random.default_rng(seed)
    grid = np.ogrid[tuple(slice(0, s) for s in shape)]
    ref = np.zeros(shape, np.uint8)
    pred = np.zeros(shape, np.uint8)
    for label, centre, radii in ORGANS:
        for out, jitter, scale in ((ref, 0.0, 1.0), (pred, 3.0, 1.06)):
            c = [f * s + rng.normal(0, jitter) for f, s in zip(centre, shape, strict=True)]
            d = sum(((g - ci) / (r * scale)) ** 2 for g, ci, r in zip(grid, c, radii, strict=True))
            noise = rng.normal(0, 0.08, shape) if out is pred else 0.0
            out[d + noise <= 1.0] = label
    return pred, ref


def monai_style_hd95(pred: np.ndarray, ref: np.ndarray, label: int, spacing) -> tuple[float, float]:
    """Full-volume HD95 following MONAI's ``get_mask_edges``/``get_surface_distance`` code.

    Returns (with MONAI's float32 cast of the distances, without it).
    """
    p, r = pred == label, ref == label
    edges_p = ndimage.binary_erosion(p) ^ p
    edges_r = ndimage.binary_erosion(r) ^ r
    d_pr = ndimage.distance_transform_edt(~edges_r, sampling=spacing)[edges_p]
    d_rp = ndimage.distance_transform_edt(~edges_p, sampling=spacing)[edges_r]
    as32 = max(
        np.quantile(d_pr.astype(np.float32), 0.95), np.quantile(d_rp.astype(np.float32), 0.95)
    )
    return float(as32), float(max(np.quantile(d_pr, 0.95), np.quantile(d_rp, 0.95)))


def compare_medpy(pred: np.ndarray, ref: np.ndarray, labels: list[int]) -> None:
    """Times medpy's ``dc`` and ``hd95`` and compares them with segshare's (``hd95="medpy"``)."""
    try:
        from medpy.metric import binary
    except ImportError:
        print("medpy not installed: skipping the medpy comparison")
        return
    t_dc, dcs = best_time(lambda: [binary.dc(pred == k, ref == k) for k in labels], 3)
    print(f"medpy dc, 4 labels:                        {t_dc:.4f} s")
    t_hd, hds = best_time(
        lambda: [binary.hd95(pred == k, ref == k, voxelspacing=SPACING) for k in labels], 1
    )
    print(f"medpy hd95, 4 labels (full volume):        {t_hd:.4f} s")
    ours_ov = overlap_metrics(pred, ref, labels)
    t_ours, ours = best_time(
        lambda: surface_metrics(pred, ref, labels, SPACING, hd95_variant="medpy"), 1
    )
    print(f"segshare hd95='medpy' (+ASSD, NSD):        {t_ours:.4f} s")
    for k, dc, hd in zip(labels, dcs, hds, strict=True):
        print(
            f"  label {k}: Dice {ours_ov[k]['Dice']:.12f} vs medpy {dc:.12f}; HD95 "
            f"{ours[k]['HD95']:.12f} vs medpy {hd:.12f} mm (|diff| {abs(ours[k]['HD95'] - hd):.1e})"
        )


def best_time(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--shape", type=int, nargs=3, default=(256, 256, 200))
    args = parser.parse_args()
    pred, ref = make_pair(tuple(args.shape))
    labels = [1, 2, 3, 4]
    print(
        f"pair {tuple(args.shape)} uint8, labels {labels}, spacing {SPACING}, "
        f"best of {args.repeats}"
    )
    t_floor, _ = best_time(
        lambda: np.bincount((ref.astype(np.int64) * 5 + pred).ravel(), minlength=25), args.repeats
    )
    print(f"one np.bincount pass (int64 ref*5+pred):   {t_floor:.4f} s")
    t_dice, ov = best_time(lambda: overlap_metrics(pred, ref, labels), args.repeats)
    print(f"segshare Dice/IoU/TP/FP/FN/TN, 4 labels:   {t_dice:.4f} s  ({t_dice / t_floor:.2f}x)")
    print("  Dice: " + ", ".join(f"{k}={v['Dice']:.4f}" for k, v in ov.items()))
    t_surf, sm = best_time(
        lambda: surface_metrics(pred, ref, labels, SPACING), max(1, args.repeats // 2)
    )
    print(f"segshare HD95+ASSD+NSD, 4 labels (bbox):   {t_surf:.4f} s")
    t_full, full = best_time(lambda: [monai_style_hd95(pred, ref, k, SPACING) for k in labels], 1)
    print(f"MONAI-style full-volume HD95, 4 labels:    {t_full:.4f} s")
    for k, (as32, as64) in zip(labels, full, strict=True):
        ours = sm[k]["HD95"]
        print(
            f"  HD95 label {k}: segshare {ours:.6f} mm, full-volume {as32:.6f} mm (float32, "
            f"|diff| {abs(ours - as32):.1e}), float64 |diff| {abs(ours - as64):.1e}"
        )
    compare_medpy(pred, ref, labels)


if __name__ == "__main__":
    main()
