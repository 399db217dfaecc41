"""Connected-component postprocessing, decided on out-of-fold predictions (as nnU-Net does).

Components are fully connected (26-neighbourhood in 3D: ``skimage.measure.label`` with
``connectivity=ndim``; measured as fast as ``scipy.ndimage.label`` and 4x slower than
``connected-components-3d``, 0.6 s for a 512x512x300 mask: ``docs/benchmarks.md``). A step acts
on the mask of its ``labels`` (treated as one mask); voxels it removes become background (0).

Decision rule of :func:`decide_postprocessing` (Dice as in ``docs/metrics.md``: per case
``2TP / (2TP + FP + FN)``, NaN when both sides are empty; a label's mean is the ``nanmean`` over
cases; the foreground Dice is the plain mean of the per-label means). "Improves" means
``after > before`` with both numbers finite (a NaN is never an improvement):

a. **Whole foreground**: all ``labels`` as one mask, keep only its largest component. Kept when
   the foreground Dice improves.
b. **Per label** (only with two or more labels), on top of (a) as decided: keep only the largest
   component of label ``l``. Kept when label ``l``'s mean Dice improves. A step on one label
   changes no other label's Dice, so the labels are decided independently.
c. **Small components per label**, on top of (a) and (b) as decided: remove the components of
   label ``l`` with fewer than ``t`` voxels. The candidates ``t`` are ``floor(f * s)`` for each
   ``f`` in ``size_fractions`` (default :data:`SIZE_FRACTIONS`), where ``s`` is the smallest
   component of label ``l`` in any reference: no true structure seen was smaller than ``s``, and
   the fractions keep a margin below it. Thresholds below 2 (which remove nothing) are dropped; a
   label absent from every reference gets no candidate. The best candidate (the smallest among
   equals) is kept when it improves label ``l``'s mean Dice.

The cases are read twice (once for (a) and the reference component sizes, once for (b) and (c),
whose candidates are all scored from one labelling of each label), one case per worker at a time.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from skimage import measure

from segshare.data.io import read_json, write_json_atomic
from segshare.data.parallel import default_num_workers, parallel_map
from segshare.evaluation.folders import check_labels
from segshare.evaluation.metrics import nanmean
from segshare.evaluation.overlap import as_label_array, dice, overlap_metrics
from segshare.evaluation.runner import check_same_grid, load_label_map

#: Version of the postprocessing file written by :func:`save_postprocessing`.
FORMAT = 1
#: Step kinds :class:`PostprocessingStep` knows.
STEP_KINDS = ("largest_component", "remove_small")
#: Default fractions of the smallest reference component tried as ``remove_small`` thresholds.
SIZE_FRACTIONS = (0.1, 0.25, 0.5, 1.0)

CaseSource = np.ndarray | str | os.PathLike


def label_components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fully connected components of ``mask`` and their sizes.

    Returns:
        ``(components, sizes)``: int32 array, 0 outside ``mask`` and ``1..n`` inside, and the
        ``n`` voxel counts (``sizes[i]`` belongs to component ``i + 1``).
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim == 0:
        raise ValueError("mask must have at least one dimension, got a scalar.")
    components, n = measure.label(mask, connectivity=mask.ndim, return_num=True)
    components = components.astype(np.int32, copy=False)
    # counting only the masked voxels avoids widening the whole int32 volume to intp
    return components, np.bincount(components[mask], minlength=n + 1)[1:]


def keep_largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest fully connected component of ``mask`` (the first in scan order among equals).

    Args:
        mask: boolean (or 0/1) array of any dimension.

    Returns:
        A new boolean array of the same shape; all False when ``mask`` is empty.
    """
    components, sizes = label_components(mask)
    if sizes.size <= 1:
        return np.asarray(mask, dtype=bool).copy()
    return components == int(np.argmax(sizes)) + 1


