"""What the inference settings of issue 15 cost and change, on a trained run and its validation
cases (a benchmark, not a test): Dice and seconds per case.

    python scripts/bench_inference_settings.py RUN [--max-cases N] [--repeats R] [--out DIR]

``RUN`` is a ``segshare-train`` run folder whose ``run.json`` names its validation cases and whose
``config.yaml`` names its dataset. Two experiments, each variant predicting the same cases with
the whole pipeline (read, preprocess, sliding window, restore, write) and scored by
``segshare.evaluation`` (foreground-mean Dice); variants are interleaved per repeat so the drift
of a shared machine hits them alike, and the median seconds per case are printed with the ratio
to the first variant:

1. **precision x runtime**: Keras float32 (the reference), Keras bfloat16, OpenVINO float32 and
   bfloat16 (when installed); the Dice difference to the reference is paired over the cases
   (:mod:`segshare.evaluation.comparison`).
2. **wider windows**: the training patch (the reference), then 2x and 4x its size per axis
   (rounded to the network's stride, at most 160), on the cases as they are (smaller than the
   patch: the wider windows are fitted back to it, ``segshare.inference.sliding_window.
   fitted_roi``) and on the same cases embedded in a 160^3 field, where a wider window means
   fewer windows. The field is the scan mirrored outwards (``np.pad(mode="reflect")``; the
   scan's world geometry kept, the affine's origin moving with the padding): zeros would be
   cropped away by preprocessing, mirrored anatomy is not. The predictions are scored inside the
   original scan's box only (the mirrored copies have no labels).

Prints one JSON object per experiment.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _cases(run_dir: Path, max_cases: int | None):
    from omegaconf import OmegaConf

    from segshare.data.discovery import discover_dataset
    from segshare.inference.trained_run import load_trained_run

    run = load_trained_run(run_dir)
    wanted = set(run.split["validation_cases"]) if run.split else None
    root = Path(OmegaConf.load(run_dir / "config.yaml").data.root)
    cases = [c for c in discover_dataset(root).cases if wanted is None or c.case_id in wanted]
    return run, cases[:max_cases]


def _padded(cases, folder: Path, size: int = 160):
    """Each case's image mirrored outwards (centred) into a ``size``^3 field, same world
    geometry; returns the new cases and each case's box ``(start, shape)`` in the field."""
    import nibabel as nib

    from segshare.data.discovery import Case

    folder.mkdir(parents=True, exist_ok=True)
    out, boxes = [], {}
    for case in cases:
        files = []
        for k, path in enumerate((*case.images, case.label)):
            img = nib.load(path)
            data = np.asarray(img.dataobj)
            before = [max((size - s) // 2, 0) for s in data.shape[:3]]
            pad = [(b, max(size - s - b, 0)) for b, s in zip(before, data.shape[:3], strict=True)]
            pad += [(0, 0)] * (data.ndim - 3)
            affine = img.affine.copy()
            affine[:3, 3] -= affine[:3, :3] @ np.asarray(before, float)  # voxel 0 moves out
            kind = "label" if k == len(case.images) else f"image{k}"
            target = folder / f"{case.case_id}_{kind}.nii.gz"
            field = np.pad(data, pad) if kind == "label" else np.pad(data, pad, mode="reflect")
            nib.save(nib.Nifti1Image(field, affine, img.header), target)
            files.append(target)
            boxes[case.case_id] = (before, data.shape[:3])
        out.append(Case(case.case_id, tuple(files[:-1]), files[-1]))
    return out, boxes


def _crop_predictions(pred_dir: Path, boxes: dict) -> Path:
    """The predictions of embedded cases cut back to each original scan's box (a new folder)."""
    import nibabel as nib

    out = pred_dir.parent / (pred_dir.name + "_box")
    out.mkdir(exist_ok=True)
    for case_id, (start, shape) in boxes.items():
        img = nib.load(pred_dir / f"{case_id}.nii.gz")
        box = tuple(slice(b, b + s) for b, s in zip(start, shape, strict=True))
        affine = img.affine.copy()
        affine[:3, 3] += affine[:3, :3] @ np.asarray(start, float)
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[box], affine), out / f"{case_id}.nii.gz")
    return out


