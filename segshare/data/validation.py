"""Dataset validation: every problem of every case, each naming its file, in one pass.

Checks (per case): file missing/unreadable, truncated or corrupt gzip, not NIfTI, wrong
dimensionality, an empty axis, a non-finite affine, header size over the voxel limit (refused
before reading any voxel), channels that disagree (shape, affine), image/label shape and affine
mismatch, NaN/Inf intensities or finite ones too large to normalise (fill values), label
values not integer or not declared in ``dataset.json``; plus what discovery found (paths outside the
root, missing labels, malformed ``dataset.json``). Cases without problems also yield their
fingerprint statistics, so each file is read once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from segshare.data.discovery import IGNORE_LABEL, Case, Dataset, is_inside
from segshare.data.fingerprint import case_statistics
from segshare.data.io import (
    NiftiReadError,
    file_signature,
    header_problem,
    load_nifti,
    read_label_voxels,
    read_voxels,
)
from segshare.data.parallel import parallel_map
from segshare.data.preprocessing import unnormalisable_intensities

DEFAULT_MAX_VOXELS = 512**3


@dataclass(frozen=True)
class Problem:
    """One problem: the file it concerns and what is wrong."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class DatasetError(ValueError):
    """The dataset has problems; ``problems`` lists every one (the message too, one per line)."""

    def __init__(self, problems: list[Problem], root: Any = None):
        self.problems = list(problems)
        head = (
            f"dataset {root} has {len(problems)} problem(s):"
            if root
            else f"{len(problems)} problem(s):"
        )
        super().__init__("\n".join([head, *(f"  - {p}" for p in self.problems)]))


@dataclass
class CaseCheck:
    """Result of checking one case: its problems and (when clean) its fingerprint statistics."""

    case_id: str
    problems: list[Problem]
    stats: dict[str, Any] | None = None


def open_headers(
    case: Case, max_voxels: int, out: list[Problem], setting: str = "data.max_voxels"
) -> list:
    """Open every file's header; check dimensionality, empty axes, a finite affine and the voxel
    limit, from the headers alone.

    Args:
        case: the case.
        max_voxels: refuse a file whose header declares more voxels.
        out: problems found are appended here (one per file at most).
        setting: the name of the caller's voxel-limit setting, quoted in the message
            (``"inference.max_voxels"`` for prediction).

    Returns:
        ``(path, kind, image)`` for every file without a problem (``kind``: image or label).
    """
    opened = []
    files = [(p, "image") for p in case.images] + ([(case.label, "label")] if case.label else [])
    for path, kind in files:
        try:
            img = load_nifti(path)
        except NiftiReadError as err:
            out.append(Problem(str(path), str(err).removeprefix(f"{path}: ")))
            continue
        shape = img.shape
        ok_dims = (3,) if kind == "label" or len(case.images) > 1 else (3, 4)
        if len(shape) not in ok_dims:
            want = "3D" if ok_dims == (3,) else "3D or 4D (channels last)"
            out.append(Problem(str(path), f"{kind} must be {want}, got shape {shape}"))
            continue
        problem = header_problem(img)
        if problem:
            out.append(Problem(str(path), problem))
            continue
        n_vox = int(np.prod(shape, dtype=np.int64))
        if n_vox > max_voxels:
            out.append(
                Problem(
                    str(path),
                    f"{shape} = {n_vox} voxels exceeds the limit "
                    f"{setting}={max_voxels}; refused before reading",
                )
            )
            continue
        opened.append((path, kind, img))
    return opened


def check_geometry(opened: list, affine_tol: float, out: list[Problem]) -> None:
    """Channels and label must share the first image's spatial shape and affine."""
    ref_path, _, ref = opened[0]
    for path, kind, img in opened[1:]:
        what = "label" if kind == "label" else "channel"
        if img.shape[:3] != ref.shape[:3]:
            out.append(
                Problem(
                    str(path),
                    f"{what} shape {img.shape[:3]} != image shape {ref.shape[:3]} of {ref_path}",
                )
            )
        elif not np.allclose(img.affine, ref.affine, atol=affine_tol):
            diff = float(np.abs(img.affine - ref.affine).max())
            out.append(
                Problem(
                    str(path),
                    f"{what} affine differs from {ref_path} by up to {diff:.4g} "
                    f"(tolerance {affine_tol})",
                )
            )


def _check_label_values(
    path, data: np.ndarray, allowed: set[int] | None, out: list[Problem]
) -> None:
    if not np.isfinite(data).all():
        out.append(Problem(str(path), "label contains NaN/Inf values"))
        return
    values = np.unique(data)
    frac = values[values != np.round(values)]
    if frac.size:
        out.append(Problem(str(path), f"label values must be integers, found {frac[:5].tolist()}"))
        return
    if allowed is not None:
        extra = sorted(int(v) for v in values if int(v) not in allowed)
        if extra:
            out.append(
                Problem(
                    str(path),
                    f"label values {extra} are not in dataset.json labels {sorted(allowed)}",
                )
            )


