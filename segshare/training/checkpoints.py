"""Atomic training checkpoints: model weights, optimizer state and the loop's state.

A checkpoint is a folder (``checkpoints/latest``, ``checkpoints/best``) holding
``model.weights.h5``, ``optimizer.npz`` (every optimizer variable, in order) and ``state.json``
(epoch, best metric, learning rate, seeds). It is written to ``<name>.tmp`` and swapped into
place by :func:`segshare.data.io.atomic_folder`, so a process killed at any moment leaves the
previous checkpoint whole (at ``<name>`` or, mid-swap, at ``<name>.old``).
"""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np

from segshare.data.io import atomic_folder

WEIGHTS, OPTIMIZER, STATE = "model.weights.h5", "optimizer.npz", "state.json"


def save_checkpoint(folder: Path, model: keras.Model, optimizer, state: dict) -> None:
    """Write model, optimizer and ``state`` to ``folder`` atomically
    (:func:`segshare.data.io.atomic_folder`: the previous checkpoint stays whole until the swap)."""
    with atomic_folder(folder) as tmp:
        model.save_weights(tmp / WEIGHTS)
        arrays = {
            f"v{i:04d}": keras.ops.convert_to_numpy(v) for i, v in enumerate(optimizer.variables)
        }
        np.savez(tmp / OPTIMIZER, **arrays)
        (tmp / STATE).write_text(json.dumps(state, indent=2, sort_keys=True))


def find_checkpoint(folder: Path) -> Path | None:
    """The complete checkpoint at ``folder`` (or its ``.old`` twin if a swap was interrupted)."""
    folder = Path(folder)
    for candidate in (folder, folder.with_name(folder.name + ".old")):
        if all((candidate / name).is_file() for name in (WEIGHTS, OPTIMIZER, STATE)):
            return candidate
    return None


def load_checkpoint(folder: Path, model: keras.Model, optimizer) -> dict:
    """Restore model and optimizer from ``folder``; returns the saved state."""
    folder = Path(folder)
    model.load_weights(folder / WEIGHTS)
    if not optimizer.built:
        optimizer.build(model.trainable_variables)
    with np.load(folder / OPTIMIZER) as arrays:
        values = [arrays[f"v{i:04d}"] for i in range(len(arrays.files))]
    if len(values) != len(optimizer.variables):
        raise ValueError(
            f"Checkpoint {folder} holds {len(values)} optimizer variables, the optimizer has "
            f"{len(optimizer.variables)}: was it written with another optimizer or model?"
        )
    for variable, value in zip(optimizer.variables, values, strict=True):
        if tuple(variable.shape) != value.shape:
            raise ValueError(
                f"Checkpoint {folder}: optimizer variable {variable.path} has shape "
                f"{tuple(variable.shape)}, the file {value.shape}."
            )
        variable.assign(value)
    return json.loads((folder / STATE).read_text())
