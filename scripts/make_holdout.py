"""Derive a dataset with a labelled hold-out test set: a seeded fraction of the cases moves to
``imagesTs/`` + ``labelsTs/``, the rest stays the training set.

    python scripts/make_holdout.py ../shared/data/Task04_Hippocampus /tmp/hippo_holdout
    python scripts/make_holdout.py SRC DST --fraction 0.2 --seed 0

Cross-validation uses every training case for validation once, so it cannot say how a 5-fold
ensemble compares with its single folds: each case's ensemble holds four models trained on it.
The held-out cases can (``segshare-predict input=DST/imagesTs``, then ``segshare-evaluate
reference=DST/labelsTs``).

``SRC`` is a dataset folder (MSD, nnU-Net raw or plain layout, read by
``segshare.data.discovery``). ``round(fraction * cases)`` cases (at least one, at most all but
two), drawn with ``seed`` from the sorted case ids, become test cases. ``DST`` holds symbolic
links to the source files, nothing is copied: the training cases under their relative paths,
the test cases' image files in ``imagesTs/`` and label files in ``labelsTs/`` under their own
names. ``dataset.json`` is copied with ``name`` suffixed " (hold-out N)", ``training`` (MSD) and
``numTraining`` reduced to the training cases, ``test`` listing the test images and ``numTest``
their count. Prints one line; exit status 2 with a one-line error for bad input (missing
``SRC``, problems in it, a fraction outside (0, 1), ``DST`` existing, inside the repository,
equal to or inside ``SRC``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

from segshare.data.discovery import Case, discover_dataset, is_inside, subset_dataset_json
from segshare.data.io import atomic_folder, read_json, write_json_atomic

REPO = Path(__file__).resolve().parents[1]


def _check(src: Path, dst: Path, fraction: float) -> None:
    """Refuse bad arguments before anything is written (``ValueError`` naming the problem)."""
    if not src.is_dir():
        raise ValueError(f"SRC {src}: dataset folder does not exist")
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"--fraction must be in (0, 1), got {fraction}")
    if dst.exists() or dst.is_symlink():
        raise ValueError(f"DST {dst} exists; choose a new folder (nothing is replaced)")
    src_r, dst_r = src.resolve(), dst.resolve()
    if dst_r == src_r or is_inside(src_r, dst_r):
        raise ValueError(f"DST {dst} is SRC or inside it; choose a folder outside {src}")
    if is_inside(REPO, dst_r):
        raise ValueError(f"DST {dst} is inside the repository {REPO}; choose a folder outside it")


def choose_test_cases(case_ids: list[str], fraction: float, seed: int) -> list[str]:
    """``round(fraction * n)`` case ids (clipped to ``[1, n - 2]``), drawn with ``seed`` from the
    sorted ids, returned sorted. The same ids, fraction and seed give the same cases."""
    ids = sorted(case_ids)
    if len(ids) < 3:
        raise ValueError(f"{len(ids)} cases: a hold-out needs at least 3 (two stay for training)")
    count = min(max(round(fraction * len(ids)), 1), len(ids) - 2)
    order = np.random.default_rng(seed).permutation(len(ids))
    return sorted(ids[i] for i in order[:count])


def _link(target: Path, link: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target.resolve(), link)


def _link_case(case: Case, src: Path, tmp: Path, test: bool) -> None:
    """Links to one case's files: under their relative paths, or in ``imagesTs``/``labelsTs``."""
    for image in case.images:
        _link(image, tmp / "imagesTs" / image.name if test else tmp / image.relative_to(src))
    if case.label is not None:
        label = tmp / "labelsTs" / case.label.name if test else tmp / case.label.relative_to(src)
        _link(case.label, label)


def _write_dataset_json(src: Path, tmp: Path, train: list[Case], test: list[Case]) -> None:
    """``dataset.json`` of ``SRC`` for the split (none written when ``SRC`` has none)."""
    if not (src / "dataset.json").is_file():
        return
    meta = subset_dataset_json(read_json(src / "dataset.json"), {c.case_id for c in train})
    meta["name"] = f"{meta.get('name', src.name)} (hold-out {len(test)})"
    meta["numTest"] = len(test)
    meta["test"] = [f"imagesTs/{c.images[0].name}" for c in test]
    write_json_atomic(meta, tmp / "dataset.json")


def make_holdout(
    src: str | Path, dst: str | Path, fraction: float = 0.2, seed: int = 0
) -> tuple[list[str], list[str]]:
    """Write the hold-out version of dataset ``src`` to ``dst`` (see the module docstring).

    Returns:
        ``(training case ids, test case ids)``.

    Raises:
        ValueError: bad arguments, a dataset without cases, with problems or unlabelled cases.
    """
    src, dst = Path(src), Path(dst)
    _check(src, dst, fraction)
    dataset = discover_dataset(src)
    if dataset.problems:
        path, message = dataset.problems[0]
        raise ValueError(f"SRC {src}: {len(dataset.problems)} problem(s), first: {path}: {message}")
    unlabelled = [c.case_id for c in dataset.cases if c.label is None]
    if unlabelled:
        raise ValueError(f"SRC {src}: cases without a label: {', '.join(unlabelled[:5])}")
    chosen = set(choose_test_cases(dataset.case_ids, fraction, seed))
    train = [c for c in dataset.cases if c.case_id not in chosen]
    test = [c for c in dataset.cases if c.case_id in chosen]
    with atomic_folder(dst) as tmp:
        for case in dataset.cases:
            _link_case(case, src, tmp, case.case_id in chosen)
        _write_dataset_json(src, tmp, train, test)
    return [c.case_id for c in train], [c.case_id for c in test]


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path, metavar="SRC", help="source dataset folder")
    parser.add_argument(
        "dst", type=Path, metavar="DST", help="new output folder (outside the repo)"
    )
    parser.add_argument("--fraction", type=float, default=0.2, help="test fraction (default 0.2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the draw (default 0)")
    args = parser.parse_args(argv)
    try:
        train, test = make_holdout(args.src, args.dst, args.fraction, args.seed)
    except ValueError as err:
        print(f"make_holdout: error: {err}", file=sys.stderr)
        return 2
    print(f"{args.src} -> {args.dst}: {len(train)} training cases, {len(test)} test cases")
    return 0


if __name__ == "__main__":
    sys.exit(main())
