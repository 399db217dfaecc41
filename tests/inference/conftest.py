"""Fixtures for the inference tests: a tiny trained-run folder and scans with chosen geometry."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

PATCH = (16, 16, 16)


def threshold_model(in_channels: int = 1, gain: float = 20.0):
    """A 1x1x1 conv giving class 1 where channel 0 > 0 (after z-scoring: above the mean)."""
    import keras

    inputs = keras.Input((None, None, None, in_channels))
    conv = keras.layers.Conv3D(2, 1, name="head")
    model = keras.Model(inputs, conv(inputs))
    kernel = np.zeros((1, 1, 1, in_channels, 2), np.float32)
    kernel[..., 0, 0], kernel[..., 0, 1] = -gain, gain
    conv.set_weights([kernel, np.zeros(2, np.float32)])
    return model


def asymmetric_model():
    """A 3-tap conv along D with an asymmetric kernel: not flip-equivariant (for TTA tests)."""
    import keras

    inputs = keras.Input((None, None, None, 1))
    conv = keras.layers.Conv3D(2, (3, 1, 1), padding="same")
    model = keras.Model(inputs, conv(inputs))
    kernel = np.zeros((3, 1, 1, 1, 2), np.float32)
    kernel[:, 0, 0, 0, 1] = [2.0, 1.0, -3.0]
    conv.set_weights([kernel, np.zeros(2, np.float32)])
    return model


def mirrored_mean(predict_fn, x: np.ndarray) -> np.ndarray:
    """Reference TTA: the mean of ``predict_fn`` over all flips of axes 1-3, flipped back."""
    from segshare.inference.model_io import mirror_axes_combinations

    flips = mirror_axes_combinations((1, 2, 3))
    return np.mean([np.flip(predict_fn(np.flip(x, a).copy()), a) for a in flips], axis=0)


def make_run_dir(
    folder: Path, model=None, in_channels: int = 1, spacing=(1.0, 1.0, 1.0), legacy: bool = False
) -> Path:
    """Write a run folder like segshare-train's: model.keras, plan.json, run.json; with ``legacy``
    like segshare 0.1's (no run.json; the patch only in config.yaml, with the rest of the config).
    """
    from segshare.data.preprocessing import Plan
    from segshare.inference.trained_run import write_run_info

    folder.mkdir(parents=True, exist_ok=True)
    (model or threshold_model(in_channels)).save(folder / "model.keras")
    plan = Plan(
        target_spacing=tuple(spacing),
        normalization=["zscore"] * in_channels,
        ct_stats=None,
        labels={"background": 0, "bright": 1},
        in_channels=in_channels,
        num_classes=2,
    )
    plan.save(folder / "plan.json")
    if legacy:
        (folder / "config.yaml").write_text(
            f"seed: 12345\ndata:\n  root: /somewhere\n  patch_size: {list(PATCH)}\n"
            f"trainer:\n  overlap: 0.5\n"
        )
    else:
        write_run_info(folder, plan, PATCH, sharing="none")
    return folder


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory) -> Path:
    """A trained-run folder with the threshold model (1 channel, 2 classes, 1 mm plan)."""
    return make_run_dir(tmp_path_factory.mktemp("run"))


def write_scan(
    path: Path,
    data: np.ndarray,
    affine: np.ndarray,
    qform_code: int = 1,
    sform_code: int = 1,
    dtype=np.int16,
) -> Path:
    """Save ``data`` as NIfTI with the given affine and qform/sform codes."""
    img = nib.Nifti1Image(data.astype(dtype), affine)
    img.set_qform(affine, code=qform_code)
    img.set_sform(affine, code=sform_code)
    img.header["descrip"] = b"test scan"
    nib.save(img, str(path))
    return path


def random_scan(shape, seed: int = 0) -> np.ndarray:
    """Smooth positive intensities (no zero voxel, so preprocessing crops nothing)."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    return 100 + 1000 * gaussian_filter(rng.random(shape), 2.0)


def assert_same_geometry(pred: nib.Nifti1Image, src: nib.Nifti1Image) -> None:
    """A prediction has its scan's shape, affine, qform/sform (and codes), orientation, zooms,
    and an unsigned 8-bit label dtype."""
    name = src.get_filename()
    assert pred.shape == src.shape[:3], name
    np.testing.assert_allclose(pred.affine, src.affine, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(pred.get_qform(), src.get_qform(), atol=1e-5, err_msg=name)
    np.testing.assert_allclose(pred.get_sform(), src.get_sform(), atol=1e-6, err_msg=name)
    assert int(pred.header["qform_code"]) == int(src.header["qform_code"]), name
    assert int(pred.header["sform_code"]) == int(src.header["sform_code"]), name
    assert nib.aff2axcodes(pred.affine) == nib.aff2axcodes(src.affine), name
    np.testing.assert_allclose(pred.header.get_zooms()[:3], src.header.get_zooms()[:3], rtol=1e-6)
    assert pred.get_data_dtype() == np.uint8, name


def oblique_affine(spacing=(1.0, 1.0, 1.0), degrees: float = 20.0) -> np.ndarray:
    """An affine rotated about two axes, with the given voxel spacing."""
    a, b = np.deg2rad(degrees), np.deg2rad(degrees / 2)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    affine = np.eye(4)
    affine[:3, :3] = rz @ rx @ np.diag(spacing)
    affine[:3, 3] = [-12.5, 30.0, 7.25]
    return affine


@pytest.fixture()
def compose_cfg(tmp_path):
    """Compose the real predict.yaml with outputs under ``tmp_path`` (no progress bars)."""
    from hydra import compose, initialize_config_module

    def _compose(*overrides: str):
        with initialize_config_module(version_base="1.3", config_module="segshare.conf"):
            return compose(
                "predict",
                overrides=[
                    f"paths.root_dir={tmp_path}",
                    f"paths.output_dir={tmp_path}/out",
                    "inference.progress=false",
                    *overrides,
                ],
            )

    return _compose
