from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from hydra import compose, initialize_config_module

from segshare.cli import instantiate
from segshare.data.cache import load_cached_case
from segshare.data.prepare import prepare_dataset
from segshare.data.splits import get_split
from segshare.data.validation import DatasetError
from segshare.preprocess import run

from .conftest import make_msd_dataset, write_nifti
from .test_validation import plant_faults


def _cfg(tmp_path, root=None, *extra):
    with initialize_config_module(version_base="1.3", config_module="segshare.conf"):
        return compose(
            "preprocess",
            overrides=[
                f"paths.root_dir={tmp_path}",
                f"paths.data_dir={tmp_path}/data",
                f"paths.output_dir={tmp_path}/out",
                "progress=false",
                "data.num_workers=1",
                "data.synthetic.num_cases=6",
                "data.synthetic.shape_range=[16,20]",
                *([f"data.root={root}"] if root else []),
                *extra,
            ],
        )


def test_default_config_generates_and_prepares_synthetic(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path)
    prepared = run(cfg)
    out = tmp_path / "data" / "synthetic_preprocessed"
    assert prepared.preprocessed_dir == out
    for name in ("fingerprint.json", "plan.json", "splits.json"):
        assert (out / name).exists()
    assert sorted(prepared.train_ids + prepared.val_ids) == prepared.dataset.case_ids
    assert not set(prepared.train_ids) & set(prepared.val_ids)
    image, label, props = load_cached_case(prepared.cache_dir, prepared.train_ids[0])
    assert isinstance(image, np.memmap) and image.ndim == 4 and label.shape == image.shape[:3]
    assert props["resampled_shape"] == list(label.shape) and "1" in props["class_locations"]
    fp = json.loads((out / "fingerprint.json").read_text())
    assert fp["num_cases"] == 6 and set(fp["class_frequency"]) == {"0", "1", "2"}
    # reused: nothing rewritten
    stamp = {p.name: p.stat().st_mtime_ns for p in prepared.cache_dir.iterdir()}
    again = prepare_dataset(instantiate(cfg.data), progress=False)
    assert again.cache_dir == prepared.cache_dir
    assert stamp == {p.name: p.stat().st_mtime_ns for p in again.cache_dir.iterdir()}
    # an interrupted case (properties JSON missing) is redone; no temp files remain
    (prepared.cache_dir / f"{prepared.train_ids[0]}.json").unlink()
    prepare_dataset(instantiate(cfg.data), progress=False)
    assert (prepared.cache_dir / f"{prepared.train_ids[0]}.json").exists()
    assert not [p for p in prepared.cache_dir.iterdir() if ".tmp" in p.name]
    # a config change gives a new cache folder
    changed = prepare_dataset(
        instantiate(_cfg(tmp_path, None, "data.target_spacing=[1.5,1.5,1.5]").data), progress=False
    )
    assert changed.cache_dir != prepared.cache_dir
    assert changed.plan.target_spacing == (1.5, 1.5, 1.5)

    # validation is skipped while no file changed, redone (and failing) once one does
    assert (out / "validated.json").exists()
    with monkeypatch.context() as m:
        m.setattr("segshare.data.prepare.validate_dataset", None)  # would fail if called
        prepare_dataset(instantiate(cfg.data), progress=False)
    image_file = prepared.dataset.cases[0].images[0]
    image_file.write_bytes(image_file.read_bytes()[:200])
    with pytest.raises(DatasetError, match=image_file.name):
        prepare_dataset(instantiate(cfg.data), progress=False)


def test_splits_written_once_and_reused(tmp_path):
    ids = [f"c{i}" for i in range(11)]
    tr0, va0 = get_split(tmp_path, ids, fold=0, seed=1)
    vals = [get_split(tmp_path, ids, fold=k)[1] for k in range(5)]  # seed ignored once written
    assert vals[0] == va0 and sorted(sum(vals, [])) == sorted(ids)
    assert sorted(tr0 + va0) == sorted(ids)
    with pytest.raises(ValueError, match="differ"):
        get_split(tmp_path, ids[:-1], fold=0)
    with pytest.raises(ValueError, match="data.fold"):
        get_split(tmp_path, ids, fold=7)


def test_prepare_raises_listing_every_problem(tmp_path):
    root = make_msd_dataset(tmp_path / "ds", num_cases=12)
    expected = plant_faults(root)
    with pytest.raises(DatasetError) as info:
        prepare_dataset(
            instantiate(_cfg(tmp_path, root, "data.max_voxels=20000").data), progress=False
        )
    assert len(info.value.problems) == len(expected)


def test_cli_exits_2_naming_every_planted_file(tmp_path):
    root = make_msd_dataset(tmp_path / "ds", num_cases=12)
    expected = plant_faults(root)
    cmd = [
        sys.executable,
        "-m",
        "segshare.preprocess",
        f"data.root={root}",
        f"data.preprocessed_dir={tmp_path}/pp",
        "data.max_voxels=20000",
        "progress=false",
        f"hydra.run.dir={tmp_path}/run",
    ]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 2, res.stderr
    for name in expected:
        assert name in res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    assert not (tmp_path / "pp" / "splits.json").exists()


