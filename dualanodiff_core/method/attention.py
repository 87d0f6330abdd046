"""DualBranchAttention: the per-layer part of DualAnoDiff.

One object per attention layer (self-attention ``attn1`` and cross-attention ``attn2`` of every transformer block)
holds, exactly as the reference ``LoRAAttnProcessor2_0`` does (docs/method.md: "Per-branch LoRA", "SAIM: cross-branch
attention", "BCM: background compensation"):

* a LoRA per branch on ``to_q``, ``to_k``, ``to_v`` and ``to_out[0]`` (``to_q_lora.{0,1}`` ...), rank r, scale
  alpha/r; index 0 is the global branch, 1 the anomaly branch;
* SAIM (``temporal_*``): LayerNorm(eps 1e-6) -> Linear -> single-head attention over the two branch tokens at every
  pixel -> Linear, added to the attention output and shared by both branches;
* optionally BCM (``temporal_condition_mlp``, ``temporal_a``): on the global branch's self-attention the K/V input
  becomes ``(1 - a) * h + a * MLP(h_bg)`` where ``h_bg`` is the same layer's input recorded during a pass of the UNet
  over the noised background.

This module reads top to bottom: the trainable layers, then the plain math as the reference computes it
(:func:`lora_linear`, :func:`attend_branches_plain`, :func:`saim_plain`, :func:`bcm_mix`), then the layer
(:func:`dual_branch_attention`), which works on any attention module exposing ``to_q``, ``to_k``, ``to_v``, ``to_out``
and ``heads`` (diffusers ``Attention`` and ComfyUI ``CrossAttention`` both do). By default the layer runs the fast
paths of :mod:`.fused` (batched branches, merged LoRA, folded SAIM), which give the same numbers. Parameter names are
the reference's, so official checkpoints map 1:1.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from . import fused
from .fused import clear_fast_cache  # noqa: F401  (re-exported: it used to live here)
from .layout import BRANCHES, LayoutError, validate_pairs

#: modes of a forward pass
MODE_DUAL = "dual"  # interleaved pairs: per-branch LoRA + SAIM (+ BCM injection when a cache is given)
MODE_RECORD = "record"  # BCM background pass: global-branch LoRA on every row, no SAIM; attn1 inputs recorded
MODE_OFF = "off"  # the plain attention of the base model (no LoRA, no SAIM, no BCM)
MODES = (MODE_DUAL, MODE_RECORD, MODE_OFF)

BCM_HIDDEN = 320  # the reference MLP is C -> 320 -> C, no activation


class LoRALinear(nn.Module):
    """``up(down(x)) * alpha / rank``; no bias. Init as the reference (diffusers 0.18 / peft "gaussian"):
    ``down ~ N(0, (1/rank)^2)``, ``up = 0``."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float | None = None):
        super().__init__()
        if rank < 1 or rank > min(in_features, out_features):
            raise ValueError(
                f"LoRA rank {rank} must be between 1 and min(in, out) = {min(in_features, out_features)} for a "
                f"{in_features}->{out_features} projection."
            )
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=False)
        self.rank = rank
        self.alpha = float(rank if alpha is None else alpha)
        nn.init.normal_(self.down.weight, std=1.0 / rank)
        nn.init.zeros_(self.up.weight)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.down.weight.dtype
        y = self.up(self.down(x.to(dtype)))
        if self.scale != 1.0:
            y = y * self.scale
        return y.to(x.dtype)


@dataclasses.dataclass
class DualControl:
    """Per-call settings read by every dual attention layer.

    ``lora_strength`` scales each branch's LoRA delta (global, anomaly) like the reference's ``scale``;
    ``saim_strength`` scales SAIM's output (0 = off, 1 = reference); ``bcm_strength`` scales every layer's learned
    fusion weight ``a`` (1 = reference). ``bcm_cache`` maps layer names to recorded background features: it is
    filled in ``record`` mode and read in ``dual`` mode.
    """

    mode: str = MODE_DUAL
    lora_strength: tuple[float, float] = (1.0, 1.0)
    saim_strength: float = 1.0
    bcm_strength: float = 1.0
    bcm_cache: dict[str, torch.Tensor] | None = None
    #: last layer that records in a background pass; learned on the first pass, then used to stop it early
    record_stop_after: str | None = None
    #: the fast paths of :mod:`.fused` (True) or the plain forms of this module (False): the same numbers
    fused: bool = True

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown dual attention mode {self.mode!r}; expected one of {MODES}")

    @contextlib.contextmanager
    def using(self, **changes) -> Iterator[DualControl]:
        """Temporarily change fields (restored afterwards, also on error)."""
        old = {k: getattr(self, k) for k in changes}
        for k, v in changes.items():
            setattr(self, k, v)
        self.__post_init__()
        try:
            yield self
        finally:
            for k, v in old.items():
                setattr(self, k, v)


