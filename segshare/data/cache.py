"""The cache of preprocessed cases: ``.npy`` arrays (memory-mappable) + per-case properties JSON.

Layout of ``<preprocessed_dir>/cache_<key>/`` where ``key`` hashes the plan (so a config change
gives a new folder and an unchanged one is reused):

* ``plan.json``: the plan the folder was built with;
* per case ``<id>_image.npy`` ``(D, H, W, C)`` float32, ``<id>_label.npy`` ``(D, H, W)`` uint8,
  ``<id>.json`` (properties for :func:`restore_to_original` + foreground locations for sampling).

Each file is written to a temporary name and renamed; ``<id>.json`` is written last and marks a
finished case, so an interrupted run leaves no half-written case and resumes where it stopped.
Workers each hold one case in memory at a time.

``<id>.json`` also records the signature of the case's source files (``sources``: per image file
and the label, :func:`segshare.data.io.file_signature`, taken before they are read). A case whose
files no longer match (a label or image corrected in place) is rebuilt by the next run; cases
written before signatures existed are rebuilt once. One run fills a folder at a time (a lock
file, ``.lock``); it first deletes the temporaries a killed run left there.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from segshare.data.discovery import Case, Dataset
from segshare.data.io import (
    file_signature,
    filling_folder,
    read_json,
    save_npy_atomic,
    write_json_atomic,
)
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


def source_signature(case: Case, signatures: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The signature of a case's source files: ``{"images": [...], "label": ...}``, one
    :func:`segshare.data.io.file_signature` each (from ``signatures`` by path when given there).

    Paths are not part of it, so a dataset moved with its timestamps (``mv``) keeps its cache.
    """

    def sig(path: Path) -> Any:
        key = str(path)
        return signatures[key] if signatures and key in signatures else file_signature(path)

    signature = {
        "images": [sig(p) for p in case.images],
        "label": None if case.label is None else sig(case.label),
    }
    return json.loads(json.dumps(signature))  # as it reads back from the JSON


def is_current(cache_dir: Path, case: Case, signature: dict[str, Any]) -> bool:
    """A case is complete and was built from source files with this ``signature``."""
    if not is_cached(cache_dir, case.case_id):
        return False
    try:
        props = read_json(cache_dir / f"{case.case_id}.json")
    except (OSError, ValueError):
        return False
    return props.get("sources") == signature


def class_locations(
    label: np.ndarray,
    seed: int,
    per_class: int = LOCATIONS_PER_CLASS,
    ignore_label: int | None = None,
) -> dict:
    """Up to ``per_class`` random voxel indices ``[i, j, k]`` of each foreground class (never of
    ``ignore_label``: no patch is centred on unannotated voxels)."""
    rng = np.random.default_rng(seed)
    out = {}
    for c in np.unique(label):
        if c == 0 or c == ignore_label:
            continue
        idx = np.argwhere(label == c)
        if len(idx) > per_class:
            idx = idx[rng.choice(len(idx), per_class, replace=False)]
        out[str(int(c))] = idx.tolist()
    return out


def _case_seed(case_id: str) -> int:
    return int(hashlib.sha256(case_id.encode()).hexdigest()[:8], 16)


def cache_case(
    case: Case, cache_dir: Path, plan: Plan, signature: dict[str, Any] | None = None
) -> int:
    """Preprocess one case into the cache unless it is current; returns bytes written.

    Args:
        case: the case.
        cache_dir: the cache folder.
        plan: the preprocessing plan.
        signature: :func:`source_signature` of the case, taken before its files are read
            (computed here when None).

    A stale case's ``<id>.json`` is deleted first, so while it is rebuilt it reads as
    incomplete, never as the old properties over new arrays.
    """
    signature = source_signature(case) if signature is None else signature
    if is_current(cache_dir, case, signature):
        return 0
    stem = cache_dir / case.case_id
    Path(f"{stem}.json").unlink(missing_ok=True)
    image, label, props = preprocess_case(case.images, case.label, plan)
    save_npy_atomic(image.astype(np.float32, copy=False), Path(f"{stem}_image.npy"))
    nbytes = image.nbytes
    if label is not None:
        save_npy_atomic(label, Path(f"{stem}_label.npy"))
        props["class_locations"] = class_locations(
            label, _case_seed(case.case_id), ignore_label=plan.ignore_label
        )
        nbytes += label.nbytes
    else:
        Path(f"{stem}_label.npy").unlink(missing_ok=True)
    props["case_id"] = case.case_id
    props["sources"] = signature
    write_json_atomic(props, Path(f"{stem}.json"))
    return nbytes


def _cache_star(args: tuple) -> tuple[str, int]:
    case, cache_dir, plan_dict, signature = args
    try:
        return case.case_id, cache_case(case, cache_dir, Plan.from_dict(plan_dict), signature)
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
    signatures: Mapping[str, Any] | None = None,
) -> Path:
    """Preprocess every case of ``dataset`` into the cache folder keyed by ``plan``.

    Args:
        dataset: the (validated) dataset.
        out_dir: the preprocessed folder (``data.preprocessed_dir``).
        plan: the preprocessing plan.
        num_workers: worker processes (<= 1: in this process).
        progress: show a tqdm progress bar.
        signatures: :func:`segshare.data.io.file_signature` by path, taken before the files were
            first read (by validation); missing ones are taken here.

    Returns:
        The cache folder. Cases there built from the same source files are reused; cases whose
        files changed since are rebuilt.
    """
    cache_dir = cache_dir_for(out_dir, plan)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with filling_folder(cache_dir):
        if not (cache_dir / "plan.json").exists():
            plan.save(cache_dir / "plan.json")
        jobs = []
        for case in dataset.cases:
            signature = source_signature(case, signatures)
            if not is_current(cache_dir, case, signature):
                jobs.append((case, cache_dir, plan.to_dict(), signature))
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
