"""ComfyUI IMAGE / MASK tensors <-> the numpy and PIL images the core works with (no ComfyUI import).

An IMAGE is ``[batch, height, width, channels]`` float in [0, 1]; a MASK is ``[batch, height, width]`` float in
[0, 1] (ComfyUI also passes ``[height, width]`` for a single mask).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ..dualanodiff_core.errors import DualAnoDiffError


class ImageInputError(DualAnoDiffError, ValueError):
    """An IMAGE or MASK input that cannot be used (the message names the input and what to do)."""


def check_images(images, name: str) -> torch.Tensor:
    """``images`` as a float ``[B, H, W, C]`` tensor with C >= 3 and finite values."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[-1] < 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ImageInputError(f"{name}: expected an IMAGE [batch, height, width, channels], got {shape}.")
    if images.shape[0] < 1 or images.shape[1] < 1 or images.shape[2] < 1:
        raise ImageInputError(f"{name}: the IMAGE batch is empty ({tuple(images.shape)}).")
    bad = ~torch.isfinite(images)
    if bool(bad.any()):
        rows = sorted({int(i) for i in bad.nonzero()[:, 0].tolist()})
        raise ImageInputError(
            f"{name}: image(s) {rows[:8]} contain NaN or infinite values (the sampler or VAE diverged); "
            "nothing can be made from them. Check the model, the sampler settings and the VAE."
        )
    return images


def check_masks(masks, name: str) -> torch.Tensor:
    """``masks`` as a float ``[B, H, W]`` tensor."""
    if not isinstance(masks, torch.Tensor):
        raise ImageInputError(f"{name}: expected a MASK, got {type(masks).__name__}.")
    m = masks
    if m.ndim == 2:
        m = m[None]
    elif m.ndim == 4 and m.shape[1] == 1:
        m = m[:, 0]
    if m.ndim != 3 or m.shape[0] < 1:
        raise ImageInputError(f"{name}: expected a MASK [batch, height, width], got {tuple(masks.shape)}.")
    if not bool(torch.isfinite(m).all()):
        raise ImageInputError(f"{name}: the MASK contains NaN or infinite values.")
    return m.float()


def to_numpy(image: torch.Tensor) -> np.ndarray:
    """One IMAGE row ``[H, W, C]`` -> float32 RGB ``[H, W, 3]`` in [0, 1] (clamped: decoders overshoot a little)."""
    return image[..., :3].detach().float().clamp(0.0, 1.0).cpu().numpy()


def to_pil(image: torch.Tensor) -> Image.Image:
    """One IMAGE row -> an 8-bit RGB PIL image (rounded like ComfyUI's Save Image)."""
    arr = np.clip(np.rint(to_numpy(image) * 255.0), 0, 255).astype(np.uint8)
    return Image.fromarray(arr, mode="RGB")


def from_pil(images: list[Image.Image]) -> torch.Tensor:
    """PIL images of one size -> an IMAGE batch ``[B, H, W, 3]``."""
    arrs = [np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images]
    return torch.from_numpy(np.stack(arrs))
