"""``dualanodiff minidefect``: write the procedural MiniDefect dataset (MVTec layout) to a folder."""

from __future__ import annotations

from ..minidefect.procedural import add_arguments, run  # noqa: F401
