"""DualAnoDiff core: the method, independent of ComfyUI.

Import what you need from the submodules; the common entry points are re-exported lazily here so that
``import dualanodiff_core`` stays cheap (no torch/diffusers import until used).
"""

from __future__ import annotations

import importlib

from . import _compat

__version__ = "0.1.0"

_EXPORTS = {
    "DualAnoDiffError": "errors",
    "RunError": "errors",
    "DualAnoDiffWeights": "method.weights",
    "WeightsError": "method.weights",
    "WeightsKeyError": "method.weights",
    "DualControl": "method.attention",
    "DualBranchAttention": "method.attention",
    "DualBranchLayers": "method.attention",
    "LoRALinear": "method.attention",
    "LayoutError": "method.layout",
    "DualUNet": "sd15.pipeline",
    "TextEncoderLoRA": "sd15.text",
    "DualAnoDiffPipeline": "sd15.pipeline",
    "DualResult": "sd15.pipeline",
}

__all__ = sorted(_EXPORTS) + ["__version__"]

_compat.install(__name__)


def __getattr__(name: str):
    if name in _EXPORTS:
        module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
