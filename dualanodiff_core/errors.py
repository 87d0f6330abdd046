"""The root of the errors this package raises on purpose.

Every specific error (a bad weights file, a batch that is not whole pairs, an unusable dataset folder, ...) derives
from :class:`DualAnoDiffError`, so a caller can catch them all in one place: the ``dualanodiff`` command line prints
the message and exits with :attr:`DualAnoDiffError.exit_code`; the ComfyUI nodes show the message. Each specific
error also keeps its older base (``ValueError`` for bad input, ``RuntimeError`` for a training run that cannot go
on), so ``except ValueError`` keeps working.
"""

from __future__ import annotations


class DualAnoDiffError(Exception):
    """Something DualAnoDiff cannot work with; the message names the file or option and what to do."""

    #: exit status of the ``dualanodiff`` command line when this error ends it (2: a usage or input error)
    exit_code = 2
