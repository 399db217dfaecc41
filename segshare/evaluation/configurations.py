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
   runs and the exact ``segshare-predict`` command that reproduces it;
4. every other candidate is compared with the first configuration (the reference, e.g.
   ``sharing=none``) case by case (:mod:`segshare.evaluation.comparison`: mean Dice difference,
   95 % bootstrap interval, Wilcoxon p); each configuration also reports its Dice mean and sd
   over folds, HD95 and unique trainable parameters.

The configurations must cover the same cases with the same labels (each is checked as a
cross-validation on its own first).
"""

from __future__ import annotations

import itertools
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from segshare.data.io import atomic_folder, read_json, save_nifti_atomic, write_json_atomic
from segshare.data.parallel import default_num_workers, parallel_map
from segshare.evaluation.comparison import case_scores, format_difference, paired_comparison
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
from segshare.inference.predictor import (
    argmax_labels,
    label_nifti,
    output_paths,
    regions_to_labels,
)

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

    case, members, like, target, order = job
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
    labels = argmax_labels(total) if order is None else regions_to_labels(total, order)
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
    order = read_json(merged / "dataset.json").get("regions_class_order")
    with atomic_folder(folder / "predictions") as tmp:
        jobs = [
            (
                c,
                [probabilities[n][c] for n in names],
                merged / "predictions" / f"{c}.nii.gz",
                tmp,
                order,
            )
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
    scores, members, summaries = {}, {}, {}
    for name, runs in runs_by_config.items():
        summary = merge_folds(runs, output / name, workers, progress, postprocessing=False)
        scores[name] = summary["foreground_mean"].get("Dice", float("nan"))
        members[name], summaries[name] = [name], summary
    probabilities = {name: _probabilities(folds[name], name) for name in folds}
    labels = sorted(v for v in folds[first][0].run.plan.labels.values() if v != 0)
    for a, b in itertools.combinations(folds, 2):
        key = f"{a}+{b}"
        summary = _ensemble(
            (a, b), probabilities, output / a, output / ENSEMBLES_DIR / key, labels, workers,
            progress,
        )  # fmt: skip
        scores[key] = summary["foreground_mean"].get("Dice", float("nan"))
        members[key], summaries[key] = [a, b], summary
    ranking = sorted(scores, key=lambda k: -np.nan_to_num(scores[k], nan=-1.0))
    best = ranking[0]
    best_dir = output / best if len(members[best]) == 1 else output / ENSEMBLES_DIR / best
    post = postprocess_merge(best_dir, labels, best_dir / "dataset.json", workers, progress)
    runs = [str(f.folder) for name in members[best] for f in folds[name]]
    command = (
        f"segshare-predict model_path=[{','.join(runs)}] input=INPUT output=OUTPUT "
        f"postprocessing={best_dir / post['file']}"
    )
    reference = case_scores(summaries[first])
    rows = []
    for key in ranking:
        row = {"name": key, "members": members[key], "foreground_dice": scores[key]}
        row["hd95"] = summaries[key]["foreground_mean"].get("HD95", float("nan"))
        if key in folds:
            dice = summaries[key]["folds"]["foreground_dice"]
            row["fold_dice"] = {"mean": dice["mean_over_folds"], "sd": dice["sd_over_folds"]}
            row["unique_parameters"] = _unique_parameters(folds[key])
        if key != first:
            row["versus_reference"] = paired_comparison(reference, case_scores(summaries[key]))
        rows.append(row)
    result = {
        "reference": first,
        "ranking": rows,
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


def _unique_parameters(fold_runs: Sequence[FoldRun]) -> int | None:
    """The unique trainable parameters of a configuration's network (its first fold's
    ``parameters.json``), None when the run has no record."""
    path = fold_runs[0].folder / "parameters.json"
    try:
        return int(read_json(path)["unique_trainable"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def ranking_rows(result: dict) -> tuple[list[str], list[list[str]]]:
    """The ranking as a table: header and rows (report and console)."""
    header = [
        "rank", "configuration", "foreground-mean Dice", "sd over folds", "HD95 (mm)",
        "unique parameters", f"vs {result['reference']}: difference [95 % CI], Wilcoxon p",
    ]  # fmt: skip
    rows = []
    for i, row in enumerate(result["ranking"], 1):
        fold = row.get("fold_dice")
        params = row.get("unique_parameters")
        versus = row.get("versus_reference")
        rows.append([
            str(i),
            row["name"],
            f"{row['foreground_dice']:.4f}",
            f"{fold['sd']:.4f}" if fold else "",
            f"{row['hd95']:.2f}",
            f"{params:,}" if params is not None else "",
            format_difference(versus) if versus else "(reference)",
        ])  # fmt: skip
    return header, rows


def _ranking_report(result: dict, output: Path) -> None:
    """``report.md``/``report.html`` of the comparison: the ranking as a table and a bar plot."""
    from segshare.data.io import write_text_atomic
    from segshare.evaluation.plots import bar_plot
    from segshare.evaluation.report import render_html, render_markdown

    scores = {row["name"]: row["foreground_dice"] for row in result["ranking"]}
    png = bar_plot(scores, "Cross-validation foreground-mean Dice per configuration")
    blocks = [
        ("h1", "Configurations by cross-validation"),
        ("table", ranking_rows(result)),
        (
            "p",
            f"Paired comparisons against {result['reference']} over the cases: mean "
            f"difference of the per-case foreground-mean Dice, its 95 % bootstrap interval "
            f"(BCa) and the two-sided Wilcoxon signed-rank p.",
        ),
        ("image", ("configurations.png", "Dice per configuration and ensemble")),
        ("p", f"Best: {result['best']['name']}. Predict with: {result['predict_command']}"),
    ]
    write_text_atomic(png, output / "configurations.png")
    write_text_atomic(render_markdown(blocks), output / "report.md")
    write_text_atomic(render_html(blocks, {"configurations": png}), output / "report.html")


__all__ = ["BEST_FILE", "ENSEMBLES_DIR", "find_best_configuration", "ranking_rows"]
