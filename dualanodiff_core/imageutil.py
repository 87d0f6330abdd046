"""Image conversions between PIL, numpy and torch (``[N, 3, H, W]`` float tensors)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from PIL import Image


def tensor_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """``[N, C, H, W]`` in [0, 1] -> list of PIL images (RGB for C=3, L for C=1)."""
    if images.ndim == 3:
        images = images.unsqueeze(0)
    arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    out = []
    for a in arr:
        if a.shape[0] == 1:
            out.append(Image.fromarray(a[0], mode="L"))
        else:
            out.append(Image.fromarray(np.ascontiguousarray(a.transpose(1, 2, 0)), mode="RGB"))
    return out


def pil_to_tensor(images: Image.Image | Iterable[Image.Image], signed: bool = False) -> torch.Tensor:
    """PIL image(s) -> ``[N, 3, H, W]`` float in [0, 1] (or [-1, 1] with ``signed``)."""
    if isinstance(images, Image.Image):
        images = [images]
    arrs = [np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images]
    t = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous()
    return t * 2 - 1 if signed else t


#: largest input image read (pixels): 8192 x 8192. Bigger photos are downscaled to 512 px anyway, and decoding one
#: costs gigabytes; PIL's own guard ("decompression bomb") is replaced by this clearer limit.
MAX_IMAGE_PIXELS = 8192 * 8192


def open_image(path, what: str = "image", max_pixels: int | None = None) -> Image.Image:
    """Open an image lazily (header only) and refuse one over ``max_pixels`` with a clear
    :class:`~dualanodiff_core.errors.InputError` (naming the file, its size and the limit) before decoding it."""
    import warnings

    from .errors import InputError

    limit = MAX_IMAGE_PIXELS if max_pixels is None else int(max_pixels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(path)
        except Image.DecompressionBombError:
            raise InputError(
                f"{path}: the {what} is far too large to read safely (over {2 * Image.MAX_IMAGE_PIXELS // 10**6} "
                f"megapixels); downscale it (at most {limit // 10**6} megapixels)."
            ) from None
    w, h = im.size
    if w * h > limit:
        im.close()
        raise InputError(
            f"{path}: the {what} is {w}x{h} = {w * h / 1e6:.0f} megapixels, over the limit of {limit / 1e6:.0f}; "
            "downscale it (DualAnoDiff works at 512 px)."
        )
    return im