def remove_small_components(mask: np.ndarray, min_voxels: int) -> np.ndarray:
    """``mask`` without its fully connected components of fewer than ``min_voxels`` voxels.

    Args:
        mask: boolean (or 0/1) array of any dimension.
        min_voxels: smallest component size kept (0 or 1 keeps everything).

    Returns:
        A new boolean array of the same shape.
    """
    if isinstance(min_voxels, bool) or not isinstance(min_voxels, int | np.integer):
        raise ValueError(f"min_voxels must be an integer, got {min_voxels!r}.")
    if min_voxels < 0:
        raise ValueError(f"min_voxels must be >= 0, got {min_voxels}.")
    components, sizes = label_components(mask)
    keep = np.concatenate([[False], sizes >= min_voxels])
    return keep[components]


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


@dataclass(frozen=True)
class PostprocessingStep:
    """One postprocessing step on the mask of ``labels`` (voxels it removes become 0).

    Attributes:
        kind: ``"largest_component"`` or ``"remove_small"``.
        labels: the label values treated together as one mask (all foreground labels, or one).
        min_voxels: for ``"remove_small"``: components with fewer voxels are removed.
    """

    kind: str
    labels: tuple[int, ...]
    min_voxels: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in STEP_KINDS:
            raise ValueError(f"unknown step kind {self.kind!r} (expected one of {STEP_KINDS}).")
        labels = self.labels
        if (
            not isinstance(labels, Sequence)
            or not labels
            or not all(_is_int(v) and v > 0 for v in labels)
        ):
            raise ValueError(
                f"labels must be a non-empty list of positive integers, got {labels!r}."
            )
        object.__setattr__(self, "labels", tuple(int(v) for v in labels))
        if self.kind == "remove_small":
            if not _is_int(self.min_voxels) or self.min_voxels < 1:
                raise ValueError(
                    f"remove_small needs min_voxels, a positive integer, got {self.min_voxels!r}."
                )
            object.__setattr__(self, "min_voxels", int(self.min_voxels))
        elif self.min_voxels is not None:
            raise ValueError(f"{self.kind} takes no min_voxels, got {self.min_voxels!r}.")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready ``{"kind", "labels"[, "min_voxels"]}``."""
        out: dict[str, Any] = {"kind": self.kind, "labels": list(self.labels)}
        if self.min_voxels is not None:
            out["min_voxels"] = self.min_voxels
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PostprocessingStep:
        """The step :meth:`to_dict` wrote; raises ``ValueError`` saying what is wrong."""
        if not isinstance(data, dict):
            raise ValueError(f"a step must be an object, got {data!r}.")
        unknown = set(data) - {"kind", "labels", "min_voxels"}
        if unknown or "kind" not in data or "labels" not in data:
            raise ValueError(
                f"a step needs 'kind' and 'labels' (and only 'min_voxels'), got {data!r}."
            )
        if not isinstance(data["labels"], list):
            raise ValueError(f"labels must be a list of positive integers, got {data['labels']!r}.")
        return cls(data["kind"], tuple(data["labels"]), data.get("min_voxels"))

    def apply(self, mask: np.ndarray) -> np.ndarray:
        """The step on one boolean mask (what remains of it)."""
        if self.kind == "largest_component":
            return keep_largest_component(mask)
        return remove_small_components(mask, self.min_voxels)


def apply_postprocessing(label_map: np.ndarray, steps: Sequence[PostprocessingStep]) -> np.ndarray:
    """Applies ``steps`` in order to a label map.

    Args:
        label_map: integer label map, any shape (``(D, H, W)`` for a volume).
        steps: the steps, e.g. :func:`load_postprocessing`'s.

    Returns:
        A new array of the same shape and dtype; voxels a step removes are 0.
    """
    label_map = np.asarray(label_map)
    if not (np.issubdtype(label_map.dtype, np.integer) or label_map.dtype == bool):
        raise TypeError(f"label_map must be an integer label map, got dtype {label_map.dtype}.")
    out = label_map.copy()
    for step in steps:
        mask = np.isin(out, step.labels)
        out[mask & ~step.apply(mask)] = 0
    return out


def _load_annotated(
    pred: CaseSource, ref: CaseSource, ignore_label: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """:func:`_load_case` and the mask of the reference's annotated voxels (None: all are)."""
    pred, ref = _load_case(pred, ref)
    if ignore_label is None:
        return pred, ref, None
    annotated = ref != ignore_label
    return pred, ref, None if annotated.all() else annotated


