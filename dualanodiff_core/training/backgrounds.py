"""BCM backgrounds: a normal (or training) image with the object region blacked out (docs/method.md, "BCM: background
compensation").

The reference pastes the image onto a black canvas through the *inverted* object mask (soft edges kept), so the
background keeps its pixels where the object mask is 0 and turns black where it is 255.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def make_background(image: Image.Image, object_mask: Image.Image | None = None) -> Image.Image:
    """``image * (1 - object_mask / 255)`` as RGB. Without an object mask the image is used as it is (for a
    background the user prepared, or texture categories where the "object" is the whole image)."""
    image = image.convert("RGB")
    if object_mask is None:
        return image
    mask = object_mask.convert("L")
    if mask.size != image.size:
        raise ValueError(
            f"object mask is {mask.size[0]}x{mask.size[1]} but the image is {image.size[0]}x{image.size[1]}; "
            "give a mask of the same size (white = object, black = background)."
        )
    keep = 1.0 - np.asarray(mask, dtype=np.float32)[..., None] / 255.0
    out = np.asarray(image, dtype=np.float32) * keep
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), mode="RGB")
