"""segshare-predict loses nothing and says what went wrong (issue #16): one output per input,
inputs that are not files listed as failures, the failure list printed before a full disk can
hide it, the raw scan's non-finite voxels counted, and concurrent runs computing each case once.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from segshare.data.discovery import Case
from segshare.data.io import write_text_atomic
from segshare.inference import predictor as predictor_module
from segshare.inference.predictor import output_paths, predict_cases
from segshare.predict import run

from .conftest import random_scan, write_scan
from .test_cli import _call_main


def _scans(folder: Path, names=("a", "b")) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        write_scan(folder / f"{name}.nii.gz", random_scan((17, 18, 19), seed=i), np.eye(4))
    return folder


def test_a_case_id_given_twice_is_refused_naming_both_files(run_dir, tmp_path, compose_cfg):
    scans = _scans(tmp_path / "scans")
    write_scan(scans / "a.nii", random_scan((17, 18, 19)), np.eye(4))
    cfg = compose_cfg(f"model_path={run_dir}", f"input={scans}", f"output={tmp_path}/out")
    with pytest.raises(ValueError, match=r"a\.nii, a\.nii\.gz"):
        run(cfg)
    assert not (tmp_path / "out").exists()


def test_inputs_that_are_not_files_are_listed_as_failures(run_dir, tmp_path, compose_cfg):
    scans = _scans(tmp_path / "scans", ("good",))
    (scans / "dangling.nii.gz").symlink_to(tmp_path / "moved_away.nii.gz")
    os.symlink(scans / "loop2.nii.gz", scans / "loop.nii.gz")
    os.symlink(scans / "loop.nii.gz", scans / "loop2.nii.gz")
    (scans / "folder.nii.gz").mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "dangling.nii.gz").write_bytes(b"from an earlier run, when the scan was there")
    report = run(compose_cfg(f"model_path={run_dir}", f"input={scans}", f"output={out}"))
    assert report.written == ["good"]
    failures = json.loads((out / "failures.json").read_text())
    reasons = {f["case_id"]: f["reason"] for f in failures}
    assert sorted(reasons) == ["dangling", "folder", "loop", "loop2"]
    assert "moved_away.nii.gz" in reasons["dangling"] and "dangling" in reasons["dangling"]
    assert "loop" in reasons["loop"] and "folder" in reasons["folder"]


def test_the_failure_list_is_printed_before_a_full_disk_can_hide_it(
    monkeypatch, tmp_path, run_dir, capsys
):
    scans = _scans(tmp_path / "scans", ("a", "b", "c"))
    out = tmp_path / "out"
    real_save = predictor_module.save_nifti_atomic
    seen_before_writing: list[str] = []

    def full_for_c(img, path):
        if Path(path).name == "c.nii.gz":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(img, path)

    def full_disk(obj, path):
        seen_before_writing.append(capsys.readouterr().err)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(predictor_module, "save_nifti_atomic", full_for_c)
    monkeypatch.setattr(predictor_module, "write_json_atomic", full_disk)
    args = [f"model_path={run_dir}", f"input={scans}", f"output={out}", "inference.progress=0"]
    assert _call_main(monkeypatch, tmp_path, *args) == 1
    err = "".join(seen_before_writing) + capsys.readouterr().err
    assert seen_before_writing and "FAILED c:" in seen_before_writing[0]
    assert "No space left on device" in seen_before_writing[0]
    assert "failures.json" in err and "not written" in err and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == ["a.nii.gz", "b.nii.gz"]


def test_one_nan_voxel_is_counted_in_the_raw_scan(run_dir, tmp_path, compose_cfg):
    scans = tmp_path / "scans"
    scans.mkdir()
    data = random_scan((20, 21, 22)).astype(np.float32)
    data[3, 4, 5] = np.nan
    write_scan(scans / "nan.nii.gz", data, np.diag([0.7, 0.7, 2.0, 1.0]), dtype=np.float32)
    out = tmp_path / "out"
    report = run(compose_cfg(f"model_path={run_dir}", f"input={scans}", f"output={out}"))
    (failure,) = report.failed
    assert "nan.nii.gz" in failure["reason"]
    assert "1 non-finite voxel " in failure["reason"] or "1 non-finite voxel;" in failure["reason"]
    assert "after preprocessing" not in failure["reason"]


# -- concurrent runs: a lock file per case ---------------------------------------------------


class SlowFake:
    """Stands in for a Predictor: records each case it computes; slow enough to overlap."""

    def __init__(self, seconds: float = 0.15):
        self.seconds, self.computed, self.lock = seconds, Counter(), threading.Lock()

    def load(self, case: Case):
        if case.problem:
            raise ValueError(case.problem)
        return np.full((2, 2, 2, 1), ord(case.case_id[-1]), np.float32), {}, case.case_id

    def predict_array(self, image):
        time.sleep(self.seconds)
        with self.lock:
            self.computed[chr(int(image.flat[0]))] += 1
        return image

    def write(self, case_id, probs, props, source, output_dir, save_probabilities, post):
        return write_text_atomic(
            f"{case_id} by {os.getpid()}", output_paths(output_dir, case_id)[0]
        )


def _cases(n: int = 6) -> list[Case]:
    return [Case(f"case{chr(ord('a') + i)}", (Path(f"/nowhere/{i}.nii.gz"),)) for i in range(n)]


def test_two_concurrent_runs_compute_every_case_once(tmp_path):
    fake, out, reports = SlowFake(), tmp_path / "out", []

    def one_run():
        reports.append(predict_cases(fake, _cases(), out, progress=False))

    threads = [threading.Thread(target=one_run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert fake.computed == Counter({c.case_id[-1]: 1 for c in _cases()})
    assert sorted(w for r in reports for w in r.written) == [c.case_id for c in _cases()]
    for report in reports:  # the other run's cases: done or being done elsewhere
        assert set(report.written) | set(report.skipped) | set(report.busy) == {
            c.case_id for c in _cases()
        }
    assert not list(out.glob(".*.lock"))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _lock(out: Path, case_id: str, pid: int, host: str, age_s: float = 0.0) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f".{case_id}.lock"
    path.write_text(json.dumps({"pid": pid, "host": host, "started": time.time() - age_s}))
    if age_s:
        os.utime(path, (time.time() - age_s, time.time() - age_s))
    return path


def test_stale_locks_are_taken_over_and_live_ones_respected(tmp_path):
    out, host = tmp_path / "out", socket.gethostname()
    _lock(out, "casea", _dead_pid(), host)  # its process is gone
    _lock(out, "caseb", 999_999, "another-host", age_s=3600)  # not refreshed for an hour
    live = _lock(out, "casec", os.getpid(), host)  # a process of this host, alive
    fake = SlowFake(0.0)
    report = predict_cases(fake, _cases(3), out, progress=False)
    assert sorted(report.written) == ["casea", "caseb"]
    assert report.busy == ["casec"] and not (out / "casec.nii.gz").exists()
    assert live.exists() and not (out / ".casea.lock").exists()
    assert fake.computed == Counter({"a": 1, "b": 1})


def test_a_lock_records_its_holder(tmp_path):
    out, seen = tmp_path / "out", []

    class Peeking(SlowFake):
        def predict_array(self, image):
            seen.extend(json.loads(p.read_text()) for p in out.glob(".*.lock"))
            return super().predict_array(image)

    predict_cases(Peeking(0.0), _cases(1), out, progress=False)
    assert seen and seen[0]["pid"] == os.getpid() and seen[0]["host"] == socket.gethostname()
