"""Placement regions and normal photos for ``dualanodiff generate --placement / --normal`` (docs/placement.md).

A :class:`PlacementSet` pairs every sample with at most one normal photo and one region mask:

* ``--normal FOLDER`` (or one image): sample ``i`` is generated onto normal photo ``i % len(photos)`` (sorted by
  file name);
* ``--placement MASK``: one region for every sample; ``--placement FOLDER``: one region per normal photo (same stem,
  or ``STEM_mask``), or, without ``--normal``, region ``i % len(masks)``.

Every file is checked before anything is generated: normal photos must be RGB or grayscale and exactly the
generation size (their pixels are kept exactly, so they are never resized); regions must be that size too and not
empty. Errors name the file and say what to do.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..fileio import IMAGE_SUFFIXES, masks_for
from ..method.placement import (
    DEFAULT_FEATHER,
    DEFAULT_MAX_OUTSIDE,
    PlacementError,
    Steering,
    as_steering,
    outside_fraction,
)
from .acceptance import FilterDecision

#: the acceptance filter's reason for a mask that leaves the placement region
OUTSIDE_REGION = "outside_region"
NORMAL_MODES = ("RGB", "L")


@dataclasses.dataclass
class PlacementItem:
    normal: Image.Image | None  # RGB, exactly the generation size
    region: np.ndarray | None  # bool [H, W], True = a defect may appear there
    normal_path: Path | None
    region_path: Path | None


def _images_in(path: Path, option: str) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise PlacementError(f"{option} {path}: the folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
        return files
    if path.is_file():
        return [path]
    raise PlacementError(f"{option} {path}: no such file or folder")


def load_normal(path: Path, size: tuple[int, int]) -> Image.Image:
    """A normal photo as RGB; it must be RGB or grayscale and exactly ``size`` = (width, height)."""
    try:
        with Image.open(path) as im:
            im.load()
            mode, got = im.mode, im.size
            img = im.convert("RGB") if mode in NORMAL_MODES else None
    except OSError as e:
        raise PlacementError(f"--normal {path}: cannot read the image ({e})") from None
    if img is None:
        raise PlacementError(
            f"--normal {path}: image mode {mode}; give an RGB or grayscale (L) photo (convert it to RGB first, "
            "e.g. drop the alpha channel)"
        )
    if got != tuple(size):
        raise PlacementError(
            f"--normal {path}: the photo is {got[0]}x{got[1]} but the images are generated at {size[0]}x{size[1]}; "
            f"its pixels are kept exactly, so it is never resized: pass --size {got[0]}x{got[1]} or resize the photo"
        )
    return img


def load_region(path: Path, size: tuple[int, int]) -> np.ndarray:
    """A region mask (white = a defect may appear there) as bool ``[H, W]``; exactly ``size``, not empty."""
    try:
        with Image.open(path) as im:
            gray = np.asarray(im.convert("L"))
    except OSError as e:
        raise PlacementError(f"--placement {path}: cannot read the mask ({e})") from None
    h, w = gray.shape
    if (w, h) != tuple(size):
        raise PlacementError(
            f"--placement {path}: the mask is {w}x{h} but the images are {size[0]}x{size[1]}; give a mask of the "
            "same size as the images (or pass --size to match it)"
        )
    region = gray >= 128
    if not region.any():
        raise PlacementError(
            f"--placement {path}: the region is empty (no pixel >= 128); paint white where defects may appear"
        )
    return region


class PlacementSet:
    """Normal photos and/or region masks, one (photo, region) per sample; see the module docstring."""

    def __init__(
        self,
        normals: list[Path] | None = None,
        regions: list[Path] | None = None,
        feather: int = DEFAULT_FEATHER,
        max_outside: float = DEFAULT_MAX_OUTSIDE,
        guide: bool = True,
        steering: Steering | bool = True,
    ):
        self.normals = [Path(p) for p in normals] if normals else None
        self.regions = [Path(p) for p in regions] if regions else None
        if self.normals is None and self.regions is None:
            raise PlacementError("placement: give normal photos, region masks or both")
        if self.normals is not None and self.regions is not None and len(self.regions) not in (1, len(self.normals)):
            raise PlacementError(
                f"--placement: {len(self.regions)} masks for {len(self.normals)} normal photos; give one mask, or "
                "one per photo"
            )
        if int(feather) != feather or feather < 0:
            raise PlacementError(f"--feather {feather}: a whole number of pixels >= 0")
        if not (0.0 <= max_outside <= 1.0):
            raise PlacementError(f"--max-outside-region {max_outside}: a share in [0, 1] (1 = off)")
        self.feather, self.max_outside, self.guide = int(feather), float(max_outside), bool(guide)
        #: how guidance steers defects into the region (only with regions and ``guide``)
        self.steering = as_steering(steering, "placement steering")
        self._cache: dict[tuple, PlacementItem] = {}

    @classmethod
    def from_paths(
        cls,
        normal: str | os.PathLike | None = None,
        placement: str | os.PathLike | None = None,
        feather: int = DEFAULT_FEATHER,
        max_outside: float = DEFAULT_MAX_OUTSIDE,
        guide: bool = True,
        steering: Steering | bool = True,
    ) -> PlacementSet:
        normals = _images_in(Path(normal), "--normal") if normal is not None else None
        regions = None
        if placement is not None:
            p = Path(placement)
            regions = _images_in(p, "--placement")
            if p.is_dir() and normals is not None:
                found, regions = regions, []
                for img, m in zip(normals, masks_for(normals, found)):
                    if m is None:
                        raise PlacementError(
                            f"--placement {p}: no region mask for normal photo {img.name} (looked for {img.stem}.* "
                            f"and {img.stem}_mask.*); give one mask per photo, or a single mask file for all"
                        )
                    regions.append(m)
        return cls(normals, regions, feather, max_outside, guide, steering)

    def __len__(self) -> int:
        return len(self.normals) if self.normals is not None else len(self.regions)

    def check(self, size: tuple[int, int]) -> None:
        """Read every file once (before anything is generated): raises :class:`PlacementError` naming the file."""
        for k in range(len(self)):
            self.get(k, size)

    def get(self, index: int, size: tuple[int, int]) -> PlacementItem:
        """Photo and region of sample ``index`` (``size`` = (width, height))."""
        k = index % len(self)
        key = (k, tuple(size))
        if key not in self._cache:
            if len(self._cache) > 64:
                self._cache.clear()
            npath = self.normals[k] if self.normals is not None else None
            rpath = None
            if self.regions is not None:
                rpath = self.regions[0] if len(self.regions) == 1 else self.regions[k]
            normal = load_normal(npath, size) if npath is not None else None
            region = load_region(rpath, size) if rpath is not None else None
            self._cache[key] = PlacementItem(normal, region, npath, rpath)
        return self._cache[key]

    def describe(self) -> dict[str, Any]:
        return {
            "normals": None if self.normals is None else [p.name for p in self.normals],
            "regions": None if self.regions is None else [p.name for p in self.regions],
            "feather": self.feather,
            "max_outside_region": self.max_outside,
            "guide": self.guide,
            "steering": self.steering.to_dict() if self.steers else None,
        }

    @property
    def steers(self) -> bool:
        """Whether sampling probes and shifts the starting noise (regions, guidance on, a probe)."""
        return self.regions is not None and self.guide and self.steering.probe > 0


def check_region(decision: FilterDecision, mask: np.ndarray, region: np.ndarray, max_outside: float):
    """``(decision, outside)``: an accepted pair whose mask has more than ``max_outside`` of its pixels outside the
    region becomes a rejection with reason :data:`OUTSIDE_REGION`."""
    outside = outside_fraction(mask, region)
    if decision.accepted and outside > max_outside:
        decision = dataclasses.replace(
            decision,
            accepted=False,
            reason=OUTSIDE_REGION,
            detail=f"{outside:.1%} of the mask lies outside the placement region (limit {max_outside:.1%})",
        )
    return decision, outside
