"""The root of the errors this package raises on purpose.

Every specific error (a bad weights file, a batch that is not whole pairs, an unusable dataset folder, ...) derives
from :class:`DualAnoDiffError`, so a caller can catch them all in one place: the ``dualanodiff`` command line prints
the message and exits with :attr:`DualAnoDiffError.exit_code`; the ComfyUI nodes show the message. Each specific
error also keeps its older base (``ValueError`` for bad input, ``RuntimeError`` for a training run that cannot go
on), so ``except ValueError`` keeps working.

Exit statuses: 2 for bad input (:class:`DualAnoDiffError` itself and most subclasses), 1 for a failure during a run
that the input did not cause (:class:`RunError`, e.g. the disk filled up).
"""

from __future__ import annotations


class DualAnoDiffError(Exception):
    """Something DualAnoDiff cannot work with; the message names the file or option and what to do."""

    #: exit status of the ``dualanodiff`` command line when this error ends it (2: a usage or input error)
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
