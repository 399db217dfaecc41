"""Synthetic 3D phantom datasets in the nnU-Net raw layout (the built-in default dataset).

Each case is a "body" ellipsoid holding a few labelled ellipsoid "organs", with smooth texture,
Gaussian noise and a multiplicative bias field; voxel spacings vary between cases and the affines
are not the identity (a small rotation and, for some cases, flipped axes: LPS-like orientation).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from numbers import Real
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage

from segshare.data.augment import rotation_matrix
from segshare.data.io import save_nifti_atomic, write_json_atomic

ORGANS = ("liver", "kidney", "spleen")
MIN_SCALED_VOXELS = 4  # fewest voxels along an axis whose drawn shape is scaled by its spacing

SpacingRange = tuple[float, float]
Spacing = SpacingRange | tuple[SpacingRange, SpacingRange, SpacingRange]


def _is_sequence(value: Any) -> bool:
    return (
        not isinstance(value, str | bytes)
        and hasattr(value, "__len__")
        and hasattr(value, "__getitem__")
    )


def _as_range(value: Any) -> SpacingRange | None:
    """``[min, max]`` with ``0 < min <= max`` as floats; ``None`` when ``value`` is not one."""
    if not _is_sequence(value) or len(value) != 2:
        return None
    if not all(isinstance(v, Real) and not isinstance(v, bool) for v in value):
        return None
    lo, hi = float(value[0]), float(value[1])
    return (lo, hi) if 0 < lo <= hi and np.isfinite(hi) else None


def parse_spacing(spacing: Any, name: str = "spacing") -> Spacing:
    """Validate a spacing setting: one ``[min, max]`` range (mm) for all three voxel axes, or three
    ranges, one per voxel axis.

    Args:
        spacing: ``[min, max]`` or ``[[min, max], [min, max], [min, max]]`` (lists, tuples or
            Hydra list nodes), ``0 < min <= max``.
        name: the setting's name in the error message.

    Returns:
        ``(min, max)`` or ``((min, max), (min, max), (min, max))`` as floats.

    Raises:
        ValueError: anything else (the message quotes the value).
    """
    single = _as_range(spacing)
    if single is not None:
        return single
    if _is_sequence(spacing) and len(spacing) == 3:
        ranges = [_as_range(r) for r in spacing]
        if all(r is not None for r in ranges):
            return tuple(ranges)  # type: ignore[return-value]
    shown = list(spacing) if _is_sequence(spacing) else spacing
    raise ValueError(
        f"{name} must be [min, max] or three [min, max] ranges, got {shown!r} "
        "(spacings in mm, 0 < min <= max)"
    )


def _draw_shape_and_spacing(
    rng: np.random.Generator, shape_range: tuple[int, int], spacing: Spacing
) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """One case's voxel shape and spacing (see :func:`generate_synthetic_dataset` for the rule)."""
    shape = rng.integers(shape_range[0], shape_range[1] + 1, 3)
    if not isinstance(spacing[0], tuple):  # one range for all axes: shapes ignore spacing
        drawn = np.round(rng.uniform(*spacing, 3), 3)
        return tuple(int(s) for s in shape), tuple(float(s) for s in drawn)
    lows, highs = (np.array(v) for v in zip(*spacing, strict=True))
    drawn = np.round(rng.uniform(lows, highs), 3)
    axis_median = (lows + highs) / 2  # the median of a uniform draw on [low, high]
    scale = np.median(axis_median) / axis_median
    scaled = np.maximum(MIN_SCALED_VOXELS, np.rint(shape * scale))
    return tuple(int(s) for s in scaled), tuple(float(s) for s in drawn)


def make_affine(
    spacing: tuple[float, float, float],
    rng: np.random.Generator,
    max_deg: float = 10.0,
    flip: bool = False,
) -> np.ndarray:
    """A 4x4 voxel-to-world affine: spacing, a small rotation, optional LPS flip."""
    lin = rotation_matrix(np.deg2rad(rng.uniform(-max_deg, max_deg, 3))) @ np.diag(spacing)
    if flip:
        lin = np.diag([-1.0, -1.0, 1.0]) @ lin
    aff = np.eye(4)
    aff[:3, :3] = lin
    aff[:3, 3] = rng.uniform(-50, 50, 3)
    return aff


