"""Measuring a generated dataset: the downstream benchmark (:mod:`.benchmark`), its metrics (:mod:`.metrics`) and the
synthetic baselines (:mod:`.synthetic`).

``dualanodiff_core.evaluation`` used to be the benchmark module itself; its names are still served from here
(loaded on first use, so importing this package stays cheap).
"""

from __future__ import annotations

import importlib

_SUBMODULES = ("benchmark", "metrics", "synthetic")


def __getattr__(name: str):
    if name.startswith("__") or name in _SUBMODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        return getattr(importlib.import_module(f"{__name__}.benchmark"), name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