class DualBranchLayers(nn.Module):
    """The trainable tensors of one attention layer, under the reference's names.

    ``query_dim``: width of the layer input; ``context_dim``: width of the K/V source (== query_dim for
    self-attention); ``inner_dim``: heads x head_dim; ``out_dim``: width of ``to_out[0]``'s output (SAIM's C).
    """

    def __init__(
        self,
        query_dim: int,
        context_dim: int,
        inner_dim: int,
        out_dim: int,
        rank: int = 32,
        alpha: float | None = None,
        saim: bool = True,
        bcm: bool = False,
        saim_zero_init: bool = False,
        bcm_alpha_init: float = 0.0,
    ):
        super().__init__()
        self.query_dim, self.context_dim, self.inner_dim, self.out_dim = query_dim, context_dim, inner_dim, out_dim
        self.rank = rank
        self.has_saim = saim
        self.has_bcm = bcm

        def pair(i, o):
            return nn.ModuleList([LoRALinear(i, o, rank, alpha) for _ in range(BRANCHES)])

        self.to_q_lora = pair(query_dim, inner_dim)
        self.to_k_lora = pair(context_dim, inner_dim)
        self.to_v_lora = pair(context_dim, inner_dim)
        self.to_out_lora = pair(inner_dim, out_dim)
        if saim:
            c = out_dim
            self.temporal_i = nn.Linear(c, c)
            self.temporal_n = nn.LayerNorm(c, elementwise_affine=True, eps=1e-6)
            self.temporal_q = nn.Linear(c, c)
            self.temporal_k = nn.Linear(c, c)
            self.temporal_v = nn.Linear(c, c)
            self.temporal_o = nn.Linear(c, c)
            if saim_zero_init:
                nn.init.zeros_(self.temporal_o.weight)
                nn.init.zeros_(self.temporal_o.bias)
        if bcm:
            self.temporal_condition_mlp = nn.Sequential(
                nn.Linear(query_dim, BCM_HIDDEN), nn.Linear(BCM_HIDDEN, query_dim)
            )
            self.temporal_a = nn.Parameter(torch.tensor([float(bcm_alpha_init)]))

    def extra_repr(self) -> str:
        return f"rank={self.rank}, saim={self.has_saim}, bcm={self.has_bcm}"


# --------------------------------------------------------------------------------------------------------------
# the plain math, as the reference computes it (the fast paths in .fused give the same numbers)


AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, "torch.Tensor | None"], torch.Tensor]


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, mask: torch.Tensor | None = None):
    """Multi-head attention on ``[B, L, heads*d]`` tensors (PyTorch's scaled dot-product attention)."""
    b, lq, inner = q.shape
    d = inner // heads
    q = q.view(b, lq, heads, d).transpose(1, 2)
    k = k.view(b, -1, heads, d).transpose(1, 2)
    v = v.view(b, -1, heads, d).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)
    return out.transpose(1, 2).reshape(b, lq, inner).to(q.dtype)


# ---- layout inside a layer ------------------------------------------------------------------------------------
# The UNet's rows are interleaved pairs [g0, a0, g1, a1, ...]. Inside a layer we work "branch-major": one copy to
# [2, pairs, tokens, C] makes each branch a contiguous half: branch i is simply x[i], SAIM pairs are the two halves
# and BCM mixes into half 0 (the fast paths batch both halves into single kernels). One copy at the end restores the
# interleaved rows.


def to_branch_major(x: torch.Tensor) -> torch.Tensor:
    """``[(n f), L, C]`` -> contiguous ``[f, n, L, C]``."""
    n = x.shape[0] // BRANCHES
    return x.view(n, BRANCHES, *x.shape[1:]).transpose(0, 1).contiguous()


def from_branch_major(x: torch.Tensor) -> torch.Tensor:
    """``[f, n, L, C]`` -> contiguous ``[(n f), L, C]``."""
    return x.transpose(0, 1).reshape(-1, *x.shape[2:])


# ---- per-branch LoRA --------------------------------------------------------------------------------------------


def lora_linear(base: nn.Module, lora: LoRALinear, x: torch.Tensor, strength: float) -> torch.Tensor:
    """A frozen projection with its LoRA: ``base(x) + strength * lora(x)`` (``lora`` carries ``alpha / rank``)."""
    y = base(x)
    if strength == 0.0:
        return y
    delta = lora(x)
    return y + (delta if strength == 1.0 else delta * strength)