def _load_case(pred: CaseSource, ref: CaseSource) -> tuple[np.ndarray, np.ndarray]:
    """A (prediction, reference) pair of label arrays from arrays or NIfTI paths."""
    if isinstance(pred, np.ndarray) and isinstance(ref, np.ndarray):
        pred, ref = as_label_array(pred, "pred"), as_label_array(ref, "ref")
        if pred.shape != ref.shape:
            raise ValueError(f"pred and ref shapes differ: {pred.shape} vs {ref.shape}.")
        return pred, ref
    if isinstance(pred, np.ndarray) or isinstance(ref, np.ndarray):
        raise TypeError("a case must be two arrays or two paths, not one of each.")
    (pred_array, pred_img), (ref_array, ref_img) = load_label_map(pred), load_label_map(ref)
    check_same_grid(Path(pred), pred_img, Path(ref), ref_img, pred_array.shape, ref_array.shape)
    return pred_array, ref_array


def _counts(
    pred: np.ndarray, ref: np.ndarray, labels: Sequence[int], annotated: np.ndarray | None
) -> np.ndarray:
    """``(len(labels), 3)`` TP, FP, FN counts (:func:`overlap_metrics`) over the ``annotated``
    voxels (None: all)."""
    if annotated is not None:
        pred, ref = pred[annotated], ref[annotated]
    m = overlap_metrics(pred, ref, labels)
    return np.array([[m[k]["TP"], m[k]["FP"], m[k]["FN"]] for k in labels], dtype=np.int64)


def _first_pass(job: tuple) -> dict[str, Any]:
    """(a): counts without and with the whole-foreground step; smallest reference components."""
    pred, ref, labels, ignore_label = job
    pred, ref, annotated = _load_annotated(pred, ref, ignore_label)
    fg_step = PostprocessingStep("largest_component", tuple(labels))
    smallest = []
    for label in labels:
        sizes = label_components(ref == label)[1]
        smallest.append(int(sizes.min()) if sizes.size else 0)
    return {
        "before": _counts(pred, ref, labels, annotated),
        "after": _counts(apply_postprocessing(pred, [fg_step]), ref, labels, annotated),
        "smallest_ref_component": smallest,
    }


def _second_pass(job: tuple) -> list[dict[str, np.ndarray]]:
    """(b), (c): per label, counts of every candidate, from one labelling of the label's mask.

    Keeping a subset ``S`` of the components gives ``TP = sum tp_i``, ``FP = sum(size_i - tp_i)``
    over ``S`` and ``FN = n_ref - TP``.
    """
    pred, ref, labels, ignore_label, base_steps, thresholds = job
    pred, ref, annotated = _load_annotated(pred, ref, ignore_label)
    pred = apply_postprocessing(pred, base_steps)
    out = []
    for label, cands in zip(labels, thresholds, strict=True):
        components, sizes = label_components(pred == label)
        ref_mask = ref == label
        tps = np.bincount(components[ref_mask], minlength=sizes.size + 1)[1:]
        n_ref = int(ref_mask.sum())
        # a component's voxels that count (its FP): those outside the ignored region
        counted = (
            sizes
            if annotated is None
            else np.bincount(components[annotated], minlength=sizes.size + 1)[1:]
        )

        def counts(keep: np.ndarray, tps=tps, counted=counted, n_ref=n_ref) -> np.ndarray:
            tp = int(tps[keep].sum())
            return np.array([tp, int(counted[keep].sum()) - tp, n_ref - tp], dtype=np.int64)

        largest = np.zeros(sizes.size, bool)
        if sizes.size:
            largest[np.argmax(sizes)] = True  # the same tie rule as keep_largest_component
        small = [sizes >= t for t in cands]
        out.append(
            {
                "base": counts(np.ones(sizes.size, bool)),
                "largest": counts(largest),
                "small": np.array([counts(k) for k in small]).reshape(-1, 3),
                "largest_small": np.array([counts(largest & k) for k in small]).reshape(-1, 3),
            }
        )
    return out


