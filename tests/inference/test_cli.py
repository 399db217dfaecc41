"""The segshare-predict app as a user runs it: exit codes, SIGKILL + resume, shards over joblib."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from segshare.predict import main, run

from .conftest import random_scan, write_scan

REPO = Path(__file__).resolve().parents[2]
PYTHONPATH = os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(REPO)]))
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": PYTHONPATH}
# No log handlers bound to pytest's captured streams in the subprocesses either.
QUIET = ["hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]


@pytest.fixture()
def scans(tmp_path) -> Path:
    folder = tmp_path / "scans"
    folder.mkdir()
    for i, name in enumerate(("a", "b", "c", "d", "e")):
        write_scan(folder / f"{name}.nii.gz", random_scan((17 + i, 18, 19), seed=i), np.eye(4))
    return folder


def _call_main(monkeypatch, tmp_path, *overrides: str) -> int:
    """Run the real Hydra entry point in-process; returns its exit status.

    Hydra's logging setup (``logging.config.dictConfig``) shuts down every existing handler, and
    absl's handler (installed when TensorFlow is imported, e.g. while pytest collects) then closes
    its stream: pytest's capture file, which breaks the whole session. Logging setup is skipped.
    """
    argv = ["segshare-predict", f"hydra.run.dir={tmp_path}/hydra", *QUIET, *overrides]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setattr("hydra.core.utils.configure_log", lambda *a, **k: None)
    monkeypatch.setattr("hydra._internal.hydra.configure_log", lambda *a, **k: None)
    with pytest.raises(SystemExit) as exit_info:
        main()
        raise SystemExit(0)
    return exit_info.value.code


def test_setup_error_exits_2_with_one_line(monkeypatch, tmp_path, scans, capsys):
    out = tmp_path / "pred"
    code = _call_main(
        monkeypatch, tmp_path, f"model_path={tmp_path}/nothing", f"input={scans}", f"output={out}"
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "segshare-predict: error: model_path=" in err and "Traceback" not in err


def test_a_bad_window_option_is_a_setup_error(monkeypatch, tmp_path, run_dir, scans, capsys):
    args = [f"model_path={run_dir}", f"input={scans}", f"output={tmp_path}/pred"]
    assert _call_main(monkeypatch, tmp_path, *args, "window.overlap=1.5") == 2
    assert "overlap must be in [0, 1), got 1.5" in capsys.readouterr().err
    assert _call_main(monkeypatch, tmp_path, *args, "window.roi_size=[16,16]") == 2
    assert "roi_size must be three positive integers" in capsys.readouterr().err
    assert not (tmp_path / "pred").exists()


def test_a_failed_case_exits_1_and_a_rerun_exits_0(monkeypatch, tmp_path, run_dir, scans):
    # (no capsys here: Hydra's logging setup closes the handlers bound to captured streams)
    out = tmp_path / "pred"
    (scans / "c.nii.gz").write_bytes(b"broken")
    common = [f"model_path={run_dir}", f"input={scans}", f"output={out}", "inference.progress=0"]
    assert _call_main(monkeypatch, tmp_path, *common) == 1
    failures = json.loads((out / "failures.json").read_text())
    assert [(f["case_id"], Path(f["file"]).name) for f in failures] == [("c", "c.nii.gz")]
    assert len(list(out.glob("[!.]*.nii.gz"))) == 4
    write_scan(scans / "c.nii.gz", random_scan((17, 18, 19)), np.eye(4))
    assert _call_main(monkeypatch, tmp_path, *common) == 0
    assert json.loads((out / "failures.json").read_text()) == []
    assert len(list(out.glob("[!.]*.nii.gz"))) == 5


KILLER = """
import os, signal, sys
real_replace = os.replace
written = []
def replace(src, dst, *args, **kwargs):
    if str(dst).endswith(".nii.gz"):
        written.append(dst)
        if len(written) == 3:  # the third output is on disk under its temporary name
            os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst, *args, **kwargs)
os.replace = replace
sys.argv = ["segshare-predict", *sys.argv[1:]]
from segshare.predict import main
main()
"""


def test_sigkill_then_rerun_does_only_the_missing_cases(tmp_path, run_dir, scans, compose_cfg):
    out = tmp_path / "pred"
    args = [f"model_path={run_dir}", f"input={scans}", f"output={out}"]
    proc = subprocess.run(
        [sys.executable, "-c", KILLER, *args, f"hydra.run.dir={tmp_path}/h", *QUIET],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert sorted(p.name for p in out.glob("[!.]*.nii.gz")) == ["a.nii.gz", "b.nii.gz"]
    assert len(list(out.glob(".c.nii.gz.*"))) == 1  # the temporary the kill left behind
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("[!.]*.nii.gz")}
    report = run(compose_cfg(*args))
    assert report.skipped == ["a", "b"] and report.written == ["c", "d", "e"]
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("[ab].nii.gz")} == before
    assert sorted(p.name for p in out.iterdir()) == [
        *(f"{c}.nii.gz" for c in "abcde"),
        "failures.json",
        "inputs.json",
    ]
    for c in "abcde":
        shape = nib.load(str(scans / f"{c}.nii.gz")).shape
        assert nib.load(str(out / f"{c}.nii.gz")).shape == shape


@pytest.mark.slow  # ~30 s on 2 cores: three Python processes import TensorFlow
def test_joblib_multirun_over_shards_writes_every_case_once(tmp_path, run_dir, scans):
    out = tmp_path / "pred"
    (scans / "f_bad.nii.gz").write_bytes(b"not a scan")  # shard 1 of 2: the sweep must fail
    cmd = [
        sys.executable,
        str(REPO / "scripts" / "predict.py"),
        "-m",
        f"model_path={run_dir}",
        f"input={scans}",
        f"output={out}",
        "shard.index=0,1",
        "shard.count=2",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        f"hydra.sweep.dir={tmp_path}/sweep",
        "inference.progress=false",
    ]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    logs = proc.stdout + proc.stderr
    assert proc.returncode == 1, logs[-3000:]
    assert "1 case(s) failed in the sweep" in logs and "Traceback" not in logs, logs[-3000:]
    assert sorted(p.name for p in out.iterdir() if p.name.endswith(".nii.gz")) == [
        f"{c}.nii.gz" for c in "abcde"
    ]
    assert sorted(p.name for p in out.glob("failures*.json")) == [
        "failures.shard-0-of-2.json",
        "failures.shard-1-of-2.json",
    ]
    # Each shard wrote its own share (round-robin over the sorted ids), nothing twice.
    assert logs.count("3 written") == 1 and logs.count("2 written") == 1, logs[-2000:]
    failures = json.loads((out / "failures.shard-1-of-2.json").read_text())
    assert [f["case_id"] for f in failures] == ["f_bad"]
