"""Shared helpers for tests (tiny models, random DualAnoDiff tensors)."""

from __future__ import annotations

import torch


def _modules(obj) -> torch.nn.Module:
    """A DualUNet's processors, or any module."""
    if hasattr(obj, "processors"):
        return torch.nn.ModuleList(obj.processors.values())
    return obj


def randomize_(obj, seed: int = 0, lora_std: float = 0.05, bcm_alpha: float = 0.3) -> None:
    """Give every DualAnoDiff parameter non-trivial random values (LoRA ``up`` starts at 0, ``temporal_a`` at 0).
    ``obj``: a DualUNet (only its processors are touched) or a module holding only DualAnoDiff layers."""
    module = _modules(obj)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("temporal_a"):
                p.fill_(bcm_alpha)
            elif ".up." in name or name.endswith("up.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * lora_std)
            elif "temporal_n" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn(p.shape, generator=g))
            elif "lora" in name:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)


def zero_lora_(obj) -> None:
    module = _modules(obj)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "_lora" in name and name.endswith("up.weight"):
                p.zero_()


def unet_inputs(unet, pairs: int = 2, size: int = 8, seed: int = 0, ctx_len: int = 7):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * pairs, unet.config.in_channels, size, size, generator=g)
    ctx = torch.randn(2 * pairs, ctx_len, unet.config.cross_attention_dim, generator=g)
    t = torch.tensor(500)
    return x, t, ctx
