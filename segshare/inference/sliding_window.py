"""Sliding-window inference with Gaussian blending (pure NumPy, backend-neutral).

The volume is tiled by windows of ``roi_size`` placed as in nnU-Net: the first window starts at
0, the last one ends at the volume's edge, and the windows in between are evenly spaced with a step
of at most ``roi * (1 - overlap)``. Windows are sent to ``predict_fn`` ``sw_batch_size`` at a time,
each prediction is weighted by a Gaussian importance map (sigma = ``roi * sigma_scale``) and
accumulated in place into one float32 buffer, which is then normalised in place by the summed
weights.

Memory: besides the input, one ``(D, H, W, K)`` float32 buffer and one ``(D, H, W)`` float32 weight
map are allocated; volumes smaller than the window are padded (a copy of the small volume only).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np

PredictFn = Callable[[np.ndarray], np.ndarray]


def check_window_args(
    roi_size: int | Sequence[int], overlap: float = 0.5, sw_batch_size: int = 2
) -> tuple[int, int, int]:
    """Validate the sliding-window arguments; returns ``roi_size`` as three positive ints.

    Raises:
        ValueError: Quoting the bad value.
    """
    roi = (roi_size,) * 3 if isinstance(roi_size, (int, np.integer)) else tuple(roi_size)
    if len(roi) != 3 or any(int(r) != r or r < 1 for r in roi):
        raise ValueError(f"roi_size must be three positive integers, got {roi_size!r}.")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap!r}.")
    if int(sw_batch_size) != sw_batch_size or sw_batch_size < 1:
        raise ValueError(f"sw_batch_size must be a positive integer, got {sw_batch_size!r}.")
    return tuple(int(r) for r in roi)


@dataclass(frozen=True)
class WindowSettings:
    """How a volume is tiled and blended (``conf/window/default.yaml``): one object for training's
    validation, its final evaluation and ``segshare-predict``.

    Attributes:
        roi_size: window ``(d, h, w)`` on the preprocessed grid; None = the model's training
            patch (resolved with :meth:`with_default_roi`).
        overlap: fraction of a window shared with its neighbour along each axis, in ``[0, 1)``.
        sw_batch_size: windows per model call.
        sigma_scale: Gaussian sigma as a fraction of ``roi_size`` (nnU-Net: 1/8).
        patch_size: the model's training patch (set by :meth:`with_default_roi`); when set, a
            ``roi_size`` wider than it is fitted to each volume (:func:`fitted_roi`).
        stride: the network's total stride per axis (set by :meth:`with_default_roi`), the
            step of a fitted window's size; None: ``gcd(roi_size, patch_size)``.

    Raises:
        ValueError: quoting a bad value (checked on construction).
    """

    roi_size: tuple[int, int, int] | None
    overlap: float
    sw_batch_size: int
    sigma_scale: float
    patch_size: tuple[int, int, int] | None = None
    stride: tuple[int, int, int] | None = None

    def __post_init__(self) -> None:
        roi = check_window_args(
            8 if self.roi_size is None else self.roi_size, self.overlap, self.sw_batch_size
        )
        if self.roi_size is not None:
            object.__setattr__(self, "roi_size", roi)
        if not float(self.sigma_scale) > 0:
            raise ValueError(f"sigma_scale must be > 0, got {self.sigma_scale!r}.")
        for name in ("patch_size", "stride"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, check_window_args(getattr(self, name)))

    def with_default_roi(
        self, patch_size: Sequence[int], stride: Sequence[int] | None = None
    ) -> WindowSettings:
        """These settings for a model trained on ``patch_size`` (whose window sizes must divide
        by ``stride``, when known): ``roi_size`` set to the patch unless one was given, and a
        wider ``roi_size`` fitted to each volume (:func:`fitted_roi`)."""
        roi = tuple(patch_size) if self.roi_size is None else self.roi_size
        stride = None if stride is None else tuple(stride)
        return replace(self, roi_size=roi, patch_size=tuple(patch_size), stride=stride)

    def roi_for(self, shape: Sequence[int]) -> tuple[int, int, int]:
        """The window for a volume of spatial ``shape``: ``roi_size``, fitted to the volume when
        it is wider than the training patch (:func:`fitted_roi`)."""
        if self.roi_size is None:
            raise ValueError("roi_size is not set: call with_default_roi(patch_size) first.")
        if self.patch_size is None:
            return self.roi_size
        return fitted_roi(shape, self.roi_size, self.patch_size, self.stride)

    def predict(
        self,
        volume: np.ndarray,
        predict_fn: PredictFn,
        num_classes: int | None = None,
        progress: bool = False,
    ) -> np.ndarray:
        """:func:`sliding_window_inference` of ``volume`` with these settings."""
        return sliding_window_inference(
            volume,
            predict_fn,
            self.roi_for(np.shape(volume)[:3]),
            overlap=self.overlap,
            sw_batch_size=self.sw_batch_size,
            sigma_scale=self.sigma_scale,
            num_classes=num_classes,
            progress=progress,
        )


def fitted_roi(
    shape: Sequence[int],
    roi_size: Sequence[int],
    patch_size: Sequence[int],
    stride: Sequence[int] | None = None,
) -> tuple[int, int, int]:
    """A window no wider than the volume needs: along each axis where ``roi_size`` exceeds both
    the volume and the training patch, the smallest multiple of the network's ``stride`` that
    covers the volume, and never less than the patch.

    A network with instance normalisation sees a window's statistics: a window mostly made of
    padding (a 2x window over a hippocampus case smaller than the patch) is far from anything
    it was trained on (Dice 0.82 -> 0.002, docs/benchmarks.md). The training patch is padded
    only as in training; a window fitted to the volume is padded by less than ``stride``.
    Without ``stride``, ``gcd(roi, patch)`` steps (both divide by the stride, so their gcd does).

    Args:
        shape: the volume's spatial shape ``(D, H, W)``.
        roi_size: the window asked for.
        patch_size: the training patch.
        stride: the network's total stride per axis, if known.

    Returns:
        The window, ``patch <= window <= roi`` along each axis where ``roi > patch``.
    """
    stride = stride or [math.gcd(int(r), int(p)) for r, p in zip(roi_size, patch_size, strict=True)]
    fitted = []
    for size, roi, patch, unit in zip(shape, roi_size, patch_size, stride, strict=True):
        roi, patch = int(roi), int(patch)
        if size >= roi or roi <= patch:
            fitted.append(roi)
            continue
        fitted.append(min(roi, max(patch, -(-int(size) // int(unit)) * int(unit))))
    return tuple(fitted)


@lru_cache(maxsize=8)
def gaussian_importance_map(
    roi_size: tuple[int, int, int], sigma_scale: float = 0.125
) -> np.ndarray:
    """Gaussian weights for one window, peak 1 at the centre (nnU-Net: sigma = roi * sigma_scale).

    Args:
        roi_size: Window size ``(d, h, w)``.
        sigma_scale: Sigma as a fraction of the window size along each axis.

    Returns:
        ``(d, h, w)`` float32 weights in ``(0, 1]`` (read-only; cached per roi). Strictly positive,
        so every voxel covered by a window gets a positive total weight.
    """
    if not sigma_scale > 0:
        raise ValueError(f"sigma_scale must be > 0, got {sigma_scale!r}.")
    axes = []
    for r in roi_size:
        sigma = r * sigma_scale
        x = np.arange(r, dtype=np.float64) - (r // 2)
        axes.append(np.exp(-0.5 * (x / sigma) ** 2))
    g = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    g /= g.max()
    g = np.maximum(g, np.finfo(np.float32).tiny * 1e6).astype(np.float32)
    g.setflags(write=False)
    return g


def window_starts(size: int, roi: int, overlap: float) -> list[int]:
    """Start positions along one axis (``size >= roi``), first at 0 and last at ``size - roi``.

    Args:
        size: Length of the (padded) volume along the axis.
        roi: Window length along the axis.
        overlap: Fraction of the window shared by neighbours, in ``[0, 1)``.

    Returns:
        Sorted, de-duplicated start indices.
    """
    step = max(roi * (1.0 - overlap), 1.0)
    n = int(np.ceil((size - roi) / step)) + 1
    if n == 1:
        return [0]
    return sorted({int(round(s)) for s in np.linspace(0, size - roi, n)})


def _window_slices(shape: Sequence[int], roi: Sequence[int], overlap: float) -> list[tuple]:
    """All window slices over a volume of ``shape`` (>= roi on every axis), in C order."""
    starts = [window_starts(s, r, overlap) for s, r in zip(shape, roi, strict=True)]
    return [
        tuple(slice(p, p + r) for p, r in zip(pos, roi, strict=True))
        for pos in itertools.product(*starts)
    ]


def _batches(
    volume: np.ndarray, slices: list[tuple], size: int
) -> Iterator[tuple[list, np.ndarray]]:
    """Yield ``(slices, windows)`` with windows stacked as a float32 ``(B, *roi, C)`` batch."""
    for i in range(0, len(slices), size):
        chunk = slices[i : i + size]
        yield chunk, np.stack([volume[s] for s in chunk]).astype(np.float32, copy=False)


def sliding_window_inference(
    volume: np.ndarray,
    predict_fn: PredictFn,
    roi_size: int | Sequence[int],
    *,
    overlap: float = 0.5,
    sw_batch_size: int = 2,
    sigma_scale: float = 0.125,
    num_classes: int | None = None,
    pad_value: float = 0.0,
    progress: bool = False,
) -> np.ndarray:
    """Predict a whole volume by blending Gaussian-weighted window predictions.

    Args:
        volume: ``(D, H, W, C)`` image (any size; cast to float32 window by window).
        predict_fn: Maps a float32 batch ``(B, *roi_size, C)`` to ``(B, *roi_size, K)`` class
            probabilities (softmax already applied). ``B <= sw_batch_size``. It is called from one
            worker thread, so the next batch is predicted while the last one is accumulated.
        roi_size: Window size ``(d, h, w)`` or one int for all axes.
        overlap: Fraction of a window shared with its neighbour along each axis, in ``[0, 1)``.
        sw_batch_size: Windows per ``predict_fn`` call.
        sigma_scale: Gaussian sigma as a fraction of ``roi_size`` (nnU-Net: 1/8).
        num_classes: ``K``; checked against the predictions when given.
        pad_value: Value used to pad volumes smaller than the window (0 = the mean after z-scoring).
        progress: Show a tqdm bar over windows.

    Returns:
        ``(D, H, W, K)`` float32 probabilities (weighted mean of the overlapping predictions).

    Raises:
        ValueError: On a bad argument or a prediction of the wrong shape; the message quotes it.
    """
    if not isinstance(volume, np.ndarray) or volume.ndim != 4:
        raise ValueError(
            f"volume must be a (D, H, W, C) numpy array, got {type(volume).__name__} "
            f"with shape {getattr(volume, 'shape', None)}."
        )
    roi = check_window_args(roi_size, overlap, sw_batch_size)
    shape = volume.shape[:3]
    pads = [(0, max(r - s, 0)) for s, r in zip(shape, roi, strict=True)]
    if any(p[1] for p in pads):
        volume = np.pad(volume, [*pads, (0, 0)], constant_values=pad_value)
    padded = volume.shape[:3]
    gauss = gaussian_importance_map(roi, float(sigma_scale))
    slices = _window_slices(padded, roi, overlap)

    weights = np.zeros(padded, dtype=np.float32)
    for s in slices:
        weights[s] += gauss
    out = None
    bar = _progress_bar(len(slices), progress)

    def accumulate(chunk: list, future) -> None:
        nonlocal out
        out = _accumulate(out, chunk, future.result(), gauss, padded, num_classes)
        bar.update(len(chunk))

    # One worker runs predict_fn (TF/JAX release the GIL), so the main thread stacks the next
    # windows and accumulates the last predictions meanwhile.
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = None
        for chunk, windows in _batches(volume, slices, int(sw_batch_size)):
            future = pool.submit(predict_fn, windows)
            if pending is not None:
                accumulate(*pending)
            pending = (chunk, future)
        accumulate(*pending)
    bar.close()
    out /= weights[..., None]
    if any(p[1] for p in pads):
        out = np.ascontiguousarray(out[tuple(slice(0, s) for s in shape)])
    return out


def _accumulate(out, chunk, pred, gauss, padded, num_classes):
    """Add the Gaussian-weighted predictions of one batch into ``out`` (allocated on first use)."""
    pred, roi = np.asarray(pred), gauss.shape
    if pred.ndim != 5 or pred.shape[0] != len(chunk) or tuple(pred.shape[1:4]) != roi:
        raise ValueError(
            f"predict_fn must return ({len(chunk)}, {', '.join(map(str, roi))}, K) "
            f"probabilities, got shape {pred.shape}."
        )
    k = pred.shape[-1]
    if num_classes is not None and k != num_classes:
        raise ValueError(f"predict_fn returned {k} classes, expected num_classes={num_classes}.")
    if out is None:
        out = np.zeros((*padded, k), dtype=np.float32)
    g = gauss[..., None]
    scale_in_place = pred.flags.writeable and pred.dtype == np.float32
    for s, p in zip(chunk, pred, strict=True):
        region = out[s]
        if scale_in_place:  # no window-sized temporary
            p *= g
            region += p
        else:
            region += p * g
    return out


def _progress_bar(total: int, enabled: bool):
    """A tqdm bar over windows, when ``enabled`` and only on a terminal: in a log file (a SLURM
    job, CI) a transient inner bar would leave one line per refresh, so only the cases bar shows."""
    from tqdm.auto import tqdm

    disable = None if enabled else True  # None: tqdm disables itself when stderr is not a TTY
    return tqdm(total=total, desc="windows", unit="win", leave=False, disable=disable)
