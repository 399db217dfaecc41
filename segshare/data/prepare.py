"""One call from a data config to cached, split training data: :func:`prepare_dataset`.

validate (every problem at once) -> fingerprint -> plan -> cache (parallel, keyed, reused) -> split.
Used by ``segshare-preprocess`` and by training, so both refuse the same bad data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from segshare.data.cache import preprocess_dataset
from segshare.data.discovery import Dataset, discover_dataset
from segshare.data.fingerprint import build_fingerprint, make_plan
from segshare.data.io import read_json, write_json_atomic
from segshare.data.preprocessing import Plan
from segshare.data.splits import get_split
from segshare.data.synthetic import ensure_dataset
from segshare.data.validation import DatasetError, Problem, dataset_signature, validate_dataset


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


def _opt(cfg: Any, key: str, default: Any = None) -> Any:
    value = cfg.get(key, default)
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def _validated_fingerprint(
    dataset: Dataset, cfg: Any, out: Path, workers: int, progress: bool
) -> dict[str, Any]:
    """Validate (skipped when no file changed since the last clean validation, unless
    ``data.revalidate``) and return the fingerprint; raises DatasetError listing every problem."""
    max_voxels = int(cfg.get("max_voxels", 512**3))
    signature = dataset_signature(dataset, max_voxels)
    sig_path, fp_path = out / "validated.json", out / "fingerprint.json"
    if not cfg.get("revalidate", False) and sig_path.exists() and fp_path.exists():
        if read_json(sig_path) == json.loads(json.dumps(signature)):
            return read_json(fp_path)
    problems, stats = validate_dataset(
        dataset, max_voxels=max_voxels, num_workers=workers, progress=progress
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


def prepare_dataset(data_cfg: Any, progress: bool = True) -> PreparedData:
    """Validate, fingerprint, plan, cache and split the dataset of ``data_cfg``.

    Args:
        data_cfg: the ``data`` config group (``conf/data/*.yaml``; a dict is accepted too).
        progress: show progress bars.

    Returns:
        The :class:`PreparedData`. ``fingerprint.json``, ``plan.json`` and ``splits.json`` are
        written to ``data_cfg.preprocessed_dir``; the cache below it.

    Raises:
        DatasetError: listing every problem found (each naming its file).
    """
    cfg = OmegaConf.create(data_cfg) if isinstance(data_cfg, dict) else data_cfg
    try:
        root = ensure_dataset(cfg)
        dataset = discover_dataset(root)
    except ValueError as err:
        raise DatasetError(
            [Problem(str(cfg.root), str(err).split(": ", 1)[-1])], cfg.root
        ) from None
    workers = int(cfg.get("num_workers", 2))
    fold, n_folds = cfg.get("fold", 0), int(cfg.get("num_folds", 5))
    if fold not in ("all", -1) and not (isinstance(fold, int) and 0 <= fold < n_folds):
        raise ValueError(f"data.fold must be in [0, {n_folds - 1}] or 'all', got {fold!r}")
    out = Path(str(cfg.preprocessed_dir))
    fingerprint = _validated_fingerprint(dataset, cfg, out, workers, progress)
    dataset.labels = dict(fingerprint["labels"])
    plan = make_plan(
        fingerprint,
        dataset.labels,
        target_spacing=_opt(cfg, "target_spacing"),
        normalization=_opt(cfg, "normalization"),
        anisotropy_threshold=float(cfg.get("anisotropy_threshold", 3.0)),
    )
    plan.save(out / "plan.json")
    cache_dir = preprocess_dataset(dataset, out, plan, num_workers=workers, progress=progress)
    train_ids, val_ids = get_split(
        out,
        dataset.case_ids,
        fold if fold == "all" else int(fold),
        seed=int(cfg.get("split_seed", 12345)),
        n_folds=n_folds,
    )
    return PreparedData(plan, cache_dir, train_ids, val_ids, dataset, fingerprint, out)
