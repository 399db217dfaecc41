"""One call from the data settings to cached, split training data: :func:`prepare_dataset`.

validate (every problem at once) -> fingerprint -> plan -> cache (parallel, keyed, reused while
its source files are unchanged) -> split.
Used by ``segshare-preprocess`` and by training, so both refuse the same bad data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from segshare.data.augment import AugmentByLength, AugmentSettings
from segshare.data.cache import preprocess_dataset
from segshare.data.discovery import Dataset, discover_dataset
from segshare.data.fingerprint import build_fingerprint, make_plan
from segshare.data.io import file_signature, filling_folder, read_json, write_json_atomic
from segshare.data.planner import PlannerSettings, plan_configurations
from segshare.data.preprocessing import Plan
from segshare.data.splits import get_split
from segshare.data.synthetic import SyntheticSpec, ensure_dataset
from segshare.data.validation import (
    DatasetError,
    Problem,
    dataset_files,
    dataset_signature,
    validate_dataset,
)


@dataclass(frozen=True)
class DataSettings:
    """The ``data`` config group as one object (``conf/data/default.yaml``): where the dataset is,
    how it is validated, planned and split, and how training patches are drawn from it.

    Attributes:
        root: dataset folder (MSD or nnU-Net raw layout, or ``imagesTr/`` + ``labelsTr/``).
        preprocessed_dir: where ``fingerprint.json``, ``plan.json``, ``splits.json`` and the
            cache go.
        fold: cross-validation fold (``0..num_folds-1``) or ``"all"``.
        num_folds: folds written to ``splits.json``.
        split_seed: seed of the fold split.
        num_workers: worker processes (validation, caching) and parallel input-pipeline calls.
        revalidate: re-read every file even when none changed since the last clean validation.
        max_voxels: refuse a file whose header declares more voxels.
        target_spacing: preprocessed voxel spacing (mm, RAS); None = planned from the data.
        normalization: ``"zscore"``/``"ct"`` (all channels, or one per channel); None = by
            channel name.
        anisotropy_threshold: spacing ratio above which one axis is resampled separately.
        patch_size: training patch ``(D, H, W)`` on the preprocessed grid; None = planned.
        batch_size: patches per batch; None = planned.
        oversample_foreground: share of each batch forced onto foreground.
        augment: the augmentation of training patches, or the choice of one by the run's
            length (:class:`AugmentByLength`).
        synthetic: the dataset generated at a missing ``root`` (None: never generate).
    """

    root: str
    preprocessed_dir: str
    fold: int | str
    num_folds: int
    split_seed: int
    num_workers: int
    revalidate: bool
    max_voxels: int
    target_spacing: list[float] | None
    normalization: list[str] | str | None
    anisotropy_threshold: float
    patch_size: list[int] | None
    batch_size: int | None
    oversample_foreground: float
    augment: AugmentSettings | AugmentByLength
    synthetic: SyntheticSpec | None

    def __post_init__(self) -> None:
        fold, n = self.fold, int(self.num_folds)
        if fold not in ("all", -1) and not (isinstance(fold, int) and 0 <= fold < n):
            raise ValueError(f"data.fold must be in [0, {n - 1}] or 'all', got {fold!r}")


@dataclass
class PreparedData:
    """What training needs: the plan, the cache folder, the fold's case ids, the dataset."""

    plan: Plan
    cache_dir: Path
    train_ids: list[str]
    val_ids: list[str]
    dataset: Dataset
    fingerprint: dict[str, Any]
    preprocessed_dir: Path


def _infer_labels(stats: dict[str, dict]) -> dict[str, int]:
    """Labels for a dataset without ``dataset.json``: every value seen, ``label_<v>`` names."""
    values = sorted({int(v) for s in stats.values() for v in s["class_counts"]} | {0})
    return {("background" if v == 0 else f"label_{v}"): v for v in values}


