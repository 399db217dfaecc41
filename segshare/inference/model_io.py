"""Loading a Keras model safely and turning it into a fast batched ``predict_fn``.

A whole trained run (model, plan, window) is read by
:func:`segshare.inference.trained_run.load_trained_run`, which uses these two.
"""

from __future__ import annotations

import itertools
import json
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

#: Largest uncompressed ``config.json`` / ``metadata.json`` a ``.keras`` archive may declare; a
#: segshare U-Net's config is ~100 KiB, and Keras parses these members whole into memory.
MAX_JSON_MEMBER_BYTES = 64 * 2**20
_JSON_MEMBERS = ("config.json", "metadata.json")


class OversizedArchiveError(ValueError):
    """A ``.keras`` archive declares a JSON member over :data:`MAX_JSON_MEMBER_BYTES`."""


def load_model_safely(path: str | Path) -> Any:
    """Load a ``.keras`` model with Keras safe mode on (no arbitrary code is ever run).

    segshare's own layers are registered first, so models built by ``segshare.models`` load.

    Raises:
        ValueError: Naming the file when it holds code that safe mode refuses (a ``Lambda``
            layer), declares a ``config.json`` or ``metadata.json`` larger than
            :data:`MAX_JSON_MEMBER_BYTES` (checked in the zip directory, before anything is
            decompressed), or cannot be read as a Keras model.
    """
    import keras

    try:  # registers segshare's serialisable layers (absent while the models are being built)
        import segshare.models  # noqa: F401
    except ImportError:
        pass
    path = Path(path)
    lambdas = _lambda_layers(path)
    if lambdas:
        raise ValueError(
            f"{path}: refused to load: the model contains arbitrary Python code (Lambda layer "
            f"{', '.join(map(repr, lambdas))}), which is never executed (Keras safe mode). Rebuild "
            f"the model without Lambda layers, or make the code a registered serialisable layer."
        )
    try:
        return keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as err:  # keras raises ValueError/TypeError/zipfile errors alike
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path}: cannot load the Keras model (safe mode): {first}") from err


def with_precision(model: Any, precision: str) -> Any:
    """The model computing in ``precision``: itself for ``float32`` (or a model already saved
    in mixed precision), else a copy built under Keras' ``mixed_bfloat16`` policy (variables
    float32, computation bfloat16) with the same weights. The output heads (``head*`` layers)
    stay float32, and the probabilities are taken in float32 (:func:`make_predict_fn`), so only
    the network's body runs in bfloat16; the sliding window accumulates in float32."""
    import keras

    if precision == "float32":
        return model
    if precision != "bfloat16":
        raise ValueError(f"precision must be float32 or bfloat16, got {precision!r}")
    if keras.backend.standardize_dtype(model.compute_dtype) != "float32":
        return model  # trained and saved in mixed precision: it computes so already
    config = model.get_config()
    _set_policies(config, "mixed_bfloat16")
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_bfloat16")  # layers built inside layers
    try:
        copy = type(model).from_config(config)
    finally:
        keras.mixed_precision.set_global_policy(previous)
    copy.set_weights(model.get_weights())
    return copy


def _set_policies(node: Any, policy: str, in_head: bool = False) -> None:
    """Set every ``DTypePolicy`` of a model config to ``policy``, except inside head layers."""
    if isinstance(node, list):
        for item in node:
            _set_policies(item, policy, in_head)
        return
    if not isinstance(node, dict):
        return
    if node.get("class_name") == "DTypePolicy" and isinstance(node.get("config"), dict):
        if not in_head:
            node["config"]["name"] = policy
        return
    config = node.get("config")
    name = config.get("name") if isinstance(config, dict) else None
    head = in_head or (isinstance(name, str) and name.startswith("head"))
    for value in node.values():
        _set_policies(value, policy, head)


def _read_config(path: Path) -> Any:
    """The parsed ``config.json`` of a ``.keras`` archive, after checking the declared sizes of
    its JSON members (a read never goes past a declared size: ``zipfile`` stops there)."""
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if info.filename in _JSON_MEMBERS and info.file_size > MAX_JSON_MEMBER_BYTES:
                raise OversizedArchiveError(
                    f"{path}: refused to load: its {info.filename} is "
                    f"{info.file_size / 2**20:.0f} MiB uncompressed, over the "
                    f"{MAX_JSON_MEMBER_BYTES // 2**20} MiB a model's description may take "
                    f"(a damaged or hostile archive)."
                )
        return json.loads(archive.read("config.json"))


def _lambda_layers(path: Path) -> list[str]:
    """Names of the ``Lambda`` layers in a ``.keras`` archive's config (read, never executed)."""
    try:
        config = _read_config(path)
    except OversizedArchiveError:
        raise
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path}: not a readable .keras model archive ({err}).") from None
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("class_name") == "Lambda":
                found.append(str(node.get("config", {}).get("name", "?")))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(config)
    return found


def mirror_axes_combinations(axes: Sequence[int]) -> list[tuple[int, ...]]:
    """All subsets of ``axes``, the identity first: the flips of mirroring TTA."""
    return [c for n in range(len(axes) + 1) for c in itertools.combinations(axes, n)]


