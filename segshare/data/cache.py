"""The cache of preprocessed cases: ``.npy`` arrays (memory-mappable) + per-case properties JSON.

Layout of ``<preprocessed_dir>/cache_<key>/`` where ``key`` hashes the plan (so a config change
gives a new folder and an unchanged one is reused):

* ``plan.json``: the plan the folder was built with;
* per case ``<id>_image.npy`` ``(D, H, W, C)`` float32, ``<id>_label.npy`` ``(D, H, W)`` uint8,
  ``<id>.json`` (properties for :func:`restore_to_original` + foreground locations for sampling).

Each file is written to a temporary name and renamed; ``<id>.json`` is written last and marks a
finished case, so an interrupted run leaves no half-written case and resumes where it stopped.
Workers each hold one case in memory at a time.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from segshare.data.discovery import Case, Dataset
from segshare.data.io import read_json, save_npy_atomic, write_json_atomic
from segshare.data.parallel import parallel_map
from segshare.data.preprocessing import Plan, preprocess_case

LOCATIONS_PER_CLASS = 2000


def cache_key(plan: Plan) -> str:
    """A short hash of the plan's preprocessing (every field that changes the cached arrays; the
    planner's network configurations do not)."""
    blob = json.dumps(plan.preprocessing_dict(), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def cache_dir_for(preprocessed_dir: str | os.PathLike, plan: Plan) -> Path:
    """``<preprocessed_dir>/cache_<key>``."""
    return Path(preprocessed_dir) / f"cache_{cache_key(plan)}"


def is_cached(cache_dir: Path, case_id: str) -> bool:
    """A case is complete when its properties JSON (written last) exists."""
    return (cache_dir / f"{case_id}.json").exists() and (
        cache_dir / f"{case_id}_image.npy"
    ).exists()


def class_locations(label: np.ndarray, seed: int, per_class: int = LOCATIONS_PER_CLASS) -> dict:
    """Up to ``per_class`` random voxel indices ``[i, j, k]`` of each foreground class."""
    rng = np.random.default_rng(seed)
    out = {}
    for c in np.unique(label):
        if c == 0:
            continue
        idx = np.argwhere(label == c)
        if len(idx) > per_class:
            idx = idx[rng.choice(len(idx), per_class, replace=False)]
        out[str(int(c))] = idx.tolist()
    return out


def _case_seed(case_id: str) -> int:
    return int(hashlib.sha256(case_id.encode()).hexdigest()[:8], 16)


def cache_case(case: Case, cache_dir: Path, plan: Plan) -> int:
    """Preprocess one case into the cache (skipped if complete); returns bytes written."""
    if is_cached(cache_dir, case.case_id):
        return 0
    image, label, props = preprocess_case(case.images, case.label, plan)
    save_npy_atomic(image.astype(np.float32, copy=False), cache_dir / f"{case.case_id}_image.npy")
    nbytes = image.nbytes
    if label is not None:
        save_npy_atomic(label, cache_dir / f"{case.case_id}_label.npy")
        props["class_locations"] = class_locations(label, _case_seed(case.case_id))
        nbytes += label.nbytes
    props["case_id"] = case.case_id
    write_json_atomic(props, cache_dir / f"{case.case_id}.json")
    return nbytes


def _cache_star(args: tuple) -> tuple[str, int]:
    case, cache_dir, plan_dict = args
    try:
        return case.case_id, cache_case(case, cache_dir, Plan.from_dict(plan_dict))
    except Exception as err:  # re-raised in the parent with the case named
        raise RuntimeError(
            f"preprocessing case {case.case_id!r} ({case.images[0]}) failed: "
            f"{type(err).__name__}: {err}"
        ) from None


def preprocess_dataset(
    dataset: Dataset,
    out_dir: str | os.PathLike,
    plan: Plan,
    num_workers: int = 2,
    progress: bool = True,
) -> Path:
    """Preprocess every case of ``dataset`` into the cache folder keyed by ``plan``.

    Args:
        dataset: the (validated) dataset.
        out_dir: the preprocessed folder (``data.preprocessed_dir``).
        plan: the preprocessing plan.
        num_workers: worker processes (<= 1: in this process).
        progress: show a tqdm progress bar.

    Returns:
        The cache folder. Cases already complete there are reused.
    """
    cache_dir = cache_dir_for(out_dir, plan)
    cache_dir.mkdir(parents=True, exist_ok=True)
    if not (cache_dir / "plan.json").exists():
        plan.save(cache_dir / "plan.json")
    todo = [c for c in dataset.cases if not is_cached(cache_dir, c.case_id)]
    jobs = [(c, cache_dir, plan.to_dict()) for c in todo]
    for _ in parallel_map(_cache_star, jobs, num_workers, "preprocess", progress):
        pass
    return cache_dir


def load_cached_case(
    cache_dir: str | os.PathLike, case_id: str
) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """Open a cached case without reading it: ``(image memmap (D, H, W, C) float32,
    label memmap (D, H, W) uint8 or None, properties dict)``."""
    cache_dir = Path(cache_dir)
    if not is_cached(cache_dir, case_id):
        raise ValueError(f"{cache_dir}: case {case_id!r} is not in the cache")
    image = np.load(cache_dir / f"{case_id}_image.npy", mmap_mode="r")
    lbl_path = cache_dir / f"{case_id}_label.npy"
    label = np.load(lbl_path, mmap_mode="r") if lbl_path.exists() else None
    return image, label, read_json(cache_dir / f"{case_id}.json")
