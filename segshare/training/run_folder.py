"""A training run's folder before the loop starts: the files later consumers read (the trained-run
contract), and the checks that resuming the folder is safe.

``plan.json`` and ``run.json`` (see :mod:`segshare.inference.trained_run`) are the contract;
``parameters.json`` (the parameter report) and ``config.yaml`` (the composed config, for people:
nothing reads it back) are the record.

Resuming: a run folder resumes from ``checkpoints/latest`` (or, with ``trainer.resume_from=best``,
from ``checkpoints/best``). A folder that holds a trained run (a log, a model or a checkpoint) but
no whole checkpoint to resume from is refused, naming the missing or damaged file: starting over
there would append epoch 0 to the old log and overwrite the best model with a worse one. Each
checkpoint's ``state.json`` records the sha256 of the weights and optimizer variables it holds
(:func:`content_checksums`), compared once they are read back, before training goes on.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from segshare.data.io import write_json_atomic, write_text_atomic
from segshare.data.preprocessing import Plan
from segshare.inference.trained_run import PLAN_FILE, RUN_FILE, write_run_info
from segshare.training.checkpoints import OPTIMIZER, STATE, WEIGHTS, find_checkpoint

#: The checkpoints a run can resume from (``trainer.resume_from``).
RESUME_POINTS = ("latest", "best")
#: What shows that a run folder holds a trained run.
RUN_TRACES = ("train_log.csv", "model.keras", "checkpoints/latest", "checkpoints/best")


def way_out(resume_from: str) -> str:
    """What to do when the checkpoint ``resume_from`` cannot be resumed from (one sentence)."""
    if resume_from == "latest":
        return (
            "Resume from the best checkpoint with trainer.resume_from=best, or train into a new "
            "folder (hydra.run.dir=...)."
        )
    return "Train into a new folder (hydra.run.dir=...), or resume with trainer.resume_from=latest."


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def content_checksums(model: Any, optimizer: Any) -> dict[str, str]:
    """The sha256 of what a checkpoint holds: the model's weights (``model.weights.h5``) and the
    optimizer's variables (``optimizer.npz``), each in order with its dtype and shape."""
    return {WEIGHTS: _sha256(model.weights), OPTIMIZER: _sha256(optimizer.variables)}


def _sha256(variables: Iterable[Any]) -> str:
    import keras

    digest = hashlib.sha256()
    for variable in variables:
        array = np.ascontiguousarray(keras.ops.convert_to_numpy(variable))
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def check_checkpoint_files(folder: Path, resume_from: str = "latest") -> dict:
    """Open a checkpoint's files without loading them: ``state.json`` parses and holds the
    epoch, the weights open as HDF5, the optimizer's archive passes its CRC checks.

    Returns:
        The saved state.

    Raises:
        ValueError: naming the damaged file and the way out (one line).
    """
    folder = Path(folder)

    def damaged(name: str, reason: str) -> ValueError:
        return ValueError(
            f"{folder / name}: damaged ({reason}); this run cannot resume from "
            f"{folder}. {way_out(resume_from)}"
        )

    try:
        state = json.loads((folder / STATE).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise damaged(STATE, f"not valid JSON: {_one_line(err)}") from err
    if not isinstance(state, dict) or not {"epoch", "best"} <= state.keys():
        raise damaged(STATE, "no 'epoch' and 'best' in it")
    import h5py

    try:
        h5py.File(folder / WEIGHTS, "r").close()
    except Exception as err:  # h5py raises OSError, sometimes others, for a broken file
        raise damaged(WEIGHTS, _one_line(err)) from err
    try:
        with zipfile.ZipFile(folder / OPTIMIZER) as archive:
            bad = archive.testzip()
    except (OSError, zipfile.BadZipFile, EOFError) as err:
        raise damaged(OPTIMIZER, _one_line(err)) from err
    if bad is not None:
        raise damaged(OPTIMIZER, f"CRC check failed for {bad}")
    return state


def resume_point(run_dir: Path, resume_from: str = "latest") -> Path | None:
    """The checkpoint a run folder resumes from, its files checked
    (:func:`check_checkpoint_files`); ``None`` for a folder without a trained run.

    Args:
        run_dir: the run folder.
        resume_from: ``latest`` or ``best`` (``trainer.resume_from``).

    Raises:
        ValueError: the folder holds a trained run (``train_log.csv``, ``model.keras`` or a
            checkpoint) but the checkpoint to resume from is missing or damaged; the message
            names the file and the way out.
    """
    if resume_from not in RESUME_POINTS:
        raise ValueError(f"trainer.resume_from must be 'latest' or 'best', got {resume_from!r}.")
    run_dir = Path(run_dir)
    folder = run_dir / "checkpoints" / resume_from
    found = find_checkpoint(folder)
    if found is not None:
        check_checkpoint_files(found, resume_from)
        return found
    traces = [name for name in RUN_TRACES if (run_dir / name).exists()]
    if not traces:
        return None
    files = [folder / n for n in (STATE, WEIGHTS, OPTIMIZER)] if folder.is_dir() else []
    missing = next((f for f in files if not f.is_file()), folder)
    raise ValueError(
        f"{missing}: missing, so {run_dir} cannot be resumed, yet it holds a trained run "
        f"({', '.join(traces)}) that starting over would overwrite. {way_out(resume_from)}"
    )


def check_resumable(run_dir: Path, plan: Plan, resume_from: str = "latest") -> Path | None:
    """The checkpoint to resume from (:func:`resume_point`; ``None``: a fresh run), after
    refusing a run whose checkpoint was trained on another preprocessing plan (the network
    configurations planned beside it may change: the run's model is what it is).

    Raises:
        ValueError: the checkpoint is missing or damaged (:func:`resume_point`), or the
            preprocessing differs (naming the run's ``plan.json`` and the settings).
    """
    found = resume_point(run_dir, resume_from)
    saved = Path(run_dir) / PLAN_FILE
    if found is None or not saved.is_file():
        return found
    old, new = Plan.load(saved).preprocessing_dict(), plan.preprocessing_dict()
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    if changed:
        details = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed)
        raise ValueError(
            f"{saved}: this run's checkpoint was trained with another preprocessing plan "
            f"({details}). Resume with the run's data settings (e.g. data.target_spacing), or "
            f"train into a new hydra.run.dir."
        )
    return found


