"""Evaluate a folder of predicted label maps against a folder of references.

:func:`evaluate_folders` is the plain function behind ``segshare-evaluate`` that the training and
prediction apps call. It writes ``summary.json`` (nnU-Net's shape), ``metrics.csv`` (tidy) and, by
default, ``report.md`` and a self-contained ``report.html`` (matplotlib is imported only then):
all of them or none (:func:`staged_outputs`).
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from segshare.data.discovery import IGNORE_LABEL
from segshare.data.io import INPUTS_FILE, read_json
from segshare.data.parallel import default_num_workers
from segshare.evaluation.runner import (
    CaseMatch,
    absent_label_metrics,
    find_image,
    find_label_file,
    ignore_label_of,
    load_label_definitions,
    match_cases,
    run_cases,
)
from segshare.evaluation.summary import build_summary, write_metrics_csv, write_summary_json
from segshare.evaluation.surface import HD95_VARIANTS


def check_labels(labels: int | Sequence[int] | None) -> list[int] | None:
    """``labels`` as a sorted list of distinct positive integers (``None`` stays ``None``).

    Raises:
        ValueError: a label is not a positive whole number (the message quotes ``labels``).
    """
    if labels is None:
        return None
    if isinstance(labels, int):
        labels = [labels]
    try:
        out = sorted({int(v) for v in labels})
    except (TypeError, ValueError) as err:
        raise ValueError(f"labels must be a list of positive integers, got {labels!r}.") from err
    if not out or any(v <= 0 for v in out) or any(float(v) != v for v in labels):
        raise ValueError(f"labels must be a list of positive integers, got {list(labels)!r}.")
    return out


def _case_tasks(match: CaseMatch, common: dict, missing_as_empty: bool) -> list[dict]:
    """Keyword arguments of :func:`~segshare.evaluation.runner.evaluate_case`, one dict a case."""
    tasks = [dict(case_id=c, ref_path=r, pred_path=p, **common) for c, r, p in match.pairs]
    if missing_as_empty:
        tasks += [
            dict(case_id=c, ref_path=r, pred_path=p, pred_missing=True, **common)
            for c, r, p in match.missing
        ]
        tasks.sort(key=lambda t: t["case_id"])
    return tasks


def _complete_cases(
    tasks: list[dict], cases: list[dict], labels: list[int] | None, ref_dir: Path
) -> list[int]:
    """Marks missing predictions and gives every case a row for every label; returns the labels
    (default: every nonzero label found in the references).

    Raises:
        ValueError: no label was given and the references hold none.
    """
    for task, case in zip(tasks, cases, strict=True):
        case["prediction_missing"] = bool(task.get("pred_missing"))
    if labels is None:
        labels = sorted({v for case in cases for v in case["ref_labels"]})
        if cases and not labels:
            raise ValueError(
                f"the references in '{ref_dir}' hold no nonzero label; "
                "pass labels=[...] to score them."
            )
    for case in cases:
        case["metrics"] = {
            k: case["metrics"].get(k) or absent_label_metrics(case["num_voxels"]) for k in labels
        }
    return labels


def unknown_labels(
    cases: list[dict], labels: Sequence[int] | None, names: dict[int, str], source: str
) -> list[dict]:
    """The predictions holding label values nobody defines, each printed as a warning (they are
    not scored: their voxels count as background for every label).

    Known values: 0, the asked ``labels``, and the labels of ``dataset.json`` (``names``) or,
    without one, every value found in the references.

    Returns:
        ``[{"prediction_file", "values"}]`` in case order (``summary.json``'s ``unknown_labels``).
    """
    known = {0, *(labels or ())}
    known |= set(names) if names else {v for case in cases for v in case.get("ref_values", ())}
    found = []
    for case in cases:
        values = sorted(set(case.get("pred_values", ())) - known)
        if values and not case.get("prediction_missing"):
            found.append({"prediction_file": case["prediction_file"], "values": values})
            print(
                f"warning: {case['prediction_file']}: label value(s) "
                f"{', '.join(map(str, values))} {source}; not scored (counted as background).",
                file=sys.stderr,
            )
    return found


@contextmanager
def staged_outputs(output_dir: Path) -> Iterator[Path]:
    """Yield a hidden temporary folder inside ``output_dir``; on success move every file written
    there into ``output_dir`` (``summary.json`` last), so that the outputs appear together. On
    an error the folder is deleted and ``output_dir`` keeps what it held (a previous evaluation
    stays whole). One evaluation per ``output_dir`` at a time.

    Raises:
        OSError: a file could not be written (e.g. a full disk), naming ``output_dir``.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    stage = output_dir / ".evaluation.tmp"  # fixed: a killed run's leftover is cleared here
    shutil.rmtree(stage, ignore_errors=True)
    try:
        stage.mkdir()
        yield stage
        files = sorted(stage.iterdir(), key=lambda f: (f.name == "summary.json", f.name))
        for file in files:  # on disk before they are moved into place
            with open(file, "rb") as fh:
                os.fsync(fh.fileno())
        for file in files:
            os.replace(file, output_dir / file.name)
    except OSError as err:
        if err.errno is None:
            raise  # not a failed write (e.g. a missing images folder): as it is
        reason = err.strerror or str(err)
        raise OSError(
            err.errno, f"cannot write the evaluation into '{output_dir}' ({reason}); none written"
        ) from err
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def recorded_inputs(pred_dir: str | Path) -> dict[str, Path]:
    """The scans ``segshare-predict`` recorded in a prediction folder (``inputs*.json``): case id
    -> its first channel, for those that still exist."""
    images = {}
    for listing in sorted(Path(pred_dir).glob(INPUTS_FILE.replace(".json", "*.json"))):
        try:
            recorded = read_json(listing)
        except ValueError:
            continue  # a damaged record only costs the overlays
        if isinstance(recorded, dict):
            for case_id, paths in recorded.items():
                if isinstance(paths, list) and paths and Path(str(paths[0])).is_file():
                    images[case_id] = Path(str(paths[0]))
    return images


def write_evaluation_report(
    summary: dict,
    output_dir: Path,
    images_dir: str | Path | None,
    pred_dir: Path,
    extra: Sequence[tuple[str, str, bytes]] = (),
) -> None:
    """``report.md``/``report.html`` with pictures: overlays of the images in ``images_dir``, or
    else of the scans recorded in ``pred_dir`` (:func:`recorded_inputs`), when there are any;
    ``extra`` pictures as :func:`segshare.evaluation.report.write_report` takes them."""
    from segshare.evaluation.report import write_report  # matplotlib only when needed

    cases = [c["case_id"] for c in summary["metric_per_case"]]
    if images_dir is not None:
        if not Path(images_dir).is_dir():
            raise FileNotFoundError(f"images folder not found: '{images_dir}'.")
        images = {c: find_image(Path(images_dir), c) for c in cases}
    else:
        recorded = recorded_inputs(pred_dir)
        images = {c: recorded.get(c) for c in cases} if recorded else None
    write_report(summary, output_dir, images=images, extra=extra)


def evaluate_folders(
    pred_dir: str | Path,
    ref_dir: str | Path,
    output_dir: str | Path,
    labels: Sequence[int] | None = None,
    images_dir: str | Path | None = None,
    nsd_tolerance_mm: float = 1.0,
    hd95: str = "monai",
    num_workers: int | None = None,
    *,
    dataset_json: str | Path | None = None,
    strict_json: bool = False,
    missing_as_empty: bool = False,
    progress: bool = True,
    report: bool = True,
    ignore_label: int | None = None,
) -> dict:
    """Scores every reference in ``ref_dir`` against the same-named file in ``pred_dir``.

    Args:
        pred_dir: folder of predicted label maps (``.nii.gz``/``.nii``).
        ref_dir: folder of reference label maps; cases are matched by file name.
        output_dir: where ``summary.json``, ``metrics.csv``, ``report.md``/``.html`` go.
        labels: positive labels to score; default every nonzero label found in the references.
        images_dir: images for the overlay montages of the report; default the scans
            ``segshare-predict`` recorded in ``pred_dir`` (``inputs.json``), if any.
        nsd_tolerance_mm: normalised surface Dice tolerance (mm).
        hd95: ``"monai"`` (max of directed 95th percentiles) or ``"medpy"`` (pooled).
        num_workers: worker processes; default
            :func:`segshare.data.parallel.default_num_workers` (the usable CPUs, at most 8).
        dataset_json: file with label names; default ``dataset.json`` in ``ref_dir`` or its parent.
        strict_json: write NaN/inf as ``null`` (default: nnU-Net's ``NaN``/``Infinity`` tokens).
        missing_as_empty: score a missing prediction as all background (default: leave the case
            out of the means; it is listed and counted either way).
        progress: show a tqdm progress bar.
        report: also write ``report.md``/``report.html`` (with pictures).
        ignore_label: the references' value of unannotated voxels, never scored and counted
            nowhere (docs/metrics.md); default the ``dataset.json`` label named ``ignore``.

    Returns:
        The summary dictionary written to ``summary.json`` (label keys are strings).

    Outputs are written together or not at all (:func:`staged_outputs`). A prediction holding
    a label value that neither ``dataset.json`` nor the references define is warned about and
    listed in ``summary.json``'s ``unknown_labels``.

    Raises:
        ValueError: unreadable files, a prediction whose shape or affine differs from its
            reference (naming both): every such case, listed together; two files of one case
            id in a folder; bad arguments.
        FileNotFoundError: a folder does not exist.
        OSError: the outputs could not be written (none is).
    """
    if hd95 not in HD95_VARIANTS:
        raise ValueError(f"hd95 must be one of {HD95_VARIANTS}, got {hd95!r}.")
    if not float(nsd_tolerance_mm) >= 0:
        raise ValueError(f"nsd_tolerance_mm must be >= 0, got {nsd_tolerance_mm!r}.")
    labels = check_labels(labels)
    if report and images_dir is not None and not Path(images_dir).is_dir():
        raise FileNotFoundError(f"images folder not found: '{images_dir}'.")  # before scoring
    pred_dir, ref_dir, output_dir = Path(pred_dir), Path(ref_dir), Path(output_dir)
    match = match_cases(pred_dir, ref_dir)
    names, regions = load_label_definitions(ref_dir, dataset_json)
    if ignore_label is None:
        ignore_label = ignore_label_of(names)
    if ignore_label is not None:
        ignore_label = int(ignore_label)
        names.pop(ignore_label, None)
        if labels and ignore_label in labels:
            raise ValueError(
                f"labels={labels} includes the ignore label {ignore_label}: its voxels are not "
                f"annotated, so it cannot be scored."
            )
    common = {
        "labels": labels,
        "nsd_tolerance_mm": float(nsd_tolerance_mm),
        "hd95": hd95,
        "ignore_label": ignore_label,
        "regions": regions,
    }
    tasks = _case_tasks(match, common, missing_as_empty)
    workers = default_num_workers() if num_workers is None else int(num_workers)
    cases = run_cases(tasks, workers, progress=progress)
    source = (
        f"not defined in {find_label_file(ref_dir, dataset_json)}"
        if names
        else "found in none of the references (nor asked for with labels=)"
    )
    known = {**names, ignore_label: IGNORE_LABEL} if names and ignore_label is not None else names
    unknown = unknown_labels(cases, labels, known, source)
    labels = _complete_cases(tasks, cases, labels, ref_dir)
    settings = {
        "pred_dir": str(pred_dir),
        "ref_dir": str(ref_dir),
        "hd95": hd95,
        "nsd_tolerance_mm": float(nsd_tolerance_mm),
        "missing_as_empty": missing_as_empty,
        "ignore_label": ignore_label,
        "spacing_source": "reference header zooms (mm)",
        "nan_means": "nanmean",
    }
    summary = build_summary(
        cases,
        labels,
        label_names=names,
        missing=[
            {"case_id": c, "reference_file": str(r), "prediction_file": str(p)}
            for c, r, p in match.missing
        ],
        unmatched=[str(u) for u in match.unmatched],
        settings=settings,
        regions=regions,
    )
    summary["unknown_labels"] = unknown
    with staged_outputs(output_dir) as stage:
        write_summary_json(summary, stage / "summary.json", strict=strict_json)
        write_metrics_csv(summary, stage / "metrics.csv")
        if report:
            write_evaluation_report(summary, stage, images_dir, Path(pred_dir))
    return summary
