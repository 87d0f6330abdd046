"""The interleaved two-branch batch layout.

Every tensor that runs through the dual UNet holds *pairs* of rows, interleaved exactly as the reference code's
``'(b f) ...'`` with ``f = 2``::

    [global_0, anomaly_0, global_1, anomaly_1, ...]

Row parity is the branch: even rows are the global branch (whole image, prompt "a vfx with sks"), odd rows the
anomaly branch (defect only, on mid-gray, prompt "sks"). Under classifier-free guidance the batch is a sequence of
*chunks* (``[uncond rows..., cond rows...]``); every chunk must itself hold whole pairs so that a pair never
straddles the CFG halves.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..errors import DualAnoDiffError

BRANCHES = 2
GLOBAL = 0
ANOMALY = 1


class LayoutError(DualAnoDiffError, ValueError):
    """A batch does not hold whole interleaved (global, anomaly) pairs."""


def validate_pairs(n_rows: int, what: str = "batch") -> int:
    """Check that ``n_rows`` holds whole pairs; return the number of pairs."""
    if n_rows <= 0 or n_rows % BRANCHES:
        raise LayoutError(
            f"{what} has {n_rows} rows, but DualAnoDiff needs an even number: rows are interleaved pairs "
            f"[global_0, anomaly_0, global_1, anomaly_1, ...]. Use an even batch (2 x number of pairs)."
        )
    return n_rows // BRANCHES


def validate_chunks(n_rows: int, chunk_rows: int | Sequence[int], what: str = "batch") -> int:
    """Check that every CFG chunk holds whole pairs.

    ``chunk_rows`` is either the size of every chunk or the list of chunk sizes. Returns the number of chunks.
    """
    sizes = list(chunk_rows) if not isinstance(chunk_rows, int) else None
    if sizes is None:
        size = int(chunk_rows)
        if size <= 0 or n_rows % size:
            raise LayoutError(f"{what}: {n_rows} rows cannot be split into CFG chunks of {size} rows.")
        sizes = [size] * (n_rows // size)
    if sum(sizes) != n_rows:
        raise LayoutError(f"{what}: chunk sizes {sizes} do not add up to the {n_rows} rows of the batch.")
    for i, s in enumerate(sizes):
        if s % BRANCHES:
            raise LayoutError(
                f"{what}: CFG chunk {i} has {s} rows; each chunk must hold whole (global, anomaly) pairs, so an "
                f"odd chunk would pair rows across the conditional and unconditional halves. Use an even latent "
                f"batch (2 x number of pairs)."
            )
    return len(sizes)


def interleave(global_rows: torch.Tensor, anomaly_rows: torch.Tensor) -> torch.Tensor:
    """``[g0, g1, ...]`` and ``[a0, a1, ...]`` -> ``[g0, a0, g1, a1, ...]``."""
    if global_rows.shape != anomaly_rows.shape:
        raise LayoutError(
            f"global and anomaly rows must have the same shape, got {tuple(global_rows.shape)} and "
            f"{tuple(anomaly_rows.shape)}."
        )
    return torch.stack([global_rows, anomaly_rows], dim=1).flatten(0, 1)


def split(x: torch.Tensor, what: str = "batch") -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`interleave`: ``(global_rows, anomaly_rows)`` (views, no copy)."""
    validate_pairs(x.shape[0], what)
    return x[GLOBAL::BRANCHES], x[ANOMALY::BRANCHES]


def share_anomaly_noise(latents: torch.Tensor, share: float) -> torch.Tensor:
    """Interleaved starting latents ``[g0, a0, g1, a1, ...]`` with each anomaly row replaced by
    ``share * g + sqrt(1 - share**2) * a`` (still standard normal, correlation ``share`` with its global row); the
    global rows unchanged. Returns a new tensor."""
    out = latents.clone()
    s = float(share)
    out[1::2] = s * latents[0::2] + math.sqrt(max(0.0, 1.0 - s * s)) * latents[1::2]
    return out


def zero_mean_anomaly_rows(latents: torch.Tensor) -> torch.Tensor:
    """Interleaved starting latents ``[g0, a0, g1, a1, ...]`` with each anomaly row's per-channel spatial mean
    removed (the global rows unchanged). Returns a new tensor."""
    out = latents.clone()
    a = out[1::2]
    out[1::2] = a - a.mean(dim=(-2, -1), keepdim=True)
    return out