def check_case(
    case: Case,
    allowed_labels: set[int] | None,
    max_voxels: int = DEFAULT_MAX_VOXELS,
    affine_tol: float = 1e-3,
    num_channels: int | None = None,
    seed: int = 0,
    ignore_label: int | None = None,
) -> CaseCheck:
    """Check one case fully; compute its fingerprint statistics when it has no problem."""
    out: list[Problem] = []
    opened = open_headers(case, max_voxels, out)
    if out or not opened:
        return CaseCheck(case.case_id, out)
    check_geometry(opened, affine_tol, out)
    if out:
        return CaseCheck(case.case_id, out)
    chans, label = [], None
    for path, kind, img in opened:
        try:
            data = read_label_voxels(img, path) if kind == "label" else read_voxels(img, path)
        except NiftiReadError as err:
            out.append(Problem(str(path), str(err).removeprefix(f"{path}: ")))
            continue
        if kind == "label":
            _check_label_values(path, data, allowed_labels, out)
            label = data
            continue
        bad = int(data.size - np.count_nonzero(np.isfinite(data)))
        if bad:
            out.append(Problem(str(path), f"{bad} NaN/Inf intensities"))
        elif problem := unnormalisable_intensities(data):
            out.append(Problem(str(path), problem))
        chans.extend([data] if data.ndim == 3 else [data[..., c] for c in range(data.shape[-1])])
    if num_channels is not None and not out and len(chans) != num_channels:
        out.append(
            Problem(
                str(case.images[0]),
                f"case has {len(chans)} channel(s), "
                f"dataset.json channel_names lists {num_channels}",
            )
        )
    if out:
        return CaseCheck(case.case_id, out)
    image = np.stack(chans, axis=-1)
    lbl = None
    if label is not None:
        lbl = label if label.dtype.kind in "iu" else np.rint(label).astype(np.int16)
    stats = case_statistics(image, lbl, opened[0][2].affine, seed, ignore_label)
    return CaseCheck(case.case_id, [], stats)


def _check_star(args: tuple) -> CaseCheck:
    return check_case(*args)


def validate_dataset(
    dataset: Dataset,
    max_voxels: int = DEFAULT_MAX_VOXELS,
    num_workers: int = 0,
    affine_tol: float = 1e-3,
    require_labels: bool = True,
    progress: bool = True,
) -> tuple[list[Problem], dict[str, dict[str, Any]]]:
    """Check every case (in ``num_workers`` processes when > 1).

    Returns:
        ``(problems, stats)``: every problem found (discovery's first), and per clean case its
        fingerprint statistics. Callers raise :class:`DatasetError` when ``problems`` is non-empty.
    """
    problems = [Problem(p, m) for p, m in dataset.problems]
    if not dataset.cases:
        problems.append(Problem(str(dataset.root), "no cases found"))
    if any(Path(p.path).name == "dataset.json" for p in problems):
        return problems, {}  # the dataset.json is refused: no case is read against it
    allowed = set(dataset.labels.values()) if dataset.labels else None
    ignore = dataset.labels.get(IGNORE_LABEL)
    n_ch = len(dataset.channel_names) if dataset.channel_names else None
    jobs = []
    for i, case in enumerate(dataset.cases):
        if (
            require_labels
            and case.label is None
            and not any(p.path == str(case.images[0]) for p in problems)
        ):
            problems.append(Problem(str(case.images[0]), f"case {case.case_id!r} has no label"))
        files = [*case.images, *([case.label] if case.label else [])]
        if all(is_inside(dataset.root, f) for f in files):  # never open files outside the root
            jobs.append((case, allowed, max_voxels, affine_tol, n_ch, i, ignore))
    results = parallel_map(  # report in case order, not finishing order
        _check_star, jobs, num_workers, "validate", progress, ordered=True
    )
    stats = {}
    for res in results:
        problems.extend(res.problems)
        if res.stats is not None:
            stats[res.case_id] = res.stats
    return problems, stats


def dataset_files(dataset: Dataset) -> list[Path]:
    """Every source file of the dataset (images, labels) and its ``dataset.json``."""
    paths = [p for c in dataset.cases for p in (*c.images, c.label) if p is not None]
    return [*paths, Path(dataset.root) / "dataset.json"]


def dataset_signature(
    dataset: Dataset, max_voxels: int, signatures: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """What a validation result depends on: every file's signature (size, mtime and a content
    hash, :func:`segshare.data.io.file_signature`), the labels, channels and voxel limit. Equal
    signatures mean the dataset need not be read again.

    Args:
        dataset: the discovered dataset.
        max_voxels: the voxel limit validation used.
        signatures: signatures already taken, by path (the rest are taken here).
    """
    signatures = signatures or {}
    files = {
        str(p): signatures[str(p)] if str(p) in signatures else file_signature(p)
        for p in dataset_files(dataset)
    }
    return {
        "version": 2,
        "max_voxels": int(max_voxels),
        "labels": dataset.labels,
        "channel_names": dataset.channel_names,
        "files": files,
    }
