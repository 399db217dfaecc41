"""The process pool of ``data.parallel``: start method, worker count, order and errors."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from segshare.data.parallel import cpu_count, default_num_workers, parallel_map, start_method


def _slow_first(job: tuple[int, float]) -> int:
    """Module level, so that spawned workers can import it."""
    index, seconds = job
    time.sleep(seconds)
    return index * 10


def _fail_first(job: tuple[int, str]) -> int:
    index, folder = job
    (Path(folder) / f"started_{index}").touch()
    if index == 0:
        raise ValueError("case 0 is broken")
    time.sleep(0.5)
    return index


@pytest.mark.parametrize("num_workers", [1, 2])
def test_parallel_map_keeps_job_order_when_asked(num_workers):
    jobs = [(0, 1.5), (1, 0.0), (2, 0.0), (3, 0.0)]  # the first job finishes last
    got = list(parallel_map(_slow_first, jobs, num_workers, "t", progress=False, ordered=True))
    assert got == [0, 10, 20, 30]


def test_parallel_map_completion_order_by_default():
    jobs = [(0, 1.5), (1, 0.0), (2, 0.0)]
    got = list(parallel_map(_slow_first, jobs, 2, "t", progress=False))
    assert sorted(got) == [0, 10, 20]
    assert got[-1] == 0


def test_parallel_map_error_cancels_pending_jobs(tmp_path):
    jobs = [(i, str(tmp_path)) for i in range(12)]
    with pytest.raises(ValueError, match="case 0 is broken"):
        list(parallel_map(_fail_first, jobs, 2, "t", progress=False, ordered=True))
    started = list(tmp_path.glob("started_*"))
    assert 1 <= len(started) < len(jobs)


def test_start_method_policy(monkeypatch):
    for name in ("tensorflow", "jax", "torch"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    main = sys.modules["__main__"]
    monkeypatch.setattr(main, "__file__", __file__, raising=False)
    assert start_method() == "fork"
    monkeypatch.setitem(sys.modules, "jax", object())
    assert start_method() == "spawn"
    monkeypatch.setattr(main, "__file__", "<stdin>")  # spawn could not re-import it
    assert start_method() == "fork"


def test_default_num_workers():
    assert 1 <= default_num_workers() <= min(cpu_count(), 8)