def _mean_dice(counts: Sequence[np.ndarray]) -> float:
    """``nanmean`` over cases of the Dice of ``(TP, FP, FN)`` counts."""
    return nanmean([dice(*(int(v) for v in c)) for c in counts])


def _improves(after: float, before: float) -> bool:
    return bool(np.isfinite(after) and np.isfinite(before) and after > before)


def _tried(step: PostprocessingStep, metric: str, before: float, after: float, kept: bool) -> dict:
    """An entry of the decision's ``tried`` list."""
    entry = {"metric": metric, "dice_before": before, "dice_after": after, "kept": kept}
    return {**step.to_dict(), **entry}


def candidate_thresholds(smallest_ref_component: int, size_fractions: Sequence[float]) -> list[int]:
    """``remove_small`` thresholds ``floor(f * s)`` (sorted, distinct, at least 2; see module)."""
    return sorted({t for f in size_fractions if (t := int(f * smallest_ref_component)) >= 2})


def _decide_label(
    label: int, per_case: list[dict], thresholds: list[int], try_largest: bool, tried: list
) -> tuple[list[PostprocessingStep], float]:
    """Steps (b) and (c) for one label: the kept steps and the label's mean Dice after them."""
    current = _mean_dice([c["base"] for c in per_case])
    metric = f"Dice of label {label}"
    kept, use_largest = [], False
    if try_largest:
        step = PostprocessingStep("largest_component", (label,))
        after = _mean_dice([c["largest"] for c in per_case])
        use_largest = _improves(after, current)
        tried.append(_tried(step, metric, current, after, use_largest))
        if use_largest:
            kept.append(step)
            current = after
    key = "largest_small" if use_largest else "small"
    scores = [_mean_dice([c[key][j] for c in per_case]) for j in range(len(thresholds))]
    best = int(np.argmax(scores)) if scores else -1  # NaN scores never improve (below)
    chosen = best if best >= 0 and _improves(scores[best], current) else -1
    for j, t in enumerate(thresholds):
        step = PostprocessingStep("remove_small", (label,), t)
        tried.append(_tried(step, metric, current, scores[j], j == chosen))
    if chosen >= 0:
        kept.append(PostprocessingStep("remove_small", (label,), thresholds[chosen]))
        current = scores[chosen]
    return kept, current


