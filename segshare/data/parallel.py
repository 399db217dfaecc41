"""Process-parallel map over cases with a progress bar (shared by validation and caching)."""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any

from tqdm import tqdm


def mp_context() -> Any:
    """``fork`` normally; ``spawn`` once TensorFlow/JAX/PyTorch are imported (their threads make
    forking unsafe), e.g. when training calls :func:`segshare.data.prepare.prepare_dataset`."""
    heavy = any(m in sys.modules for m in ("tensorflow", "jax", "torch"))
    return mp.get_context("spawn" if heavy else "fork")


def cpu_count() -> int:
    """Usable CPU cores (affinity-aware)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def parallel_map(
    fn: Callable[[Any], Any],
    jobs: Sequence[Any],
    num_workers: int,
    desc: str,
    progress: bool = True,
) -> Iterator[Any]:
    """Yield ``fn(job)`` for every job, in completion order when ``num_workers > 1``.

    Each worker process holds one job at a time. ``fn`` must be a module-level function.
    """
    bar = tqdm(
        total=len(jobs), desc=desc, unit="case", disable=not progress or not jobs, leave=False
    )
    with bar:
        if num_workers > 1 and len(jobs) > 1:
            with ProcessPoolExecutor(num_workers, mp_context=mp_context()) as pool:
                for fut in as_completed([pool.submit(fn, j) for j in jobs]):
                    yield fut.result()
                    bar.update()
        else:
            for job in jobs:
                yield fn(job)
                bar.update()
