"""What the console apps share: building a config group's object, and ending on a user's mistake
with one line naming the problem, a status, no traceback. Used by ``segshare-train``,
``-predict``, ``-evaluate`` and ``-preprocess``."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from omegaconf.errors import OmegaConfBaseException

#: Errors that mean "the command or its inputs are wrong" (bad value, missing file, bad config).
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, OmegaConfBaseException)


def instantiate(node: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate(node, **kwargs)`` with lists and dicts as plain Python objects;
    a ``ValueError``/``TypeError`` raised by the object's constructor (a bad setting) comes out
    as itself, not wrapped in Hydra's ``InstantiationException``, so the apps report it in one
    line."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate as hydra_instantiate

    try:
        return hydra_instantiate(node, _convert_="all", **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, ValueError | TypeError):
            raise cause from None
        raise


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