def make_predict_fn(
    model: Any,
    *,
    tta: bool = False,
    mirror_axes: Sequence[int] = (1, 2, 3),
    activation: str = "softmax",
) -> Callable[[np.ndarray], np.ndarray]:
    """Wrap a Keras model mapping ``(B, D, H, W, C)`` to logits ``(B, D, H, W, K)``.

    The returned function maps a float32 NumPy batch to probabilities (NumPy float32): the
    softmax over classes, or with ``activation="sigmoid"`` one sigmoid per output (regions). On
    the TensorFlow backend the forward pass and softmax run in one ``tf.function`` traced once for
    any batch and window size (no per-call ``model.predict`` overhead); on JAX in one ``jax.jit``
    over ``model.stateless_call`` (a smaller last batch is padded to the first batch's size, so it
    compiles once); on other backends the model is called directly. Deep-supervision models (a
    list of outputs) use the first, full-resolution output; mixed-precision logits are cast to
    float32 before the softmax. With ``tta`` the probabilities are averaged over all mirrorings of
    the batch along ``mirror_axes`` (batch axes 1..3 = spatial axes), each flipped back.
    """
    import keras

    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    flips = mirror_axes_combinations(tuple(mirror_axes)) if tta else [()]
    backend = keras.backend.backend()

    def probabilities(out: Any) -> Any:
        return _probabilities(out, activation)

    if backend == "tensorflow":
        import tensorflow as tf

        shape = model.inputs[0].shape if getattr(model, "inputs", None) else (None,) * 5
        spec = tf.TensorSpec([None] * (len(shape) - 1) + [shape[-1]], tf.float32)

        @tf.function(input_signature=[spec])
        def forward(x):
            return _mirrored_mean(x, flips, lambda xi: probabilities(model(xi, training=False)))

        return lambda batch: forward(batch).numpy()
    if backend == "jax":
        return _jax_predict_fn(model, flips, probabilities)

    def forward_any(batch: np.ndarray) -> np.ndarray:
        x = keras.ops.convert_to_tensor(batch)
        p = _mirrored_mean(x, flips, lambda xi: probabilities(model(xi, training=False)))
        return keras.ops.convert_to_numpy(p).astype(np.float32, copy=False)

    return forward_any


#: The output activations: softmax over classes, or one sigmoid per region.
ACTIVATIONS = ("softmax", "sigmoid")


def _probabilities(out: Any, activation: str) -> Any:
    """Float32 probabilities of a model's logits (the first output under deep supervision, the
    full-resolution one): softmax over the last axis, or elementwise sigmoid."""
    import keras

    if isinstance(out, (list, tuple)):
        out = out[0]
    out = keras.ops.cast(out, "float32")
    if activation == "sigmoid":
        return keras.ops.sigmoid(out)
    return keras.ops.softmax(out, axis=-1)


def _mirrored_mean(x: Any, flips: list[tuple[int, ...]], probabilities: Callable) -> Any:
    """Mean of ``probabilities`` over the flips of ``x``, each flipped back (``keras.ops``)."""
    import keras

    total = None
    for axes in flips:
        p = probabilities(keras.ops.flip(x, axes) if axes else x)
        p = keras.ops.flip(p, axes) if axes else p
        total = p if total is None else total + p
    return total / len(flips)


def _jax_predict_fn(
    model: Any, flips: list[tuple[int, ...]], activate: Callable
) -> Callable[[np.ndarray], np.ndarray]:
    """The JAX version of :func:`make_predict_fn`: one jitted stateless forward + ``activate``,
    over the variables' values at each call (training assigns new ones between validations)."""
    import jax

    @jax.jit
    def forward(trainable, non_trainable, x):
        def probabilities(xi):
            out, _ = model.stateless_call(trainable, non_trainable, xi, training=False)
            return activate(out)

        return _mirrored_mean(x, flips, probabilities)

    batch_size: list[int] = []

    def predict(batch: np.ndarray) -> np.ndarray:
        n = batch.shape[0]
        if not batch_size:
            batch_size.append(n)
        if n < batch_size[0]:  # same shape as the first call: no recompilation
            pad = np.zeros((batch_size[0] - n, *batch.shape[1:]), batch.dtype)
            batch = np.concatenate([batch, pad])
        trainable = [v.value for v in model.trainable_variables]
        non_trainable = [v.value for v in model.non_trainable_variables]
        return np.asarray(forward(trainable, non_trainable, batch))[:n]

    return predict


def slice_predict_fn(
    predict_fn: Callable[[np.ndarray], np.ndarray], slice_axis: int
) -> Callable[[np.ndarray], np.ndarray]:
    """A 2D network's ``predict_fn`` applied to 3D windows across ``slice_axis`` (0, 1, 2 = D, H,
    W): ``(B, *window, C)`` -> ``(B, *window, K)``, every slice of every window in one batch (a
    window of 2D runs is one voxel thick; an ensemble with 3D models passes their thicker one)."""
    axis = 1 + int(slice_axis)

    def predict(batch: np.ndarray) -> np.ndarray:
        moved = np.moveaxis(batch, axis, 1)  # (B, T, a, b, C): T slices per window
        b, t = moved.shape[:2]
        out = np.asarray(predict_fn(moved.reshape(b * t, *moved.shape[2:])))
        return np.moveaxis(out.reshape(b, t, *out.shape[1:]), 1, axis)

    return predict
