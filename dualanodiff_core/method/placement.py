"""Placement control (docs/placement.md): where a defect may appear, and generating onto a given normal photo.

Tensor helpers shared by the sampler (:meth:`DualAnoDiffPipeline.generate`), the dataset generator and the ComfyUI
nodes; no file handling here (see :mod:`dualanodiff_core.dataset.placement`).

* a *region* is ``[B, 1, H, W]`` in [0, 1] at image resolution, white (>= 0.5) = a defect may appear there;
* :func:`latent_region` brings it to the latent grid (a latent cell is inside when at least half of its pixels are);
* :func:`keep_mask` says, per interleaved row ``[g, a, g, a, ...]``, where the sampler pins the latent to a known
  one (the gray background on anomaly rows, the normal photo on global rows) at every step;
* :func:`feather_alpha` / :func:`composite` paste the decoded image into the normal photo through a feathered band
  around the region: outside the band the photo's pixels are kept exactly;
* steering (:class:`Steering`): the anomaly branch runs free for the first steps; then its predicted clean latent
  shows where a defect is forming (:func:`forming_defect`), :func:`shift_scores` / :func:`choose_shifts` pick a
  circular shift that moves it into the region (one of the best shifts, chosen by the sample's seed so that defects
  spread over the region), :func:`roll_pairs` applies it to both rows of the pair mid-sampling, and the hold outside
  the region then ramps in (:func:`ramp_weight`) instead of erasing, from the first step, a defect that would have
  formed outside. :func:`plan_steering` is what the Python API and the ComfyUI sampler share.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence

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


@dataclasses.dataclass(frozen=True)
class Steering:
    """How placement guidance steers a defect into the region (docs/placement.md, "How it works").

    ``probe``: share of the sampling steps during which the anomaly branch runs free, before the latents of both
    rows are rolled so that the defect forming in them lies inside the region (at least one step; 0 = no shift,
    only the hold outside the region); ``ramp``: share of the sampling steps over which the anomaly branch's hold at
    the gray background outside the region then grows from 0 to full (0 = full at once; with ``probe`` 0 too, full
    from the start: the behaviour before steering, :data:`HOLD_ONLY`); ``slack``: every shift whose predicted share
    of the forming defect inside the region is within this of the best one is a candidate, and the sample's seed
    picks among them."""

    probe: float = 0.2
    ramp: float = 0.3
    slack: float = 0.05

    def __post_init__(self):
        for k in ("probe", "ramp", "slack"):
            v = getattr(self, k)
            if not isinstance(v, (int, float)) or not (0.0 <= float(v) <= 1.0):
                raise PlacementError(f"steering {k}={v}: a share in [0, 1]")

    def probe_steps(self, steps: int) -> int:
        """After how many of ``steps`` sampling steps the latents are rolled (0 = never)."""
        return 0 if self.probe <= 0 else max(1, min(int(steps), round(self.probe * steps)))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


#: :class:`Steering` settings meaning "no steering": no probe and the hold at full strength from the first step
HOLD_ONLY = Steering(probe=0.0, ramp=0.0, slack=0.0)


def as_steering(value, what: str = "steering") -> Steering:
    """``True`` = the :class:`Steering` defaults, ``False`` = :data:`HOLD_ONLY`, or a :class:`Steering`."""
    if isinstance(value, Steering):
        return value
    if isinstance(value, bool):
        return Steering() if value else HOLD_ONLY
    raise PlacementError(f"{what}={value!r}: give True (steer), False (hold only) or a Steering(...)")


def ramp_weight(step: int, steps: int, ramp: float, start: int = 0) -> float:
    """Strength in [0, 1] of the anomaly branch's hold outside the region after sampling step ``step`` (-1 = the
    start) of ``steps``: 0 before step ``start`` (steering lets the defect form freely until then), then growing
    linearly to 1 over a ``ramp`` share of the steps; ``ramp`` 0 = 1 from ``start`` on."""
    if step + 1 < start:
        return 0.0
    if ramp <= 0:
        return 1.0
    return float(min(1.0, max(0.0, (step + 1 - start) / (ramp * steps))))


def forming_defect(x0_anomaly: torch.Tensor, gray: torch.Tensor) -> torch.Tensor:
    """Where the anomaly branch is drawing a defect: ``[N, h, w]`` >= 0, the distance of its predicted clean latent
    ``x0_anomaly`` ``[N, C, h, w]`` from the gray background latent ``gray`` ``[1, C, h, w]``, above the per-sample
    median (the background's own small deviation)."""
    d = (x0_anomaly.float() - gray.float()).norm(dim=1)
    med = d.flatten(1).median(dim=1).values[:, None, None]
    return (d - med).clamp_min(0)


def shift_scores(weight: torch.Tensor, region_latent: torch.Tensor) -> torch.Tensor:
    """``[N, h, w]``: entry ``(n, dy, dx)`` is the share of ``weight[n]`` that lies inside the region after
    ``torch.roll(weight[n], (dy, dx))``, rounded to 1e-6 (so that the FFT's rounding noise cannot change which
    shifts tie). A sample with nothing forming scores 0 everywhere."""
    n, h, w = weight.shape
    r = region_latent.float().reshape(-1, h, w).expand(n, -1, -1)
    wt = weight.float()
    # circular cross-correlation: score[s] = sum_q w[q] r[q + s]
    corr = torch.fft.ifft2(torch.conj(torch.fft.fft2(wt.double())) * torch.fft.fft2(r.double())).real
    total = wt.double().flatten(1).sum(1)[:, None, None]
    share = torch.where(total > 0, corr / total.clamp_min(1e-12), torch.zeros_like(corr))
    return (torch.round(share * 1e6) / 1e6).float()


def _choice(seed: int, count: int) -> int:
    """A whole number in [0, count) from ``seed`` alone (no global random state, the same on every machine)."""
    h = hashlib.sha256(f"dualanodiff-steer:{int(seed)}".encode()).digest()
    return int.from_bytes(h[:8], "little") % count


def choose_shifts(scores: torch.Tensor, seeds: Sequence[int], slack: float) -> list[tuple[int, int]]:
    """One roll ``(dy, dx)`` per sample: among the shifts scoring within ``slack`` of the best (compared in units of
    1e-6, as :func:`shift_scores` rounds them), the one picked by the sample's seed."""
    n, h, w = scores.shape
    if len(seeds) != n:
        raise PlacementError(f"steering: {len(seeds)} seeds for {n} samples")
    out = []
    for k in range(n):
        s = torch.round(scores[k].double() * 1e6)
        cand = torch.nonzero(s >= s.max() - round(slack * 1e6)).tolist()  # row-major order
        dy, dx = cand[_choice(seeds[k], len(cand))]
        out.append((int(dy), int(dx)))
    return out


def signed_shift(shift: tuple[int, int], latent_hw: tuple[int, int], scale: int = 1) -> list[int]:
    """A roll ``(dy, dx)`` on an ``h x w`` grid as the signed offset it amounts to, times ``scale`` (pixels per
    latent cell): rolling by ``h - 1`` is moving up by one."""
    return [(v - n if v > n // 2 else v) * scale for v, n in zip(shift, latent_hw)]


def roll_pairs(latents: torch.Tensor, shifts: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Interleaved ``[g0, a0, g1, a1, ...]``: both rows of pair ``j`` rolled by ``shifts[j]`` (SAIM ties the two
    branches' positions, so they move together). Returns a new tensor."""
    if latents.shape[0] != 2 * len(shifts):
        raise PlacementError(f"steering: {len(shifts)} shifts for {latents.shape[0] // 2} pairs")
    rows = [torch.roll(latents[2 * j : 2 * j + 2], tuple(shifts[j]), dims=(-2, -1)) for j in range(len(shifts))]
    return torch.cat(rows)


def plan_steering(
    x0_anomaly: torch.Tensor,
    gray: torch.Tensor,
    region_latent: torch.Tensor,
    seeds: Sequence[int],
    steering: Steering,
    probe_steps: int,
    scale: int,
) -> tuple[list[tuple[int, int]], list[dict]]:
    """The shared core of steering (the Python API and the ComfyUI sampler both call it after their probe): from the
    anomaly branch's predicted clean latents ``[N, C, h, w]``, one roll per pair (:func:`choose_shifts`) and its
    record for the manifest: the shift in pixels (``scale`` pixels per latent cell) and the share of the forming
    defect the probe predicts inside the region without and with it."""
    hw = tuple(x0_anomaly.shape[-2:])
    n = x0_anomaly.shape[0]
    region = region_latent.float().reshape(-1, 1, *hw)
    if region.shape[0] not in (1, n):
        raise PlacementError(f"steering: {region.shape[0]} regions for {n} pairs")
    scores = shift_scores(forming_defect(x0_anomaly, gray), region.expand(n, -1, -1, -1))
    shifts = choose_shifts(scores, list(seeds), steering.slack)
    records = [
        dict(
            probe_steps=int(probe_steps),
            shift_px=signed_shift(s, hw, scale),
            inside_predicted_before=round(float(scores[j, 0, 0]), 4),
            inside_predicted_after=round(float(scores[j, s[0], s[1]]), 4),
        )
        for j, s in enumerate(shifts)
    ]
    return shifts, records


def ramp_anomaly_rows(keep_or_generate: torch.Tensor, weight: float, generate: bool = False) -> torch.Tensor:
    """Interleaved rows ``[g0, a0, g1, a1, ...]`` of a hold mask, the anomaly rows' hold scaled by ``weight``
    (:func:`ramp_weight`). ``generate=True``: the mask says where to *generate* (1 - hold, ComfyUI's noise mask)."""
    m = keep_or_generate.clone()
    a = m[1::2]
    m[1::2] = 1 - weight * (1 - a) if generate else a * weight
    return m
