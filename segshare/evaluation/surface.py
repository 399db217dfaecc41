"""Surface distances (HD95, ASSD, NSD) as MONAI and medpy define them, computed in bounding boxes.

A surface voxel is a foreground voxel removed by a 6-connected binary erosion (voxels outside the
image count as background). Distances come from ``scipy.ndimage.distance_transform_edt`` with
``sampling=spacing``, so they are in millimetres. Everything is computed inside the bounding box of
the union of both masks (plus a one-voxel margin), which gives the same values as the full volume
because a Euclidean distance transform is exact and every surface voxel lies inside that box.
Definitions and empty cases: ``docs/metrics.md``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from segshare.evaluation.overlap import as_label_array

#: Names of the surface metrics, in report order.
SURFACE_METRICS = ("HD95", "ASSD", "NSD")
HD95_VARIANTS = ("monai", "medpy")

BBox = tuple[slice, ...]


def check_spacing(spacing: Sequence[float], ndim: int) -> tuple[float, ...]:
    """Validates a voxel spacing (one positive number per axis) and returns it as a tuple."""
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != ndim or not all(np.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing must be {ndim} positive numbers, got {spacing}.")
    return spacing


def surface_voxels(mask: np.ndarray) -> np.ndarray:
    """Surface of a binary mask: foreground voxels removed by a 6-connected erosion.

    Args:
        mask: boolean array of any rank (a 3D mask is ``(D, H, W)``).

    Returns:
        Boolean array of the same shape; voxels on the image border count as surface.
    """
    mask = np.asarray(mask, dtype=bool)
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def directed_distances(
    from_surface: np.ndarray, to_surface: np.ndarray, spacing: Sequence[float]
) -> np.ndarray:
    """Distance (mm) from each voxel of ``from_surface`` to the nearest voxel of ``to_surface``.

    Returns a 1-D float64 array (one value per ``from_surface`` voxel, C order); all +inf when
    ``to_surface`` is empty.
    """
    if not to_surface.any():
        return np.full(int(from_surface.sum()), np.inf)
    # The EDT's feature transform (index of the nearest ``to_surface`` voxel), then distances only
    # at the ``from_surface`` voxels, with the same float operations as distance_transform_edt.
    nearest = ndimage.distance_transform_edt(
        ~to_surface, sampling=spacing, return_distances=False, return_indices=True
    )
    coords = np.nonzero(from_surface)
    squared = [
        np.square((nearest[axis][coords] - coords[axis]).astype(np.float64) * spacing[axis])
        for axis in range(from_surface.ndim)
    ]
    return np.sqrt(np.add.reduce(squared, axis=0))


def union_bbox(*boxes: BBox | None, shape: Sequence[int], margin: int = 1) -> BBox | None:
    """Bounding box covering all given boxes (``None`` ones are skipped), grown by ``margin``."""
    boxes = [b for b in boxes if b is not None]
    if not boxes:
        return None
    return tuple(
        slice(
            max(min(b[a].start for b in boxes) - margin, 0),
            min(max(b[a].stop for b in boxes) + margin, shape[a]),
        )
        for a in range(len(shape))
    )


def surface_distances(
    pred_mask: np.ndarray,
    ref_mask: np.ndarray,
    spacing: Sequence[float],
    bbox: BBox | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances in both directions, in mm.

    Args:
        pred_mask: boolean prediction mask ``(D, H, W)``.
        ref_mask: boolean reference mask, same shape.
        spacing: voxel spacing in mm, one value per axis.
        bbox: optional box (tuple of slices) known to hold both masks; computed when omitted.

    Returns:
        ``(d_pred_to_ref, d_ref_to_pred)``: 1-D float64 arrays, one value per surface voxel of the
        first mask (empty when that mask is empty, all +inf when the other one is).
    """
    pred_mask, ref_mask = np.asarray(pred_mask, bool), np.asarray(ref_mask, bool)
    if pred_mask.shape != ref_mask.shape:
        raise ValueError(f"mask shapes differ: {pred_mask.shape} vs {ref_mask.shape}.")
    spacing = check_spacing(spacing, pred_mask.ndim)
    if bbox is None:
        bbox = union_bbox(_mask_bbox(pred_mask), _mask_bbox(ref_mask), shape=pred_mask.shape)
    if bbox is None:
        return np.zeros(0), np.zeros(0)
    pred_surf = surface_voxels(pred_mask[bbox])
    ref_surf = surface_voxels(ref_mask[bbox])
    return (
        directed_distances(pred_surf, ref_surf, spacing),
        directed_distances(ref_surf, pred_surf, spacing),
    )


def _mask_bbox(mask: np.ndarray) -> BBox | None:
    found = ndimage.find_objects(mask.astype(np.uint8, copy=False))
    return found[0] if found else None


