"""Derive a thick-slice dataset: keep every ``factor``-th slice along one voxel axis of every case.

    python scripts/make_thick_slices.py ../shared/data/Task04_Hippocampus /tmp/hippo_thick
    python scripts/make_thick_slices.py SRC DST --axis 2 --factor 3 --max-cases 3

``SRC`` is a dataset folder (MSD, nnU-Net raw or plain layout, read by
``segshare.data.discovery``). For each training case, slices ``0, factor, 2 * factor, ...`` along
voxel axis ``axis`` of every image channel and of the label (the same slices: nearest, never
interpolated) are written to ``DST`` under the same relative paths, with that axis's spacing
multiplied by ``factor``: new affine = old affine @ diag(scale), so each kept slice keeps its world
position (slice 0 is kept, so the origin stays). Stored voxel values and data types are kept.
``dataset.json`` is copied with ``name`` suffixed " (thick slices xN)", the ``training`` list (MSD)
and ``numTraining`` reduced to the converted cases; test cases are not converted (``numTest`` 0,
``test`` empty). Every file is written atomically. Prints one summary line; exit status 2 with a
one-line error for bad input (missing ``SRC``, no cases, axis out of range, factor < 2, ``DST``
inside the repository, equal to or inside ``SRC``).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from segshare.data.discovery import Case, discover_dataset, is_inside, subset_dataset_json
from segshare.data.io import (
    load_nifti,
    read_json,
    read_label_voxels,
    save_nifti_atomic,
    write_json_atomic,
)

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Summary:
    """What :func:`make_thick_slices` converted: per-case voxel shapes and spacings (mm, voxel
    axis order) of the first image, before and after (arrays ``(cases, 3)``)."""

    cases: int
    old_shapes: np.ndarray
    new_shapes: np.ndarray
    old_spacings: np.ndarray
    new_spacings: np.ndarray

    def line(self, axis: int, factor: int) -> str:
        """The one-line report."""

        def fmt(values: np.ndarray) -> str:
            return "x".join(f"{v:g}" for v in np.round(np.median(values, axis=0), 3))

        return (
            f"{self.cases} cases, axis {axis} x{factor}: median shape {fmt(self.old_shapes)} -> "
            f"{fmt(self.new_shapes)}, median spacing {fmt(self.old_spacings)} -> "
            f"{fmt(self.new_spacings)} mm"
        )


def _check(src: Path, dst: Path, axis: int, factor: int, max_cases: int | None) -> None:
    """Refuse bad arguments before anything is written (``ValueError`` naming the problem)."""
    if not src.is_dir():
        raise ValueError(f"SRC {src}: dataset folder does not exist")
    if not 0 <= axis <= 2:
        raise ValueError(f"--axis must be 0, 1 or 2 (a voxel axis), got {axis}")
    if factor < 2:
        raise ValueError(f"--factor must be >= 2, got {factor}")
    if max_cases is not None and max_cases < 1:
        raise ValueError(f"--max-cases must be >= 1, got {max_cases}")
    src_r, dst_r = src.resolve(), dst.resolve()
    if dst_r == src_r or is_inside(src_r, dst_r):
        raise ValueError(f"DST {dst} is SRC or inside it; choose a folder outside {src}")
    if is_inside(REPO, dst_r):
        raise ValueError(f"DST {dst} is inside the repository {REPO}; choose a folder outside it")


def thin_image(img: nib.Nifti1Image, path: Path, axis: int, factor: int) -> nib.Nifti1Image:
    """Every ``factor``-th slice along voxel ``axis`` (from slice 0), with the stored values and
    data type, the affine ``img.affine @ diag(scale)`` (``factor`` on that axis) and the source's
    sform/qform codes."""
    data = read_label_voxels(img, path)  # the stored integers, or float32 when scaled or float
    index = [slice(None)] * data.ndim
    index[axis] = slice(None, None, factor)
    scale = np.ones(4)
    scale[axis] = factor
    affine = img.affine @ np.diag(scale)
    out = nib.Nifti1Image(data[tuple(index)], affine, header=img.header)
    out.set_data_dtype(data.dtype)
    sform_code, qform_code = int(img.header["sform_code"]), int(img.header["qform_code"])
    if sform_code or qform_code:  # keep the source's codes (the constructor resets them)
        out.set_sform(affine, code=sform_code)
        out.set_qform(affine, code=qform_code)
    return out


def _convert_case(case: Case, src: Path, dst: Path, axis: int, factor: int) -> tuple:
    """Write one case's thinned files; ``(old shape, new shape, old spacing, new spacing)`` of its
    first image."""
    stats = []
    for path in [*case.images, *([case.label] if case.label is not None else [])]:
        img = load_nifti(path)
        out = thin_image(img, path, axis, factor)
        save_nifti_atomic(out, dst / path.relative_to(src))
        stats.append((img.shape[:3], out.shape[:3], *map(_spacing, (img, out))))
    return stats[0]


def _spacing(img: nib.Nifti1Image) -> np.ndarray:
    """Voxel spacing (mm) in voxel axis order: the norms of the affine's columns."""
    return np.linalg.norm(img.affine[:3, :3], axis=0)