def _score(pred_dir: Path, cases, run) -> dict[str, float]:
    """Foreground-mean Dice per case against each case's label file."""
    from segshare.evaluation import evaluate_folders
    from segshare.evaluation.comparison import case_scores

    refs = pred_dir.parent / (pred_dir.name + "_refs")
    refs.mkdir(exist_ok=True)
    for case in cases:
        link = refs / f"{case.case_id}.nii.gz"
        if not link.exists():
            link.symlink_to(Path(case.label).resolve())
    summary = evaluate_folders(
        pred_dir, refs, pred_dir.parent / (pred_dir.name + "_eval"), report=False,
        progress=False, labels=sorted(v for v in run.plan.labels.values() if v), num_workers=1,
    )  # fmt: skip
    return case_scores(summary)


def _experiment(run_dir, run, cases, variants, repeats, folder: Path, crop=None) -> dict:
    """``variants``: ``{label: load_ensemble keyword arguments}``; the first is the reference.
    ``crop``: ``(boxes, original cases)`` of embedded cases (:func:`_padded`), scored inside
    their original box against the original labels."""
    from segshare.evaluation.comparison import format_difference, paired_comparison
    from segshare.inference.ensemble import load_ensemble
    from segshare.inference.predictor import predict_cases
    from segshare.inference.sliding_window import WindowSettings

    predictors = {}
    for label, options in variants.items():
        window = WindowSettings(options.pop("roi_size", None), 0.5, 2, 0.125)
        try:
            predictors[label] = load_ensemble(run_dir, window, **options)[0]
        except ValueError as err:
            print(f"# {label}: skipped ({err})")
    seconds = {label: [] for label in predictors}
    scores = {}
    for r in range(repeats):
        for label, predictor in predictors.items():
            out = folder / f"{label}_{r}"
            report = predict_cases(predictor, cases, out, progress=False, skip_existing=False)
            if report.failed:
                raise RuntimeError(f"{label}: {report.failed}")
            seconds[label].append(report.seconds / len(cases))
            if r == 0 and crop is None:
                scores[label] = _score(out, cases, run)
            elif r == 0:
                scores[label] = _score(_crop_predictions(out, crop[0]), crop[1], run)
    reference = next(iter(predictors))
    ref_s = float(np.median(seconds[reference]))
    return {
        label: {
            "seconds_per_case": round(float(np.median(seconds[label])), 3),
            "time_ratio": round(float(np.median(seconds[label])) / ref_s, 3),
            "dice": round(float(np.mean(list(scores[label].values()))), 5),
            "dice_minus_reference": format_difference(
                paired_comparison(scores[reference], scores[label])
            )
            if label != reference
            else "",
        }
        for label in predictors
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--max-cases", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="work folder (default: temporary)")
    parser.add_argument("--only", choices=["precision", "windows"], default=None)
    args = parser.parse_args()
    run, cases = _cases(args.run, args.max_cases)
    folder = args.out or Path(tempfile.mkdtemp(prefix="bench_inference."))
    print(f"# {args.run}: {len(cases)} validation cases, work folder {folder}")
    if args.only in (None, "precision"):
        variants = {
            "keras_float32": {"precision": "float32"},
            "keras_bfloat16": {"precision": "bfloat16"},
            "openvino_float32": {"precision": "float32", "runtime": "openvino"},
            "openvino_bfloat16": {"precision": "bfloat16", "runtime": "openvino"},
        }
        result = _experiment(args.run, run, cases, variants, args.repeats, folder / "precision")
        print(json.dumps({"experiment": "precision x runtime", **result}), flush=True)
    if args.only in (None, "windows"):
        patch = run.window_size
        stride = 2 ** (len(run.info["network"]["features"]) - 1)
        variants = {"patch": {}}
        for factor in (2, 4):
            roi = [min(160, -(-p * factor // stride) * stride) for p in patch]
            variants[f"roi_{'x'.join(map(str, roi))}"] = {"roi_size": roi}
        field, boxes = _padded(cases, folder / "padded")
        for name, which, crop in (("as_is", cases, None), ("in_160_field", field, (boxes, cases))):
            result = _experiment(
                args.run, run, which, {k: dict(v) for k, v in variants.items()}, args.repeats,
                folder / f"windows_{name}", crop,
            )  # fmt: skip
            print(json.dumps({"experiment": f"wider windows, cases {name}", **result}), flush=True)


if __name__ == "__main__":
    main()