def attend_branches_plain(attn, layers, hb, sb, strengths, attention_fn, mask, finish) -> torch.Tensor:
    """Each branch's attention with its own LoRA on q, k, v and out: branch-major ``hb``/``sb`` ``[2, n, L, C]``
    (queries / keys-values) -> ``[2, n, L, C_out]``. ``mask``: ``None``, one for all rows, or branch-major."""
    outs = []
    for i in range(BRANCHES):
        s = strengths[i]
        q = lora_linear(attn.to_q, layers.to_q_lora[i], hb[i], s)
        k = lora_linear(attn.to_k, layers.to_k_lora[i], sb[i], s)
        v = lora_linear(attn.to_v, layers.to_v_lora[i], sb[i], s)
        m = mask if mask is None or mask.shape[0] != 2 * hb.shape[1] else mask.view(2, -1, *mask.shape[1:])[i]
        a = attention_fn(q, k, v, attn.heads, m)
        outs.append(finish(lora_linear(attn.to_out[0], layers.to_out_lora[i], a, s)))
    return torch.stack(outs)


# ---- SAIM ---------------------------------------------------------------------------------------------------------


def saim_plain(layers: DualBranchLayers, ob: torch.Tensor) -> torch.Tensor:
    """SAIM's residual for branch-major attention outputs ``ob [2, n, N, C]``: at every pixel the two branch tokens
    attend to each other -- LayerNorm -> Linear -> single-head attention over the 2 tokens -> Linear."""
    dtype = layers.temporal_i.weight.dtype  # the new layers may be kept in fp32 under a half-precision UNet
    x = layers.temporal_i(layers.temporal_n(ob.to(dtype)))  # [2, n, N, C]
    tokens = x.permute(1, 2, 0, 3)  # [n, N, 2, C]: the (global, anomaly) tokens of each pixel
    q, k, v = layers.temporal_q(tokens), layers.temporal_k(tokens), layers.temporal_v(tokens)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)  # [n, N, 2, 2]
    y = layers.temporal_o(weights @ v)  # [n, N, 2, C]
    return y.permute(2, 0, 1, 3).to(ob.dtype)


# ---- BCM ----------------------------------------------------------------------------------------------------------


def bcm_mix(layers: DualBranchLayers, sb: torch.Tensor, control: DualControl, layer_name: str) -> torch.Tensor:
    """Branch-major K/V input: the global half becomes ``(1 - a) h + a MLP(h_bg)``; the anomaly half is unchanged.
    ``h_bg`` is this layer's input recorded in the background pass (:func:`run_with_background`)."""
    try:
        bg = control.bcm_cache[layer_name]
    except KeyError:
        raise LayoutError(
            f"BCM: no background features were recorded for layer {layer_name!r}; run the record pass first."
        ) from None
    g = sb[0]
    if bg.shape != g.shape:
        raise LayoutError(
            f"BCM: layer {layer_name!r} recorded background features of shape {tuple(bg.shape)}, but the batch "
            f"holds {g.shape[0]} pairs of {tuple(g.shape[1:])}; give one background row per pair."
        )
    # .to(device): ComfyUI may keep the parameter elsewhere (lowvram) and cast modules per call
    a = layers.temporal_a.to(device=g.device, dtype=g.dtype) * float(control.bcm_strength)
    mlp_dtype = layers.temporal_condition_mlp[0].weight.dtype
    mixed = (1 - a) * g + a * layers.temporal_condition_mlp(bg.to(mlp_dtype)).to(g.dtype)
    return torch.stack([mixed, sb[1]])


# ---- the layer --------------------------------------------------------------------------------------------------


