"""Cross-validation merge: the validation predictions of every fold of one configuration, scored as
one set (nnU-Net's ``crossval_results_folds_0_1_2_3_4``).

Each fold's run folder (``segshare-train``) holds ``run.json`` with its ``split`` and the final
evaluation's ``validation/predictions/<case>.nii.gz`` and ``validation/references/``. The runs are
checked first (same labels, channels, classes and preprocessing plan; validation cases that are
disjoint and together cover every case; a prediction for every validation case), and nothing is
written when they fail. The merge folder then gets:

- ``predictions/`` and ``references/``: links (copies where links fail) to every fold's files;
- ``summary.json``, ``metrics.csv``, ``report.md``/``.html`` of
  :func:`~segshare.evaluation.evaluate_folders` over all cases, and ``dataset.json`` (the label
  names of the runs);
- ``folds.json``: per run its fold, folder, cases and Dice (from the merged metrics), and the mean
  and standard deviation over folds. It is written last: a folder without it holds an
  interrupted merge. Every file is written atomically; a re-run replaces the previous merge.
"""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from segshare.data.discovery import IGNORE_LABEL
from segshare.data.io import (
    INPUTS_FILE,
    atomic_folder,
    list_nifti,
    read_json,
    save_nifti_atomic,
    strip_nifti_suffix,
    write_json_atomic,
)
from segshare.data.parallel import default_num_workers, parallel_map
from segshare.evaluation.folders import (
    evaluate_folders,
    recorded_inputs,
    write_evaluation_report,
)
from segshare.evaluation.metrics import aggregate_means
from segshare.evaluation.postprocessing import (
    PostprocessingStep,
    apply_postprocessing,
    decide_postprocessing,
    save_postprocessing,
)
from segshare.evaluation.runner import ignore_label_of, load_label_names
from segshare.inference.trained_run import MODEL_FILE, TrainedRun, load_trained_run

FOLDS_FILE = "folds.json"
POSTPROCESSING_FILE = "postprocessing.json"
POSTPROCESSED_DIR = "postprocessed"
_REDO = (
    "re-run its final evaluation (its segshare-train command again with hydra.run.dir=RUN: a "
    "finished run is not trained further, it rewrites run.json and evaluates) or re-train it "
    "with this version of segshare"
)
_SAME = ("labels", "in_channels", "num_classes")


@dataclass(frozen=True)
class FoldRun:
    """A fold's trained run and its validation files.

    Attributes:
        run: the trained run (``run.json``, ``plan.json``).
        fold: the fold index of its split.
        validation_cases: the case ids it was validated on.
        all_cases: its training and validation case ids.
        predictions: case id -> its validation prediction.
        references: case id -> its validation reference.
    """

    run: TrainedRun
    fold: int
    validation_cases: tuple[str, ...]
    all_cases: frozenset[str]
    predictions: dict[str, Path]
    references: dict[str, Path]

    @property
    def folder(self) -> Path:
        """The run folder."""
        return self.run.folder


def _ids(cases: Sequence[str] | set[str], most: int = 10) -> str:
    """``"3 cases (a, b, c)"``, the first ``most`` ids (sorted) and the count."""
    ids = sorted(cases)
    shown = ", ".join(ids[:most]) + (", ..." if len(ids) > most else "")
    return f"{len(ids)} case{'s' if len(ids) != 1 else ''} ({shown})"


def _short(value: object, most: int = 60) -> str:
    """``repr(value)``, cut to ``most`` characters."""
    text = repr(value)
    return text if len(text) <= most else text[: most - 3] + "..."


def _by_case(folder: Path) -> dict[str, Path]:
    """The NIfTI files of ``folder`` by case id (empty when the folder does not exist)."""
    return {strip_nifti_suffix(p.name): p for p in list_nifti(folder)} if folder.is_dir() else {}


