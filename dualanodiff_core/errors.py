"""The one error type of DualAnoDiff: every failure a user can act on is a :class:`DualAnoDiffError`.

Its message names what went wrong, which file or option, and what to do. ``exit_code`` is what the ``dualanodiff``
command exits with: 2 for bad input (:class:`DualAnoDiffError` itself and most subclasses), 1 for a failure during a
run that the input did not cause (:class:`RunError`, e.g. the disk filled up). The command prints the message in one
or two lines, never a traceback (``--debug`` shows one).

The older error classes (``DatasetError``, ``WeightsError``, ``DataError``, ...) derive from it and still derive from
``ValueError`` as before, so existing ``except ValueError`` code keeps working.
"""

from __future__ import annotations


class DualAnoDiffError(Exception):
    """A failure the user can fix: bad input (a file, a folder, an option)."""

    exit_code = 2


class RunError(DualAnoDiffError):
    """A failure during a run (disk full, out of memory, a file vanished); finished work is kept."""

    exit_code = 1


class InputError(DualAnoDiffError, ValueError):
    """A bad option value or input file (a ``ValueError`` too)."""


class MissingInputError(DualAnoDiffError, FileNotFoundError):
    """A file or folder given as input does not exist (a ``FileNotFoundError`` too)."""


def require_finite(**values) -> None:
    """Raise :class:`InputError` naming the first value that is not a finite number (nan, inf), e.g.
    ``require_finite(strength_global=x, strength_anomaly=y)``."""
    import math

    for name, v in values.items():
        items = v if isinstance(v, (tuple, list)) else (v,)
        try:
            ok = all(math.isfinite(float(x)) for x in items)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise InputError(f"{name}={v!r}: give a finite number (1.0 = as trained)")
