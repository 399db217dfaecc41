"""Folder-level evaluation: match files by name, read label maps, score cases in parallel.

File names, listing and reading come from :mod:`segshare.data.io`, worker processes from
:mod:`segshare.data.parallel`, label names from :func:`segshare.data.discovery.labels_from_json`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from segshare.data.discovery import IGNORE_LABEL, check_unique_case_files, labels_from_json
from segshare.data.io import (
    NIFTI_SUFFIXES,
    NiftiReadError,
    list_nifti,
    read_json,
    read_label_map,
    strip_nifti_suffix,
)
from segshare.data.parallel import parallel_map
from segshare.evaluation.metrics import ALL_METRICS, compute_case_metrics, compute_region_metrics
from segshare.evaluation.overlap import as_label_array

#: Largest affine difference (mm) tolerated between a prediction and its reference.
AFFINE_ATOL = 1e-3


@dataclass
class CaseMatch:
    """Files found in the reference and prediction folders, matched by file name."""

    pairs: list[tuple[str, Path, Path]] = field(default_factory=list)  # (case_id, ref, pred)
    missing: list[tuple[str, Path, Path]] = field(default_factory=list)  # no prediction
    unmatched: list[Path] = field(default_factory=list)  # predictions without a reference


def match_cases(pred_dir: Path, ref_dir: Path) -> CaseMatch:
    """Matches prediction and reference files by file name (case id = name without the ending,
    so ``x.nii`` also matches ``x.nii.gz``).

    Raises:
        ValueError: when ``ref_dir`` holds no NIfTI file, or either folder holds two files of
            one case id (``x.nii`` and ``x.nii.gz``; the message names both).
    """
    refs = list_nifti(ref_dir)
    if not refs:
        raise ValueError(f"no NIfTI reference files (.nii.gz/.nii) in '{ref_dir}'.")
    pred_files = list_nifti(pred_dir)
    check_unique_case_files(refs, ref_dir)
    check_unique_case_files(pred_files, pred_dir)
    preds = {strip_nifti_suffix(path.name): path for path in pred_files}
    match = CaseMatch()
    ref_ids = set()
    for ref in refs:
        case_id = strip_nifti_suffix(ref.name)
        ref_ids.add(case_id)
        if case_id in preds:
            match.pairs.append((case_id, ref, preds[case_id]))
        else:
            match.missing.append((case_id, ref, Path(pred_dir) / ref.name))
    match.unmatched = [p for cid, p in preds.items() if cid not in ref_ids]
    return match


def load_label_map(path: Path) -> tuple[np.ndarray, nib.Nifti1Image]:
    """A label map (:func:`segshare.data.io.read_label_map`) as a non-negative integer array
    ``(D, H, W)`` (uint8 when its labels fit) plus its image (header, affine).

    Raises:
        ValueError: the file is unreadable, not 3D or holds non-integer or negative labels (the
            message names the file).
    """
    try:
        array, img = read_label_map(path)
    except NiftiReadError as err:
        raise ValueError(
            f"cannot read NIfTI file '{path}': {str(err).removeprefix(f'{path}: ')}"
        ) from err
    array = as_label_array(array, f"label map '{path}'")
    if array.max(initial=0) < 256:
        array = array.astype(np.uint8, copy=False)
    return array, img


def check_same_grid(
    pred_path: Path,
    pred_img: nib.Nifti1Image,
    ref_path: Path,
    ref_img: nib.Nifti1Image,
    pred_shape,
    ref_shape,
) -> None:
    """Raises ``ValueError`` naming both files when shape or affine differ."""
    if tuple(pred_shape) != tuple(ref_shape):
        raise ValueError(
            f"prediction '{pred_path}' has shape {tuple(pred_shape)} but reference '{ref_path}' "
            f"has shape {tuple(ref_shape)}."
        )
    if not np.allclose(pred_img.affine, ref_img.affine, atol=AFFINE_ATOL, rtol=0):
        raise ValueError(
            f"prediction '{pred_path}' and reference '{ref_path}' have different affines:\n"
            f"{np.array2string(pred_img.affine, precision=4)}\nvs\n"
            f"{np.array2string(ref_img.affine, precision=4)}"
        )


def absent_label_metrics(num_voxels: int) -> dict[str, float]:
    """Metrics of a label absent from both reference and prediction."""
    nan = float("nan")
    values = dict.fromkeys(ALL_METRICS, nan)
    values.update(TP=0, FP=0, FN=0, TN=int(num_voxels), n_ref=0, n_pred=0, VolDiff_ml=0.0)
    return values


def evaluate_case(
    case_id: str,
    ref_path: Path,
    pred_path: Path,
    labels: Sequence[int] | None,
    nsd_tolerance_mm: float,
    hd95: str,
    pred_missing: bool = False,
    ignore_label: int | None = None,
    regions: dict[str, list[int]] | None = None,
) -> dict:
    """Scores one case (runs in a worker process).

    Args:
        case_id: case name (file name without the NIfTI ending).
        ref_path / pred_path: NIfTI label files.
        labels: labels to score; ``None`` scores 1..max label of either map.
        nsd_tolerance_mm: NSD tolerance.
        hd95: ``"monai"`` or ``"medpy"``.
        pred_missing: score an all-background prediction (the file does not exist).
        ignore_label: the reference's value of unannotated voxels, counted nowhere
            (:func:`~segshare.evaluation.metrics.compute_case_metrics`).
        regions: region name -> values, each also scored as the union of its values
            (``region_metrics``, :func:`~segshare.evaluation.metrics.compute_region_metrics`).

    Returns:
        nnU-Net style entry ``{"case_id", "reference_file", "prediction_file", "metrics",
        "ref_labels", "num_voxels"}`` with ``metrics`` keyed by int label, plus the nonzero
        values present in each map (``ref_values``, ``pred_values``).
    """
    ref, ref_img = load_label_map(ref_path)
    if pred_missing:
        pred = np.zeros_like(ref)
    else:
        pred, pred_img = load_label_map(pred_path)
        check_same_grid(pred_path, pred_img, ref_path, ref_img, pred.shape, ref.shape)
    spacing = tuple(float(z) for z in ref_img.header.get_zooms()[:3])
    if labels is None:
        top = int(max(ref.max(initial=0), pred.max(initial=0)))
        labels = list(range(1, top + 1))
    metrics = compute_case_metrics(
        pred,
        ref,
        labels,
        spacing,
        nsd_tolerance_mm=nsd_tolerance_mm,
        hd95=hd95,
        ignore_label=ignore_label,
    )
    ignored = int(np.count_nonzero(ref == ignore_label)) if ignore_label is not None else 0
    scored = {}
    if regions:
        scored["region_metrics"] = compute_region_metrics(
            pred,
            ref,
            regions,
            spacing,
            nsd_tolerance_mm=nsd_tolerance_mm,
            hd95=hd95,
            ignore_label=ignore_label,
        )
    return {
        **scored,
        "case_id": case_id,
        "reference_file": str(ref_path),
        "prediction_file": str(pred_path),
        "metrics": metrics,
        "ref_labels": [k for k, v in metrics.items() if v["n_ref"] > 0],
        "num_voxels": int(ref.size) - ignored,  # the annotated voxels
        "spacing": list(spacing),
        "ref_values": [v for v in label_values(ref) if v != ignore_label],
        "pred_values": [] if pred_missing else label_values(pred),
    }


def label_values(array: np.ndarray) -> list[int]:
    """The nonzero values of a label map, sorted (one counting pass for uint8 maps)."""
    if array.dtype == np.uint8:
        values = np.flatnonzero(np.bincount(array.ravel(), minlength=1))
    else:
        values = np.unique(array)
    return [int(v) for v in values if v != 0]


def _evaluate_task(task: dict) -> dict:
    """:func:`evaluate_case`; a bad file comes back as ``{"case_id", "error"}`` (so that every
    bad case of a folder is reported together)."""
    try:
        return evaluate_case(**task)
    except ValueError as err:
        return {"case_id": task["case_id"], "error": str(err)}


def run_cases(tasks: list[dict], num_workers: int, progress: bool = True) -> list[dict]:
    """Runs :func:`evaluate_case` on ``tasks`` (keyword dicts); in processes if ``num_workers > 1``.

    Results keep the order of ``tasks``. Workers start as :func:`segshare.data.parallel.mp_context`
    says (``spawn`` once TensorFlow is imported), so calling this from training is safe.

    Raises:
        ValueError: after every case ran, listing each one whose files could not be scored
            (unreadable, non-integer labels, another shape or affine), one per line.
    """
    results = list(
        parallel_map(_evaluate_task, tasks, num_workers, "evaluate", progress, ordered=True)
    )
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        lines = "\n".join(f"  - {e}" for e in errors)
        raise ValueError(f"{len(errors)} of {len(results)} case(s) cannot be scored:\n{lines}")
    return results


def load_label_names(ref_dir: Path, dataset_json: Path | None = None) -> dict[int, str]:
    """Label names (``{value: name}``) of :func:`load_label_definitions`."""
    return load_label_definitions(ref_dir, dataset_json)[0]


def load_label_definitions(
    ref_dir: Path, dataset_json: Path | None = None
) -> tuple[dict[int, str], dict[str, list[int]] | None]:
    """Label names and regions from a ``dataset.json``
    (:func:`segshare.data.discovery.labels_from_json`).

    Looks at ``dataset_json`` when given, else in ``ref_dir`` and its parent.

    Returns:
        ``({value: name}, regions)``: ``regions`` ``{name: values}`` when the file declares
        regions (with ``regions_class_order``), else None; ``({}, None)`` when no file is found.

    Raises:
        FileNotFoundError: ``dataset_json`` is given and does not exist.
        ValueError: the file is not valid JSON or its labels cannot be honoured.
    """
    path = find_label_file(ref_dir, dataset_json)
    if path is None:
        return {}, None
    try:
        meta = read_json(path)
        if not isinstance(meta, dict):
            raise ValueError(f"{path}: top level must be an object")
        labels, regions, _ = labels_from_json(meta, str(path))
    except ValueError as err:
        message = str(err).removeprefix(f"{path}: ")
        raise ValueError(f"cannot read labels from '{path}': {message}") from err
    return {value: name for name, value in labels.items()}, regions


def ignore_label_of(names: dict[int, str]) -> int | None:
    """The value of the label named ``ignore`` in ``{value: name}`` (:func:`load_label_names`),
    or None."""
    return next((v for v, n in names.items() if n == IGNORE_LABEL), None)


def find_label_file(ref_dir: Path, dataset_json: Path | None = None) -> Path | None:
    """The ``dataset.json`` that names the labels: ``dataset_json`` when given, else the one in
    ``ref_dir`` or its parent; ``None`` when there is none.

    Raises:
        FileNotFoundError: ``dataset_json`` is given and does not exist.
    """
    if dataset_json is not None:
        if not Path(dataset_json).is_file():
            raise FileNotFoundError(f"dataset_json not found: '{dataset_json}'.")
        return Path(dataset_json)
    candidates = [Path(ref_dir) / "dataset.json", Path(ref_dir).parent / "dataset.json"]
    return next((path for path in candidates if path.is_file()), None)


def find_image(images_dir: Path, case_id: str) -> Path | None:
    """The first-channel image of a case: ``{case}_0000.nii.gz`` (nnU-Net) or ``{case}.nii.gz``."""
    for stem in (f"{case_id}_0000", case_id):
        for ending in NIFTI_SUFFIXES:
            path = Path(images_dir) / f"{stem}{ending}"
            if path.is_file():
                return path
    return None
