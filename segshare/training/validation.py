"""The last step of training: the fold's validation cases predicted on their original grids by the
trained run, as ``segshare-predict`` would, and scored as ``segshare-evaluate`` would.

Writes ``validation/predictions/`` (labels, and with ``save_probabilities`` the class
probabilities ``<case>.npz`` on the scan's grid, from which ``segshare-crossval`` ensembles
configurations without retraining), ``validation/references/`` (links to the labels, named like the
predictions) and the evaluation report (``validation/summary.json`` ...) into the run folder.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from segshare.data.discovery import Case
from segshare.data.prepare import PreparedData
from segshare.evaluation import evaluate_folders
from segshare.inference.predictor import predict_cases
from segshare.inference.sliding_window import WindowSettings
from segshare.inference.trained_run import load_trained_run


def _reference_link(label: Path, target: Path) -> None:
    """Expose a reference under the prediction's file name (a link, or a .nii.gz copy)."""
    import nibabel as nib

    if target.exists() or target.is_symlink():
        target.unlink()
    if label.name.endswith(".nii.gz"):
        target.symlink_to(label.resolve())
    else:
        nib.save(nib.load(label), target)


def evaluate_trained_run(
    run_dir: Path,
    cases: Sequence[Case],
    window: WindowSettings,
    dataset_json: Path | None = None,
    progress: bool = True,
    save_probabilities: bool = False,
) -> dict:
    """Predict ``cases`` (labelled) with the run in ``run_dir`` and evaluate them.

    Args:
        run_dir: a trained run (loaded with :func:`load_trained_run`, as for prediction).
        cases: the cases to predict; each must have a label.
        window: the sliding window (``roi_size`` None = the run's training patch).
        dataset_json: the dataset's ``dataset.json`` (label names), if any.
        progress: show progress bars.
        save_probabilities: also write each case's probabilities (``<case>.npz``).

    Returns:
        The evaluation summary (``validation/summary.json``).
    """
    out = Path(run_dir) / "validation"
    pred_dir, ref_dir = out / "predictions", out / "references"
    ref_dir.mkdir(parents=True, exist_ok=True)
    run = load_trained_run(run_dir)
    predictor = run.predictor(window)
    predict_cases(
        predictor,
        cases,
        pred_dir,
        save_probabilities=save_probabilities,
        skip_existing=False,
        progress=progress,
    )
    for case in cases:
        _reference_link(Path(case.label), ref_dir / f"{case.case_id}.nii.gz")
    summary = evaluate_folders(
        pred_dir,
        ref_dir,
        out,
        dataset_json=dataset_json,
        num_workers=1,
        progress=progress,
        ignore_label=run.plan.ignore_label,
    )
    dice = summary["foreground_mean"].get("Dice", float("nan"))
    regions = summary.get("region_foreground_mean", {}).get("Dice")
    print(
        f"Final validation ({len(cases)} cases, original geometry): foreground-mean Dice {dice:.4f}"
        + (f", region-mean Dice {regions:.4f}" if regions is not None else "")
    )
    return summary


def evaluate_fold(
    run_dir: Path,
    prepared: PreparedData,
    window: WindowSettings,
    progress: bool = True,
    save_probabilities: bool = False,
) -> dict:
    """:func:`evaluate_trained_run` on all of the fold's validation cases (even when the epochs
    validated on fewer), with the dataset's label names."""
    wanted = set(prepared.val_ids)
    cases = [c for c in prepared.dataset.cases if c.case_id in wanted]
    dataset_json = Path(prepared.dataset.root) / "dataset.json"
    names = dataset_json if dataset_json.exists() else None
    return evaluate_trained_run(
        run_dir, cases, window, names, progress=progress, save_probabilities=save_probabilities
    )
