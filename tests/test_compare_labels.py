"""scripts/compare_labels.py: bit-identical label folders pass, one changed voxel fails."""

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "compare_labels.py"


def _write(folder: Path, name: str, labels: np.ndarray) -> None:
    folder.mkdir(exist_ok=True)
    nib.save(nib.Nifti1Image(labels.astype(np.uint8), np.diag([0.8, 1, 2, 1])), folder / name)


def test_compare_labels_reports_each_case(tmp_path):
    labels = np.zeros((5, 6, 7), np.uint8)
    labels[1:3, 2:5, 3:6] = 2
    for folder in ("a", "b"):
        _write(tmp_path / folder, "x.nii.gz", labels)
        _write(tmp_path / folder, "y.nii.gz", labels)
    cmd = [sys.executable, str(SCRIPT), str(tmp_path / "a"), str(tmp_path / "b")]
    same = subprocess.run(cmd, capture_output=True, text=True)
    assert same.returncode == 0 and "2 of 2 cases bit-identical" in same.stdout
    changed = labels.copy()
    changed[0, 0, 0] = 1
    _write(tmp_path / "b", "y.nii.gz", changed)
    differ = subprocess.run(cmd, capture_output=True, text=True)
    assert differ.returncode == 1
    assert "y.nii.gz: 1 of 210 voxels differ" in differ.stdout
    assert "1 of 2 cases bit-identical" in differ.stdout