def dual_branch_attention(
    attn: nn.Module,
    layers: DualBranchLayers,
    hidden: torch.Tensor,
    context: torch.Tensor | None = None,
    control: DualControl | None = None,
    *,
    layer_name: str = "",
    is_self_attention: bool | None = None,
    attention_fn: AttentionFn | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The dual attention of one layer.

    ``attn`` supplies the frozen base projections (``to_q``, ``to_k``, ``to_v``, ``to_out``) and ``heads``.
    ``hidden`` is ``[rows, N, C]``; ``context`` the K/V source (``None`` for self-attention). In ``dual`` mode rows are
    interleaved (global, anomaly) pairs; in ``record`` mode they are background rows. ``control.fused`` picks the
    fast paths of :mod:`.fused` (default) or the plain forms above; both give the same numbers.
    """
    control = control or DualControl()
    mode = control.mode
    if is_self_attention is None:
        is_self_attention = context is None
    attention_fn = attention_fn or sdpa_attention
    heads = attn.heads
    src = hidden if context is None else context

    def finish(out):
        return attn.to_out[1](out) if len(attn.to_out) > 1 else out

    if mode == MODE_OFF:
        out = attention_fn(attn.to_q(hidden), attn.to_k(src), attn.to_v(src), heads, mask)
        return finish(attn.to_out[0](out))

    if mode == MODE_RECORD:
        if is_self_attention and control.bcm_cache is not None:
            # the reference stores the attn1 input (= norm1(h_bg)) of the background pass
            control.bcm_cache[layer_name] = src
            if layer_name == control.record_stop_after and not torch.is_grad_enabled():
                # everything after the last recorded layer is discarded by the reference: skip computing it
                raise RecordComplete()
        s = float(control.lora_strength[0])
        if control.fused:

            def project(base, lora, x, name):
                return fused.project_record(base, lora, x, s, layers, name)

        else:

            def project(base, lora, x, name):
                return lora_linear(base, lora, x, s)

        q = project(attn.to_q, layers.to_q_lora[0], hidden, "q")
        k = project(attn.to_k, layers.to_k_lora[0], src, "k")
        v = project(attn.to_v, layers.to_v_lora[0], src, "v")
        a = attention_fn(q, k, v, heads, mask)
        return finish(project(attn.to_out[0], layers.to_out_lora[0], a, "out"))

    # ---- dual mode: interleaved pairs
    rows = hidden.shape[0]
    validate_pairs(rows, f"input of attention layer {layer_name or '?'}")
    if src.shape[0] != rows:
        raise LayoutError(f"attention layer {layer_name}: {rows} query rows but {src.shape[0]} context rows.")
    strengths = (float(control.lora_strength[0]), float(control.lora_strength[1]))
    hb = to_branch_major(hidden)
    sb = hb if context is None else to_branch_major(context)
    if is_self_attention and layers.has_bcm and control.bcm_cache is not None and control.bcm_strength != 0.0:
        sb = bcm_mix(layers, sb, control, layer_name)
    if mask is not None and mask.shape[0] == rows:
        mask = to_branch_major(mask).flatten(0, 1)
    attend = fused.attend_branches if control.fused else attend_branches_plain
    ob = attend(attn, layers, hb, sb, strengths, attention_fn, mask, finish)
    if layers.has_saim and control.saim_strength != 0.0:
        y = fused.saim(layers, ob) if control.fused else saim_plain(layers, ob)
        s = float(control.saim_strength)
        ob = ob + y if s == 1.0 else torch.add(ob, y, alpha=s)
    return from_branch_major(ob)


class DualBranchAttention(nn.Module):
    """Wraps an attention module, keeping its ``to_q``/``to_k``/``to_v``/``to_out`` children under the same names
    (so state-dict keys, weight patches and device moves of the base model keep working), and owns the layer's
    :class:`DualBranchLayers` as ``dual``.
    """

    def __init__(self, attn: nn.Module, layers: DualBranchLayers, layer_name: str, is_self_attention: bool):
        super().__init__()
        for name in ("to_q", "to_k", "to_v", "to_out"):
            if not hasattr(attn, name):
                raise TypeError(f"{type(attn).__name__} has no {name}; cannot wrap it as a dual attention layer")
        self.to_q, self.to_k, self.to_v, self.to_out = attn.to_q, attn.to_k, attn.to_v, attn.to_out
        self.heads = attn.heads
        self.dual = layers
        self.layer_name = layer_name
        self.is_self_attention = is_self_attention
        self.wrapped_class = type(attn)

    def forward(self, hidden, context=None, control: DualControl | None = None, attention_fn=None, mask=None):
        return dual_branch_attention(
            self,
            self.dual,
            hidden,
            context,
            control,
            layer_name=self.layer_name,
            is_self_attention=self.is_self_attention,
            attention_fn=attention_fn,
            mask=mask,
        )


def attention_dims(attn: nn.Module) -> dict[str, int]:
    """The sizes :class:`DualBranchLayers` needs, read off a module with ``to_q/to_k/to_v/to_out``."""
    return dict(
        query_dim=attn.to_q.in_features,
        context_dim=attn.to_k.in_features,
        inner_dim=attn.to_q.out_features,
        out_dim=attn.to_out[0].out_features,
    )


def layers_for(attn: nn.Module, **kwargs) -> DualBranchLayers:
    """Build :class:`DualBranchLayers` sized for an attention module with ``to_q/to_k/to_v/to_out``."""
    return DualBranchLayers(**attention_dims(attn), **kwargs)


class RecordComplete(Exception):
    """Raised inside the background pass once the last self-attention input is recorded (inference only)."""


def run_with_background(control: DualControl, record: Callable[[], object], main: Callable[[], torch.Tensor]):
    """BCM: run ``record()`` (the UNet over the noised background rows) in record mode, then ``main()`` (the UNet
    over the interleaved pairs) with the recorded features injected. The cache lives only for this call.

    The background pass's own output is discarded (as in the reference); under no_grad it stops right after the
    last recorded layer, which is learned on the first pass."""
    cache: dict[str, torch.Tensor] = {}
    with control.using(mode=MODE_RECORD, bcm_cache=cache):
        try:
            record()
        except RecordComplete:
            pass
    if control.record_stop_after is None and cache:
        control.record_stop_after = next(reversed(cache))
    with control.using(mode=MODE_DUAL, bcm_cache=cache):
        return main()
