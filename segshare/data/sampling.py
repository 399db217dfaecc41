"""Random training patches from the cache, a share of each batch forced onto foreground.

As nnU-Net: the last ``round(B * p)`` samples of a batch of ``B`` (``p`` =
``oversample_foreground``) are centred near a voxel of a randomly chosen foreground class present
in the case (from the cached ``class_locations``); the others are uniformly random. Volumes smaller
than the patch are zero-padded (image 0 = the normalised mean, label 0 = background). Every draw
takes a ``numpy.random.Generator``: the same seed gives the same patches.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from segshare.data.cache import load_cached_case


def crop_with_padding(array: np.ndarray, start: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """``array[start:start+size]`` over the first three axes, zero-filled where out of bounds.

    Args:
        array: ``(D, H, W)`` or ``(D, H, W, C)``.
        start: corner per axis (may be negative or run past the end).
        size: patch size per axis.
    """
    out = np.zeros((*size, *array.shape[3:]), dtype=array.dtype)
    src, dst = [], []
    for lo, p, s in zip(start, size, array.shape[:3], strict=True):
        a, b = max(lo, 0), min(lo + p, s)
        src.append(slice(a, max(a, b)))
        dst.append(slice(a - lo, a - lo + max(0, b - a)))
    out[tuple(dst)] = array[tuple(src)]
    return out


class PatchSampler:
    """Draws ``(image, label)`` patches from cached cases (opened lazily as memory maps).

    Args:
        cache_dir: the cache folder from :func:`segshare.data.cache.preprocess_dataset`.
        case_ids: the cases to sample from (e.g. a fold's training cases).
        patch_size: ``(D, H, W)`` voxels.
        oversample_foreground: share of each batch forced to contain foreground, in ``[0, 1]``.
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike,
        case_ids: Sequence[str],
        patch_size: Sequence[int],
        oversample_foreground: float = 1 / 3,
    ):
        if len(patch_size) != 3 or any(int(p) < 1 for p in patch_size):
            raise ValueError(f"patch_size must be 3 positive integers, got {list(patch_size)}")
        if not 0.0 <= oversample_foreground <= 1.0:
            raise ValueError(
                f"oversample_foreground must be in [0, 1], got {oversample_foreground}"
            )
        if not case_ids:
            raise ValueError("case_ids is empty: nothing to sample from")
        self.cache_dir = Path(cache_dir)
        self.case_ids = list(case_ids)
        self.patch_size = tuple(int(p) for p in patch_size)
        self.oversample_foreground = float(oversample_foreground)
        self._cases: dict[str, tuple] = {}

    def __getstate__(self) -> dict:
        """Pickle without the opened memory maps (they would be copied in full)."""
        return {**self.__dict__, "_cases": {}}

    def _case(self, case_id: str) -> tuple:
        if case_id not in self._cases:
            image, label, props = load_cached_case(self.cache_dir, case_id)
            locs = {
                int(k): np.asarray(v, dtype=np.int64).reshape(-1, 3)
                for k, v in props.get("class_locations", {}).items()
                if len(v)
            }
            self._cases[case_id] = (image, label, locs)
        return self._cases[case_id]

    @property
    def num_channels(self) -> int:
        """Image channels of the cached cases."""
        return int(self._case(self.case_ids[0])[0].shape[-1])

    def _corner(self, shape: Sequence[int], rng: np.random.Generator, voxel=None) -> list[int]:
        corner = []
        for ax, (s, p) in enumerate(zip(shape, self.patch_size, strict=True)):
            lo, hi = min(0, s - p), max(0, s - p)
            if voxel is not None:  # keep the voxel inside the patch
                lo, hi = max(lo, int(voxel[ax]) - p + 1), min(hi, int(voxel[ax]))
            corner.append(int(rng.integers(lo, hi + 1)))
        return corner

    def sample(
        self,
        rng: np.random.Generator,
        force_foreground: bool = False,
        case_id: str | None = None,
        margin: Sequence[int] = (0, 0, 0),
    ) -> tuple[np.ndarray, np.ndarray]:
        """One patch: image ``(*size, C)`` float32 and label ``(*size)`` int32, where
        ``size = patch_size + 2 * margin``; the forced foreground voxel lies in the central
        ``patch_size`` part (the part left after a spatial augmentation crops the margin)."""
        cid = case_id if case_id is not None else self.case_ids[rng.integers(len(self.case_ids))]
        image, label, locs = self._case(cid)
        voxel = None
        if force_foreground and locs:
            cls = list(locs)[rng.integers(len(locs))]
            voxel = locs[cls][rng.integers(len(locs[cls]))]
        corner = [
            c - m for c, m in zip(self._corner(image.shape[:3], rng, voxel), margin, strict=True)
        ]
        size = [p + 2 * m for p, m in zip(self.patch_size, margin, strict=True)]
        img = crop_with_padding(image, corner, size).astype(np.float32, copy=False)
        if label is None:
            return img, np.zeros(size, np.int32)
        return img, crop_with_padding(label, corner, size).astype(np.int32)

    def sample_batch(
        self, batch_size: int, rng: np.random.Generator, margin: Sequence[int] = (0, 0, 0)
    ) -> tuple[np.ndarray, np.ndarray]:
        """A batch: x ``(B, *size, C)`` float32, y ``(B, *size)`` int32 (``size`` as in
        :meth:`sample`); the last ``round(B * oversample_foreground)`` samples are forced onto
        foreground."""
        n_random = round(batch_size * (1.0 - self.oversample_foreground))
        pairs = [self.sample(rng, b >= n_random, margin=margin) for b in range(batch_size)]
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