def hd95_from_distances(d_pr: np.ndarray, d_rp: np.ndarray, variant: str = "monai") -> float:
    """95th-percentile Hausdorff distance from the two directed distance arrays.

    ``monai``: the larger of the two directed 95th percentiles (MONAI ``compute_hausdorff_distance``
    with ``percentile=95``). ``medpy``: the 95th percentile of both directions pooled
    (``medpy.metric.binary.hd95``). Percentiles interpolate linearly (NumPy's and torch's default).
    NaN when both surfaces are empty, +inf when exactly one is.
    """
    if variant not in HD95_VARIANTS:
        raise ValueError(f"hd95 variant must be one of {HD95_VARIANTS}, got {variant!r}.")
    if d_pr.size == 0 and d_rp.size == 0:
        return float("nan")
    if d_pr.size == 0 or d_rp.size == 0:
        return float("inf")
    if variant == "medpy":
        return float(np.percentile(np.concatenate([d_pr, d_rp]), 95))
    return float(max(np.percentile(d_pr, 95), np.percentile(d_rp, 95)))


def assd_from_distances(d_pr: np.ndarray, d_rp: np.ndarray) -> float:
    """Average symmetric surface distance: mean of both directions pooled (MONAI, symmetric=True).

    NaN when both surfaces are empty, +inf when exactly one is.
    """
    if d_pr.size == 0 and d_rp.size == 0:
        return float("nan")
    if d_pr.size == 0 or d_rp.size == 0:
        return float("inf")
    return float(np.concatenate([d_pr, d_rp]).mean())


def nsd_from_distances(d_pr: np.ndarray, d_rp: np.ndarray, tolerance_mm: float) -> float:
    """Normalised surface Dice: share of surface voxels of both masks within ``tolerance_mm`` of the
    other surface (MONAI ``compute_surface_dice``, voxel counts). NaN when both are empty, 0 when
    exactly one is."""
    complete = d_pr.size + d_rp.size
    if complete == 0:
        return float("nan")
    correct = int((d_pr <= tolerance_mm).sum()) + int((d_rp <= tolerance_mm).sum())
    return correct / complete


def hd95(
    pred_mask: np.ndarray, ref_mask: np.ndarray, spacing: Sequence[float], variant: str = "monai"
) -> float:
    """HD95 in mm of two boolean masks ``(D, H, W)``; see :func:`hd95_from_distances`."""
    return hd95_from_distances(*surface_distances(pred_mask, ref_mask, spacing), variant=variant)


def assd(pred_mask: np.ndarray, ref_mask: np.ndarray, spacing: Sequence[float]) -> float:
    """ASSD in mm of two boolean masks ``(D, H, W)``; see :func:`assd_from_distances`."""
    return assd_from_distances(*surface_distances(pred_mask, ref_mask, spacing))


def normalized_surface_dice(
    pred_mask: np.ndarray, ref_mask: np.ndarray, spacing: Sequence[float], tolerance_mm: float = 1.0
) -> float:
    """NSD of two boolean masks ``(D, H, W)``; see :func:`nsd_from_distances`."""
    return nsd_from_distances(*surface_distances(pred_mask, ref_mask, spacing), tolerance_mm)


def surface_metrics(
    pred: np.ndarray,
    ref: np.ndarray,
    labels: Sequence[int],
    spacing: Sequence[float],
    *,
    nsd_tolerance_mm: float = 1.0,
    hd95_variant: str = "monai",
) -> dict[int, dict[str, float]]:
    """HD95, ASSD and NSD for every label of two label maps.

    Bounding boxes of all labels come from one ``scipy.ndimage.find_objects`` pass per map; each
    label's distances are then computed inside its own box only.

    Args:
        pred: predicted label map ``(D, H, W)``, non-negative integers.
        ref: reference label map, same shape.
        labels: positive label values to score.
        spacing: voxel spacing in mm per axis.
        nsd_tolerance_mm: NSD tolerance in mm.
        hd95_variant: ``"monai"`` or ``"medpy"``.

    Returns:
        ``{label: {"HD95", "ASSD", "NSD"}}`` (floats, mm for distances).
    """
    if hd95_variant not in HD95_VARIANTS:
        raise ValueError(f"hd95 variant must be one of {HD95_VARIANTS}, got {hd95_variant!r}.")
    pred, ref = as_label_array(pred, "pred"), as_label_array(ref, "ref")
    spacing = check_spacing(spacing, ref.ndim)
    if any(int(label) <= 0 for label in labels):
        raise ValueError(f"surface metrics need positive labels, got {list(labels)}.")
    top = max(labels, default=0)
    pred_boxes = ndimage.find_objects(pred, max_label=top) if top else []
    ref_boxes = ndimage.find_objects(ref, max_label=top) if top else []
    out: dict[int, dict[str, float]] = {}
    for label in labels:
        box = union_bbox(pred_boxes[label - 1], ref_boxes[label - 1], shape=ref.shape)
        if box is None:
            d_pr = d_rp = np.zeros(0)
        else:
            d_pr, d_rp = surface_distances(
                pred[box] == label, ref[box] == label, spacing, bbox=(slice(None),) * ref.ndim
            )
        out[int(label)] = {
            "HD95": hd95_from_distances(d_pr, d_rp, hd95_variant),
            "ASSD": assd_from_distances(d_pr, d_rp),
            "NSD": nsd_from_distances(d_pr, d_rp, nsd_tolerance_mm),
        }
    return out
