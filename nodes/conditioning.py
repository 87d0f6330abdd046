"""Paired conditioning and interleaved results, on ComfyUI's data structures (no ComfyUI import).

* A CONDITIONING is a list of ``[tensor [batch, tokens, dim], {options}]`` entries. DualAnoDiff needs one entry whose
  tensor holds the two prompts ``[global, anomaly]`` (batch 2): ComfyUI tiles it over the latent batch to
  ``[g, a, g, a, ...]`` (``comfy.utils.repeat_to_batch_size``), so every row gets its branch's prompt.
* A LATENT is ``{"samples": [rows, C, h, w], "noise_mask"?: ..., "batch_index"?: [...]}``; an IMAGE is
  ``[rows, H, W, C]``. Sampled pairs are interleaved rows ``[g0, a0, g1, a1, ...]``
  (see ``dualanodiff_core.method.layout``).
"""

from __future__ import annotations

import logging
import math

import torch

from ..dualanodiff_core.errors import DualAnoDiffError
from ..dualanodiff_core.method.layout import LayoutError, interleave, split, validate_pairs

log = logging.getLogger("DualAnoDiff")

#: conditioning options that only make sense for one prompt; dropped from the anomaly prompt when pairing
_PER_PROMPT_KEYS = ("control", "area", "mask", "strength", "set_area_to_bounds", "hooks", "gligen")


class ConditioningError(DualAnoDiffError, ValueError):
    """A conditioning cannot be used as a DualAnoDiff prompt pair."""


def _single_entry(cond, name: str):
    if not isinstance(cond, (list, tuple)) or not cond:
        raise ConditioningError(f"{name} is empty or not a CONDITIONING; connect a CLIP Text Encode output.")
    if len(cond) != 1:
        raise ConditioningError(
            f"{name} holds {len(cond)} conditionings (from Conditioning Combine/Concat?). DualAnoDiff pairs exactly "
            "one global prompt with one anomaly prompt: connect a single CLIP Text Encode output to each."
        )
    entry = cond[0]
    tensor, options = entry[0], entry[1] if len(entry) > 1 else {}
    if not isinstance(tensor, torch.Tensor) or tensor.ndim != 3:
        raise ConditioningError(f"{name}: expected a [batch, tokens, dim] text embedding, got {type(tensor).__name__}.")
    return tensor, dict(options)