def _validated_fingerprint(
    dataset: Dataset,
    settings: DataSettings,
    out: Path,
    progress: bool,
    signatures: dict[str, Any],
) -> dict[str, Any]:
    """Validate (skipped when no file changed since the last clean validation, unless
    ``data.revalidate``) and return the fingerprint; raises DatasetError listing every problem.
    ``signatures``: every file's :func:`segshare.data.io.file_signature`, taken before reading."""
    max_voxels = int(settings.max_voxels)
    signature = dataset_signature(dataset, max_voxels, signatures)
    sig_path, fp_path = out / "validated.json", out / "fingerprint.json"
    if not settings.revalidate and sig_path.exists() and fp_path.exists():
        if read_json(sig_path) == json.loads(json.dumps(signature)):
            return read_json(fp_path)
    problems, stats = validate_dataset(
        dataset, max_voxels=max_voxels, num_workers=settings.num_workers, progress=progress
    )
    if problems:
        raise DatasetError(problems, dataset.root)
    if not dataset.labels:
        dataset.labels = _infer_labels(stats)
    out.mkdir(parents=True, exist_ok=True)
    fingerprint = build_fingerprint(dataset, stats)
    write_json_atomic(fingerprint, fp_path)
    write_json_atomic(signature, sig_path)
    return fingerprint


def prepare_dataset(
    settings: DataSettings, progress: bool = True, planner: PlannerSettings | None = None
) -> PreparedData:
    """Validate, fingerprint, plan, cache and split the dataset of ``settings``.

    Args:
        settings: the data settings (``conf/data/*.yaml``, instantiated).
        progress: show progress bars.
        planner: also plan the network, patch and batch of every configuration
            (``plan.configurations``; see :mod:`segshare.data.planner`).

    Returns:
        The :class:`PreparedData`. ``fingerprint.json``, ``plan.json`` and ``splits.json`` are
        written to ``settings.preprocessed_dir``; the cache below it.

    Raises:
        DatasetError: listing every problem found (each naming its file).
        ValueError: the planner cannot plan ``3d_fullres`` (cases too small, budget too small).
    """
    try:
        root = ensure_dataset(settings.root, settings.synthetic)
        dataset = discover_dataset(root)
    except ValueError as err:
        raise DatasetError(
            [Problem(str(settings.root), str(err).split(": ", 1)[-1])], settings.root
        ) from None
    with filling_folder(settings.preprocessed_dir) as out:  # one preparer at a time
        return _prepare(settings, dataset, out, progress, planner)


def _prepare(
    settings: DataSettings,
    dataset: Dataset,
    out: Path,
    progress: bool,
    planner: PlannerSettings | None,
) -> PreparedData:
    """:func:`prepare_dataset` once the dataset is discovered and ``out`` is locked."""
    # one signature per file, taken before anything reads it: validation's skip and the cache's
    # rebuild decisions both compare these (a file changed while it is read counts as changed)
    signatures = {str(p): file_signature(p) for p in dataset_files(dataset)}
    fingerprint = _validated_fingerprint(dataset, settings, out, progress, signatures)
    dataset.labels = dict(fingerprint["labels"])
    plan = make_plan(
        fingerprint,
        dataset.labels,
        target_spacing=settings.target_spacing,
        normalization=settings.normalization,
        anisotropy_threshold=float(settings.anisotropy_threshold),
        regions=dataset.regions,
        regions_class_order=dataset.regions_class_order,
    )
    if planner is not None:
        plans = plan_configurations(
            fingerprint, plan.target_spacing, plan.in_channels, plan.num_classes, planner
        )
        plan.configurations = {name: c.to_dict() for name, c in plans.items()}
    plan.save(out / "plan.json")
    workers = int(settings.num_workers)
    cache_dir = preprocess_dataset(
        dataset, out, plan, num_workers=workers, progress=progress, signatures=signatures
    )
    fold = settings.fold
    train_ids, val_ids = get_split(
        out,
        dataset.case_ids,
        fold if fold == "all" else int(fold),
        seed=int(settings.split_seed),
        n_folds=int(settings.num_folds),
    )
    return PreparedData(plan, cache_dir, train_ids, val_ids, dataset, fingerprint, out)
