"""Process-parallel map over cases with a progress bar (validation, caching and evaluation).

Workers die with their parent: each runs a watchdog thread that ends the worker (``os._exit``)
within :data:`PARENT_POLL_SECONDS` of its parent's death, so a SIGKILLed app (an OOM kill, a
scheduler's time limit) leaves no orphaned workers computing on. A thread rather than Linux's
``PR_SET_PDEATHSIG``: that signal fires when the parent *thread* that started the worker ends,
not the parent process, and it exists on Linux only.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any

from tqdm import tqdm

#: Most worker processes :func:`default_num_workers` proposes.
MAX_DEFAULT_WORKERS = 8
#: How often a worker checks that its parent still runs (seconds).
PARENT_POLL_SECONDS = 0.25


def start_method() -> str:
    """The start method of worker processes: ``fork``, or ``spawn`` once TensorFlow/JAX/PyTorch
    are imported (their threads make forking unsafe), e.g. when training evaluates or calls
    :func:`segshare.data.prepare.prepare_dataset`.

    ``spawn`` re-imports ``__main__`` by its path; a main module without such a file (a script
    read from stdin: ``__file__ == "<stdin>"``) cannot be re-imported, so ``fork`` is kept there.
    """
    heavy = any(m in sys.modules for m in ("tensorflow", "jax", "torch"))
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    no_main_file = bool(main_file) and not os.path.exists(main_file)
    return "spawn" if heavy and not no_main_file else "fork"


def mp_context() -> Any:
    """The multiprocessing context of :func:`start_method`."""
    return mp.get_context(start_method())


def die_with_parent(parent_pid: int) -> None:
    """Worker initializer: end this process as soon as ``parent_pid`` is no longer its parent.

    An orphan is re-parented (to init or a subreaper), so ``os.getppid()`` changes when the
    parent dies; a daemon thread checks it every :data:`PARENT_POLL_SECONDS`.
    """
    if os.getppid() != parent_pid:  # the parent died before this worker started
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(PARENT_POLL_SECONDS)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, name="segshare-watch-parent", daemon=True).start()


def cpu_count() -> int:
    """Usable CPU cores (affinity-aware)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def default_num_workers() -> int:
    """Worker processes by default: the usable CPU cores, at most :data:`MAX_DEFAULT_WORKERS`."""
    return max(1, min(cpu_count(), MAX_DEFAULT_WORKERS))


def parallel_map(
    fn: Callable[[Any], Any],
    jobs: Sequence[Any],
    num_workers: int,
    desc: str,
    progress: bool = True,
    *,
    ordered: bool = False,
) -> Iterator[Any]:
    """Yield ``fn(job)`` for every job, in worker processes when ``num_workers > 1``.

    Each worker process holds one job at a time and exits when this process dies
    (:func:`die_with_parent`). ``fn`` must be a module-level function. When a job raises (or the
    caller stops iterating), jobs not yet started are cancelled and the error propagates.

    Args:
        fn: called with one job.
        jobs: the jobs.
        num_workers: worker processes (at most one per job); ``<= 1``: in this process.
        desc: progress bar title.
        progress: show a tqdm progress bar.
        ordered: yield in the order of ``jobs`` (a finished result waits for the earlier ones);
            default in completion order.

    Yields:
        The results.
    """
    bar = tqdm(
        total=len(jobs), desc=desc, unit="case", disable=not progress or not jobs, leave=False
    )
    with bar:
        if num_workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                result = fn(job)
                bar.update()
                yield result
            return
        with ProcessPoolExecutor(
            min(num_workers, len(jobs)),
            mp_context=mp_context(),
            initializer=die_with_parent,
            initargs=(os.getpid(),),
        ) as pool:
            futures = {pool.submit(fn, job): i for i, job in enumerate(jobs)}
            done: dict[int, Any] = {}
            next_index = 0
            try:
                for future in as_completed(futures):
                    result = future.result()
                    bar.update()
                    if not ordered:
                        yield result
                        continue
                    done[futures[future]] = result
                    while next_index in done:
                        yield done.pop(next_index)
                        next_index += 1
            except BaseException:
                pool.shutdown(wait=False, cancel_futures=True)
                raise
