"""Folder-level evaluation: match files by name, load NIfTI label maps, score cases in parallel."""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm.auto import tqdm

from segshare.evaluation.metrics import ALL_METRICS, compute_case_metrics
from segshare.evaluation.overlap import as_label_array

NIFTI_ENDINGS = (".nii.gz", ".nii")
#: Largest affine difference (mm) tolerated between a prediction and its reference.
AFFINE_ATOL = 1e-3


@dataclass
class CaseMatch:
    """Files found in the reference and prediction folders, matched by file name."""

    pairs: list[tuple[str, Path, Path]] = field(default_factory=list)  # (case_id, ref, pred)
    missing: list[tuple[str, Path, Path]] = field(default_factory=list)  # no prediction
    unmatched: list[Path] = field(default_factory=list)  # predictions without a reference


def split_ending(name: str) -> tuple[str, str]:
    """``("case_001", ".nii.gz")`` from ``"case_001.nii.gz"``; ending ``""`` when not NIfTI."""
    for ending in NIFTI_ENDINGS:
        if name.endswith(ending):
            return name[: -len(ending)], ending
    return name, ""


def list_nifti(folder: Path) -> list[Path]:
    """NIfTI files directly in ``folder`` (hidden files skipped), sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"folder not found: '{folder}'.")
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and split_ending(p.name)[1]
    )


def match_cases(pred_dir: Path, ref_dir: Path) -> CaseMatch:
    """Matches prediction and reference files by file name (case id = name without the ending,
    so ``x.nii`` also matches ``x.nii.gz``).

    Raises:
        ValueError: when ``ref_dir`` holds no NIfTI file.
    """
    refs = list_nifti(ref_dir)
    if not refs:
        raise ValueError(f"no NIfTI reference files (.nii.gz/.nii) in '{ref_dir}'.")
    preds: dict[str, Path] = {}
    for path in list_nifti(pred_dir):  # .nii.gz sorts before .nii: the exact name wins below
        preds.setdefault(split_ending(path.name)[0], path)
    match = CaseMatch()
    ref_ids = set()
    for ref in refs:
        case_id = split_ending(ref.name)[0]
        ref_ids.add(case_id)
        exact = Path(pred_dir) / ref.name
        if exact.is_file():
            match.pairs.append((case_id, ref, exact))
        elif case_id in preds:
            match.pairs.append((case_id, ref, preds[case_id]))
        else:
            match.missing.append((case_id, ref, exact))
    match.unmatched = [p for cid, p in preds.items() if cid not in ref_ids]
    return match


def load_label_map(path: Path) -> tuple[np.ndarray, nib.Nifti1Image]:
    """Loads a NIfTI label map as an integer array ``(D, H, W)`` plus its image (header, affine)."""
    try:
        img = nib.load(str(path))
        array = np.asanyarray(img.dataobj)
    except Exception as err:  # nibabel raises many types for broken files
        raise ValueError(f"cannot read NIfTI file '{path}': {err}") from err
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise ValueError(f"label map '{path}' must be 3D, got shape {array.shape}.")
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
) -> dict:
    """Scores one case (runs in a worker process).

    Args:
        case_id: case name (file name without the NIfTI ending).
        ref_path / pred_path: NIfTI label files.
        labels: labels to score; ``None`` scores 1..max label of either map.
        nsd_tolerance_mm: NSD tolerance.
        hd95: ``"monai"`` or ``"medpy"``.
        pred_missing: score an all-background prediction (the file does not exist).

    Returns:
        nnU-Net style entry ``{"case_id", "reference_file", "prediction_file", "metrics",
        "ref_labels", "num_voxels"}`` with ``metrics`` keyed by int label.
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
        pred, ref, labels, spacing, nsd_tolerance_mm=nsd_tolerance_mm, hd95=hd95
    )
    return {
        "case_id": case_id,
        "reference_file": str(ref_path),
        "prediction_file": str(pred_path),
        "metrics": metrics,
        "ref_labels": [k for k, v in metrics.items() if v["n_ref"] > 0],
        "num_voxels": int(ref.size),
        "spacing": list(spacing),
    }


def run_cases(tasks: list[dict], num_workers: int, progress: bool = True) -> list[dict]:
    """Runs :func:`evaluate_case` on ``tasks`` (keyword dicts); in processes if ``num_workers > 1``.

    Results keep the order of ``tasks``. Workers use the ``spawn`` start method, so calling this
    after TensorFlow has started threads (training, prediction) is safe.
    """
    bar = tqdm(total=len(tasks), desc="evaluate", unit="case", disable=not progress)
    results: list[dict | None] = [None] * len(tasks)
    try:
        if num_workers <= 1 or len(tasks) <= 1:
            for i, task in enumerate(tasks):
                results[i] = evaluate_case(**task)
                bar.update()
        else:
            ctx = multiprocessing.get_context(_start_method())
            with ProcessPoolExecutor(min(num_workers, len(tasks)), mp_context=ctx) as pool:
                futures = {pool.submit(evaluate_case, **task): i for i, task in enumerate(tasks)}
                try:
                    for future in as_completed(futures):
                        results[futures[future]] = future.result()
                        bar.update()
                except BaseException:
                    pool.shutdown(wait=False, cancel_futures=True)
                    raise
    finally:
        bar.close()
    return results  # type: ignore[return-value]


def _start_method() -> str:
    # spawn is safe after TensorFlow started threads, but re-imports ``__main__`` by path; a
    # main module read from stdin has no such path, so fall back to fork there.
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    return "fork" if main_file and not os.path.exists(main_file) else "spawn"


def default_num_workers() -> int:
    """Worker processes by default: the CPUs this process may use, at most 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 8))


def load_label_names(ref_dir: Path, dataset_json: Path | None = None) -> dict[int, str]:
    """Label names from a ``dataset.json`` (nnU-Net ``{name: int}`` or MSD ``{"1": name}``).

    Looks at ``dataset_json`` when given, else in ``ref_dir`` and its parent. Returns ``{}`` when
    no file is found; region labels (lists) are skipped.
    """
    if dataset_json is not None:
        candidates = [Path(dataset_json)]
        if not candidates[0].is_file():
            raise FileNotFoundError(f"dataset_json not found: '{dataset_json}'.")
    else:
        candidates = [Path(ref_dir) / "dataset.json", Path(ref_dir).parent / "dataset.json"]
    for path in candidates:
        if path.is_file():
            try:
                labels = json.loads(path.read_text()).get("labels", {})
            except (json.JSONDecodeError, AttributeError) as err:
                raise ValueError(f"cannot read labels from '{path}': {err}") from err
            names: dict[int, str] = {}
            for key, value in labels.items():
                if isinstance(value, int):  # nnU-Net: name -> int
                    names[value] = str(key)
                elif str(key).isdigit():  # MSD: "1" -> name
                    names[int(key)] = str(value)
            return names
    return {}


def find_image(images_dir: Path, case_id: str) -> Path | None:
    """The first-channel image of a case: ``{case}_0000.nii.gz`` (nnU-Net) or ``{case}.nii.gz``."""
    for stem in (f"{case_id}_0000", case_id):
        for ending in NIFTI_ENDINGS:
            path = Path(images_dir) / f"{stem}{ending}"
            if path.is_file():
                return path
    return None