def load_fold_run(path: str | Path) -> FoldRun:
    """Load a fold's run folder and its validation files.

    Raises:
        ValueError: naming the run when it is not a trained run, has no cross-validation split
            (``run.json`` written before it was recorded, or ``fold="all"``), no final evaluation,
            or no prediction or reference for some of its validation cases.
    """
    if not Path(path).expanduser().is_dir():
        raise ValueError(f"{path}: no such run folder.")
    if not (Path(path).expanduser() / MODEL_FILE).is_file():
        raise ValueError(f"{path}: not a run folder of segshare-train (no {MODEL_FILE}).")
    run = load_trained_run(path)
    split, where = run.split, run.folder
    if not isinstance(split, dict):
        raise ValueError(
            f"{where}: its run.json records no cross-validation split (written before segshare "
            f"recorded it); {_REDO}."
        )
    try:
        fold, train, val = split["fold"], split["train_cases"], split["validation_cases"]
    except KeyError as err:
        raise ValueError(f"{where}: run.json's split has no {err}; {_REDO}.") from None
    if not isinstance(fold, int) or fold < 0:
        raise ValueError(
            f"{where}: fold {fold!r} is not a cross-validation fold (fold 'all' validates on "
            "its own training cases); merge the runs of folds 0..num_folds-1."
        )
    validation = where / "validation"
    if not (validation / "predictions").is_dir():
        raise ValueError(f"{where}: no validation/predictions (no final evaluation); {_REDO}.")
    preds, refs = _by_case(validation / "predictions"), _by_case(validation / "references")
    for kind, found in (("prediction", preds), ("reference", refs)):
        missing = [c for c in val if c not in found]
        if missing:
            raise ValueError(
                f"{where}: no validation {kind} for {_ids(missing)} of fold {fold} in "
                f"{validation / (kind + 's')}; {_REDO}."
            )
    return FoldRun(
        run, fold, tuple(val), frozenset(train) | frozenset(val),
        {c: preds[c] for c in val}, {c: refs[c] for c in val},
    )  # fmt: skip


def _check_same_model(runs: Sequence[FoldRun]) -> list[str]:
    """Problems: runs whose labels, channels, classes, plan or num_folds differ from the first."""
    first, problems = runs[0], []
    base = first.run.plan.preprocessing_dict()
    for other in runs[1:]:
        for key in _SAME:
            a, b = first.run.info.get(key), other.run.info.get(key)
            if a != b:
                problems.append(f"{key} differ: {first.folder} has {a!r}, {other.folder} has {b!r}")
        plan = other.run.plan.preprocessing_dict()
        keys = sorted(
            k for k in base.keys() | plan.keys() if k not in _SAME and base.get(k) != plan.get(k)
        )
        if keys:
            details = "; ".join(
                f"{k}: {_short(base.get(k))} vs {_short(plan.get(k))}" for k in keys
            )
            problems.append(
                f"{other.folder}/plan.json differs from {first.folder}/plan.json ({details}): "
                "merge only folds trained with one preprocessing plan"
            )
        a, b = first.run.split.get("num_folds"), other.run.split.get("num_folds")
        if a != b:
            problems.append(f"num_folds differ: {first.folder} has {a!r}, {other.folder} has {b!r}")
    return problems


def _check_partition(runs: Sequence[FoldRun], complete: bool = True) -> list[str]:
    """Problems: a fold given twice, validation cases in two runs and (when ``runs`` are all the
    runs given) cases in no run's validation."""
    problems, seen = [], {}
    for i, a in enumerate(runs):
        for b in runs[i + 1 :]:
            if a.fold == b.fold:
                both = "is given twice (" if a.folder == b.folder else f"and {b.folder} are both ("
                problems.append(f"{a.folder} {both}fold {a.fold}): give each fold once")
                continue
            shared = set(a.validation_cases) & set(b.validation_cases)
            if shared:
                problems.append(
                    f"{a.folder} (fold {a.fold}) and {b.folder} (fold {b.fold}) both validate "
                    f"on {_ids(shared)}: folds must not overlap (runs of one splits.json)"
                )
        seen.update(dict.fromkeys(a.validation_cases))
    every = frozenset().union(*(r.all_cases for r in runs))
    missing = every - set(seen)
    if missing and complete:
        num_folds = runs[0].run.split.get("num_folds")
        given = {r.fold for r in runs}
        absent = sorted(set(range(num_folds)) - given) if isinstance(num_folds, int) else []
        folds = f" (folds {absent} of {num_folds} are not given)" if absent else ""
        problems.append(
            f"{_ids(missing)} of the {len(every)} are in no run's validation cases{folds}: "
            "give the runs of every fold"
        )
    return problems


def check_folds(runs: Sequence[str | Path]) -> list[FoldRun]:
    """Load the runs and check that they form one cross-validation (see the module docstring).

    Raises:
        ValueError: listing every problem found, naming the runs and the cases.
    """
    if not runs:
        raise ValueError("runs is empty: give the run folder of every fold, e.g. runs=[A,B,C].")
    folds, problems = [], []
    for path in runs:
        try:
            folds.append(load_fold_run(path))
        except ValueError as err:
            problems.append(str(err).rstrip("."))
    if folds:
        problems += _check_same_model(folds) + _check_partition(folds, not problems)
    if len(problems) == 1:
        raise ValueError(problems[0] + ".")
    if problems:
        raise ValueError(
            f"cannot merge these {len(runs)} runs:\n" + "\n".join(f"  - {p}" for p in problems)
        )
    return sorted(folds, key=lambda f: f.fold)


