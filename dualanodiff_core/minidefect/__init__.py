"""MiniDefect: the procedural defect dataset (:mod:`.procedural`), the tiny SD-shaped models (:mod:`.tiny`) and the
pre-training of the shipped base model (:mod:`.pretrain`). The model files themselves stay in
``dualanodiff_core/assets/minidefect-sd``.

``dualanodiff_core.minidefect`` used to be the procedural-data module itself; its names are still served from here
(loaded on first use, so importing this package stays cheap). ``python -m dualanodiff_core.minidefect`` still works.
"""

from __future__ import annotations

import importlib

_SUBMODULES = ("procedural", "pretrain", "tiny", "bench")


def __getattr__(name: str):
    if name.startswith("__") or name in _SUBMODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        return getattr(importlib.import_module(f"{__name__}.procedural"), name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
