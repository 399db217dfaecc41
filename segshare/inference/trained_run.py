"""The trained-run contract: what ``segshare-train`` leaves in a run folder for every later
consumer (``segshare-predict``, training's final evaluation, ensembles), and the one loader.

A run folder holds ``model.keras``, ``plan.json`` (the preprocessing the model expects) and
``run.json``: the model's contract that no other file states, i.e. the window it was trained on
(``patch_size``), its input channels, classes and labels, and what it was trained with. Training
writes ``run.json`` with :func:`write_run_info`; :func:`load_trained_run` reads a run folder (or
its ``.keras`` file) into a :class:`TrainedRun`, which loads the model and builds a
:class:`~segshare.inference.predictor.Predictor`.

Runs written before ``run.json`` existed (segshare 0.1) still load: their window is the
``data.patch_size`` recorded in the run's ``config.yaml``, read once by
:func:`_legacy_patch_size` (the only reader of that file).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from segshare.data.io import read_json, write_json_atomic
from segshare.data.pipeline import volume_patch
from segshare.data.preprocessing import Plan
from segshare.data.validation import DEFAULT_MAX_VOXELS
from segshare.inference.model_io import (
    load_model_safely,
    make_predict_fn,
    mirror_axes_combinations,
    slice_predict_fn,
    with_precision,
)
from segshare.inference.predictor import Predictor
from segshare.inference.sliding_window import WindowSettings, check_window_args

MODEL_FILE = "model.keras"
PLAN_FILE = "plan.json"
RUN_FILE = "run.json"
RUN_FORMAT = 1
#: Where the network runs at prediction.
RUNTIMES = ("keras", "openvino")


def write_run_info(
    folder: str | Path,
    plan: Plan,
    patch_size: Sequence[int],
    slice_axis: int | None = None,
    split: dict[str, Any] | None = None,
    network: dict[str, Any] | None = None,
    **trained_with: Any,
) -> Path:
    """Write ``run.json`` into a run folder (atomically).

    Args:
        folder: the run folder (``model.keras`` and ``plan.json`` go beside it).
        plan: the preprocessing plan the model is trained with (channels, classes, labels).
        patch_size: the training patch: the window prediction uses by default (2 sizes for a 2D
            network).
        slice_axis: for a 2D network, the (RAS) volume axis its slices are taken across.
        split: the cross-validation split it was trained on: ``fold``, ``num_folds``,
            ``train_cases`` and ``validation_cases`` (case ids), for merging folds.
        network: what was trained: configuration, patch and batch, and the model's planned
            arguments (widths, blocks, kernels, strides); a resume must match it.
        trained_with: provenance to record (sharing scheme, precision, versions, ...).
    """
    import keras

    from segshare import __version__

    info = {
        "format": RUN_FORMAT,
        "model_file": MODEL_FILE,
        "plan_file": PLAN_FILE,
        "patch_size": [int(p) for p in patch_size],
        "slice_axis": None if slice_axis is None else int(slice_axis),
        "in_channels": plan.in_channels,
        "num_classes": plan.num_classes,
        "labels": dict(plan.labels),
        "split": split,
        "network": network,
        "trained_with": {
            "segshare": __version__,
            "keras": keras.__version__,
            "backend": keras.backend.backend(),
            **trained_with,
        },
    }
    return write_json_atomic(info, Path(folder) / RUN_FILE)


@dataclass(frozen=True)
class TrainedRun:
    """A trained model with everything needed to apply it.

    Attributes:
        folder: the run folder.
        model_file: the ``.keras`` file.
        plan: the preprocessing plan the model was trained with.
        patch_size: the training patch (3D, or the two in-plane sizes of a 2D network).
        info: the ``run.json`` contents (empty for a run written before it existed).
    """

    folder: Path
    model_file: Path
    plan: Plan
    patch_size: tuple[int, ...]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def split(self) -> dict[str, Any] | None:
        """The cross-validation split of training (``fold``, ``num_folds``, ``train_cases``,
        ``validation_cases``); None for runs written before it was recorded."""
        return self.info.get("split")

    @property
    def slice_axis(self) -> int | None:
        """For a 2D network, the volume axis its slices are taken across; None in 3D."""
        return self.info.get("slice_axis")

    @property
    def window_size(self) -> tuple[int, ...]:
        """The default 3D window: the training patch (one voxel thick for a 2D network)."""
        return volume_patch(self.patch_size, self.slice_axis)

    @property
    def window_stride(self) -> tuple[int, ...] | None:
        """The network's total stride along each axis of :attr:`window_size` (a window size must
        divide by it), from the strides recorded in ``run.json`` (or, where only the widths are,
        the encoder's default: 1 for the first stage, 2 after); None where neither is."""
        from segshare.models.unet import total_stride

        network = self.info.get("network") or {}
        stages = network.get("strides") or network.get("features")
        if not stages:
            return None
        stride = total_stride(len(stages), len(self.patch_size), network.get("strides"))
        return volume_patch(stride, self.slice_axis)

    @property
    def in_channels(self) -> int:
        """Image channels the model takes."""
        return self.plan.in_channels

    @property
    def num_classes(self) -> int:
        """Classes the model predicts (background included)."""
        return self.plan.num_classes

    def load_model(self) -> Any:
        """The Keras model (safe mode), checked against the plan's channels.

        Raises:
            ValueError: naming the files when the model and the plan disagree.
        """
        model = load_model_safely(self.model_file)
        channels = model.inputs[0].shape[-1] if getattr(model, "inputs", None) else None
        if channels is not None and channels != self.in_channels:
            raise ValueError(
                f"{self.model_file}: the model takes {channels} channels but "
                f"{self.folder / PLAN_FILE} says {self.in_channels}."
            )
        return model

    def predictor(
        self,
        window: WindowSettings,
        *,
        tta: bool = False,
        mirror_axes: Sequence[int] = (0, 1, 2),
        progress: bool = False,
        max_voxels: int = DEFAULT_MAX_VOXELS,
        model: Any = None,
        precision: str = "float32",
        runtime: str = "keras",
    ) -> Predictor:
        """A :class:`Predictor` for this run: the window defaults to the training patch, and one
        empty window is predicted up front, so a window the model cannot take is refused before
        any case is read.

        Args:
            window: the sliding window over the volume (``roi_size`` None =
                :attr:`window_size`; for a 2D network one voxel thick along the slice axis).
            tta: average over the mirrorings along ``mirror_axes``.
            mirror_axes: spatial axes (0, 1, 2 = D, H, W) mirrored by ``tta``.
            progress: show a progress bar over the windows of each case.
            max_voxels: refuse a scan whose header declares more voxels.
            model: the model, if already loaded (default: :meth:`load_model`).
            precision: ``float32`` or ``bfloat16``
                (:func:`~segshare.inference.model_io.with_precision`).
            runtime: ``keras`` (the Keras backend) or ``openvino``
                (:mod:`segshare.inference.openvino_runtime`).

        Raises:
            ValueError: the model cannot predict a window of ``roi_size`` or gives the wrong
                number of classes.
        """
        if runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}.")
        window = window.with_default_roi(self.window_size, self.window_stride)
        model = self.load_model() if model is None else model
        activation = "sigmoid" if self.plan.regions else "softmax"
        if self.slice_axis is None:
            axes = [int(a) + 1 for a in mirror_axes]  # batch axes 1..3
        else:  # the 2D network's batch axes 1, 2 are the in-plane volume axes
            plane = [a for a in range(3) if a != self.slice_axis]
            axes = [plane.index(int(a)) + 1 for a in mirror_axes if int(a) in plane]
        if runtime == "openvino":
            from segshare.inference.openvino_runtime import openvino_predict_fn

            flips = mirror_axes_combinations(tuple(axes)) if tta else [()]
            predict_fn = openvino_predict_fn(
                self.model_file, model, precision=precision, flips=flips, activation=activation
            )
        else:
            model = with_precision(model, precision)
            predict_fn = make_predict_fn(model, tta=tta, mirror_axes=axes, activation=activation)
        if self.slice_axis is not None:
            predict_fn = slice_predict_fn(predict_fn, self.slice_axis)
        check_window(predict_fn, window.roi_size, self.in_channels, self.num_classes)
        return Predictor(predict_fn, self.plan, window, progress=progress, max_voxels=max_voxels)


