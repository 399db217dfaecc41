"""How the console apps end on a user's mistake: one line naming the problem, a status, no
traceback. Shared by ``segshare-train``, ``-predict``, ``-evaluate`` and ``-preprocess``."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from omegaconf.errors import OmegaConfBaseException

#: Errors that mean "the command or its inputs are wrong" (bad value, missing file, bad config).
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, OmegaConfBaseException)


@contextmanager
def exit_on_user_error(
    app: str, codes: Sequence[tuple[type[BaseException] | tuple, int]] = ((USER_ERRORS, 2),)
) -> Iterator[None]:
    """Turn the listed exceptions into ``"<app>: error: <message>"`` on stderr and ``exit(code)``;
    the first matching ``(exceptions, code)`` pair wins. Anything else propagates (a real bug
    keeps its traceback)."""
    try:
        yield
    except BaseException as err:
        for kinds, code in codes:
            if isinstance(err, kinds):
                print(f"{app}: error: {err}", file=sys.stderr)
                raise SystemExit(code) from None
        raise