#: The keys of ``run.json``'s ``split`` a resume must keep (the training cases follow from them).
SPLIT_KEYS = ("fold", "num_folds", "validation_cases")


def _brief(value: Any) -> Any:
    """A long list (of case ids) as its length, for messages."""
    return f"{len(value)} cases" if isinstance(value, list) and len(value) > 8 else value


def check_same_training(run_dir: Path, split: dict[str, Any], network: dict[str, Any]) -> None:
    """Refuse to resume a run with another fold or another network than it was trained with
    (``run.json``'s ``split`` and ``network``; runs that did not record them are not checked).

    Resuming fold 0's run as fold 1 would validate on cases it trained on; resuming with other
    widths, patch or batch (e.g. a plan made on another device, or changed defaults) would not
    load, or would silently continue another experiment.

    Raises:
        ValueError: naming ``run.json``, each differing setting and both values.
    """
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        return
    info = json.loads(path.read_text())
    new = json.loads(json.dumps({"split": split, "network": network}))
    for key, wanted in (("split", SPLIT_KEYS), ("network", None)):
        old = info.get(key) if isinstance(info, dict) else None
        if not isinstance(old, dict):
            continue
        keys = wanted or sorted(set(old) | set(new[key]))
        changed = [k for k in keys if old.get(k) != new[key].get(k)]
        if changed:
            details = "; ".join(
                f"{k}: {_brief(old.get(k))!r} -> {_brief(new[key].get(k))!r}" for k in changed
            )
            raise ValueError(
                f"{path}: this run was trained with another {key} ({details}). Resume it with "
                f"its own settings, or train into a new hydra.run.dir."
            )


def write_run_files(
    run_dir: Path,
    plan: Plan,
    patch_size: tuple[int, ...],
    parameters: dict[str, Any],
    config_yaml: str,
    configuration: str | None = None,
    slice_axis: int | None = None,
    split: dict[str, Any] | None = None,
    network: dict[str, Any] | None = None,
    precision: str | None = None,
) -> None:
    """Write ``plan.json``, ``run.json``, ``parameters.json`` and ``config.yaml`` (atomically).

    Args:
        run_dir: the run folder.
        plan: the preprocessing plan the model is trained with.
        patch_size: the training patch (the model's default prediction window).
        parameters: the parameter report (``segshare.models.parameter_report``).
        config_yaml: the composed config, resolved, as YAML.
        configuration: the planned configuration trained (``3d_fullres``, ...), if any.
        slice_axis: for a 2D network, the volume axis its slices are taken across.
        split: the fold and its case ids (``run.json``'s ``split``).
        network: configuration, patch, batch and planned model arguments (``run.json``'s
            ``network``).
        precision: the dtype policy trained with (``trainer.precision``, ``auto`` resolved),
            recorded in ``run.json``'s ``trained_with``.
    """
    run_dir = Path(run_dir)
    plan.save(run_dir / PLAN_FILE)
    write_run_info(
        run_dir,
        plan,
        patch_size,
        slice_axis,
        split,
        network,
        sharing=parameters.get("sharing"),
        configuration=configuration,
        precision=precision,
    )
    write_json_atomic(parameters, run_dir / "parameters.json")
    write_text_atomic(config_yaml, run_dir / "config.yaml")
