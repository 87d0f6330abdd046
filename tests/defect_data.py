"""Tiny synthetic defect data sets for the data and training tests (16-32 px, exact masks)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def defect_pair(i: int, size: int = 16, seed: int = 0):
    """(image RGB uint8, defect mask uint8 0/255, object mask uint8 0/255): a gray square object on a dark
    background with a red square defect somewhere on the object."""
    rng = np.random.default_rng(seed * 1000 + i)
    img = np.full((size, size, 3), 50, np.uint8)
    lo, hi = size // 4, size - size // 4
    img[lo:hi, lo:hi] = (190, 190, 190)
    obj = np.zeros((size, size), np.uint8)
    obj[lo:hi, lo:hi] = 255
    d = max(2, size // 4)
    y, x = rng.integers(lo, hi - d + 1, 2)
    img[y : y + d, x : x + d] = (220, 30, 30)
    mask = np.zeros((size, size), np.uint8)
    mask[y : y + d, x : x + d] = 255
    return img, mask, obj


def save(arr: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def make_flat(
    root: Path, n: int = 4, size: int = 16, object_masks: bool = False, normals: int = 0, mask_suffix: str = ""
) -> Path:
    """``root/images``, ``root/masks`` (``<stem><mask_suffix>.png``), optional ``object_masks/`` and ``normals/``."""
    for i in range(n):
        img, mask, obj = defect_pair(i, size)
        save(img, root / "images" / f"{i:03d}.png")
        save(mask, root / "masks" / f"{i:03d}{mask_suffix}.png")
        if object_masks:
            save(obj, root / "object_masks" / f"{i:03d}.png")
    for i in range(normals):
        img, _, _ = defect_pair(100 + i, size)
        save(img, root / "normals" / f"n{i}.png")
    return root


def make_side_by_side(root: Path, n: int = 3, size: int = 16, objects: bool = False) -> Path:
    for i in range(n):
        img, mask, obj = defect_pair(i, size)
        save(img, root / f"img{i}.png")
        save(mask, root / f"img{i}_mask.png")
        if objects:
            save(obj, root / f"img{i}_object.png")
    return root


def make_mvtec(
    root: Path,
    defect: str = "scratch",
    n: int = 6,
    size: int = 16,
    normals: int = 2,
    other_defects: tuple[str, ...] = ("hole",),
) -> Path:
    """``root`` is the category folder."""
    for name in (defect,) + tuple(other_defects):
        for i in range(n):
            img, mask, _ = defect_pair(i, size, seed=len(name))
            save(img, root / "test" / name / f"{i:03d}.png")
            save(mask, root / "ground_truth" / name / f"{i:03d}_mask.png")
    for i in range(normals):
        img, _, _ = defect_pair(100 + i, size)
        save(img, root / "train" / "good" / f"{i:03d}.png")
        save(img, root / "test" / "good" / f"{i:03d}.png")
    return root
