"""The preprocessing cache follows its source files: a corrected image or label is rebuilt, an
unchanged one reused; a killed run's temporaries are removed by the next run."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

from segshare.data.cache import load_cached_case, preprocess_dataset
from segshare.data.prepare import prepare_dataset

from .conftest import data_settings, make_msd_dataset, write_nifti


def _settings(root: Path, out: Path, *extra: str):
    return data_settings(
        f"data.root={root}",
        f"data.preprocessed_dir={out}",
        "data.num_workers=1",
        "data.fold=0",
        "data.num_folds=3",
        *extra,
    )


def _stamps(cache_dir: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in cache_dir.iterdir()}


@pytest.mark.parametrize("revalidate", [False, True])
def test_a_label_corrected_in_place_is_rebuilt(tmp_path, revalidate):
    root = make_msd_dataset(tmp_path / "ds", num_cases=6)
    settings = _settings(root, tmp_path / "pp", f"data.revalidate={str(revalidate).lower()}")
    prepared = prepare_dataset(settings, progress=False)
    _, old_label, _ = load_cached_case(prepared.cache_dir, "case_00")
    assert set(np.unique(old_label)) == {0, 1, 2}
    before = _stamps(prepared.cache_dir)

    label_file = root / "labelsTr" / "case_00.nii.gz"
    fixed = np.asarray(nib.load(str(label_file)).dataobj).copy()
    fixed[fixed == 2] = 1  # the annotator merged the two classes
    write_nifti(label_file, fixed)
    again = prepare_dataset(settings, progress=False)

    assert again.cache_dir == prepared.cache_dir
    _, new_label, _ = load_cached_case(again.cache_dir, "case_00")
    assert set(np.unique(new_label)) == {0, 1}
    after = _stamps(again.cache_dir)
    changed = sorted(name for name in after if after[name] != before.get(name))
    assert changed == ["case_00.json", "case_00_image.npy", "case_00_label.npy"]


def test_an_image_corrected_in_place_is_rebuilt(tmp_path):
    root = make_msd_dataset(tmp_path / "ds", num_cases=6)
    settings = _settings(root, tmp_path / "pp")
    prepared = prepare_dataset(settings, progress=False)
    old_image, _, _ = load_cached_case(prepared.cache_dir, "case_03")
    old_image = np.array(old_image)

    image_file = root / "imagesTr" / "case_03.nii.gz"
    data = np.asarray(nib.load(str(image_file)).dataobj)
    data = data.copy()
    data[:4] = 1.0  # a corrected slab: the z-scored image differs
    write_nifti(image_file, data)
    again = prepare_dataset(settings, progress=False)

    new_image, _, _ = load_cached_case(again.cache_dir, "case_03")
    assert not np.allclose(new_image, old_image)


def test_a_same_size_change_with_the_old_mtime_is_caught_by_the_content_hash(tmp_path):
    root = make_msd_dataset(tmp_path / "ds", num_cases=6)
    label_file = root / "labelsTr" / "case_01.nii.gz"
    raw = tmp_path / "case_01.nii"  # uncompressed: the corrected file has exactly the same size
    nib.save(nib.load(str(label_file)), str(raw))
    label_file.unlink()
    label_file = root / "labelsTr" / "case_01.nii"
    raw.rename(label_file)
    meta = (root / "dataset.json").read_text()
    meta = meta.replace("./labelsTr/case_01.nii.gz", "./labelsTr/case_01.nii")
    (root / "dataset.json").write_text(meta)
    settings = _settings(root, tmp_path / "pp")
    prepare_dataset(settings, progress=False)

    st = label_file.stat()
    img = nib.load(str(label_file))
    fixed = np.asarray(img.dataobj).copy()
    fixed[fixed == 2] = 1
    nib.save(nib.Nifti1Image(fixed, img.affine, img.header), str(label_file))
    os.utime(label_file, ns=(st.st_atime_ns, st.st_mtime_ns))  # e.g. restored with `cp -p`
    assert label_file.stat().st_size == st.st_size
    assert label_file.stat().st_mtime_ns == st.st_mtime_ns
    again = prepare_dataset(settings, progress=False)

    _, new_label, _ = load_cached_case(again.cache_dir, "case_01")
    assert set(np.unique(new_label)) == {0, 1}


def test_stale_temporaries_of_a_killed_run_are_removed(tmp_path):
    root = make_msd_dataset(tmp_path / "ds", num_cases=6)
    settings = _settings(root, tmp_path / "pp")
    prepared = prepare_dataset(settings, progress=False)
    cache = prepared.cache_dir
    leftovers = [
        cache / ".case_02_image.npy.k3x9a1.tmp.npy",  # killed between mkstemp and np.save
        cache / ".case_02.json.q8w2e0.tmp.json",
        cache / ".plan.json.zz1234.tmp.json",
    ]
    for path in leftovers:
        path.write_bytes(b"")
    (cache / "case_02.json").unlink()  # the killed case is incomplete

    prepare_dataset(settings, progress=False)

    assert [p.name for p in leftovers if p.exists()] == []
    assert (cache / "case_02.json").exists()
    assert not [p.name for p in cache.iterdir() if ".tmp" in p.name]


@pytest.mark.skipif(fcntl is None, reason="needs fcntl")
def test_a_second_run_waits_for_the_one_filling_the_cache_and_keeps_its_temporaries(tmp_path):
    settings = _settings(make_msd_dataset(tmp_path / "ds"), tmp_path / "pp")
    prepared = prepare_dataset(settings, progress=False)
    cache = prepared.cache_dir
    in_flight = cache / ".case_04_image.npy.a1b2c3d4.tmp.npy"  # the other run is writing it
    with open(cache / ".lock", "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        in_flight.write_bytes(b"\x93NUMPY")
        second = threading.Thread(
            target=preprocess_dataset,
            args=(prepared.dataset, prepared.preprocessed_dir, prepared.plan),
            kwargs={"num_workers": 1, "progress": False},
        )
        second.start()
        time.sleep(1.0)
        assert second.is_alive() and in_flight.exists()  # waiting, nothing deleted
        fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
    second.join(30)
    assert not second.is_alive()
    assert not in_flight.exists()  # stale once its writer let go of the lock


def test_stale_temporaries_beside_the_cache_are_removed_too(tmp_path):
    settings = _settings(make_msd_dataset(tmp_path / "ds"), tmp_path / "pp")
    prepared = prepare_dataset(settings, progress=False)
    out = prepared.preprocessed_dir
    leftovers = [
        out / ".fingerprint.json.0a1b2c3d.tmp.json",
        out / ".splits.json.9f8e7d6c.tmp.json",
    ]
    for path in leftovers:
        path.write_bytes(b"")
    prepare_dataset(settings, progress=False)
    assert [p.name for p in leftovers if p.exists()] == []
