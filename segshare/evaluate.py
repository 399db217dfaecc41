"""``segshare-evaluate``: score a folder of predicted label maps against references.

Writes ``summary.json`` (nnU-Net's shape), ``metrics.csv`` (tidy), ``report.md`` and a
self-contained ``report.html`` into the output folder. ``evaluate_folders`` is the plain function
that the training and prediction apps call; ``run(cfg)`` is its Hydra wrapper.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from segshare.cli import exit_on_user_error
from segshare.evaluation.runner import (
    absent_label_metrics,
    default_num_workers,
    find_image,
    load_label_names,
    match_cases,
    run_cases,
)
from segshare.evaluation.summary import (
    build_summary,
    write_metrics_csv,
    write_summary_json,
)
from segshare.evaluation.surface import HD95_VARIANTS


def _check_labels(labels) -> list[int] | None:
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
) -> dict:
    """Scores every reference in ``ref_dir`` against the same-named file in ``pred_dir``.

    Args:
        pred_dir: folder of predicted label maps (``.nii.gz``/``.nii``).
        ref_dir: folder of reference label maps; cases are matched by file name.
        output_dir: where ``summary.json``, ``metrics.csv``, ``report.md``/``.html`` go.
        labels: positive labels to score; default every nonzero label found in the references.
        images_dir: optional images for the overlay montages of the report.
        nsd_tolerance_mm: normalised surface Dice tolerance (mm).
        hd95: ``"monai"`` (max of directed 95th percentiles) or ``"medpy"`` (pooled).
        num_workers: worker processes; default the available CPUs (at most 8).
        dataset_json: file with label names; default ``dataset.json`` in ``ref_dir`` or its parent.
        strict_json: write NaN/inf as ``null`` (default: nnU-Net's ``NaN``/``Infinity`` tokens).
        missing_as_empty: score a missing prediction as all background (default: leave the case
            out of the means; it is listed and counted either way).
        progress: show a tqdm progress bar.
        report: also write ``report.md``/``report.html`` (with pictures).

    Returns:
        The summary dictionary written to ``summary.json`` (label keys are strings).

    Raises:
        ValueError: unreadable files, a prediction whose shape or affine differs from its
            reference (naming both), bad arguments.
        FileNotFoundError: a folder does not exist.
    """
    if hd95 not in HD95_VARIANTS:
        raise ValueError(f"hd95 must be one of {HD95_VARIANTS}, got {hd95!r}.")
    if not float(nsd_tolerance_mm) >= 0:
        raise ValueError(f"nsd_tolerance_mm must be >= 0, got {nsd_tolerance_mm!r}.")
    labels = _check_labels(labels)
    pred_dir, ref_dir, output_dir = Path(pred_dir), Path(ref_dir), Path(output_dir)
    match = match_cases(pred_dir, ref_dir)
    names = load_label_names(ref_dir, dataset_json)
    common = {"labels": labels, "nsd_tolerance_mm": float(nsd_tolerance_mm), "hd95": hd95}
    tasks = [dict(case_id=c, ref_path=r, pred_path=p, **common) for c, r, p in match.pairs]
    if missing_as_empty:
        tasks += [
            dict(case_id=c, ref_path=r, pred_path=p, pred_missing=True, **common)
            for c, r, p in match.missing
        ]
        tasks.sort(key=lambda t: t["case_id"])
    workers = default_num_workers() if num_workers is None else int(num_workers)
    cases = run_cases(tasks, workers, progress=progress)
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
    missing = [
        {"case_id": c, "reference_file": str(r), "prediction_file": str(p)}
        for c, r, p in match.missing
    ]
    settings = {
        "pred_dir": str(pred_dir),
        "ref_dir": str(ref_dir),
        "hd95": hd95,
        "nsd_tolerance_mm": float(nsd_tolerance_mm),
        "missing_as_empty": missing_as_empty,
        "spacing_source": "reference header zooms (mm)",
        "nan_means": "nanmean",
    }
    summary = build_summary(
        cases,
        labels,
        label_names=names,
        missing=missing,
        unmatched=[str(u) for u in match.unmatched],
        settings=settings,
    )
    write_summary_json(summary, output_dir / "summary.json", strict=strict_json)
    write_metrics_csv(summary, output_dir / "metrics.csv")
    if report:
        from segshare.evaluation.report import write_report  # matplotlib only when needed

        images = None
        if images_dir is not None:
            if not Path(images_dir).is_dir():
                raise FileNotFoundError(f"images folder not found: '{images_dir}'.")
            images = {c["case_id"]: find_image(Path(images_dir), c["case_id"]) for c in cases}
        write_report(summary, output_dir, images=images)
    return summary


def run(cfg: DictConfig) -> dict:
    """Runs the evaluation described by a composed ``evaluate.yaml`` config; returns the summary."""
    labels = cfg.labels
    if labels is not None and not isinstance(labels, int | str):
        labels = OmegaConf.to_container(labels)
    return evaluate_folders(
        cfg.pred,
        cfg.ref,
        cfg.output,
        labels=labels,
        images_dir=cfg.images,
        nsd_tolerance_mm=cfg.nsd_tolerance_mm,
        hd95=cfg.hd95,
        num_workers=cfg.num_workers,
        dataset_json=cfg.dataset_json,
        strict_json=cfg.strict_json,
        missing_as_empty=cfg.missing_as_empty,
        progress=cfg.progress,
    )


def _print_summary(summary: dict, output: str) -> None:
    fg = summary["foreground_mean"]
    print(f"{summary['num_cases']} cases, {summary['num_missing_predictions']} missing predictions")
    for key, name in summary["labels"].items():
        m = summary["mean"][key]
        print(
            f"  label {key} ({name}): Dice {m['Dice']:.4f}  HD95 {m['HD95']:.3f} mm  "
            f"NSD {m['NSD']:.4f}"
        )
    print(f"  foreground mean Dice {fg['Dice']:.4f}; reports in {output}")


@hydra.main(version_base="1.3", config_path="pkg://segshare.conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    """Console entry point ``segshare-evaluate pred=DIR ref=DIR output=DIR``."""
    with exit_on_user_error("segshare-evaluate"):
        summary = run(cfg)
    _print_summary(summary, str(cfg.output))


if __name__ == "__main__":
    main()
