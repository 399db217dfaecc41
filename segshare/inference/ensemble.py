"""Several trained runs as one predictor: their softmax probabilities averaged on each case's grid
before the argmax (nnU-Net's ensembling), with memory that does not grow with the number of models.

Members that share a preprocessing plan (all folds of one configuration; 2D and 3D networks
trained on the same preprocessed data) are combined **per window**: the sliding window calls one
function that applies the members one after another to the same batch of windows and averages
their probabilities. Gaussian blending is linear, so this equals averaging the members' blended
volumes, and the case needs the single accumulation buffer of one model. The window is the
``window.roi_size`` given, else the first member's training patch; every member is checked to
take it (2D members predict its slices; the window of a 3D member is preferred).

Members with different plans (another spacing or normalisation) are predicted group by group,
each restored to the scan's grid one class at a time and added into one float32 buffer of the
scan's shape, weighted by the group's number of members; then the argmax.

Members must agree on the input channels (their number and, where recorded, their names), the
classes and their labels; anything else (spacing,
patch, network, sharing scheme) may differ.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from segshare.data.discovery import Case
from segshare.data.io import atomic_target, save_nifti_atomic
from segshare.data.preprocessing import restore_to_original
from segshare.data.validation import DEFAULT_MAX_VOXELS
from segshare.inference.predictor import (
    LabelFn,
    Predictor,
    label_nifti,
    output_paths,
    probabilities_to_labels,
)
from segshare.inference.sliding_window import WindowSettings
from segshare.inference.trained_run import TrainedRun, check_window, load_trained_run

#: The file of a ``segshare-crossval`` folder that lists the runs it merged.
CROSSVAL_RUNS_FILE = "folds.json"


def resolve_run_paths(model_path: str | Path | Sequence[str | Path]) -> list[Path]:
    """The run folders (or ``.keras`` files) of ``model_path``: one run, a list of runs, a
    ``segshare-crossval`` output folder (its runs, from ``folds.json``), or a ``segshare-export``
    package (``.zip``: its runs, verified and extracted by
    :func:`~segshare.inference.package.open_package`).

    Raises:
        ValueError: an empty list, a crossval folder whose ``folds.json`` lists no runs, or a
            package that is refused.
    """
    if isinstance(model_path, str | Path):
        folder = Path(model_path).expanduser()
        if folder.suffix == ".zip":
            from segshare.inference.package import open_package, package_runs

            return package_runs(open_package(folder))
        listing = folder / CROSSVAL_RUNS_FILE
        if folder.is_dir() and not (folder / "model.keras").exists() and listing.is_file():
            try:
                runs = [Path(f["run"]) for f in json.loads(listing.read_text())["folds"]]
            except (KeyError, TypeError, ValueError) as err:
                raise ValueError(f"{listing}: not a segshare-crossval runs list ({err}).") from None
            if not runs:
                raise ValueError(f"{listing}: lists no runs.")
            return runs
        return [folder]
    paths = [Path(p).expanduser() for p in model_path]
    if not paths:
        raise ValueError("model_path=[]: give at least one trained run.")
    return paths


def _check_compatible(runs: Sequence[TrainedRun]) -> None:
    """Refuse members that disagree on channels, classes or labels, naming both runs."""
    first = runs[0]
    for run in runs[1:]:
        for key in ("in_channels", "num_classes"):
            if getattr(run, key) != getattr(first, key):
                raise ValueError(
                    f"model_path: {run.folder} has {key}={getattr(run, key)} but {first.folder} "
                    f"has {getattr(first, key)}; an ensemble needs models of the same task."
                )
        names, first_names = run.plan.channel_names, first.plan.channel_names
        if names and first_names and names != first_names:
            raise ValueError(
                f"model_path: {run.folder} takes channels {names} but {first.folder} takes "
                f"{first_names}; an ensemble's models must read the same scans."
            )
        if run.plan.labels != first.plan.labels:
            raise ValueError(
                f"model_path: {run.folder} predicts labels {run.plan.labels} but {first.folder} "
                f"predicts {first.plan.labels}; an ensemble needs the same labels."
            )
        mine = (run.plan.regions, run.plan.regions_class_order)
        theirs = (first.plan.regions, first.plan.regions_class_order)
        if mine != theirs:
            raise ValueError(
                f"model_path: {run.folder} predicts regions {mine[0]} (order {mine[1]}) but "
                f"{first.folder} predicts {theirs[0]} (order {theirs[1]}); an ensemble needs "
                "the same regions."
            )


def mean_predict_fn(
    functions: Sequence[Callable[[np.ndarray], np.ndarray]],
) -> Callable[[np.ndarray], np.ndarray]:
    """One ``predict_fn`` averaging the probabilities of ``functions`` on the same windows."""
    if len(functions) == 1:
        return functions[0]

    def predict(batch: np.ndarray) -> np.ndarray:
        total = np.array(functions[0](batch), dtype=np.float32, copy=True)
        for fn in functions[1:]:
            total += fn(batch)
        total /= len(functions)
        return total

    return predict


def _group_predictor(
    runs: Sequence[TrainedRun], window: WindowSettings, options: dict[str, Any]
) -> Predictor:
    """One :class:`Predictor` for members sharing a plan: their averaged ``predict_fn``."""
    volumes = [r for r in runs if r.slice_axis is None] or runs  # a 3D member's patch first
    window = window.with_default_roi(volumes[0].window_size, volumes[0].window_stride)
    functions = []
    for run in runs:
        try:
            functions.append(run.predictor(window, **options).predict_fn)
        except ValueError as err:
            raise ValueError(f"{run.folder}: {err}") from None
    predict_fn = mean_predict_fn(functions)
    check_window(predict_fn, window.roi_size, runs[0].in_channels, runs[0].num_classes)
    return Predictor(
        predict_fn,
        runs[0].plan,
        window,
        progress=options["progress"],
        max_voxels=options["max_voxels"],
    )


class EnsemblePredictor:
    """Groups of members with different plans, averaged on the scan's grid (the interface of
    :class:`~segshare.inference.predictor.Predictor`: ``load``, ``predict_array``, ``write``).

    Args:
        groups: one :class:`Predictor` per plan, with the number of members it averages.
    """

    def __init__(self, groups: Sequence[tuple[Predictor, int]]):
        self.groups = list(groups)
        self.plan = self.groups[0][0].plan

    def load(self, case: Case) -> tuple[list, None, nib.Nifti1Image]:
        """Every group's preprocessed image and properties, and the source scan."""
        loaded, source = [], None
        for predictor, _ in self.groups:
            image, props, source = predictor.load(case)
            loaded.append((image, props))
        return loaded, None, source

    def predict_array(self, loaded: list) -> np.ndarray:
        """The members' mean probabilities ``(I, J, K, classes)`` on the scan's grid."""
        total, weights = None, 0
        for (predictor, members), (image, props) in zip(self.groups, loaded, strict=True):
            probs = predictor.predict_array(image)
            for k in range(probs.shape[-1]):  # one class on the scan's grid at a time
                # Uncropping fills a restored array's channel 0 with 1.0 (background): right for
                # class 0; for class k > 0 and every region restore 1 - p_k (linear), so that
                # p_k is 0 there.
                background = k == 0 and not self.plan.regions
                one = probs[..., k : k + 1] if background else 1.0 - probs[..., k : k + 1]
                restored = restore_to_original(one, props, is_label=False)[..., 0]
                if total is None:
                    total = np.zeros((*restored.shape, probs.shape[-1]), np.float32)
                total[..., k] += members * (restored if background else 1.0 - restored)
            weights += members
            del probs
        total /= weights
        return total

    def write(
        self,
        case_id: str,
        probs: np.ndarray,
        props: None,
        source: nib.Nifti1Image,
        output_dir: Path,
        save_probabilities: bool = False,
        postprocess: LabelFn | None = None,
    ) -> Path:
        """Write the labels (and the probabilities) of probabilities already on the scan's grid;
        ``postprocess`` maps the labels before they are written."""
        nii_path, npz_path = output_paths(output_dir, case_id)
        if save_probabilities:
            with atomic_target(npz_path, ".npz") as tmp:
                np.savez_compressed(tmp, probabilities=probs)
        labels = probabilities_to_labels(probs, self.plan)
        if postprocess is not None:
            labels = postprocess(labels)
        return save_nifti_atomic(label_nifti(labels, source), nii_path)


