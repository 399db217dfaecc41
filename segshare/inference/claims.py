"""Exclusive claims on the cases of an output folder: concurrent ``segshare-predict`` runs into one
folder compute each case once (``docs/robustness.md``)."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

HOST = socket.gethostname()


def _pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return pid > 0  # someone else's process (or not a pid at all)
    return True


class CaseClaims:
    """Exclusive claims on the cases of an output folder, so that concurrent runs into one folder
    compute each case once.

    A claim is the file ``.<case>.lock`` created with ``O_CREAT | O_EXCL`` (atomic, also on NFS),
    holding ``{"pid", "host", "started"}``. While held, its modification time is refreshed every
    ``stale_after / 4`` seconds (at most every minute). A lock is taken over when its holder is
    gone: on this host, its pid is dead; anywhere, it was not refreshed for ``stale_after``
    seconds. Use as a context manager: the claims still held are released on exit.

    Args:
        folder: the output folder.
        stale_after: seconds without a refresh after which a lock counts as abandoned.
    """

    def __init__(self, folder: Path, stale_after: float = 600.0):
        if not float(stale_after) > 0:
            raise ValueError(f"stale_after must be > 0 seconds, got {stale_after!r}.")
        self.folder, self.stale_after = Path(folder), float(stale_after)
        self._held: set[Path] = set()
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        self._refresher: threading.Thread | None = None

    def path(self, case_id: str) -> Path:
        """The lock file of ``case_id``."""
        return self.folder / f".{case_id}.lock"

    def claim(self, case_id: str) -> bool:
        """Claim ``case_id``; False when another live run holds it."""
        path = self.path(case_id)
        for _ in range(3):  # a lock released or taken over meanwhile: try again
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                abandoned = self._abandoned(path)
                if abandoned is None:
                    continue  # released meanwhile: create it anew (never unlink a fresh lock)
                if not abandoned:
                    return False
                path.unlink(missing_ok=True)  # taken over
                continue
            with os.fdopen(fd, "w") as fh:
                json.dump({"pid": os.getpid(), "host": HOST, "started": time.time()}, fh)
            with self._mutex:
                self._held.add(path)
            self._start_refreshing()
            return True
        return False

    def release(self, case_id: str) -> None:
        """Remove the lock of ``case_id`` (when this object holds it)."""
        path = self.path(case_id)
        with self._mutex:
            held = path in self._held
            self._held.discard(path)
        if held:
            path.unlink(missing_ok=True)

    def _abandoned(self, path: Path) -> bool | None:
        """Whether the lock's holder is gone; None when the lock was released meanwhile."""
        try:
            age = time.time() - path.stat().st_mtime
            holder = json.loads(path.read_text() or "{}")
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            holder = {}  # being written, or damaged: judged by its age
        if age > self.stale_after:
            return True
        pid = holder.get("pid") if isinstance(holder, dict) else None
        same_host = isinstance(holder, dict) and holder.get("host") == HOST
        return same_host and isinstance(pid, int) and not _pid_alive(pid)

    def _start_refreshing(self) -> None:
        with self._mutex:
            if self._refresher is not None:
                return
            self._refresher = threading.Thread(target=self._refresh, daemon=True)
        self._refresher.start()

    def _refresh(self) -> None:
        while not self._stop.wait(min(60.0, self.stale_after / 4)):
            with self._mutex:
                held = list(self._held)
            for path in held:
                try:
                    os.utime(path)
                except OSError:
                    pass  # released meanwhile, or the folder is unreachable: nothing to refresh

    def __enter__(self) -> CaseClaims:
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        with self._mutex:
            held, self._held = list(self._held), set()
        for path in held:
            path.unlink(missing_ok=True)