@pytest.mark.realdata
@pytest.mark.slow
def test_cli_on_hippocampus_exits_0(tmp_path, hippocampus_root):
    cmd = [
        sys.executable,
        "-m",
        "segshare.preprocess",
        "data=hippocampus",
        f"data.root={hippocampus_root}",
        f"data.preprocessed_dir={tmp_path}/pp",
        "progress=false",
        f"hydra.run.dir={tmp_path}/run",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    cache = next((tmp_path / "pp").glob("cache_*"))
    assert len(list(cache.glob("*_image.npy"))) == 195
    assert (tmp_path / "pp" / "splits.json").exists()


def test_msd_4d_multichannel_case_is_prepared(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "msd4d"
    training = []
    for i in range(3):
        img = rng.normal(5, 1, (11, 12, 13, 2)).astype(np.float32)
        lbl = np.zeros((11, 12, 13), np.uint8)
        lbl[3:7, 4:8, 5:9] = 1
        write_nifti(root / "imagesTr" / f"m_{i}.nii.gz", img)
        write_nifti(root / "labelsTr" / f"m_{i}.nii.gz", lbl)
        training.append({"image": f"./imagesTr/m_{i}.nii.gz", "label": f"./labelsTr/m_{i}.nii.gz"})
    meta = {
        "modality": {"0": "FLAIR", "1": "T1w"},
        "labels": {"0": "background", "1": "x"},
        "training": training,
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    cfg = _cfg(tmp_path, root, "data.num_folds=3", f"data.preprocessed_dir={tmp_path}/pp")
    prepared = prepare_dataset(instantiate(cfg.data), progress=False)
    assert prepared.plan.in_channels == 2 and prepared.plan.normalization == ["zscore"] * 2
    image, label, _ = load_cached_case(prepared.cache_dir, "m_0")
    assert image.shape == (11, 12, 13, 2) and label.sum() == 64


def test_pydataset_under_jax_backend(prepared):
    code = (
        "import numpy as np, keras; assert keras.backend.backend() == 'jax'\n"
        "from segshare.data.pipeline import make_training_data\n"
        "import sys\n"
        f"ds = make_training_data({str(prepared.cache_dir)!r}, {list(prepared.train_ids)!r},"
        " (9, 10, 11), 2, seed=3, num_workers=2, steps_per_epoch=3)\n"
        "assert isinstance(ds, keras.utils.PyDataset) and len(ds) == 3\n"
        "x, y = ds[0]; assert x.shape == (2, 9, 10, 11, 1) and y.dtype == np.int32\n"
        "assert 'tensorflow' not in sys.modules, 'TF imported under JAX'\n"
        "print('ok')\n"
    )
    env = {**os.environ, "KERAS_BACKEND": "jax", "TF_CPP_MIN_LOG_LEVEL": "2"}
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


def _fingerprint(spacings, shapes):
    ids = [f"c{i}" for i in range(len(spacings))]
    return {
        "median_spacing": np.median(np.array(spacings, float), axis=0).tolist(),
        "spacings": dict(zip(ids, spacings, strict=True)),
        "median_cropped_shape": np.median(np.array(shapes, float), axis=0).tolist(),
    }


def test_target_spacing_takes_10th_percentile_along_thick_few_slices():
    from segshare.data.fingerprint import default_target_spacing

    # Thick slices (median 5 mm, 3x the in-plane 0.8 mm) and few of them (40 vs 256): the 10th
    # percentile of the slice spacing (as nnU-Net), so the thin-slice scans keep their detail.
    z = [1.5, 2.0, 3.0] + [5.0] * 7
    fp = _fingerprint([[0.8, 0.8, s] for s in z], [[256, 256, 40]] * 10)
    target = default_target_spacing(fp)
    assert target[:2] == (0.8, 0.8)
    assert target[2] == pytest.approx(np.percentile(z, 10)) and target[2] < 5.0
    # Thick but not few slices (200 of them): the median.
    fp = _fingerprint([[0.8, 0.8, s] for s in z], [[256, 256, 200]] * 10)
    assert default_target_spacing(fp) == (0.8, 0.8, 5.0)
    # Mildly anisotropic (under the threshold): the median.
    fp = _fingerprint([[1.0, 1.0, s] for s in (2.0, 2.5, 2.5)], [[200, 200, 40]] * 3)
    assert default_target_spacing(fp) == (1.0, 1.0, 2.5)
    # The percentile never goes finer than the other axes.
    z = [0.5, 0.5, 4.0, 4.0, 4.0]
    fp = _fingerprint([[1.0, 1.0, s] for s in z], [[300, 300, 30]] * 5)
    assert default_target_spacing(fp)[2] == pytest.approx(1.0 + 1e-5)