def check_window(predict_fn, roi: Sequence[int], channels: int, num_classes: int) -> None:
    """Predict one empty window (this also traces the model once) to catch a bad roi_size.

    Raises:
        ValueError: the model fails on the window or maps it to the wrong shape.
    """
    try:
        out = predict_fn(np.zeros((1, *roi, channels), np.float32))
    except Exception as err:  # noqa: BLE001 - backend errors vary; the first line is enough
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(
            f"roi_size={list(roi)}: the model cannot predict a window of this size ({first}); "
            f"U-Nets need sizes divisible by the product of their strides along each axis."
        ) from None
    if out.shape != (1, *roi, num_classes):
        dims = ", ".join(map(str, roi))
        raise ValueError(
            f"the model maps a (1, {dims}, {channels}) window to {out.shape}, expected "
            f"(1, {dims}, {num_classes}) (plan.json)."
        )


def load_trained_run(path: str | Path) -> TrainedRun:
    """Read a run folder, or the ``.keras`` file inside one, into a :class:`TrainedRun`.

    Raises:
        ValueError: naming the file when the model, ``plan.json`` or ``run.json`` is missing,
            unreadable or inconsistent.
    """
    given = Path(path).expanduser()
    model = given / MODEL_FILE if given.is_dir() else given
    if not model.is_file():
        raise ValueError(
            f"model_path={str(path)!r}: no model found (expected a .keras file or a run "
            f"folder holding {MODEL_FILE})."
        )
    if model.suffix != ".keras":
        raise ValueError(f"model_path={str(path)!r}: expected a Keras 3 '.keras' file.")
    folder = model.parent
    if not (folder / PLAN_FILE).is_file():
        raise ValueError(
            f"{model}: no {PLAN_FILE} beside it; the preprocessing plan of the training run is "
            f"needed to predict (copy it from the run folder)."
        )
    try:
        plan = Plan.load(folder / PLAN_FILE)
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{folder / PLAN_FILE}: not a segshare plan ({err}).") from None
    if not (folder / RUN_FILE).is_file():
        return TrainedRun(folder, model, plan, _legacy_patch_size(folder, model))
    info = read_json(folder / RUN_FILE)
    _check_run_info(info, plan, folder / RUN_FILE)
    return TrainedRun(folder, model, plan, tuple(info["patch_size"]), info)