def decide_postprocessing(
    cases: Sequence[tuple[CaseSource, CaseSource]],
    labels: Sequence[int],
    *,
    size_fractions: Sequence[float] = SIZE_FRACTIONS,
    num_workers: int | None = None,
    progress: bool = True,
    ignore_label: int | None = None,
) -> dict[str, Any]:
    """Decides the postprocessing steps on out-of-fold predictions (rule in the module docstring).

    Args:
        cases: ``(prediction, reference)`` pairs, each two NIfTI label files (read one case per
            worker at a time, so the cases need not fit in memory; the pairs of two folders:
            ``[(p, r) for _, r, p in runner.match_cases(pred_dir, ref_dir).pairs]``) or two
            integer arrays of the same shape.
        labels: the positive foreground labels.
        size_fractions: fractions in (0, 1] of the smallest reference component of a label tried
            as its ``remove_small`` thresholds.
        num_workers: worker processes; default :func:`~segshare.data.parallel.default_num_workers`.
        progress: show a progress bar.
        ignore_label: the references' value of unannotated voxels: they count nowhere (the
            components are still those of the whole prediction, as applied later).

    Returns:
        JSON-ready ``{"format", "labels", "steps", "tried", "foreground_dice_before",
        "foreground_dice_after", "per_label_dice_before", "per_label_dice_after",
        "smallest_reference_component", "num_cases"}``: ``steps`` are the kept steps in order
        (as :meth:`PostprocessingStep.to_dict`), ``tried`` every step tried with its ``metric``,
        ``dice_before``, ``dice_after`` and ``kept``; label keys are strings.

    Raises:
        ValueError: no case, bad labels or fractions, unreadable files or mismatched pairs (the
            message names the files).
    """
    if labels is None:
        raise ValueError("labels must list the foreground labels, got None.")
    if not cases:
        raise ValueError("cases is empty: postprocessing needs at least one case.")
    labels = check_labels(labels)
    if not all(0 < float(f) <= 1 for f in size_fractions):
        raise ValueError(f"size_fractions must lie in (0, 1], got {list(size_fractions)!r}.")
    workers = default_num_workers() if num_workers is None else int(num_workers)

    def run(fn, extra: tuple, desc: str) -> list:
        jobs = [(p, r, labels, ignore_label, *extra) for p, r in cases]
        return list(parallel_map(fn, jobs, workers, desc, progress, ordered=True))

    first = run(_first_pass, (), "postprocessing 1/2")
    before = [_mean_dice([c["before"][i] for c in first]) for i in range(len(labels))]
    after = [_mean_dice([c["after"][i] for c in first]) for i in range(len(labels))]
    fg_before, fg_after = float(np.mean(before)), float(np.mean(after))
    fg_step = PostprocessingStep("largest_component", tuple(labels))
    keep_fg = _improves(fg_after, fg_before)
    tried = [_tried(fg_step, "foreground Dice", fg_before, fg_after, keep_fg)]
    steps = [fg_step] if keep_fg else []

    smallest = [
        min((s for c in first if (s := c["smallest_ref_component"][i]) > 0), default=0)
        for i in range(len(labels))
    ]
    thresholds = [candidate_thresholds(s, size_fractions) for s in smallest]
    second = run(_second_pass, (list(steps), thresholds), "postprocessing 2/2")
    label_steps, final = [], {}
    for i, label in enumerate(labels):
        kept, final[str(label)] = _decide_label(
            label, [c[i] for c in second], thresholds[i], len(labels) > 1, tried
        )
        label_steps += kept
    # largest-component steps first, then remove_small (labels are independent: same result)
    label_steps.sort(key=lambda s: s.kind != "largest_component")
    return {
        "format": FORMAT,
        "labels": labels,
        "steps": [s.to_dict() for s in steps + label_steps],
        "tried": tried,
        "foreground_dice_before": fg_before,
        "foreground_dice_after": float(np.mean(list(final.values()))),
        "per_label_dice_before": {str(k): v for k, v in zip(labels, before, strict=True)},
        "per_label_dice_after": final,
        "smallest_reference_component": {str(k): s for k, s in zip(labels, smallest, strict=True)},
        "num_cases": len(cases),
    }


def save_postprocessing(decision: dict[str, Any], path: str | os.PathLike) -> Path:
    """Writes a decision (:func:`decide_postprocessing`) as JSON, atomically.

    Raises:
        ValueError: the decision is not one :func:`load_postprocessing` would accept.
    """
    path = Path(path)
    _parse_steps(decision, f"decision for '{path}'")
    return write_json_atomic(decision, path)


def _parse_steps(data: Any, source: str) -> list[PostprocessingStep]:
    if not isinstance(data, dict):
        raise ValueError(f"{source}: the top level must be an object, got {type(data).__name__}.")
    if data.get("format") != FORMAT or isinstance(data.get("format"), bool):
        raise ValueError(f"{source}: unknown format {data.get('format')!r} (expected {FORMAT}).")
    if not isinstance(data.get("steps"), list):
        raise ValueError(f"{source}: 'steps' must be a list, got {data.get('steps')!r}.")
    steps = []
    for i, item in enumerate(data["steps"]):
        try:
            steps.append(PostprocessingStep.from_dict(item))
        except (ValueError, TypeError) as err:
            raise ValueError(f"{source}: step {i}: {err}") from err
    return steps


def load_postprocessing(path: str | os.PathLike) -> list[PostprocessingStep]:
    """The steps of a file :func:`save_postprocessing` wrote, in order.

    Raises:
        ValueError: the file is missing, unreadable, not JSON, of an unknown format or holds an
            invalid step (the message names the file and the problem).
    """
    path = Path(path)
    source = f"postprocessing file '{path}'"
    if not path.is_file():
        problem = "is not a file" if path.exists() else "does not exist"
        raise ValueError(f"{source} {problem}.")
    try:
        data = read_json(path)
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{source} cannot be read ({err}).") from err
    except ValueError as err:
        raise ValueError(f"{source}: {str(err).removeprefix(f'{path}: ')}.") from err
    return _parse_steps(data, source)