def load_ensemble(
    model_path: str | Path | Sequence[str | Path],
    window: WindowSettings,
    *,
    tta: bool = False,
    mirror_axes: Sequence[int] = (0, 1, 2),
    progress: bool = False,
    max_voxels: int = DEFAULT_MAX_VOXELS,
    precision: str = "float32",
    runtime: str = "keras",
) -> tuple[Predictor | EnsemblePredictor, list[TrainedRun]]:
    """The predictor of one run or of an ensemble (see the module docstring), and its runs.

    Raises:
        ValueError: a run cannot be loaded, the members disagree on channels, classes or labels,
            or a member cannot take the common window; the message names the run.
    """
    runs = [load_trained_run(p) for p in resolve_run_paths(model_path)]
    _check_compatible(runs)
    options = dict(
        tta=tta, mirror_axes=mirror_axes, progress=progress, max_voxels=max_voxels,
        precision=precision, runtime=runtime,
    )  # fmt: skip
    groups: dict[str, list[TrainedRun]] = {}
    for run in runs:
        key = json.dumps(run.plan.preprocessing_dict(), sort_keys=True, default=str)
        groups.setdefault(key, []).append(run)
    predictors = [(_group_predictor(g, window, options), len(g)) for g in groups.values()]
    if len(predictors) == 1:
        return predictors[0][0], runs
    return EnsemblePredictor(predictors), runs
