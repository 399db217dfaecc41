"""Atomic writers (a file, a folder), NIfTI listing and the label-map reader of ``data.io``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from segshare.data import io
from segshare.data.io import (
    NiftiReadError,
    atomic_folder,
    list_nifti,
    read_label_map,
    write_json_atomic,
    write_text_atomic,
)


def _leftovers(folder: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


def test_write_text_atomic_str_and_bytes(tmp_path):
    target = tmp_path / "sub" / "report.md"
    assert write_text_atomic("über\nline\n", target) == target  # parent created
    assert target.read_bytes() == "über\nline\n".encode()
    write_text_atomic(b"\x89PNG\r\n", target)
    assert target.read_bytes() == b"\x89PNG\r\n"
    assert _leftovers(target.parent, {"report.md"}) == []


def test_write_text_atomic_replaces_only_when_complete(tmp_path, monkeypatch):
    target = tmp_path / "metrics.csv"
    target.write_text("old\n")
    seen = []
    real_write = Path.write_bytes

    def write_and_look(self, data):
        real_write(self, data)
        seen.append((self != target, target.read_text()))  # mid-write: a temporary, old content

    monkeypatch.setattr(Path, "write_bytes", write_and_look)
    write_text_atomic("new\n", target)
    assert seen == [(True, "old\n")]
    assert target.read_text() == "new\n"


def test_write_text_atomic_leaves_no_temporary_on_error(tmp_path, monkeypatch):
    target = tmp_path / "summary.json"
    target.write_text("old")

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(io.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_text_atomic("new", target)
    monkeypatch.undo()
    with pytest.raises(TypeError):
        write_text_atomic(12, target)  # type: ignore[arg-type]
    assert target.read_text() == "old"
    assert _leftovers(tmp_path, {"summary.json"}) == []


def test_write_json_atomic_format(tmp_path):
    obj = {"b": 1, "a": [1.5, None]}
    path = write_json_atomic(obj, tmp_path / "x.json")
    assert path.read_text() == json.dumps(obj, indent=2) + "\n"


def _fill(folder: Path, text: str) -> None:
    (folder / "state.json").write_text(text)
    (folder / "deep").mkdir()
    (folder / "deep" / "w.bin").write_bytes(text.encode())


def test_atomic_folder_swaps_into_place(tmp_path):
    target = tmp_path / "latest"
    (tmp_path / "latest.tmp").mkdir()  # a killed writer's leftover is cleared, not used
    (tmp_path / "latest.tmp" / "stale").write_text("x")
    with atomic_folder(target) as tmp:
        assert tmp != target and not any(tmp.iterdir())
        _fill(tmp, "one")
    with atomic_folder(target) as tmp:
        assert (target / "state.json").read_text() == "one"  # untouched while writing
        _fill(tmp, "two")
    assert (target / "state.json").read_text() == "two"
    assert (target / "deep" / "w.bin").read_bytes() == b"two"
    assert sorted(p.name for p in target.iterdir()) == ["deep", "state.json"]
    assert _leftovers(tmp_path, {"latest"}) == []


def test_atomic_folder_keeps_old_folder_whole_when_body_raises(tmp_path):
    target = tmp_path / "best"
    with atomic_folder(target) as tmp:
        _fill(tmp, "good")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_folder(target) as tmp:
            (tmp / "state.json").write_text("half")
            raise RuntimeError("boom")
    assert (target / "state.json").read_text() == "good"
    assert (target / "deep" / "w.bin").read_bytes() == b"good"
    assert _leftovers(tmp_path, {"best"}) == []


def test_atomic_folder_interrupted_swap_leaves_old(tmp_path, monkeypatch):
    target = tmp_path / "latest"
    with atomic_folder(target) as tmp:
        _fill(tmp, "good")
    real_replace = os.replace

    def fail_second_move(src, dst):
        if Path(src).name == "latest.tmp":
            raise OSError("killed")
        real_replace(src, dst)

    monkeypatch.setattr(io.os, "replace", fail_second_move)
    with pytest.raises(OSError, match="killed"):
        with atomic_folder(target) as tmp:
            _fill(tmp, "new")
    assert not target.exists()
    assert (tmp_path / "latest.old" / "state.json").read_text() == "good"
    monkeypatch.undo()
    with atomic_folder(target) as tmp:  # the next write recovers
        _fill(tmp, "next")
    assert (target / "state.json").read_text() == "next"
    assert _leftovers(tmp_path, {"latest"}) == []


def _save(path: Path, array: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(array, np.diag([0.5, 1.0, 2.0, 1.0])), str(path))
    return path


def test_list_nifti(tmp_path):
    for name in ("b.nii", "a.nii.gz", ".hidden.nii.gz", "notes.txt", "C.NII.GZ"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "dir.nii.gz").mkdir()
    assert [p.name for p in list_nifti(tmp_path)] == ["C.NII.GZ", "a.nii.gz", "b.nii"]
    with pytest.raises(FileNotFoundError, match="folder not found: '.*nope'"):
        list_nifti(tmp_path / "nope")


def test_read_label_map(tmp_path):
    labels = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4) % 3
    array, img = read_label_map(_save(tmp_path / "a.nii.gz", labels[..., None]))
    assert array.dtype == np.uint8 and array.shape == (2, 3, 4)
    np.testing.assert_array_equal(array, labels)
    assert img.header.get_zooms()[:3] == (0.5, 1.0, 2.0)
    flat = _save(tmp_path / "flat.nii.gz", labels[0])
    with pytest.raises(NiftiReadError, match=r"must be 3D, got shape \(3, 4\)") as info:
        read_label_map(flat)
    assert str(flat) in str(info.value)
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a nifti")
    with pytest.raises(NiftiReadError) as info:
        read_label_map(broken)
    assert str(broken) in str(info.value)
