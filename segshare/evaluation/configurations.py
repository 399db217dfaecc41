"""Which configuration to use, by cross-validation (nnU-Net's ``nnUNetv2_find_best_configuration``).

For several configurations (e.g. sharing schemes, or 2d and 3d_fullres), each given as the runs
of all its folds:

1. each configuration's folds are merged and scored (:func:`~segshare.evaluation.crossval.
   merge_folds`, into ``output/<name>/``);
2. every pair of configurations is ensembled out of fold, without retraining: per case the
   class probabilities its fold's runs saved at their final evaluation
   (``validation/predictions/<case>.npz``, on the scan's grid) are averaged, then the argmax
   (``output/ensembles/<a>+<b>/``), and scored against the same references;
3. all candidates are ranked by foreground-mean Dice over all cases; the connected-component
   postprocessing is decided on the best one's merged predictions (``postprocessing.json`` in
   its folder), and ``best_configuration.json`` records the ranking, the best candidate, its
   runs and the exact ``segshare-predict`` command that reproduces it.

The configurations must cover the same cases with the same labels (each is checked as a
cross-validation on its own first).
"""

from __future__ import annotations

import itertools
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from segshare.data.io import atomic_folder, save_nifti_atomic, write_json_atomic
from segshare.data.parallel import default_num_workers, parallel_map
from segshare.evaluation.crossval import (
    POSTPROCESSED_DIR,
    POSTPROCESSING_FILE,
    FoldRun,
    check_folds,
    link_folder,
    merge_folds,
    postprocess_merge,
)
from segshare.evaluation.folders import evaluate_folders
from segshare.inference.predictor import argmax_labels, label_nifti, output_paths

BEST_FILE = "best_configuration.json"
ENSEMBLES_DIR = "ensembles"


def _probabilities(fold_runs: Sequence[FoldRun], name: str) -> dict[str, Path]:
    """case id -> its saved probabilities, for every case of a configuration's folds.

    Raises:
        ValueError: a case has no ``.npz``, naming the run and the way to make it.
    """
    found, missing = {}, {}
    for fold in fold_runs:
        for case, prediction in fold.predictions.items():
            npz = output_paths(prediction.parent, case)[1]
            if npz.is_file():
                found[case] = npz
            else:
                missing.setdefault(str(fold.folder), []).append(case)
    if missing:
        where = "; ".join(f"{run}: {', '.join(sorted(c)[:5])}" for run, c in missing.items())
        raise ValueError(
            f"configuration {name!r}: no saved probabilities for some validation cases ({where}); "
            f"an ensemble needs them: re-run the final evaluation of those runs with "
            f"save_validation_probabilities=true (the default)."
        )
    return found


def _ensemble_case(job: tuple) -> None:
    """Average the members' probabilities of one case, write the argmax with its geometry."""
    import nibabel as nib

    case, members, like, target = job
    total = None
    for npz in members:
        with np.load(npz) as data:
            probs = data["probabilities"].astype(np.float32, copy=False)
        if total is None:
            total = probs.copy()
        elif probs.shape != total.shape:
            raise ValueError(f"{npz}: probabilities of shape {probs.shape}, not {total.shape}.")
        else:
            total += probs
    source = nib.load(like)
    if total.shape[:3] != source.shape[:3]:
        raise ValueError(f"{members[0]}: probabilities of shape {total.shape} for {like}.")
    labels = argmax_labels(total)
    save_nifti_atomic(label_nifti(labels, source), output_paths(target, case)[0])


def _ensemble(
    names: Sequence[str],
    probabilities: Mapping[str, dict[str, Path]],
    merged: Path,
    folder: Path,
    labels: list[int],
    num_workers: int,
    progress: bool,
) -> dict:
    """Out-of-fold ensemble of ``names`` into ``folder`` (predictions, references, report)."""
    cases = sorted(probabilities[names[0]])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / POSTPROCESSING_FILE).unlink(missing_ok=True)  # decided anew if this one is best
    shutil.rmtree(folder / POSTPROCESSED_DIR, ignore_errors=True)
    with atomic_folder(folder / "predictions") as tmp:
        jobs = [
            (c, [probabilities[n][c] for n in names], merged / "predictions" / f"{c}.nii.gz", tmp)
            for c in cases
        ]
        for _ in parallel_map(_ensemble_case, jobs, num_workers, "ensemble", progress):
            pass
    link_folder(
        folder / "references", {f"{c}.nii.gz": merged / "references" / f"{c}.nii.gz" for c in cases}
    )
    shutil.copyfile(merged / "dataset.json", folder / "dataset.json")
    return evaluate_folders(
        folder / "predictions",
        folder / "references",
        folder,
        labels=labels,
        num_workers=num_workers,
        dataset_json=folder / "dataset.json",
        progress=progress,
    )