def _repeat_tokens(t: torch.Tensor, length: int) -> torch.Tensor:
    # repeating every token leaves attention unchanged (ComfyUI pads the same way when it concatenates conds)
    return t if t.shape[1] == length else t.repeat(1, length // t.shape[1], 1)


def pair_conditioning(global_cond, anomaly_cond) -> list:
    """``[global]`` + ``[anomaly]`` -> one batch-2 conditioning ``[[cat(global, anomaly), options]]``.

    The options (pooled output, ControlNet, area ...) are the global prompt's; per-prompt options of the anomaly
    prompt are dropped with a warning. Prompts of different lengths (e.g. 77 and 154 tokens) are padded by
    repetition to a common length.
    """
    g, g_opts = _single_entry(global_cond, "the global-branch positive")
    a, a_opts = _single_entry(anomaly_cond, "the anomaly-branch positive")
    for t, name in ((g, "global"), (a, "anomaly")):
        if t.shape[0] != 1:
            raise ConditioningError(
                f"the {name}-branch positive has a batch of {t.shape[0]} prompts; give one prompt per branch "
                "(it is repeated for every pair). An already paired conditioning goes straight to a sampler."
            )
    if g.shape[2] != a.shape[2]:
        raise ConditioningError(
            f"the two prompts were encoded to different widths ({g.shape[2]} and {a.shape[2]}); encode both with "
            "the same CLIP."
        )
    length = math.lcm(g.shape[1], a.shape[1])
    if length // min(g.shape[1], a.shape[1]) > 4:
        raise ConditioningError(
            f"the prompts have {g.shape[1]} and {a.shape[1]} tokens, which do not pad to a common length cheaply; "
            "shorten the longer prompt."
        )
    dropped = sorted(k for k in a_opts if k in _PER_PROMPT_KEYS)
    if dropped:
        log.warning(
            "DualAnoDiff: the anomaly prompt's %s options are ignored; the pair uses the global "
            "prompt's options for both rows.",
            ", ".join(dropped),
        )
    pair = torch.cat([_repeat_tokens(g, length), _repeat_tokens(a.to(g.device, g.dtype), length)])
    return [[pair, g_opts]]


def check_paired(cond, name: str = "positive") -> None:
    """A conditioning that is already a pair: one entry of batch 2."""
    t, _ = _single_entry(cond, name)
    if t.shape[0] != 2:
        raise ConditioningError(
            f"{name} has a batch of {t.shape[0]}; a DualAnoDiff positive is a pair [global, anomaly] (batch 2) "
            "built by the DualAnoDiff Pair Conditioning node."
        )


def check_negative(cond, name: str = "negative") -> None:
    """A negative applies to both branches (batch 1) or gives one per branch (batch 2)."""
    if not isinstance(cond, (list, tuple)) or not cond:
        raise ConditioningError(f"{name} is empty or not a CONDITIONING; connect a CLIP Text Encode output.")
    for i, entry in enumerate(cond):
        t = entry[0]
        if not isinstance(t, torch.Tensor) or t.ndim != 3 or t.shape[0] not in (1, 2):
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ConditioningError(
                f"{name} entry {i} has shape {shape}; give one negative prompt for both branches (batch 1) or a "
                "[global, anomaly] pair (batch 2)."
            )


def _mask_rows(mask: torch.Tensor, rows: int) -> torch.Tensor:
    """A LATENT noise mask as ``[rows, 1, h, w]`` (ComfyUI accepts [h, w], [b, h, w] and [b, 1, h, w])."""
    m = mask
    if m.ndim == 2:
        m = m[None, None]
    elif m.ndim == 3:
        m = m[:, None]
    if m.shape[0] == 1 and rows > 1:
        m = m.expand(rows, *m.shape[1:])
    if m.shape[0] != rows:
        raise LayoutError(f"the latent's noise mask has {m.shape[0]} masks for {rows} latents; give 1 or {rows}.")
    return m


def pair_latent(latent: dict) -> dict:
    """The starting LATENT of a dual sampling: every row of ``latent`` becomes one (global, anomaly) pair.

    Both rows of a pair start from the same latent. A noise mask (inpainting) applies to the global row only; the
    anomaly row is always generated in full (its target is the defect alone on mid-gray).
    """
    samples = latent.get("samples") if isinstance(latent, dict) else None
    if not isinstance(samples, torch.Tensor) or samples.ndim < 4 or samples.shape[0] < 1:
        raise LayoutError("the LATENT input holds no latent images; connect e.g. Empty Latent Image or VAE Encode.")
    n = samples.shape[0]
    out = {"samples": interleave(samples, samples)}
    mask = latent.get("noise_mask")
    if mask is not None:
        m = _mask_rows(mask, n)
        out["noise_mask"] = interleave(m, torch.ones_like(m))
    return out


def split_latent(latent: dict) -> tuple[dict, dict]:
    """An interleaved LATENT ``[g0, a0, g1, a1, ...]`` -> (global LATENT, anomaly LATENT)."""
    samples = latent.get("samples") if isinstance(latent, dict) else None
    if not isinstance(samples, torch.Tensor):
        raise LayoutError("the LATENT input holds no latent images.")
    rows = samples.shape[0]
    validate_pairs(rows, "the interleaved LATENT")
    g, a = split(samples, "the interleaved LATENT")
    out_g, out_a = {"samples": g.clone()}, {"samples": a.clone()}
    mask = latent.get("noise_mask")
    if isinstance(mask, torch.Tensor) and mask.ndim >= 3 and mask.shape[0] == rows:
        out_g["noise_mask"], out_a["noise_mask"] = mask[0::2].clone(), mask[1::2].clone()
    elif mask is not None:
        out_g["noise_mask"] = out_a["noise_mask"] = mask
    index = latent.get("batch_index")
    if isinstance(index, (list, tuple)) and len(index) == rows:
        out_g["batch_index"], out_a["batch_index"] = list(index[0::2]), list(index[1::2])
    return out_g, out_a


def split_images(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An interleaved IMAGE batch ``[g0, a0, g1, a1, ...]`` -> (global images, anomaly images)."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        raise LayoutError("expected an IMAGE batch [rows, height, width, channels].")
    g, a = split(images, "the interleaved IMAGE batch")
    return g.clone(), a.clone()