def _write_dataset_json(src: Path, dst: Path, cases: list[Case], factor: int) -> None:
    """``dataset.json`` of ``SRC`` for the converted cases (none written when ``SRC`` has none)."""
    if not (src / "dataset.json").is_file():
        return
    meta = subset_dataset_json(read_json(src / "dataset.json"), {c.case_id for c in cases})
    meta["name"] = f"{meta.get('name', src.name)} (thick slices x{factor})"
    if "numTest" in meta:
        meta["numTest"] = 0
    if "test" in meta:
        meta["test"] = []
    write_json_atomic(meta, dst / "dataset.json")


def make_thick_slices(
    src: str | Path, dst: str | Path, axis: int = 2, factor: int = 3, max_cases: int | None = None
) -> Summary:
    """Write the thick-slice version of dataset ``src`` to ``dst`` (see the module docstring).

    Args:
        src: the source dataset folder.
        dst: the output folder (outside the repository, not ``src``); files there are replaced.
        axis: the voxel axis to thin (0, 1 or 2).
        factor: keep every ``factor``-th slice (>= 2).
        max_cases: convert only the first ``max_cases`` cases (by case id); None: all.

    Returns:
        The Summary (per-case shapes and spacings, before and after).

    Raises:
        ValueError: bad arguments, a dataset without cases or with problems, an unreadable file.
    """
    src, dst = Path(src), Path(dst)
    _check(src, dst, axis, factor, max_cases)
    dataset = discover_dataset(src)
    if dataset.problems:
        path, message = dataset.problems[0]
        raise ValueError(f"SRC {src}: {len(dataset.problems)} problem(s), first: {path}: {message}")
    cases = dataset.cases[:max_cases]
    if not cases:
        raise ValueError(f"SRC {src}: no cases found")
    stats = [_convert_case(case, src, dst, axis, factor) for case in cases]
    _write_dataset_json(src, dst, cases, factor)
    columns = [np.array([s[k] for s in stats], dtype=float) for k in range(4)]
    return Summary(len(cases), *columns)


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path, metavar="SRC", help="source dataset folder")
    parser.add_argument("dst", type=Path, metavar="DST", help="output folder (outside the repo)")
    parser.add_argument("--axis", type=int, default=2, help="voxel axis to thin (default 2)")
    parser.add_argument("--factor", type=int, default=3, help="keep every N-th slice (default 3)")
    parser.add_argument("--max-cases", type=int, default=None, help="convert the first N cases")
    args = parser.parse_args(argv)
    try:
        summary = make_thick_slices(args.src, args.dst, args.axis, args.factor, args.max_cases)
    except ValueError as err:  # NiftiReadError included
        print(f"make_thick_slices: error: {err}", file=sys.stderr)
        return 2
    print(f"{args.src} -> {args.dst}: {summary.line(args.axis, args.factor)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
