"""Atomic writes: the user's umask decides the mode, data and folder entry are fsync-ed around the
rename; file signatures see content changes that keep size and mtime."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from segshare.data import io
from segshare.data.io import (
    atomic_folder,
    atomic_target,
    file_signature,
    save_nifti_atomic,
    save_npy_atomic,
    write_json_atomic,
    write_text_atomic,
)


def _write_all(folder: Path) -> list[Path]:
    """One file through each atomic writer (the predictor's ``.npz`` via ``atomic_target``)."""
    label = nib.Nifti1Image(np.zeros((4, 5, 6), np.uint8), np.eye(4))
    paths = [
        write_text_atomic("x\n", folder / "report.md"),
        write_json_atomic({"a": 1}, folder / "summary.json"),
        save_npy_atomic(np.zeros(3), folder / "a.npy"),
        save_nifti_atomic(label, folder / "case.nii.gz"),
    ]
    with atomic_target(folder / "case.npz", ".npz") as tmp:
        np.savez_compressed(tmp, probabilities=np.zeros(2))
    return [*paths, folder / "case.npz"]


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002], ids=["022", "077", "002"])
def test_outputs_get_the_users_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        paths = _write_all(tmp_path)
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in paths}
    assert modes == {p.name: 0o666 & ~umask for p in paths}


def _record_durability(monkeypatch) -> list[tuple[str, str]]:
    """Record, in order, each ``fsync`` (of a file or a folder, by path) and ``replace``."""
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        kind = "fsync_dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync_file"
        events.append((kind, os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", f"{src} -> {dst}"))
        real_replace(src, dst)

    monkeypatch.setattr(io.os, "fsync", fsync)
    monkeypatch.setattr(io.os, "replace", replace)
    return events


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_atomic_writes_fsync_the_data_before_and_the_folder_after_the_rename(tmp_path, monkeypatch):
    events = _record_durability(monkeypatch)
    _write_all(tmp_path)
    replaces = [i for i, (kind, _) in enumerate(events) if kind == "replace"]
    assert len(replaces) == 5
    for i in replaces:
        src, dst = events[i][1].split(" -> ")
        assert events[i - 1] == ("fsync_file", src), events  # the data first
        assert events[i + 1] == ("fsync_dir", str(Path(dst).parent)), events  # then the entry


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_atomic_folder_fsyncs_its_files_and_both_folders(tmp_path, monkeypatch):
    events = _record_durability(monkeypatch)
    target = tmp_path / "latest"
    with atomic_folder(target) as tmp:
        (tmp / "state.json").write_text("{}")
    kinds = [kind for kind, _ in events]
    assert kinds == ["fsync_file", "fsync_dir", "replace", "fsync_dir"], events
    assert events[1] == ("fsync_dir", str(tmp_path / "latest.tmp"))
    assert events[3] == ("fsync_dir", str(tmp_path))


def test_file_signature_sees_a_change_that_keeps_size_and_mtime(tmp_path):
    path = tmp_path / "label.nii"
    path.write_bytes(b"\x00" * 1000)
    st = path.stat()
    before = file_signature(path)
    assert before[:2] == [1000, st.st_mtime_ns]
    path.write_bytes(b"\x00" * 500 + b"\x01" + b"\x00" * 499)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert file_signature(path) != before
    assert file_signature(tmp_path / "missing.nii") is None


def test_file_signature_of_a_large_file_hashes_its_ends(tmp_path):
    path = tmp_path / "scan.nii"
    size = 5 * 2**20
    data = bytearray(size)
    path.write_bytes(bytes(data))
    st = path.stat()
    before = file_signature(path)
    for offset, changed in [(10, True), (size - 10, True), (2**16 + 10, False), (size // 2, False)]:
        edited = bytearray(data)
        edited[offset] = 1
        path.write_bytes(bytes(edited))
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert (file_signature(path) != before) is changed, offset
