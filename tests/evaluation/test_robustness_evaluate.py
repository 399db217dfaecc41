"""segshare-evaluate is never silently wrong (issue #16): one prediction per case, outputs that
appear together or not at all (a full disk), every bad file listed at once, unknown labels named.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import pytest

from segshare.evaluation import evaluate_folders
from segshare.evaluation import folders as folders_module

from .conftest import blob_labels, save_label

OUTPUTS = ["metrics.csv", "report.html", "report.md", "summary.json"]


def _evaluate(folders, out, **kwargs):
    kwargs = {"num_workers": 1, "progress": False, **kwargs}
    return evaluate_folders(folders["pred"], folders["ref"], out, **kwargs)


def _names(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


@pytest.mark.parametrize("where", ["pred", "ref"])
def test_two_files_of_one_case_are_refused_naming_both(label_folders, tmp_path, where):
    folder = label_folders[where]
    save_label(blob_labels(seed=1), folder / "case_1.nii")
    with pytest.raises(ValueError, match=r"case_1\.nii, case_1\.nii\.gz"):
        _evaluate(label_folders, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_leaves_no_partial_evaluation(label_folders, tmp_path, monkeypatch):
    out = tmp_path / "out"
    _evaluate(label_folders, out)
    before = {name: (out / name).read_bytes() for name in OUTPUTS}
    save_label(blob_labels(seed=0, shift=(3, 3, 3)), label_folders["pred"] / "case_0.nii.gz")
    monkeypatch.setattr(folders_module, "write_metrics_csv", _full_disk)
    with pytest.raises(OSError, match="No space left on device") as info:
        _evaluate(label_folders, out)
    assert str(out) in str(info.value)
    assert {name: (out / name).read_bytes() for name in _names(out) if name in OUTPUTS} == before
    assert [n for n in _names(out) if n.startswith(".")] == []  # no temporary left
    fresh = tmp_path / "fresh"
    with pytest.raises(OSError):
        _evaluate(label_folders, fresh)
    assert [n for n in _names(fresh) if not n.endswith(".png")] == []


def test_a_full_disk_exits_2_with_one_line(label_folders, tmp_path):
    script = (
        "import errno, os, sys\n"
        "import segshare.evaluation.folders as f\n"
        "def full(*a, **k):\n"
        "    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))\n"
        "f.write_metrics_csv = full\n"
        "sys.argv = ['segshare-evaluate', *sys.argv[1:]]\n"
        "from segshare.evaluate import main\n"
        "main()\n"
    )
    argv = [
        sys.executable,
        "-c",
        script,
        f"pred={label_folders['pred']}",
        f"ref={label_folders['ref']}",
        f"output={tmp_path / 'o'}",
        f"hydra.run.dir={tmp_path / 'h'}",
        "progress=false",
        "num_workers=1",
    ]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "segshare-evaluate: error:" in proc.stderr and "No space left" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not any(name in OUTPUTS for name in _names(tmp_path / "o"))


def test_every_bad_prediction_is_listed_in_one_run(label_folders, tmp_path):
    pred = label_folders["pred"]
    (pred / "case_0.nii.gz").write_bytes(b"not a nifti")
    save_label(blob_labels(shape=(33, 34, 36)), pred / "case_2.nii.gz")
    with pytest.raises(ValueError) as info:
        _evaluate(label_folders, tmp_path / "out", num_workers=2)
    message = str(info.value)
    assert str(pred / "case_0.nii.gz") in message and str(pred / "case_2.nii.gz") in message
    assert "2 " in message.splitlines()[0]
    assert not any(name in OUTPUTS for name in _names(tmp_path / "out"))


def test_a_label_value_nobody_defines_is_warned_about(label_folders, tmp_path, capsys):
    pred = label_folders["pred"] / "case_1.nii.gz"
    labels = blob_labels(seed=1, shift=(1, 0, -1))
    labels[0:3, 0:3, 0:3] = 7
    save_label(labels, pred)
    summary = _evaluate(label_folders, tmp_path / "out")
    err = capsys.readouterr().err
    assert str(pred) in err and "7" in err and "dataset.json" in err
    assert summary["unknown_labels"] == [{"prediction_file": str(pred), "values": [7]}]
    on_disk = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert on_disk["unknown_labels"] == summary["unknown_labels"]


def test_without_dataset_json_the_references_define_the_labels(label_folders, tmp_path, capsys):
    (label_folders["root"] / "raw" / "dataset.json").unlink()
    pred = label_folders["pred"] / "case_2.nii.gz"
    labels = blob_labels(seed=2, shift=(2, 0, -1))
    labels[0:2, 0:2, 0:2] = 3
    save_label(labels, pred)
    summary = _evaluate(label_folders, tmp_path / "out", report=False)
    assert summary["unknown_labels"] == [{"prediction_file": str(pred), "values": [3]}]
    assert "references" in capsys.readouterr().err
    clean = _evaluate(label_folders, tmp_path / "clean", report=False, labels=[1, 2, 3])
    assert clean["unknown_labels"] == []  # asked for: known
