"""``runtime=openvino``: the trained model converted once to OpenVINO IR and run on OpenVINO's CPU
plugin, float32 or bfloat16, behind the same ``predict_fn`` as the Keras runtime.

The IR is made with ``model.export(format="openvino")`` and cached beside the model file, in
``openvino/<sha256 of model.keras, 16 hex digits>/model.xml`` (a retrained model gets a new one);
where the run folder is read-only, under ``$XDG_CACHE_HOME/segshare/openvino/`` (default
``~/.cache``). It is written to a temporary folder and renamed into place, so a killed conversion
leaves nothing half-written. The network's logits come back as float32; softmax or sigmoid, the
mirrorings of TTA and their mean are computed in NumPy float32, as the Keras runtime computes
them in ``keras.ops``. OpenVINO is optional: ``pip install "segshare[openvino]"``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

#: OpenVINO's ``INFERENCE_PRECISION_HINT`` per precision setting.
PRECISION_HINTS = {"float32": "f32", "bfloat16": "bf16"}


def _require_openvino():
    try:
        import openvino
    except ImportError:
        raise ValueError(
            'runtime=openvino needs OpenVINO: pip install "segshare[openvino]" '
            "(or use runtime=keras)"
        ) from None
    return openvino


def file_digest(path: Path) -> str:
    """The first 16 hex digits of the file's SHA-256."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def _cache_roots(model_file: Path) -> list[Path]:
    home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return [model_file.parent / "openvino", home / "segshare" / "openvino"]


def converted_ir(model_file: Path, model: Any) -> Path:
    """The IR (``model.xml``) of ``model`` (loaded from ``model_file``): the cached one, or a new
    conversion (module docstring).

    Raises:
        ValueError: OpenVINO is missing, or no cache folder can be written.
    """
    _require_openvino()
    key = file_digest(model_file)
    roots = _cache_roots(Path(model_file))
    for root in roots:
        if (root / key / "model.xml").is_file() and (root / key / "model.bin").is_file():
            return root / key / "model.xml"
    problems = []
    for root in roots:
        try:
            root.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=root))
        except OSError as err:
            problems.append(f"{root}: {err.strerror or err}")
            continue
        try:
            model.export(str(tmp / "model.xml"), format="openvino", verbose=False)
            try:
                os.replace(tmp, root / key)
            except OSError:  # another process converted it meanwhile
                if not (root / key / "model.xml").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return root / key / "model.xml"
    raise ValueError(f"{model_file}: cannot write its OpenVINO conversion ({'; '.join(problems)})")


def _activate(logits: np.ndarray, activation: str) -> np.ndarray:
    logits = logits.astype(np.float32, copy=False)
    if activation == "sigmoid":
        return 1.0 / (1.0 + np.exp(-logits))
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def openvino_predict_fn(
    model_file: Path,
    model: Any,
    *,
    precision: str = "float32",
    flips: Sequence[tuple[int, ...]] = ((),),
    activation: str = "softmax",
) -> Callable[[np.ndarray], np.ndarray]:
    """A ``(B, *roi, C)`` float32 -> ``(B, *roi, K)`` probabilities function on OpenVINO's CPU
    plugin (the first output: the full-resolution one of a deep-supervision model).

    Args:
        model_file: the ``.keras`` file (its digest keys the cached IR).
        model: the model loaded from it (converted when no IR is cached).
        precision: ``float32`` or ``bfloat16`` (the plugin's inference precision).
        flips: batch axes to mirror, ``()`` first (TTA: every combination), each flipped back.
        activation: ``softmax`` or ``sigmoid`` (regions).
    """
    if precision not in PRECISION_HINTS:
        raise ValueError(f"precision must be one of {tuple(PRECISION_HINTS)}, got {precision!r}")
    openvino = _require_openvino()
    xml = converted_ir(Path(model_file), model)
    compiled = openvino.Core().compile_model(
        str(xml), "CPU", {"INFERENCE_PRECISION_HINT": PRECISION_HINTS[precision]}
    )
    output = compiled.outputs[0]
    request = compiled.create_infer_request()

    def predict(batch: np.ndarray) -> np.ndarray:
        total = None
        for axes in flips:
            x = np.ascontiguousarray(np.flip(batch, axes) if axes else batch, dtype=np.float32)
            p = _activate(np.asarray(request.infer([x])[output]), activation)
            p = np.flip(p, axes) if axes else p
            total = p if total is None else total + p
        return np.ascontiguousarray(total / len(flips), dtype=np.float32)

    return predict


__all__ = ["PRECISION_HINTS", "converted_ir", "file_digest", "openvino_predict_fn"]
