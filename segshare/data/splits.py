"""Seeded k-fold cross-validation splits, written once to ``splits.json`` and reused (as nnU-Net).

``splits.json`` is a list of ``{"train": [...], "val": [...]}``, one entry per fold.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from segshare.data.io import read_json, write_json_atomic


def make_splits(case_ids: list[str], n_folds: int = 5, seed: int = 12345) -> list[dict]:
    """Shuffle ``case_ids`` with ``seed`` and cut them into ``n_folds`` validation folds."""
    ids = sorted(case_ids)
    if n_folds < 2 or n_folds > len(ids):
        raise ValueError(
            f"num_folds must be in [2, {len(ids)}] for {len(ids)} cases, got {n_folds}"
        )
    order = np.random.default_rng(seed).permutation(len(ids))
    splits = []
    for fold in np.array_split(order, n_folds):
        val = {ids[i] for i in fold}
        splits.append({"train": [c for c in ids if c not in val], "val": sorted(val)})
    return splits


def get_split(
    preprocessed_dir: str | os.PathLike,
    case_ids: list[str],
    fold: int,
    seed: int = 12345,
    n_folds: int = 5,
) -> tuple[list[str], list[str]]:
    """Train and validation case ids of ``fold``, from ``<preprocessed_dir>/splits.json``.

    The file is created on first use and then reused, so every run of every fold sees the same
    partition. ``fold="all"`` (or -1) trains and validates on every case.

    Raises:
        ValueError: bad fold, or a ``splits.json`` whose cases differ from ``case_ids``.
    """
    ids = sorted(case_ids)
    if fold in ("all", -1):
        return ids, ids
    path = Path(preprocessed_dir) / "splits.json"
    if path.exists():
        splits = read_json(path)
        listed = sorted({c for s in splits for c in s["train"] + s["val"]})
        if listed != ids:
            raise ValueError(
                f"{path}: lists {len(listed)} cases that differ from the dataset's {len(ids)}; "
                "delete it to make new splits"
            )
    else:
        splits = make_splits(ids, n_folds, seed)
        write_json_atomic(splits, path)
    if not isinstance(fold, int) or not 0 <= fold < len(splits):
        raise ValueError(f"data.fold must be in [0, {len(splits) - 1}] or 'all', got {fold!r}")
    return list(splits[fold]["train"]), list(splits[fold]["val"])