def find_best_configuration(
    runs_by_config: Mapping[str, Sequence[str | Path]],
    output: str | Path,
    num_workers: int | None = None,
    progress: bool = True,
) -> dict:
    """Rank configurations and their pairwise ensembles by cross-validation (module docstring).

    Args:
        runs_by_config: configuration name -> the run folders of its folds.
        output: the folder of the comparison (created).
        num_workers: worker processes; default the usable CPUs (at most 8).
        progress: show progress bars.

    Returns:
        The ``best_configuration.json`` contents.

    Raises:
        ValueError: fewer than two configurations, a configuration that is not a complete
            cross-validation, configurations that cover other cases or labels, or missing saved
            probabilities (each message names the configuration and runs).
    """
    if len(runs_by_config) < 2:
        raise ValueError(
            f"runs_by_config needs at least two configurations to compare, got "
            f"{sorted(runs_by_config)}; for one, use runs=[...]."
        )
    output = Path(output)
    workers = default_num_workers() if num_workers is None else int(num_workers)
    folds = {}
    for name, runs in runs_by_config.items():
        try:
            folds[name] = check_folds(runs)
        except ValueError as err:
            raise ValueError(f"configuration {name!r}: {err}") from None
    first = next(iter(folds))
    counts = {name: len(f) for name, f in folds.items()}
    if len(set(counts.values())) > 1:
        raise ValueError(
            f"configurations have different numbers of folds ({counts}): their ensembles would "
            f"weigh them unequally; compare configurations of one split."
        )
    for name, fold_runs in folds.items():
        cases = set().union(*(f.predictions for f in fold_runs))
        reference = set().union(*(f.predictions for f in folds[first]))
        labels = fold_runs[0].run.plan.labels
        if cases != reference or labels != folds[first][0].run.plan.labels:
            raise ValueError(
                f"configurations {first!r} and {name!r} cover different cases or labels "
                f"({len(reference)} vs {len(cases)} cases; labels {folds[first][0].run.plan.labels}"
                f" vs {labels}); compare configurations of one dataset and split."
            )
    scores, members = {}, {}
    for name, runs in runs_by_config.items():
        summary = merge_folds(runs, output / name, workers, progress, postprocessing=False)
        scores[name] = summary["foreground_mean"].get("Dice", float("nan"))
        members[name] = [name]
    probabilities = {name: _probabilities(folds[name], name) for name in folds}
    labels = sorted(v for v in folds[first][0].run.plan.labels.values() if v != 0)
    for a, b in itertools.combinations(folds, 2):
        key = f"{a}+{b}"
        summary = _ensemble(
            (a, b), probabilities, output / a, output / ENSEMBLES_DIR / key, labels, workers,
            progress,
        )  # fmt: skip
        scores[key] = summary["foreground_mean"].get("Dice", float("nan"))
        members[key] = [a, b]
    ranking = sorted(scores, key=lambda k: -np.nan_to_num(scores[k], nan=-1.0))
    best = ranking[0]
    best_dir = output / best if len(members[best]) == 1 else output / ENSEMBLES_DIR / best
    post = postprocess_merge(best_dir, labels, best_dir / "dataset.json", workers, progress)
    runs = [str(f.folder) for name in members[best] for f in folds[name]]
    command = (
        f"segshare-predict model_path=[{','.join(runs)}] input=INPUT output=OUTPUT "
        f"postprocessing={best_dir / post['file']}"
    )
    result = {
        "ranking": [
            {"name": k, "members": members[k], "foreground_dice": scores[k]} for k in ranking
        ],
        "best": {
            "name": best,
            "members": members[best],
            "runs": runs,
            "foreground_dice": scores[best],
            "postprocessing": post,
        },
        "predict_command": command,
    }
    write_json_atomic(result, output / BEST_FILE)
    _ranking_report(result, output)
    return result


def _ranking_report(result: dict, output: Path) -> None:
    """``report.md``/``report.html`` of the comparison: the ranking as a table and a bar plot."""
    from segshare.data.io import write_text_atomic
    from segshare.evaluation.plots import bar_plot
    from segshare.evaluation.report import render_html, render_markdown

    scores = {row["name"]: row["foreground_dice"] for row in result["ranking"]}
    png = bar_plot(scores, "Cross-validation foreground-mean Dice per configuration")
    rows = [[str(i), row["name"], f"{row['foreground_dice']:.4f}"]
            for i, row in enumerate(result["ranking"], 1)]  # fmt: skip
    blocks = [
        ("h1", "Configurations by cross-validation"),
        ("table", (["rank", "configuration", "foreground-mean Dice"], rows)),
        ("image", ("configurations.png", "Dice per configuration and ensemble")),
        ("p", f"Best: {result['best']['name']}. Predict with: {result['predict_command']}"),
    ]
    write_text_atomic(png, output / "configurations.png")
    write_text_atomic(render_markdown(blocks), output / "report.md")
    write_text_atomic(render_html(blocks, {"configurations": png}), output / "report.html")


__all__ = ["BEST_FILE", "ENSEMBLES_DIR", "find_best_configuration"]