def _ellipsoid(shape: tuple[int, ...], center: np.ndarray, radii: np.ndarray) -> np.ndarray:
    grids = np.ogrid[tuple(slice(0, s) for s in shape)]
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grids, center, radii, strict=True)) <= 1.0


def make_phantom(
    shape: tuple[int, int, int],
    rng: np.random.Generator,
    num_organs: int = 2,
    ct_like: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """One phantom volume and its label map.

    Args:
        shape: ``(D, H, W)`` voxels.
        rng: the random generator.
        num_organs: labelled organs (labels 1..num_organs).
        ct_like: Hounsfield-like intensities (air -1000 outside the body) instead of MR-like
            (0 outside the body, so cropping to the nonzero box has something to remove).

    Returns:
        image ``(D, H, W)`` float32 and label ``(D, H, W)`` uint8.
    """
    shape_arr = np.asarray(shape, dtype=float)
    body = _ellipsoid(shape, shape_arr / 2, shape_arr * rng.uniform(0.36, 0.46, 3))
    label = np.zeros(shape, np.uint8)
    base = [40.0, 60.0, 90.0] if ct_like else [300.0, 500.0, 700.0]
    image = np.where(body, 20.0 if ct_like else 200.0, -1000.0 if ct_like else 0.0)
    for k in range(1, num_organs + 1):
        center = shape_arr / 2 + rng.uniform(-0.15, 0.15, 3) * shape_arr
        organ = _ellipsoid(shape, center, shape_arr * rng.uniform(0.08, 0.18, 3)) & body
        label[organ] = k
        image[organ] = base[(k - 1) % 3] + 20 * k
    texture = ndimage.gaussian_filter(rng.standard_normal(shape), 1.5) * 40
    grids = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    bias = 1.0 + 0.15 * sum(c * g for c, g in zip(rng.uniform(-1, 1, 3), grids, strict=True))
    noisy = (image + texture * body) * (bias if not ct_like else 1.0)
    noisy = noisy + rng.normal(0, 15 if ct_like else 20, shape) * body
    return noisy.astype(np.float32), label


#: The channels of the BraTS-like phantoms, and each tissue's mean intensity in them:
#: brain, edema (label 1), necrotic/non-enhancing core (2), enhancing tumor (3).
BRATS_CHANNELS = ("T1", "T1ce", "T2", "FLAIR")
_BRATS_INTENSITY = np.array(
    [
        [400.0, 340.0, 260.0, 300.0],  # T1
        [400.0, 380.0, 280.0, 760.0],  # T1ce: enhancing is bright
        [400.0, 720.0, 640.0, 520.0],  # T2
        [350.0, 780.0, 480.0, 560.0],  # FLAIR: edema is bright
    ]
)
#: nnU-Net's BraTS regions (labels 1 edema, 2 non-enhancing core, 3 enhancing) and their order.
BRATS_LABELS = {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing": 3}
BRATS_REGIONS_CLASS_ORDER = [1, 2, 3]


def make_brats_phantom(
    shape: tuple[int, int, int], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """One BraTS-like case: a brain with one tumor of nested structures, in 4 MR channels.

    The tumor is an ellipsoid of edema (label 1) around a core ellipsoid whose outer shell,
    1-2 voxels thick, is enhancing tumor (3) and whose inside is necrotic core (2): whole tumor
    (1, 2, 3) contains tumor core (2, 3) contains enhancing (3), as BraTS's regions nest. Each
    tissue has its own mean in each channel (:data:`_BRATS_INTENSITY`), so no single channel
    separates every label.

    Returns:
        image ``(4, D, H, W)`` float32 (T1, T1ce, T2, FLAIR) and label ``(D, H, W)`` uint8.
    """
    shape_arr = np.asarray(shape, dtype=float)
    brain = _ellipsoid(shape, shape_arr / 2, shape_arr * rng.uniform(0.38, 0.46, 3))
    center = shape_arr / 2 + rng.uniform(-0.1, 0.1, 3) * shape_arr
    radii = shape_arr * rng.uniform(0.18, 0.26, 3)
    whole = _ellipsoid(shape, center, radii) & brain
    core = _ellipsoid(shape, center + rng.uniform(-0.2, 0.2, 3) * radii, radii * 0.65) & whole
    inner = ndimage.binary_erosion(core, iterations=int(rng.integers(1, 3)))
    label = np.zeros(shape, np.uint8)
    label[whole] = 1
    label[core] = 3
    label[inner] = 2
    tissue = np.where(brain, label.astype(int) + 1, 0)  # 0 outside, 1 brain, 2..4 labels 1..3
    texture = ndimage.gaussian_filter(rng.standard_normal(shape), 1.5) * 40
    channels = []
    for means in _BRATS_INTENSITY:
        lookup = np.concatenate([[0.0], means])
        chan = lookup[tissue] * rng.uniform(0.8, 1.2)
        chan = chan + (texture + rng.normal(0, 25, shape)) * brain
        channels.append(chan.astype(np.float32))
    return np.stack(channels), label


def _write_case(
    root: Path,
    case_id: str,
    img: np.ndarray,
    lbl: np.ndarray,
    aff: np.ndarray,
    num_channels: int,
    rng: np.random.Generator,
    split: str = "Tr",
) -> None:
    for c in range(num_channels):
        if img.ndim == 4:  # the channels themselves
            chan = img[c]
        else:  # channel 0 and rescaled, noisier copies of it
            chan = img if c == 0 else (img * rng.uniform(0.5, 1.5) + rng.normal(0, 10, img.shape))
        save_nifti_atomic(
            nib.Nifti1Image(chan.astype(np.float32), aff),
            root / f"images{split}" / f"{case_id}_{c:04d}.nii.gz",
        )
    save_nifti_atomic(nib.Nifti1Image(lbl, aff), root / f"labels{split}" / f"{case_id}.nii.gz")


def generate_synthetic_dataset(
    out_dir: str | os.PathLike,
    num_cases: int = 24,
    seed: int = 0,
    shape_range: tuple[int, int] = (28, 40),
    spacing: Spacing = (0.8, 1.6),
    num_organs: int = 2,
    num_channels: int = 1,
    ct_like: bool = False,
    num_test_cases: int = 0,
    overwrite: bool = True,
    kind: str = "phantoms",
) -> Path:
    """Write a synthetic dataset in the nnU-Net raw layout.

    Args:
        out_dir: the dataset folder to create (``imagesTr/``, ``labelsTr/``, ``dataset.json``).
        num_cases: number of cases.
        seed: random seed (same seed, same files).
        shape_range: inclusive min/max voxels per axis, drawn independently for each axis.
        spacing: voxel spacing in mm, drawn uniformly per case and axis (rounded to 0.001 mm):
            one ``(min, max)`` range for all three voxel axes (shapes are then drawn from
            ``shape_range`` regardless of spacing), or three ranges, one per voxel axis, e.g.
            ``((0.6, 0.7), (0.6, 0.7), (3.5, 4.5))`` for thick slices along the last axis. With
            three ranges, each axis's drawn shape is multiplied by
            ``median(m_0, m_1, m_2) / m_axis``, where ``m_a = (min_a + max_a) / 2`` is the median
            spacing of axis ``a``, rounded, and kept at 4 voxels or more: a thick axis gets
            correspondingly fewer voxels, so the phantom keeps its physical size (the example:
            28-40 voxels in-plane, 5-6 slices).
        num_organs: foreground labels.
        num_channels: image channels per case (``{case}_{XXXX}`` files).
        ct_like: CT-like intensities; ``dataset.json`` then names the channels "CT".
        num_test_cases: held-out cases written to ``imagesTs/`` and ``labelsTs/`` (numbered after
            the training cases, drawn after them, so they never change the training cases).
        overwrite: replace an existing ``out_dir``. ``False``: an existing ``out_dir`` is kept
            (returned at once), also when it appears while this call generates (another process
            made it meanwhile): it is never replaced under a reader; this call's copy is dropped.
        kind: ``"phantoms"`` (ellipsoid organs, labels ``1..num_organs``) or ``"brats"``
            (:func:`make_brats_phantom`: 4 channels, nested tumor labels, and a ``dataset.json``
            with nnU-Net's BraTS regions and ``regions_class_order``; ``num_channels`` must be 4,
            ``num_organs`` and ``ct_like`` do not apply).

    Returns:
        ``out_dir``. The folder is built under a temporary name and renamed into place.
    """
    out = Path(out_dir)
    if num_cases < 1:
        raise ValueError(f"num_cases must be >= 1, got {num_cases}")
    spacing = parse_spacing(spacing)
    if kind not in SYNTHETIC_KINDS:
        raise ValueError(f"data.synthetic.kind must be one of {SYNTHETIC_KINDS}, got {kind!r}")
    if kind == "brats" and num_channels != len(BRATS_CHANNELS):
        raise ValueError(
            f"data.synthetic.kind=brats writes {len(BRATS_CHANNELS)} channels {BRATS_CHANNELS}, "
            f"got num_channels={num_channels} (data/synthetic=brats sets both)"
        )
    if out.exists() and not overwrite:
        return out
    rng = np.random.default_rng(seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for i in range(num_cases + num_test_cases):
            shape, case_spacing = _draw_shape_and_spacing(rng, shape_range, spacing)
            aff = make_affine(case_spacing, rng, flip=bool(i % 3 == 1))
            if kind == "brats":
                img, lbl = make_brats_phantom(shape, rng)
            else:
                img, lbl = make_phantom(shape, rng, num_organs=num_organs, ct_like=ct_like)
            split = "Tr" if i < num_cases else "Ts"
            _write_case(tmp, f"case_{i:03d}", img, lbl, aff, num_channels, rng, split)
        modality = "CT" if ct_like else "MR"
        meta: dict[str, Any] = {
            "name": "segshare-synthetic",
            "description": f"Synthetic ellipsoid phantoms (seed {seed})",
            "channel_names": {str(c): modality for c in range(num_channels)},
            "labels": {
                "background": 0,
                **{ORGANS[k % 3] + (f"_{k}" if k >= 3 else ""): k + 1 for k in range(num_organs)},
            },
            "numTraining": num_cases,
            "numTest": num_test_cases,
            "file_ending": ".nii.gz",
        }
        if kind == "brats":
            meta["description"] = f"Synthetic BraTS-like tumors, regions (seed {seed})"
            meta["channel_names"] = {str(c): name for c, name in enumerate(BRATS_CHANNELS)}
            meta["labels"] = dict(BRATS_LABELS)
            meta["regions_class_order"] = list(BRATS_REGIONS_CLASS_ORDER)
        write_json_atomic(meta, tmp / "dataset.json")
        if out.exists() and overwrite:
            shutil.rmtree(out)
        try:
            os.replace(tmp, out)  # fails on an existing non-empty folder: it is never clobbered
        except OSError:
            if overwrite or not out.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


#: What :func:`generate_synthetic_dataset` can draw.
SYNTHETIC_KINDS = ("phantoms", "brats")


@dataclass(frozen=True)
class SyntheticSpec:
    """The synthetic dataset to generate at a dataset root that does not exist yet
    (``conf/data/synthetic/phantoms.yaml``); fields as :func:`generate_synthetic_dataset`.

    Attributes:
        generate_if_missing: generate at a missing root; False: a missing root is an error.
        spacing: ``[min, max]`` mm for all axes, or three ranges, one per voxel axis (validated
            and stored as tuples on construction; see :func:`generate_synthetic_dataset`).
    """

    generate_if_missing: bool
    num_cases: int
    num_test_cases: int
    seed: int
    shape_range: tuple[int, int]
    spacing: Spacing
    num_organs: int
    num_channels: int
    kind: str = "phantoms"

    def __post_init__(self) -> None:
        object.__setattr__(self, "spacing", parse_spacing(self.spacing, "data.synthetic.spacing"))

    def generate(self, out_dir: str | os.PathLike, overwrite: bool = True) -> Path:
        """Write this dataset to ``out_dir`` (see :func:`generate_synthetic_dataset`)."""
        fields = {k: v for k, v in asdict(self).items() if k != "generate_if_missing"}
        fields["shape_range"] = tuple(int(v) for v in fields["shape_range"])
        return generate_synthetic_dataset(out_dir, overwrite=overwrite, **fields)


def ensure_dataset(root: str | os.PathLike, synthetic: SyntheticSpec | None = None) -> Path:
    """Return ``root``, generating ``synthetic`` there first when the folder is missing and
    ``synthetic.generate_if_missing`` is true.

    Raises:
        ValueError: the root does not exist and is not to be generated.
    """
    root = Path(root)
    if not root.exists() and synthetic is not None and synthetic.generate_if_missing:
        # a concurrent run (multirun, joblib) may have made it meanwhile: never overwrite
        synthetic.generate(root, overwrite=False)
    if not root.exists():
        raise ValueError(f"data.root: dataset folder {root} does not exist")
    return root