#: Marks a folder as a merge of segshare-crossval (only such a folder's predictions/ are replaced).
MERGE_MARKER = ".segshare-crossval"


def _check_output(output: Path, folds: Sequence[FoldRun]) -> None:
    """Refuse a merge folder that is a run (or its validation folder) or holds one, or that holds
    ``predictions/`` or ``references/`` a merge did not write (they would be replaced)."""
    out = output.resolve()
    for f in folds:
        run = f.folder.resolve()
        inside = any(run.is_relative_to(out / sub) for sub in ("predictions", "references"))
        if out in (run, run / "validation") or out.is_relative_to(run / "validation") or inside:
            raise ValueError(
                f"output={str(output)!r}: overlaps the run {f.folder}; use a folder of its own."
            )
    if not (output / MERGE_MARKER).is_file():
        for sub in ("predictions", "references"):
            if (output / sub).exists():
                raise ValueError(
                    f"output={str(output)!r} already holds {sub}/ that segshare-crossval did not "
                    f"write (it would be replaced); use a folder of its own."
                )


def link_folder(folder: Path, files: dict[str, Path]) -> None:
    """Swap in a folder of links ``name -> file`` (copies where linking fails)."""
    with atomic_folder(folder) as tmp:
        for name, src in files.items():
            try:
                (tmp / name).symlink_to(src.resolve())
            except OSError:
                shutil.copy2(src, tmp / name)


def fold_results(summary: dict, folds: Sequence[FoldRun]) -> dict:
    """The contents of ``folds.json``: each fold's Dice from the merged per-case metrics, and the
    mean and (sample) standard deviation over folds, NaN-aware as the summary's means."""
    labels = [int(k) for k in summary["labels"]]
    per_case = {
        c["case_id"]: {int(k): v for k, v in c["metrics"].items()}
        for c in summary["metric_per_case"]
    }
    rows = []
    for f in folds:
        mean, fg = aggregate_means([per_case[c] for c in f.validation_cases], labels)
        rows.append({
            "fold": f.fold, "run": str(f.folder.resolve()), "num_cases": len(f.validation_cases),
            "foreground_dice": fg["Dice"], "dice": {str(k): v["Dice"] for k, v in mean.items()},
        })  # fmt: skip
    values = np.array([r["foreground_dice"] for r in rows], float)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mean_over = float(np.nanmean(values))
        sd_over = float(np.nanstd(values, ddof=1))
    return {
        "num_folds": folds[0].run.split.get("num_folds"),
        "labels": summary["labels"],
        "folds": rows,
        "foreground_dice": {
            "mean_over_folds": mean_over,
            "sd_over_folds": sd_over,
            "all_cases": summary["foreground_mean"]["Dice"],
        },
    }


def merge_folds(
    runs: Sequence[str | Path],
    output: str | Path,
    num_workers: int | None = None,
    progress: bool = True,
    postprocessing: bool = True,
) -> dict:
    """Merge the validation predictions of the folds' runs into ``output`` and score them.

    Args:
        runs: the run folders of the folds (one per fold, any order).
        output: the merge folder (created; a previous merge there is replaced).
        num_workers: worker processes of the evaluation; default the usable CPUs (at most 8).
        progress: show a progress bar.
        postprocessing: also decide the connected-component postprocessing on the merged
            predictions (``postprocessing.json``), apply it (``postprocessed/predictions``) and
            score the result (``postprocessed/summary.json``); ``folds.json`` records the Dice
            with and without it.

    Returns:
        The summary of all cases (``summary.json``) with ``"folds"``: the ``folds.json`` contents.

    Raises:
        ValueError: the runs do not form one cross-validation (every problem listed, naming the
            runs and cases), a file cannot be scored, or ``output`` overlaps a run.
    """
    folds = check_folds(runs)
    output = Path(output)
    _check_output(output, folds)
    output.mkdir(parents=True, exist_ok=True)
    (output / MERGE_MARKER).touch()
    (output / FOLDS_FILE).unlink(missing_ok=True)  # written last: marks a finished merge
    for kind in ("predictions", "references"):
        files = {p.name: p for fold in folds for p in getattr(fold, kind).values()}
        link_folder(output / kind, files)
    scans = {}  # the folds' recorded scans, so that the merged report shows overlays
    for fold in folds:
        scans.update(recorded_inputs(fold.folder / "validation" / "predictions"))
    inputs = {case: [str(path)] for case, path in sorted(scans.items())}
    write_json_atomic(inputs, output / "predictions" / INPUTS_FILE)
    plan = folds[0].run.plan
    labels, ignore = plan.labels, plan.ignore_label
    named: dict = {**labels, IGNORE_LABEL: ignore} if ignore is not None else dict(labels)
    meta: dict = {"labels": named}
    if plan.regions:  # the merge is scored per region too (segshare.evaluation.runner)
        regions = {"background": 0, **plan.regions}
        meta = {"labels": regions | ({IGNORE_LABEL: ignore} if ignore is not None else {})}
        meta["regions_class_order"] = list(plan.regions_class_order)
    names = write_json_atomic(meta, output / "dataset.json")
    summary = evaluate_folders(
        output / "predictions",
        output / "references",
        output,
        labels=sorted(v for v in labels.values() if v != 0),
        num_workers=num_workers,
        dataset_json=names,
        progress=progress,
        report=False,  # written with the per-fold plot below
    )
    results = fold_results(summary, folds)
    _fold_report(summary, results, output)
    if postprocessing:
        scored = sorted(v for v in labels.values() if v != 0)
        results["postprocessing"] = postprocess_merge(output, scored, names, num_workers, progress)
    else:  # a decision of an earlier merge must not outlive it
        (output / POSTPROCESSING_FILE).unlink(missing_ok=True)
        shutil.rmtree(output / POSTPROCESSED_DIR, ignore_errors=True)
    write_json_atomic(results, output / FOLDS_FILE)
    return {**summary, "folds": results}


