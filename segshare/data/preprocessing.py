"""Invertible preprocessing of one case: reorient -> crop -> normalise -> resample, and back.

Forward (:func:`preprocess_case`): reorient to the closest canonical (RAS) voxel order, crop to
the bounding box of nonzero image (and label) voxels, normalise intensities per channel (z-score, or
CT clip + z-score with dataset statistics), resample to the plan's target spacing (images spline
order 3, labels one-hot linear + argmax; nearest along an anisotropic axis).

Inverse (:func:`restore_to_original`): resample back to the cropped shape, pad the crop back
(background), undo the reorientation. The ``properties`` dict holds everything needed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel import orientations as ornt_mod

from segshare.data.io import (
    header_problem,
    load_nifti,
    read_json,
    read_label_voxels,
    read_voxels,
    write_json_atomic,
)
from segshare.data.resample import (
    anisotropic_axis,
    bounding_box,
    compute_new_shape,
    resample_image,
    resample_label,
    resample_probabilities,
)

PLAN_VERSION = 1
_RAS = ornt_mod.axcodes2ornt(("R", "A", "S"))
#: Largest intensity magnitude accepted: the square root of float32's largest value, beyond which
#: a squared deviation overflows float32. Beyond it a value is a fill/NoData marker (1e30,
#: NetCDF's 9.97e36, -FLT_MAX), never a measurement; such a scan is refused (like NaN/Inf).
MAX_INTENSITY = float(np.sqrt(np.finfo(np.float32).max))
#: Elements per chunk when :func:`mean_std` accumulates in float64.
_STAT_CHUNK = 2**22


@dataclass
class Plan:
    """How a dataset is preprocessed (saved as ``plan.json`` beside the cache and in each run).

    Attributes:
        target_spacing: voxel spacing (mm) of the preprocessed grid, RAS axis order.
        normalization: per channel, ``"zscore"`` (per image) or ``"ct"`` (dataset statistics).
        ct_stats: per channel ``{"p005", "p995", "mean", "std"}`` of foreground intensities
            (None entries for z-scored channels), or None.
        labels: label name -> value, background included, the ignore label not.
        in_channels: image channels.
        num_classes: the network's outputs: classes ``0..num_classes-1``, or one per region.
        anisotropy_threshold: max/min spacing ratio above which one axis is resampled separately.
        channel_names: channel index -> modality name.
        use_mask_for_norm: per channel, z-score over the nonzero voxels only and keep the rest 0
            (nnU-Net's choice when cropping to the nonzero box removed much of the volume, e.g.
            skull-stripped MR: the zero background would otherwise dominate the statistics).
        image_order: spline order for images.
        version: plan format version.
        ignore_label: the value of the voxels nobody annotated (the dataset's ``ignore``
            label, above every class) or None: left out of the losses, the oversampled
            foreground and every metric.
        regions: region name -> label values when the dataset declares regions (nnU-Net's
            region-based training): the network has one sigmoid output per region
            (``num_classes`` of them) instead of softmax classes; None otherwise.
        regions_class_order: with regions, the value each region writes into the predicted
            label map, in order (:func:`segshare.regions.regions_to_labels`).
        configurations: the planner's network, patch and batch per configuration
            (``3d_fullres``, ``2d``, ``3d_lowres``; see ``segshare.data.planner``); not part of
            the preprocessing, so not part of the cache key.
    """

    target_spacing: tuple[float, float, float]
    normalization: list[str]
    ct_stats: list[dict | None] | None
    labels: dict[str, int]
    in_channels: int
    num_classes: int
    anisotropy_threshold: float = 3.0
    channel_names: dict[str, str] = field(default_factory=dict)
    use_mask_for_norm: list[bool] | None = None
    image_order: int = 3
    version: int = PLAN_VERSION
    ignore_label: int | None = None
    regions: dict[str, list[int]] | None = None
    regions_class_order: list[int] | None = None
    configurations: dict[str, dict] = field(default_factory=dict)

    @property
    def region_values(self) -> list[list[int]] | None:
        """The values of each region, in output order (None without regions)."""
        return None if self.regions is None else [list(v) for v in self.regions.values()]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict."""
        d = asdict(self)
        d["target_spacing"] = [float(s) for s in self.target_spacing]
        return d

    def preprocessing_dict(self) -> dict[str, Any]:
        """:meth:`to_dict` without the network ``configurations``: what the cached arrays (and a
        resumed checkpoint) depend on; ``ignore_label`` and the regions only when there are
        some, so that the caches of datasets without them keep their keys."""
        optional = ("ignore_label", "regions", "regions_class_order")
        return {
            k: v
            for k, v in self.to_dict().items()
            if k != "configurations" and not (k in optional and v is None)
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError``."""
        known = set(cls.__dataclass_fields__)
        extra = set(d) - known
        if extra:
            raise ValueError(f"plan has unknown keys {sorted(extra)}")
        d = dict(d)
        d["target_spacing"] = tuple(float(s) for s in d["target_spacing"])
        return cls(**d)

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``plan.json`` atomically."""
        return write_json_atomic(self.to_dict(), path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Plan:
        """Read a ``plan.json``."""
        return cls.from_dict(read_json(path))


def reorient_to_ras(
    array: np.ndarray, affine: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Permute/flip the first three axes into the closest RAS order.

    Returns:
        ``(array_ras, affine_ras, ornt)``; ``ornt`` is the original orientation (nibabel ornt).
    """
    ornt = ornt_mod.io_orientation(affine)
    transform = ornt_mod.ornt_transform(ornt, _RAS)
    out = ornt_mod.apply_orientation(array, transform)
    new_affine = affine @ ornt_mod.inv_ornt_aff(transform, array.shape[:3])
    return out, new_affine, ornt


def spacing_of(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel spacing (mm) per voxel axis from a 4x4 affine (column norms)."""
    return tuple(float(s) for s in np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0)))


def nonzero_bbox(mask: np.ndarray) -> list[list[int]]:
    """``[[lo, hi), ...]`` per axis of the True voxels of a 3D mask (whole volume if none)."""
    if not mask.any():
        return [[0, s] for s in mask.shape]
    return [[lo, hi] for lo, hi in bounding_box(mask)]


def unnormalisable_intensities(data: np.ndarray) -> str | None:
    """Why ``data`` cannot be normalised: finite values beyond ±:data:`MAX_INTENSITY`.

    NaN/Inf are not counted here (validation and prediction refuse them with their own message).

    Returns:
        A one-line problem (how many voxels, the largest magnitude, what to do), or None.
    """
    if data.size == 0:
        return None
    hi, lo = float(np.fmax.reduce(data, axis=None)), float(np.fmin.reduce(data, axis=None))
    if max(abs(hi), abs(lo)) <= MAX_INTENSITY:  # NaN-ignoring, no copy: the common case
        return None
    magnitude = np.abs(data)
    huge = (magnitude > MAX_INTENSITY) & (magnitude != np.inf)
    count = int(np.count_nonzero(huge))
    if not count:
        return None
    largest = float(magnitude[huge].max())
    return (
        f"{count} voxel(s) of magnitude up to {largest:.3g} cannot be normalised: beyond "
        f"±{MAX_INTENSITY:.3g} a value is a fill/NoData marker, not an intensity (its square "
        f"overflows float32); refused. Replace them (e.g. with the background value) and re-run."
    )


def _open_checked(path: str | os.PathLike) -> nib.Nifti1Image:
    """:func:`load_nifti` plus :func:`segshare.data.io.header_problem` as a ``ValueError``."""
    img = load_nifti(path)
    problem = header_problem(img)
    if problem:
        raise ValueError(f"{path}: {problem}")
    return img


def load_case_arrays(
    image_paths: Sequence[str | os.PathLike], label_path: str | os.PathLike | None
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Read a case: image ``(I, J, K, C)`` float32 (file voxel order), label, affine.

    Raises:
        ValueError: naming the file, when a header has an empty axis or a non-finite affine,
            channels differ in shape, or intensities cannot be normalised
            (:func:`unnormalisable_intensities`).
    """
    chans, affine = [], None
    for p in image_paths:
        img = _open_checked(p)
        data = read_voxels(img, p)
        problem = unnormalisable_intensities(data)
        if problem:
            raise ValueError(f"{p}: {problem}")
        if affine is None:
            affine = img.affine
        chans.extend([data] if data.ndim == 3 else [data[..., c] for c in range(data.shape[-1])])
    if len({c.shape for c in chans}) != 1:
        raise ValueError(f"{image_paths[0]}: channels of this case have different shapes")
    image = chans[0][..., None] if len(chans) == 1 else np.stack(chans, axis=-1)
    label = None
    if label_path is not None:
        raw = read_label_voxels(_open_checked(label_path), label_path)
        label = raw if raw.dtype.kind in "iu" else np.rint(raw).astype(np.int16)
    return image, label, np.asarray(affine, dtype=float)


def mean_std(values: np.ndarray) -> tuple[float, float]:
    """Mean and (population) standard deviation, accumulated in float64 in chunks.

    In float32 the squared deviations of large intensities overflow (``std`` becomes inf and the
    z-scored image all zeros); chunking keeps the float64 temporaries small.
    """
    flat = values.reshape(-1)
    n = flat.size
    if n == 0:
        return 0.0, 0.0
    chunks = range(0, n, _STAT_CHUNK)
    mean = sum(float(flat[i : i + _STAT_CHUNK].sum(dtype=np.float64)) for i in chunks) / n
    sq = 0.0
    for i in chunks:
        dev = flat[i : i + _STAT_CHUNK].astype(np.float64) - mean
        sq += float(np.dot(dev, dev))
    return mean, float(np.sqrt(sq / n))


def normalize(image: np.ndarray, plan: Plan, nonzero: np.ndarray | None = None) -> np.ndarray:
    """Normalise ``(D, H, W, C)`` per channel into a float32 copy (statistics in float64).

    Args:
        image: the cropped image.
        plan: normalisation schemes (and CT statistics, masked z-score flags).
        nonzero: ``(D, H, W)`` mask of nonzero voxels, used where ``plan.use_mask_for_norm``.
    """
    out = image.astype(np.float32, copy=True)
    masked = plan.use_mask_for_norm or [False] * len(plan.normalization)
    for c, scheme in enumerate(plan.normalization):
        ch = out[..., c]
        if scheme == "ct":
            st = plan.ct_stats[c]
            np.clip(ch, st["p005"], st["p995"], out=ch)
            ch -= st["mean"]
            ch /= max(st["std"], 1e-8)
        elif scheme == "zscore" and masked[c] and nonzero is not None and nonzero.any():
            mean, std = mean_std(ch[nonzero])
            ch -= mean
            ch /= max(std, 1e-8)
            ch[~nonzero] = 0.0
        elif scheme == "zscore":
            mean, std = mean_std(ch)
            ch -= mean
            ch /= max(std, 1e-8)
        else:
            raise ValueError(f"normalization must be 'zscore' or 'ct', got {scheme!r}")
    return out


def preprocess_case(
    image_paths: Sequence[str | os.PathLike], label_path: str | os.PathLike | None, plan: Plan
) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """Preprocess one case onto the plan's grid.

    Args:
        image_paths: one file per channel, or one 4D file with channels last.
        label_path: the label map, or None (inference).
        plan: the preprocessing plan.

    Returns:
        ``(image, label, properties)``: image ``(D, H, W, C)`` float32, label ``(D, H, W)`` uint8
        or None, and a JSON-serialisable dict of what :func:`restore_to_original` needs.

    Raises:
        ValueError: naming the file, when it is unreadable, a header has an empty axis or a
            non-finite affine, intensities are beyond ±:data:`MAX_INTENSITY` (fill values), or the
            channel count differs from the plan's. NaN/Inf voxels are passed through (training
            data was validated; prediction refuses them with its own message).
    """
    image, label, affine = load_case_arrays(image_paths, label_path)
    if image.shape[-1] != plan.in_channels:
        raise ValueError(
            f"{image_paths[0]}: {image.shape[-1]} channels, plan expects {plan.in_channels}"
        )
    orig_shape = image.shape[:3]
    image, affine_ras, ornt = reorient_to_ras(image, affine)
    if label is not None:
        label, _, _ = reorient_to_ras(label, affine)
    spacing = spacing_of(affine_ras)
    nonzero = (image != 0).any(axis=-1)
    mask = nonzero | (label > 0) if label is not None else nonzero
    bbox = nonzero_bbox(mask)
    crop = tuple(slice(lo, hi) for lo, hi in bbox)
    image = normalize(image[crop], plan, nonzero[crop])
    cropped_shape = image.shape[:3]
    new_shape = compute_new_shape(cropped_shape, spacing, plan.target_spacing)
    axis = anisotropic_axis(spacing, plan.target_spacing, plan.anisotropy_threshold)
    image = resample_image(image, new_shape, order=plan.image_order, axis=axis)
    if label is not None:
        label = resample_label(label[crop], new_shape, axis=axis)
    scale = np.diag([*(c / n for c, n in zip(cropped_shape, new_shape, strict=True)), 1.0])
    scale[:3, 3] = [lo + (sc - 1) / 2 for (lo, _), sc in zip(bbox, np.diag(scale)[:3], strict=True)]
    props = {
        "original_shape": [int(s) for s in orig_shape],
        "original_affine": np.asarray(affine).tolist(),
        "original_orientation": "".join(ornt_mod.ornt2axcodes(ornt)),
        "original_ornt": ornt.tolist(),
        "original_spacing": list(spacing_of(affine)),
        "reoriented_shape": [int(s) for s in mask.shape],
        "spacing": list(spacing),
        "crop_bbox": bbox,
        "cropped_shape": [int(s) for s in cropped_shape],
        "target_spacing": [float(s) for s in plan.target_spacing],
        "resampled_shape": [int(s) for s in new_shape],
        "anisotropic_axis": axis,
        "preprocessed_affine": (affine_ras @ scale).tolist(),
        "num_channels": int(image.shape[-1]),
    }
    return image, label, props


def restore_to_original(
    array: np.ndarray, properties: dict[str, Any], is_label: bool
) -> np.ndarray:
    """Map an array on the preprocessed grid back onto the original scan's voxel grid.

    Args:
        array: ``(D, H, W)`` label map (``is_label=True``) or ``(D, H, W, K)`` class
            probabilities on the preprocessed grid (``properties["resampled_shape"]``).
        properties: the dict returned by :func:`preprocess_case` for this scan.
        is_label: labels are resampled per class (linear) + argmax, never creating new values;
            probabilities linearly (nearest along an anisotropic axis).

    Returns:
        The array on the original grid, ``original_shape`` (+ ``K``): uint8 labels or float32
        probabilities. Voxels outside the crop box are background (label 0, class 0 = 1.0).
    """
    expected = tuple(properties["resampled_shape"])
    if tuple(array.shape[:3]) != expected or array.ndim != (3 if is_label else 4):
        kind = "(D, H, W) labels" if is_label else "(D, H, W, K) probabilities"
        raise ValueError(f"expected {kind} on the preprocessed grid {expected}, got {array.shape}")
    cropped, axis = properties["cropped_shape"], properties["anisotropic_axis"]
    full_shape = tuple(properties["reoriented_shape"])
    crop = tuple(slice(lo, hi) for lo, hi in properties["crop_bbox"])
    if is_label:
        small = resample_label(array, cropped, axis=axis)
        full = np.zeros(full_shape, np.uint8)
    else:
        small = resample_probabilities(array.astype(np.float32, copy=False), cropped, axis=axis)
        full = np.zeros((*full_shape, array.shape[-1]), np.float32)
        full[..., 0] = 1.0
    full[crop] = small
    ornt = np.asarray(properties["original_ornt"])
    back = ornt_mod.ornt_transform(_RAS, ornt)
    out = ornt_mod.apply_orientation(full, back)
    if tuple(out.shape[:3]) != tuple(properties["original_shape"]):
        raise RuntimeError(f"restored shape {out.shape} != original {properties['original_shape']}")
    return np.ascontiguousarray(out)


def original_nifti(array: np.ndarray, properties: dict[str, Any]) -> nib.Nifti1Image:
    """Wrap a restored array in a NIfTI with the original affine (convenience for tests/tools)."""
    return nib.Nifti1Image(array, np.asarray(properties["original_affine"]))