def _check_run_info(info: Any, plan: Plan, path: Path) -> None:
    """Refuse a ``run.json`` of another format or one that contradicts ``plan.json``."""
    if not isinstance(info, dict) or info.get("format") != RUN_FORMAT:
        found = info.get("format") if isinstance(info, dict) else type(info).__name__
        raise ValueError(f"{path}: run format {found!r}, this segshare reads {RUN_FORMAT}.")
    try:
        check_window_args(volume_patch(info["patch_size"], info.get("slice_axis")))
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: no valid patch_size ({err}).") from None
    for key in ("in_channels", "num_classes", "labels"):
        if info.get(key) != getattr(plan, key):
            raise ValueError(
                f"{path}: {key} is {info.get(key)!r} but {path.parent / PLAN_FILE} says "
                f"{getattr(plan, key)!r}; the run folder mixes files of two runs."
            )


def _legacy_patch_size(folder: Path, model: Path) -> tuple[int, ...]:
    """The window of a run written before ``run.json``: ``data.patch_size`` of its config.yaml."""
    import yaml

    config = folder / "config.yaml"
    try:
        patch = yaml.safe_load(config.read_text())["data"]["patch_size"]
        return check_window_args(patch)
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError):
        raise ValueError(
            f"{model}: no {RUN_FILE} beside it (nor a config.yaml with data.patch_size, as runs "
            f"of segshare 0.1 have), so the window the model was trained on is unknown."
        ) from None
