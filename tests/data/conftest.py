"""Fixtures for the data pipeline tests: tiny synthetic datasets and NIfTI writers."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from segshare.data.preprocessing import Plan
from segshare.data.synthetic import generate_synthetic_dataset

HIPPOCAMPUS = Path(__file__).resolve().parents[3] / "shared" / "data" / "Task04_Hippocampus"


#: A 1 mm, one-channel z-score plan with one foreground label, for preprocessing tests.
ONE_LABEL_PLAN = Plan(
    target_spacing=(1.0, 1.0, 1.0),
    normalization=["zscore"],
    ct_stats=None,
    labels={"background": 0, "a": 1},
    in_channels=1,
    num_classes=2,
)


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    """Write ``data`` to ``path`` (parents created); identity affine by default."""
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
    return path


def sphere_label(shape: tuple[int, int, int], radius: float, value: int = 1) -> np.ndarray:
    """A label map with a centred ball of ``value``."""
    grids = np.ogrid[tuple(slice(0, s) for s in shape)]
    r2 = sum((g - (s - 1) / 2) ** 2 for g, s in zip(grids, shape, strict=True))
    return np.where(r2 <= radius**2, value, 0).astype(np.uint8)


def make_msd_dataset(root: Path, num_cases: int = 6, shape=(13, 14, 15), seed: int = 0) -> Path:
    """A tiny MSD-layout dataset (``dataset.json`` with a ``training`` list), labels {0, 1, 2}."""
    rng = np.random.default_rng(seed)
    training = []
    for i in range(num_cases):
        img = (rng.normal(100, 10, shape) + 1).astype(np.float32)
        lbl = sphere_label(shape, 4)
        lbl[: shape[0] // 2][lbl[: shape[0] // 2] == 1] = 2
        write_nifti(root / "imagesTr" / f"case_{i:02d}.nii.gz", img)
        write_nifti(root / "labelsTr" / f"case_{i:02d}.nii.gz", lbl)
        training.append(
            {"image": f"./imagesTr/case_{i:02d}.nii.gz", "label": f"./labelsTr/case_{i:02d}.nii.gz"}
        )
    meta = {
        "name": "tiny",
        "modality": {"0": "MRI"},
        "labels": {"0": "background", "1": "a", "2": "b"},
        "training": training,
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A read-only-by-convention synthetic dataset (8 cases, 20-26 voxels per axis)."""
    root = tmp_path_factory.mktemp("syn") / "synthetic"
    return generate_synthetic_dataset(root, num_cases=8, seed=3, shape_range=(20, 26))


@pytest.fixture
def hippocampus_root() -> Path:
    """The real hippocampus dataset; skips when absent."""
    if not (HIPPOCAMPUS / "dataset.json").exists():
        pytest.skip(f"real data not found at {HIPPOCAMPUS}")
    return HIPPOCAMPUS


def data_settings(*overrides: str):
    """The real ``data`` group (``conf/data/default.yaml``) with Hydra overrides, instantiated."""
    from hydra import compose, initialize_config_module

    from segshare.cli import instantiate

    with initialize_config_module(version_base="1.3", config_module="segshare.conf"):
        cfg = compose("preprocess", overrides=["paths.root_dir=/nonexistent", *overrides])
    return instantiate(cfg.data)


@pytest.fixture(scope="session")
def prepared(synthetic_root, tmp_path_factory):
    """The synthetic dataset prepared (validated, cached, split) into a temporary folder."""
    from segshare.data.prepare import prepare_dataset

    out = tmp_path_factory.mktemp("prep") / "pp"
    settings = data_settings(
        f"data.root={synthetic_root}",
        f"data.preprocessed_dir={out}",
        "data.num_workers=1",
        "data.fold=0",
        "data.num_folds=4",
    )
    return prepare_dataset(settings, progress=False)
