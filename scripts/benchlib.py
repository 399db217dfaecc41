"""Helpers shared by the benchmark scripts (``python scripts/bench_*.py`` puts this folder on the
path)."""

from __future__ import annotations

import platform
import subprocess


def cpu_model() -> str:
    """The CPU model name from ``/proc/cpuinfo`` (else ``lscpu``, else ``platform``)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
