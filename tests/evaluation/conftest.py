"""Fixtures of the evaluation tests: small label maps and folders of NIfTI label files."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

HIPPOCAMPUS = Path(__file__).resolve().parents[3] / "shared" / "data" / "Task04_Hippocampus"
SPACING = (0.8, 1.0, 1.5)


def blob_labels(shape=(33, 34, 35), seed=0, shift=(0, 0, 0)) -> np.ndarray:
    """A label map with two ellipsoid-ish labels (1 and 2), optionally shifted."""
    rng = np.random.default_rng(seed)
    grid = np.indices(shape).astype(float)
    out = np.zeros(shape, np.uint8)
    for label, centre, radii in ((1, (12, 14, 15), (6, 7, 5)), (2, (22, 18, 20), (4, 5, 6))):
        c = np.asarray(centre, float) + np.asarray(shift) + rng.uniform(-0.5, 0.5, 3)
        d = sum(((grid[a] - c[a]) / radii[a]) ** 2 for a in range(3))
        out[d <= 1.0] = label
    return out


def save_label(array: np.ndarray, path: Path, spacing=SPACING) -> Path:
    """Writes ``array`` as a NIfTI label map with a diagonal affine of ``spacing``."""
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = (-10.0, 5.0, 2.0)
    nib.save(nib.Nifti1Image(array.astype(np.uint8), affine), str(path))
    return path


@pytest.fixture
def label_folders(tmp_path: Path) -> dict[str, Path]:
    """ref/ and pred/ folders of 4 cases (case_3 has no prediction), dataset.json, images."""
    ref, pred, images = (
        tmp_path / "raw" / "labelsTr",
        tmp_path / "pred",
        tmp_path / "raw" / "imagesTr",
    )
    for folder in (ref, pred, images):
        folder.mkdir(parents=True)
    for i in range(4):
        ref_map = blob_labels(seed=i)
        save_label(ref_map, ref / f"case_{i}.nii.gz")
        img = ref_map * 40 + np.random.default_rng(i).normal(100, 10, ref_map.shape)
        affine = np.diag([*SPACING, 1.0])
        affine[:3, 3] = (-10.0, 5.0, 2.0)
        nib.save(
            nib.Nifti1Image(img.astype(np.float32), affine), str(images / f"case_{i}_0000.nii.gz")
        )
        if i != 3:
            save_label(blob_labels(seed=i, shift=(i, 0, -1)), pred / f"case_{i}.nii.gz")
    (tmp_path / "raw" / "dataset.json").write_text(
        json.dumps({"labels": {"background": 0, "left": 1, "right": 2}, "file_ending": ".nii.gz"})
    )
    return {"ref": ref, "pred": pred, "images": images, "root": tmp_path}
