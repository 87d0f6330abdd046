"""DualAnoDiff core: the method, independent of ComfyUI.

Import what you need from the submodules; the common entry points are re-exported lazily here so that
``import dualanodiff_core`` stays cheap (no torch/diffusers import until used).
"""

from __future__ import annotations

__version__ = "0.1.0"

_EXPORTS = {
    "DualAnoDiffWeights": "weights",
    "WeightsError": "weights",
    "WeightsKeyError": "weights",
    "DualControl": "attention",
    "DualBranchAttention": "attention",
    "DualBranchLayers": "attention",
    "LoRALinear": "attention",
    "LayoutError": "layout",
    "DualUNet": "diffusers_backend",
    "TextEncoderLoRA": "diffusers_backend",
    "DualAnoDiffPipeline": "diffusers_backend",
    "DualResult": "diffusers_backend",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
