"""``runtime=openvino``: the trained model converted once to OpenVINO IR and run on OpenVINO's CPU
plugin, float32 or bfloat16, behind the same ``predict_fn`` as the Keras runtime.

The IR is made with ``model.export(format="openvino")`` and cached beside the model file, in
``openvino/<sha256 of model.keras, 16 hex digits>/model.xml`` (a retrained model gets a new one);
where the run folder is read-only, under ``$XDG_CACHE_HOME/segshare/openvino/`` (default
``~/.cache``). It is written to a temporary folder and renamed into place, so a killed conversion
leaves nothing half-written. At compile time the network's first output is converted to float32
and its softmax or sigmoid appended (OpenVINO's post-processing steps, which run in float32 after
the bfloat16 body, as the Keras runtime's heads do): one pass of the plugin's threads instead of a
single-threaded NumPy pass per batch. The mirrorings of TTA and their mean are NumPy float32.
OpenVINO is optional: ``pip install "segshare[openvino]"``.
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

from segshare.inference.model_io import ACTIVATIONS

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


def _with_activation(openvino, core, xml: Path, activation: str):
    """The IR read from ``xml`` by ``core`` with its first output cast to float32 and activated."""
    from openvino import opset13 as ops
    from openvino.preprocess import PrePostProcessor

    steps = PrePostProcessor(core.read_model(str(xml)))
    post = steps.output(0).postprocess()
    post.convert_element_type(openvino.Type.f32)
    if activation == "sigmoid":
        post.custom(lambda node: ops.sigmoid(node).output(0))
    else:
        post.custom(_channels_first_softmax)
    return steps.build()


def _channels_first_softmax(node):
    """Softmax over the last (class) axis, computed with the classes moved to axis 1.

    The CPU plugin's softmax over a short innermost axis (2-4 classes) is slow: for a batch of two
    64^3 windows and 3 classes it took 10 ms, 6.5 % of the whole bfloat16 forward pass. Over axis
    1 each class is a contiguous plane and the same softmax takes 0.4 ms, the transposes 0.7 ms
    (same values to 1e-7; docs/benchmarks.md, issue 15)."""
    from openvino import opset13 as ops

    rank = node.get_partial_shape().rank.get_length()
    to_first = [0, rank - 1, *range(1, rank - 1)]
    to_last = [0, *range(2, rank), 1]
    moved = ops.softmax(ops.transpose(node, np.array(to_first)), 1)
    return ops.transpose(moved, np.array(to_last)).output(0)


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
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    openvino = _require_openvino()
    xml = converted_ir(Path(model_file), model)
    core = openvino.Core()
    activated = _with_activation(openvino, core, xml, activation)
    requests: dict[tuple[int, ...], Any] = {}

    def request_for(shape: tuple[int, ...]):
        """An infer request compiled for this exact input shape (static shapes run ~10 % faster
        than the IR's dynamic ones); a sliding window needs one or two shapes."""
        if shape not in requests:
            static = activated.clone()
            static.reshape(list(shape))
            compiled = core.compile_model(
                static, "CPU", {"INFERENCE_PRECISION_HINT": PRECISION_HINTS[precision]}
            )
            requests[shape] = (compiled.create_infer_request(), compiled.outputs[0])
        return requests[shape]

    def predict(batch: np.ndarray) -> np.ndarray:
        total = None
        for axes in flips:
            x = np.ascontiguousarray(np.flip(batch, axes) if axes else batch, dtype=np.float32)
            request, output = request_for(x.shape)
            p = request.infer([x])[output]  # the request's buffer: copied before the next call
            p = np.flip(p, axes) if axes else p
            if total is None:
                total = np.array(p, dtype=np.float32)
            else:
                total += p
        if len(flips) > 1:
            total /= len(flips)
        return np.ascontiguousarray(total)

    return predict


__all__ = ["PRECISION_HINTS", "converted_ir", "file_digest", "openvino_predict_fn"]
