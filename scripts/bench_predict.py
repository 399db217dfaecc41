"""Benchmark of segshare-predict: seconds per volume and peak resident memory.

Scenarios (each runs in its own process, so peak RSS is that scenario's own):

* ``cube``: a 160^3 one-channel volume, roi 64^3, overlap 0.5, Gaussian blending,
  sw_batch_size 2, the issue's U-Net: widths 16-32-64-128, two conv-instance norm-LeakyReLU
  per stage (``build_unet(features=(16, 32, 64, 128), block="plain", blocks_per_stage=(1, 1, 1, 1),
  sharing="none")``, untrained: speed does not depend on the weights; ``--block residual`` for
  the residual encoder, 24 % more convolution work). Timed twice: a straightforward Keras loop
  (``model.predict`` per batch of windows, accumulate, no threads) and ``segshare.inference``
  (tf.function forward + softmax, windows gathered and accumulated while the next batch runs).
  Both are checked to give the same labels.
  ``model_only`` times the network alone on 32 batches of 2 windows: the floor of any loop.
* ``runtimes`` (issue 15): the cube through the network with the old norm (Keras'
  ``GroupNormalization(groups=-1)``) and the new one (``InstanceNormalization``), on the Keras and
  the OpenVINO runtime, in float32 and bfloat16, the variants interleaved in each repeat; median
  seconds, the ratio to the old float32 Keras path, and the labels' agreement with it.
* ``hippo``: whole-case prediction of real hippocampus scans (read + preprocess + sliding window
  with roi 48x64x48 + restore + atomic NIfTI write) with the same network; seconds per case.
* ``ct``: a 512x512x300 one-channel CT-like volume with 3 classes through the sliding window and
  the argmax (roi 128^3, a cheap NumPy stand-in for the network: this scenario measures memory);
  peak RSS is compared with input + class probabilities (float32).
* ``ct_file``: the same size as a user runs it, NIfTI file in -> labels NIfTI out (read,
  CT normalisation, sliding window, restore, write), on the plan's grid (no resampling);
  ``ct_file_resampled``: the same with a plan of 1.0 x 1.0 x 2.5 mm (0.8 mm in-plane scan), so
  the image is resampled and the probabilities are resampled back before the argmax.
* ``ct_ensemble3``: ``ct_file`` with a 3-model ensemble sharing the plan (the members averaged per
  window, ``segshare.inference.ensemble``); ``ct_ensemble3_two_plans``: 3 members on two plans
  (one as ``ct_file``, two as ``ct_file_resampled``), averaged on the scan's grid. Peak memory
  is compared with ``ct_file``'s (one model).

Usage::

    python scripts/bench_predict.py                  # all scenarios, best of 3 for timings
    python scripts/bench_predict.py --only cube --repeats 2
    python scripts/bench_predict.py --only runtimes --repeats 8 \
        --variants instancenorm_openvino_bfloat16     # the reference and one variant
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
HIPPO = Path(__file__).resolve().parents[2] / "shared" / "data" / "Task04_Hippocampus"


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MiB; Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


BLOCK = "plain"  # set by --block
KERAS_ONLY = False  # set by --keras-only: the runtimes scenario without OpenVINO
VARIANTS: set[str] = set()  # set by --variants: the runtimes variants to run (empty: all)


def benchmark_network(num_classes: int = 3):
    """The 16-32-64-128 U-Net of the benchmark (segshare.models), two convs per stage."""
    from segshare.models import build_unet

    return build_unet(
        features=(16, 32, 64, 128),
        sharing="none",
        block=BLOCK,
        blocks_per_stage=(1, 1, 1, 1),
        num_classes=num_classes,
    )


def smooth_volume(shape, seed: int = 0) -> np.ndarray:
    """A smooth random ``(*shape, 1)`` float32 volume (z-scored)."""
    from scipy.ndimage import gaussian_filter

    v = gaussian_filter(np.random.default_rng(seed).normal(size=shape).astype(np.float32), 3)
    return ((v - v.mean()) / v.std())[..., None]


def straightforward_loop(volume, model, roi, overlap, sw_batch_size):
    """The reference: ``model.predict`` per batch of windows, softmax, Gaussian accumulation."""
    from segshare.inference.sliding_window import _window_slices, gaussian_importance_map

    gauss = gaussian_importance_map(tuple(roi), 0.125)[..., None]
    slices = _window_slices(volume.shape[:3], roi, overlap)
    out, norm = None, np.zeros((*volume.shape[:3], 1), np.float32)
    for i in range(0, len(slices), sw_batch_size):
        chunk = slices[i : i + sw_batch_size]
        logits = model.predict(np.stack([volume[s] for s in chunk]), verbose=0)
        e = np.exp(logits - logits.max(-1, keepdims=True))
        probs = e / e.sum(-1, keepdims=True)
        if out is None:
            out = np.zeros((*volume.shape[:3], probs.shape[-1]), np.float32)
        for s, p in zip(chunk, probs, strict=True):
            out[s] += p * gauss
            norm[s] += gauss
    return out / norm


def run_cube(repeats: int) -> dict:
    from segshare.inference.model_io import make_predict_fn
    from segshare.inference.sliding_window import sliding_window_inference

    roi, overlap, sw = (64, 64, 64), 0.5, 2
    volume = smooth_volume((160, 160, 160))
    model = benchmark_network()
    predict_fn = make_predict_fn(model)
    predict_fn(volume[None, :64, :64, :64])  # trace once (excluded, as the baseline's warm-up)
    model.predict(volume[None, :64, :64, :64], verbose=0)
    times = {"keras_loop": [], "segshare": [], "model_only": []}
    batch = np.stack([volume[:64, :64, :64]] * sw)
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(64 // sw):  # the network alone on 64 windows: the floor for both loops
            predict_fn(batch)
        times["model_only"].append(time.perf_counter() - t)
        t = time.perf_counter()
        ref = straightforward_loop(volume, model, roi, overlap, sw)
        times["keras_loop"].append(time.perf_counter() - t)
        t = time.perf_counter()
        ours = sliding_window_inference(volume, predict_fn, roi, overlap=overlap, sw_batch_size=sw)
        times["segshare"].append(time.perf_counter() - t)
    same = float((ref.argmax(-1) == ours.argmax(-1)).mean())
    return {
        "scenario": f"cube 160^3, roi 64^3, overlap 0.5, sw_batch_size 2, 64 windows, {BLOCK}",
        "keras_loop_s": [round(t, 2) for t in times["keras_loop"]],
        "segshare_s": [round(t, 2) for t in times["segshare"]],
        "model_only_s": [round(t, 2) for t in times["model_only"]],
        "best_keras_loop_s": round(min(times["keras_loop"]), 2),
        "best_segshare_s": round(min(times["segshare"]), 2),
        "best_model_only_s": round(min(times["model_only"]), 2),
        "max_abs_prob_diff": float(np.abs(ref - ours).max()),
        "same_label_fraction": same,
        "peak_rss_mb": round(peak_rss_mb()),
    }


def run_hippo(repeats: int, num_cases: int = 5) -> dict:
    import tempfile

    from segshare.data.discovery import discover_dataset
    from segshare.data.preprocessing import Plan
    from segshare.inference.model_io import make_predict_fn
    from segshare.inference.predictor import Predictor, predict_cases
    from segshare.inference.sliding_window import WindowSettings

    if not HIPPO.is_dir():
        return {"scenario": "hippo", "skipped": f"{HIPPO} not found"}
    cases = discover_dataset(HIPPO).cases[:num_cases]
    plan = Plan(
        target_spacing=(1.0, 1.0, 1.0),
        normalization=["zscore"],
        ct_stats=None,
        labels={"background": 0, "Anterior": 1, "Posterior": 2},
        in_channels=1,
        num_classes=3,
    )
    window = WindowSettings(roi_size=(48, 64, 48), overlap=0.5, sw_batch_size=2, sigma_scale=0.125)
    predictor = Predictor(make_predict_fn(benchmark_network()), plan, window)
    predictor.predict_array(np.zeros((48, 64, 48, 1), np.float32))  # trace once
    per_case = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as out:
            report = predict_cases(predictor, cases, out, progress=False)
            if report.failed:
                raise RuntimeError(f"hippocampus cases failed: {report.failed}")
            per_case.append(report.seconds / len(cases))
    return {
        "scenario": f"hippocampus, {len(cases)} real cases, whole pipeline, roi 48x64x48",
        "seconds_per_case": [round(t, 3) for t in per_case],
        "best_seconds_per_case": round(min(per_case), 3),
        "peak_rss_mb": round(peak_rss_mb()),
    }


def cheap_predict_fn(batch: np.ndarray) -> np.ndarray:
    """A NumPy stand-in network (3-class softmax of [x, -x, 0]) for the memory scenario."""
    x = batch[..., :1]
    logits = np.concatenate([x, -x, np.zeros_like(x)], axis=-1)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def run_ct(repeats: int) -> dict:
    from segshare.inference.predictor import argmax_labels
    from segshare.inference.sliding_window import sliding_window_inference

    shape, k = (512, 512, 300), 3
    volume = np.random.default_rng(0).standard_normal((*shape, 1), dtype=np.float32)
    base = peak_rss_mb()
    t = time.perf_counter()
    probs = sliding_window_inference(volume, cheap_predict_fn, (128, 128, 128), num_classes=k)
    labels = argmax_labels(probs)
    seconds = time.perf_counter() - t
    reference_mb = (volume.nbytes + probs.nbytes) / 2**20
    peak = peak_rss_mb()
    return {
        "scenario": "CT-like 512x512x300, 3 classes, roi 128^3 (NumPy stand-in network)",
        "seconds": round(seconds, 1),
        "input_plus_probabilities_mb": round(reference_mb),
        "peak_rss_mb": round(peak),
        "peak_rss_over_input_plus_probabilities": round(peak / reference_mb, 2),
        "rss_before_inference_mb": round(base),
        "labels_dtype": str(labels.dtype),
    }


def run_ct_file(repeats: int, target_spacing=None, members=(1,)) -> dict:
    """The CT-like case as a user runs it: NIfTI file in, NIfTI labels out (whole pipeline).

    ``target_spacing=None``: the scan is on the plan's grid (no resampling); otherwise the image
    is resampled to it and the probabilities back to the scan's grid. ``members``: an ensemble,
    members per plan (the first plan on the scan's grid, a second at 1.0 x 1.0 x 2.5 mm).
    """
    import tempfile

    import nibabel as nib

    from segshare.data.discovery import Case
    from segshare.data.preprocessing import Plan
    from segshare.inference.ensemble import EnsemblePredictor, mean_predict_fn
    from segshare.inference.predictor import Predictor, predict_cases
    from segshare.inference.sliding_window import WindowSettings

    shape, spacing = (512, 512, 300), (0.8, 0.8, 2.5)
    plan = Plan(
        target_spacing=target_spacing or spacing,
        normalization=["ct"],
        ct_stats=[{"p005": -1000.0, "p995": 1500.0, "mean": 40.0, "std": 300.0}],
        labels={"background": 0, "organ": 1, "tumour": 2},
        in_channels=1,
        num_classes=3,
    )
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        data = rng.integers(-1000, 1500, size=shape, dtype=np.int16)
        scan = Path(tmp) / "ct.nii"
        nib.save(nib.Nifti1Image(data, np.diag([*spacing, 1.0])), str(scan))
        del data
        base = peak_rss_mb()
        window = WindowSettings((128, 128, 128), overlap=0.5, sw_batch_size=2, sigma_scale=0.125)
        plans = [plan, replace(plan, target_spacing=(1.0, 1.0, 2.5))]
        groups = [
            (Predictor(mean_predict_fn([cheap_predict_fn] * n), p, window), n)
            for n, p in zip(members, plans, strict=False)
        ]
        predictor = groups[0][0] if len(groups) == 1 else EnsemblePredictor(groups)
        report = predict_cases(predictor, [Case("ct", (scan,))], Path(tmp) / "out", progress=False)
        if report.failed:
            raise RuntimeError(report.failed)
        reference_mb = np.prod(shape) * 4 * (1 + 3) / 2**20
        peak = peak_rss_mb()
    grid = "no resampling" if target_spacing is None else f"resampled to {target_spacing} mm"
    if sum(members) > 1:
        grid += f", ensemble of {sum(members)} models on {len(members)} plan(s)"
    return {
        "scenario": f"CT-like 512x512x300 NIfTI -> labels NIfTI, 3 classes, {grid}",
        "seconds": round(report.seconds, 1),
        "input_plus_probabilities_mb": round(reference_mb),
        "peak_rss_mb": round(peak),
        "peak_rss_over_input_plus_probabilities": round(peak / reference_mb, 2),
        "rss_before_inference_mb": round(base),
    }


def _old_norm_network():
    """The benchmark network with the norm segshare used before issue 15: Keras'
    ``GroupNormalization(groups=-1)`` (6-D reshape) instead of ``InstanceNormalization``."""
    import keras

    import segshare.models.encoder as encoder
    import segshare.models.unet as unet

    def group_norm(kind, name):
        return keras.layers.GroupNormalization(groups=-1, epsilon=1e-5, name=name)

    saved = encoder.make_norm
    encoder.make_norm = unet.make_norm = group_norm
    try:
        return benchmark_network()
    finally:
        encoder.make_norm = unet.make_norm = saved


#: ``runtimes`` variants: (label, old norm?, runtime, precision); the first is the reference.
RUNTIME_VARIANTS = (
    ("groupnorm_keras_float32 (before issue 15)", True, "keras", "float32"),
    ("instancenorm_keras_float32", False, "keras", "float32"),
    ("instancenorm_keras_bfloat16", False, "keras", "bfloat16"),
    ("groupnorm_openvino_float32", True, "openvino", "float32"),
    ("instancenorm_openvino_float32", False, "openvino", "float32"),
    ("instancenorm_openvino_bfloat16", False, "openvino", "bfloat16"),
)


def run_runtimes(repeats: int) -> dict:
    """The cube through every norm x runtime x precision of issue 15, interleaved per repeat (a
    shared machine's drift hits every variant alike); median seconds, ratio to the first."""
    import tempfile

    import keras

    from segshare.inference.model_io import make_predict_fn, with_precision
    from segshare.inference.sliding_window import sliding_window_inference

    roi, overlap, sw = (64, 64, 64), 0.5, 2
    volume = smooth_volume((160, 160, 160))
    functions, folder = {}, Path(tempfile.mkdtemp(prefix="bench_runtimes."))
    weights = None
    for label, old, runtime, precision in RUNTIME_VARIANTS:
        left_out = (KERAS_ONLY and runtime != "keras") or (
            VARIANTS and label.split()[0] not in VARIANTS
        )
        if left_out and label != RUNTIME_VARIANTS[0][0]:  # the reference always runs
            continue
        keras.utils.set_random_seed(0)
        model = _old_norm_network() if old else benchmark_network()
        if weights is None:
            weights = model.get_weights()
        model.set_weights(weights)  # the same network in every variant
        if runtime == "openvino":
            try:
                from segshare.inference.openvino_runtime import openvino_predict_fn
            except ImportError:
                continue
            path = folder / f"{label.split()[0]}.keras"
            model.save(path)
            try:
                functions[label] = openvino_predict_fn(path, model, precision=precision)
            except ValueError as err:  # OpenVINO not installed
                return {"scenario": "runtimes", "skipped": str(err)}
        else:
            functions[label] = make_predict_fn(with_precision(model, precision))
        functions[label](volume[None, :64, :64, :64])  # trace / compile once
    times = {label: [] for label in functions}
    outputs = {}
    for _ in range(repeats):
        for label, fn in functions.items():
            t = time.perf_counter()
            outputs[label] = sliding_window_inference(
                volume, fn, roi, overlap=overlap, sw_batch_size=sw
            )
            times[label].append(time.perf_counter() - t)
    reference = RUNTIME_VARIANTS[0][0]
    ref_median = float(np.median(times[reference]))
    ref_labels = outputs[reference].argmax(-1)
    return {
        "scenario": f"runtimes: cube 160^3, roi 64^3, overlap 0.5, sw_batch_size 2, {BLOCK}, "
        f"{keras.backend.backend()}",
        "median_s": {k: round(float(np.median(v)), 2) for k, v in times.items()},
        "ratio_to_reference": {
            k: round(float(np.median(v)) / ref_median, 3) for k, v in times.items()
        },
        "same_labels_as_reference": {
            k: round(float((o.argmax(-1) == ref_labels).mean()), 5) for k, o in outputs.items()
        },
        "max_abs_prob_diff": {
            k: round(float(np.abs(o - outputs[reference]).max()), 4) for k, o in outputs.items()
        },
        "peak_rss_mb": round(peak_rss_mb()),
    }


SCENARIOS = {
    "cube": run_cube,
    "runtimes": run_runtimes,
    "hippo": run_hippo,
    "ct": run_ct,
    "ct_file": run_ct_file,
    "ct_file_resampled": lambda repeats: run_ct_file(repeats, target_spacing=(1.0, 1.0, 2.5)),
    "ct_ensemble3": lambda repeats: run_ct_file(repeats, members=(3,)),
    "ct_ensemble3_two_plans": lambda repeats: run_ct_file(repeats, members=(1, 2)),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(SCENARIOS), help="run one scenario in-process")
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats (best reported)")
    parser.add_argument("--block", choices=["plain", "residual"], default="plain")
    parser.add_argument("--keras-only", action="store_true", help="runtimes: no OpenVINO")
    names = [label.split()[0] for label, *_ in RUNTIME_VARIANTS]
    parser.add_argument(
        "--variants", nargs="+", choices=names, default=[],
        help="runtimes: only these variants (and the reference), e.g. more repeats of two",
    )  # fmt: skip
    args = parser.parse_args()
    global BLOCK, KERAS_ONLY, VARIANTS
    BLOCK, KERAS_ONLY, VARIANTS = args.block, args.keras_only, set(args.variants)
    if args.only:
        print(json.dumps(SCENARIOS[args.only](args.repeats)), flush=True)
        return
    for name in SCENARIOS:  # one process per scenario: clean peak-RSS numbers
        cmd = [sys.executable, __file__, "--only", name, "--repeats", str(args.repeats)]
        cmd += ["--block", args.block] + (["--keras-only"] if args.keras_only else [])
        cmd += ["--variants", *args.variants] if args.variants else []
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
        print(lines[-1] if lines else f"{name}: failed\n{out.stderr[-2000:]}", flush=True)


if __name__ == "__main__":
    main()