def _fold_report(summary: dict, results: dict, output: Path) -> None:
    """The merge's report, with the foreground-mean Dice of every fold against all cases'."""
    from segshare.evaluation.plots import bar_plot

    per_fold = {f"fold {r['fold']}": r["foreground_dice"] for r in results["folds"]}
    png = bar_plot(
        per_fold, "Foreground-mean Dice per fold", results["foreground_dice"]["all_cases"]
    )
    extra = [("Dice per fold", "folds", png)]
    write_evaluation_report(summary, output, None, output / "predictions", extra)


def _postprocess_file(job: tuple[Path, Path, list[PostprocessingStep]]) -> None:
    """Apply the steps to one label map; the output keeps the input's header and geometry."""
    import nibabel as nib

    source, target, steps = job
    img = nib.load(source)
    labels = np.asarray(img.dataobj)
    out = apply_postprocessing(labels, steps).astype(labels.dtype, copy=False)
    save_nifti_atomic(nib.Nifti1Image(out, img.affine, img.header), target)


def postprocess_merge(
    output: Path, labels: list[int], names: Path, num_workers: int | None, progress: bool
) -> dict:
    """Decide the postprocessing on the merged predictions of ``output`` (a folder with
    ``predictions/``, ``references/`` and their ``summary.json``), write ``postprocessing.json``,
    apply it into ``postprocessed/predictions`` and score that (``postprocessed/summary.json``).

    Returns:
        ``file``, the kept ``steps`` and the foreground-mean Dice before and after.
    """
    files = sorted(list_nifti(output / "predictions"))
    pairs = [(p, output / "references" / p.name) for p in files]
    workers = default_num_workers() if num_workers is None else int(num_workers)
    ignore = ignore_label_of(load_label_names(output, names))
    decision = decide_postprocessing(
        pairs, labels, num_workers=workers, progress=progress, ignore_label=ignore
    )
    save_postprocessing(decision, output / POSTPROCESSING_FILE)
    steps = [PostprocessingStep.from_dict(s) for s in decision["steps"]]
    target = output / POSTPROCESSED_DIR
    with atomic_folder(target / "predictions") as tmp:
        jobs = [(p, tmp / p.name, steps) for p in files]
        for _ in parallel_map(_postprocess_file, jobs, workers, "postprocess", progress):
            pass
        recorded = output / "predictions" / INPUTS_FILE
        if recorded.is_file():
            shutil.copyfile(recorded, tmp / INPUTS_FILE)
    after = evaluate_folders(
        target / "predictions",
        output / "references",
        target,
        labels=labels,
        num_workers=num_workers,
        dataset_json=names,
        progress=progress,
    )
    before = read_json(output / "summary.json")["foreground_mean"].get("Dice", float("nan"))
    return {
        "file": POSTPROCESSING_FILE,
        "steps": decision["steps"],
        "foreground_dice_before": before,
        "foreground_dice_after": after["foreground_mean"].get("Dice", float("nan")),
    }


__all__ = [
    "FOLDS_FILE",
    "POSTPROCESSED_DIR",
    "POSTPROCESSING_FILE",
    "FoldRun",
    "check_folds",
    "fold_results",
    "load_fold_run",
    "merge_folds",
    "postprocess_merge",
]
