"""Placement control (docs/placement.md): where a defect may appear, and generating onto a given normal photo.

Tensor helpers shared by the sampler (:meth:`DualAnoDiffPipeline.generate`), the dataset generator and the ComfyUI
nodes; no file handling here (see :mod:`dualanodiff_core.dataset.placement`).

* a *region* is ``[B, 1, H, W]`` in [0, 1] at image resolution, white (>= 0.5) = a defect may appear there;
* :func:`latent_region` brings it to the latent grid (a latent cell is inside when at least half of its pixels are);
* :func:`keep_mask` says, per interleaved row ``[g, a, g, a, ...]``, where the sampler pins the latent to a known
  one (the gray background on anomaly rows, the normal photo on global rows) at every step;
* :func:`feather_alpha` / :func:`composite` paste the decoded image into the normal photo through a feathered band
  around the region: outside the band the photo's pixels are kept exactly.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DualAnoDiffError

#: default width (pixels) of the band outside the region where the generated image fades into the normal photo
DEFAULT_FEATHER = 8
#: default share of an accepted mask's pixels allowed outside the region
DEFAULT_MAX_OUTSIDE = 0.05


class PlacementError(DualAnoDiffError, ValueError):
    """A placement region or normal photo that cannot be used (wrong size or mode, empty region, ...)."""


def as_region(region: torch.Tensor, what: str = "placement") -> torch.Tensor:
    """``[H, W]``, ``[B, H, W]`` or ``[B, 1, H, W]`` -> ``[B, 1, H, W]`` float in {0, 1} (white >= 0.5)."""
    if not isinstance(region, torch.Tensor):
        raise PlacementError(f"{what}: expected a tensor mask, got {type(region).__name__}")
    r = region
    if r.ndim == 2:
        r = r[None, None]
    elif r.ndim == 3:
        r = r[:, None]
    if r.ndim != 4 or r.shape[1] != 1:
        raise PlacementError(f"{what}: a mask must be [H, W], [B, H, W] or [B, 1, H, W], got {tuple(region.shape)}")
    r = (r.float() >= 0.5).float()
    empty = [i for i in range(r.shape[0]) if not bool(r[i].any())]
    if empty:
        raise PlacementError(f"{what}: region {empty[0]} is empty (all black); paint white where defects may appear")
    return r


def latent_region(region: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """Region ``[B, 1, H, W]`` -> ``[B, 1, h, w]`` in {0, 1} on the latent grid: a cell is inside when at least half
    of its pixels are; a region too thin for that keeps every cell it touches."""
    h, w = latent_hw
    r = region.float()
    share = F.interpolate(r, size=(h, w), mode="area")
    out = (share >= 0.5).float()
    touched = (F.adaptive_max_pool2d(r, (h, w)) > 0).float()
    thin = out.flatten(1).sum(1) == 0
    if bool(thin.any()):
        out[thin] = touched[thin]
    return out


def keep_mask(region_latent: torch.Tensor, n_pairs: int, tie_global: bool, guide_anomaly: bool = True) -> torch.Tensor:
    """Per interleaved row ``[g0, a0, g1, a1, ...]``: 1 where the sampler pins the latent to the known one.
    Anomaly rows: outside the region (the gray background); global rows: outside the region when a normal photo is
    given (``tie_global``), nowhere otherwise."""
    r = region_latent.expand(n_pairs, -1, -1, -1) if region_latent.shape[0] == 1 else region_latent
    if r.shape[0] != n_pairs:
        raise PlacementError(f"placement: give 1 or {n_pairs} regions, got {region_latent.shape[0]}")
    outside = 1.0 - r
    g = outside if tie_global else torch.zeros_like(outside)
    a = outside if guide_anomaly else torch.zeros_like(outside)
    return torch.stack([g, a], 1).reshape(2 * n_pairs, *r.shape[1:])


def feather_alpha(region: torch.Tensor, feather: int = DEFAULT_FEATHER) -> torch.Tensor:
    """Composite weight ``[B, 1, H, W]``: 1 inside the region, falling linearly to 0 over ``feather`` pixels
    outside it (chessboard distance), exactly 0 beyond that band."""
    if int(feather) != feather or feather < 0:
        raise PlacementError(f"feather={feather}: a whole number of pixels >= 0")
    r = (region.float() >= 0.5).float()
    alpha = r.clone()
    grown = r
    for d in range(1, int(feather) + 1):
        nxt = F.max_pool2d(grown, 3, stride=1, padding=1)
        ring = nxt - grown
        alpha = alpha + ring * (1.0 - d / (feather + 1))
        grown = nxt
    return alpha


def composite(generated: torch.Tensor, normal: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """``generated * alpha + normal * (1 - alpha)``, and exactly ``normal`` where ``alpha`` is 0."""
    alpha = alpha.to(generated.device, generated.dtype)
    normal = normal.to(generated.device, generated.dtype)
    mixed = generated * alpha + normal * (1.0 - alpha)
    return torch.where(alpha > 0, mixed, normal)


def outside_fraction(mask: np.ndarray, region: np.ndarray) -> float:
    """Share of the mask's pixels outside the region (0.0 for an empty mask)."""
    m = np.asarray(mask) > 0
    total = int(m.sum())
    if total == 0:
        return 0.0
    return float((m & ~(np.asarray(region) > 0)).sum()) / total
