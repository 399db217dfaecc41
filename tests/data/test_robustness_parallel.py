"""Worker processes die with their parent: a SIGKILLed app leaves no orphaned pool workers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    import segshare.data.parallel as parallel

    def job(args):
        folder, index = args
        (open(os.path.join(folder, f"worker_{os.getpid()}"), "w")).close()
        time.sleep(120)
        return index

    if __name__ == "__main__":
        folder, method = sys.argv[1], sys.argv[2]
        parallel.start_method = lambda: method
        list(parallel.parallel_map(job, [(folder, 0), (folder, 1)], 2, "t", progress=False))
    """
)


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for its new parent to reap it counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def _wait_for(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_workers_die_when_the_parent_is_killed(tmp_path, method):
    script = tmp_path / "app.py"
    script.write_text(SCRIPT)
    parent = subprocess.Popen([sys.executable, str(script), str(tmp_path), method])
    pids: list[int] = []
    try:
        started = _wait_for(lambda: len(list(tmp_path.glob("worker_*"))) == 2, 60)
        assert started, "the workers did not start"
        pids = [int(p.name.removeprefix("worker_")) for p in tmp_path.glob("worker_*")]
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        gone = _wait_for(lambda: not any(_alive(pid) for pid in pids), 5)
        assert gone, f"workers {[p for p in pids if _alive(p)]} outlived their killed parent"
    finally:
        if parent.poll() is None:
            parent.kill()
        for pid in pids:  # the workers this test started, if the check failed
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
