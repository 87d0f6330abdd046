"""DualBranchAttention: the per-layer part of DualAnoDiff.

One object per attention layer (self-attention ``attn1`` and cross-attention ``attn2`` of every transformer block)
holds, exactly as the reference ``LoRAAttnProcessor2_0`` does (METHOD.md §1.2-1.4):

* a LoRA per branch on ``to_q``, ``to_k``, ``to_v`` and ``to_out[0]`` (``to_q_lora.{0,1}`` ...), rank r, scale
  alpha/r; index 0 is the global branch, 1 the anomaly branch;
* SAIM (``temporal_*``): LayerNorm(eps 1e-6) -> Linear -> single-head attention over the two branch tokens at every
  pixel -> Linear, added to the attention output and shared by both branches;
* optionally BCM (``temporal_condition_mlp``, ``temporal_a``): on the global branch's self-attention the K/V input
  becomes ``(1 - a) * h + a * MLP(h_bg)`` where ``h_bg`` is the same layer's input recorded during a pass of the UNet
  over the noised background.

The math lives in :func:`dual_branch_attention`, which works on any attention module exposing ``to_q``, ``to_k``,
``to_v``, ``to_out`` and ``heads`` (diffusers ``Attention`` and ComfyUI ``CrossAttention`` both do). Parameter names
are the reference's, so official checkpoints map 1:1.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

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

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown dual attention mode {self.mode!r}; expected one of {MODES}")

    @contextlib.contextmanager
    def using(self, **changes) -> Iterator["DualControl"]:
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
            self.temporal_condition_mlp = nn.Sequential(nn.Linear(query_dim, BCM_HIDDEN), nn.Linear(BCM_HIDDEN, query_dim))
            self.temporal_a = nn.Parameter(torch.tensor([float(bcm_alpha_init)]))

    def extra_repr(self) -> str:
        return f"rank={self.rank}, saim={self.has_saim}, bcm={self.has_bcm}"


# --------------------------------------------------------------------------------------------------------------
# the math


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


def _scaled(y: torch.Tensor, s: float) -> torch.Tensor:
    return y if s == 1.0 else y * s


# ---- inference fast paths (exact fusions) ---------------------------------------------------------------------
# Under torch.no_grad / inference_mode the per-branch LoRA can be merged into per-branch weights and SAIM's five
# linear maps folded into three, computed once and cached on the layer. Results equal the straightforward path
# within float rounding (tests guard 1e-5). Training (grad enabled) always takes the straightforward path.

#: merge a branch LoRA into its base weight when the LoRA would add at least this share of the base matmul's work
MERGE_MIN_COST_SHARE = 0.125


def _param_token(t: torch.Tensor) -> tuple:
    try:
        version = t._version
    except RuntimeError:  # inference tensors carry no version counter; load_weights clears the cache
        version = -1
    return (t.data_ptr(), version, t.dtype, t.device)


def _cached(layers: "DualBranchLayers", key, sources: tuple, build: Callable[[], object]):
    cache = layers.__dict__.setdefault("_fast_cache", {})
    token = tuple(_param_token(t) for t in sources)
    hit = cache.get(key)
    if hit is not None and hit[0] == token:
        return hit[1]
    value = build()
    cache[key] = (token, value)
    return value


def clear_fast_cache(module: nn.Module) -> None:
    """Drop cached merged weights (call after changing parameters in place under inference mode)."""
    for m in module.modules():
        m.__dict__.pop("_fast_cache", None)


def _mergeable(base: nn.Module, lora: "LoRALinear") -> bool:
    if type(base) is not nn.Linear or torch.is_grad_enabled():
        return False  # only plain Linears: patched/cast layers (e.g. ComfyUI's) keep the delta path
    i, o, r = base.in_features, base.out_features, lora.rank
    return r * (i + o) >= MERGE_MIN_COST_SHARE * i * o


def _merged_weight(layers, name: str, branch: int, base: nn.Linear, lora: "LoRALinear", s: float) -> torch.Tensor:
    def build():
        w = base.weight
        delta = (lora.up.weight.double() @ lora.down.weight.double()) * (lora.scale * s)
        return (w.double() + delta.to(w.device)).to(w.dtype)

    return _cached(layers, ("merged", name, branch, s), (base.weight, lora.down.weight, lora.up.weight), build)


def branch_lora(loras: nn.ModuleList, x: torch.Tensor, strength: tuple[float, float]) -> torch.Tensor | None:
    """Per-branch LoRA delta on interleaved rows: row 2p uses ``loras[0]``, row 2p+1 ``loras[1]`` (each branch's
    delta computed on its own rows only). Returns None when both strengths are 0."""
    s_g, s_a = float(strength[0]), float(strength[1])
    if s_g == 0.0 and s_a == 0.0:
        return None
    n = x.shape[0] // BRANCHES
    xv = x.view(n, BRANCHES, *x.shape[1:])
    parts = [None if s == 0.0 else _scaled(loras[i](xv[:, i]), s) for i, s in enumerate((s_g, s_a))]
    ref = parts[0] if parts[0] is not None else parts[1]
    parts = [p if p is not None else torch.zeros_like(ref) for p in parts]
    return torch.stack(parts, dim=1).flatten(0, 1)


def _project(base: nn.Module, loras: nn.ModuleList, x: torch.Tensor, mode: str, strength,
             layers: "DualBranchLayers | None" = None, name: str = "") -> torch.Tensor:
    """``base(x)`` plus the LoRA of each row's branch (record mode: the global LoRA on every row)."""
    if mode == MODE_RECORD:
        s = float(strength[0])
        if s == 0.0:
            return base(x)
        if layers is not None and _mergeable(base, loras[0]):
            return F.linear(x, _merged_weight(layers, name, 0, base, loras[0], s), base.bias)
        return base(x) + _scaled(loras[0](x), s)

    strengths = (float(strength[0]), float(strength[1]))
    if strengths == (0.0, 0.0):
        return base(x)
    n = x.shape[0] // BRANCHES
    xv = x.view(n, BRANCHES, *x.shape[1:])
    if layers is not None and _mergeable(base, loras[0]):
        ws = [base.weight if s == 0.0 else _merged_weight(layers, name, i, base, loras[i], s)
              for i, s in enumerate(strengths)]
        return torch.stack([F.linear(xv[:, i], ws[i], base.bias) for i in range(BRANCHES)], dim=1).flatten(0, 1)
    y = base(x)
    yv = y.view(n, BRANCHES, *y.shape[1:])
    for i, s in enumerate(strengths):
        if s != 0.0:
            # in place into the base output's rows of this branch (the base matmul does not need its output for
            # backward, so autograd allows it): no stacked copy of the delta
            yv[:, i] += _scaled(loras[i](xv[:, i]), s)
    return y


def saim(layers: DualBranchLayers, o: torch.Tensor) -> torch.Tensor:
    """SAIM's residual for interleaved attention outputs ``o`` ``[(b f), N, C]``.

    The reference runs a single-head attention over the two branch tokens of every pixel. A softmax over two scores
    is the sigmoid of their difference, so for token i: ``out_i = v_1 + sigmoid((q_i . (k_0 - k_1)) / sqrt(C)) *
    (v_0 - v_1)`` -- the same numbers without a generic attention call on sequences of length 2.
    """
    if not torch.is_grad_enabled():
        return _saim_fused(layers, o)
    dtype = layers.temporal_i.weight.dtype  # the new layers may be kept in fp32 under a half-precision UNet
    x = layers.temporal_i(layers.temporal_n(o.to(dtype)))
    n = x.shape[0] // BRANCHES
    c = x.shape[-1]
    q = layers.temporal_q(x).view(n, BRANCHES, *x.shape[1:])
    k = layers.temporal_k(x).view(n, BRANCHES, *x.shape[1:])
    v = layers.temporal_v(x).view(n, BRANCHES, *x.shape[1:])
    dk = (k[:, 0] - k[:, 1]).unsqueeze(1)  # [n, 1, N, C]
    w0 = torch.sigmoid((q * dk).sum(-1, keepdim=True) * (1.0 / math.sqrt(c)))  # weight of token 0, [n, 2, N, 1]
    v1 = v[:, 1:2]
    out = torch.addcmul(v1, w0, v[:, 0:1] - v1)  # v1 + w0 * (v0 - v1)
    return layers.temporal_o(out.flatten(0, 1)).to(o.dtype)


def _saim_fused_weights(layers: DualBranchLayers):
    """Fold temporal_i into q/k/v and temporal_o into v (float64, then cast):

    with z = LN(o), A = Wq Wi, B = Wk Wi, V = Wv Wi, P = Wo V:
      score_i = (z_i . u + m . d) / sqrt(C),  d = z_0 - z_1,  u = (A^T B) d,  m = B^T (Wq bi + bq)
      y_i     = P z_1 + p + sigmoid(score_i) * (P d),   p = Wo (Wv bi + bv) + bo
    """
    def build():
        f = lambda lin: (lin.weight.double(), lin.bias.double())  # noqa: E731
        wi, bi = f(layers.temporal_i)
        wq, bq = f(layers.temporal_q)
        wk, _ = f(layers.temporal_k)
        wv, bv = f(layers.temporal_v)
        wo, bo = f(layers.temporal_o)
        a_mat, b_mat = wq @ wi, wk @ wi
        dtype = layers.temporal_i.weight.dtype
        m_mat = a_mat.T @ b_mat  # u = d @ m_mat.T
        m_vec = b_mat.T @ (wq @ bi + bq)
        p_mat = wo @ (wv @ wi)
        p_vec = wo @ (wv @ bi + bv) + bo
        return tuple(t.to(dtype) for t in (m_mat, m_vec, p_mat, p_vec))

    mods = (layers.temporal_i, layers.temporal_q, layers.temporal_k, layers.temporal_v, layers.temporal_o)
    sources = tuple(t for m in mods for t in (m.weight, m.bias))
    return _cached(layers, ("saim",), sources, build)


def _saim_fused(layers: DualBranchLayers, o: torch.Tensor) -> torch.Tensor:
    # .to(o.device): the layers' parameters may live elsewhere (ComfyUI's lowvram mode casts them per call)
    m_mat, m_vec, p_mat, p_vec = (t.to(o.device) for t in _saim_fused_weights(layers))
    z = layers.temporal_n(o.to(m_mat.dtype))
    n = z.shape[0] // BRANCHES
    zv = z.view(n, BRANCHES, *z.shape[1:])
    d = zv[:, 0] - zv[:, 1]  # [n, N, C]
    u = F.linear(d, m_mat)
    md = F.linear(d, m_vec.unsqueeze(0))  # [n, N, 1]
    scores = (zv * u.unsqueeze(1)).sum(-1, keepdim=True) + md.unsqueeze(1)  # [n, 2, N, 1]
    w0 = torch.sigmoid(scores * (1.0 / math.sqrt(z.shape[-1])))
    e = F.linear(zv[:, 1], p_mat, p_vec).unsqueeze(1)  # P z_1 + p
    f = F.linear(d, p_mat).unsqueeze(1)  # P d
    return torch.addcmul(e, w0, f).flatten(0, 1).to(o.dtype)


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
    interleaved (global, anomaly) pairs; in ``record`` mode they are background rows.
    """
    control = control or DualControl()
    mode = control.mode
    if is_self_attention is None:
        is_self_attention = context is None
    attention_fn = attention_fn or sdpa_attention
    heads = attn.heads
    src = hidden if context is None else context

    if mode == MODE_OFF:
        q, k, v = attn.to_q(hidden), attn.to_k(src), attn.to_v(src)
        out = attention_fn(q, k, v, heads, mask)
        out = attn.to_out[0](out)
        return attn.to_out[1](out) if len(attn.to_out) > 1 else out

    strength = control.lora_strength
    if mode == MODE_DUAL:
        validate_pairs(hidden.shape[0], f"input of attention layer {layer_name or '?'}")
        if src.shape[0] != hidden.shape[0]:
            raise LayoutError(
                f"attention layer {layer_name}: {hidden.shape[0]} query rows but {src.shape[0]} context rows."
            )

    if mode == MODE_RECORD and is_self_attention and control.bcm_cache is not None:
        # the reference stores the attn1 input (= norm1(h_bg)) of the background pass
        control.bcm_cache[layer_name] = src
        if layer_name == control.record_stop_after and not torch.is_grad_enabled():
            # everything after the last recorded layer is discarded by the reference: skip computing it
            raise RecordComplete()

    if (
        mode == MODE_DUAL
        and is_self_attention
        and layers.has_bcm
        and control.bcm_cache is not None
        and control.bcm_strength != 0.0
    ):
        src = _bcm_mix(layers, src, control, layer_name)

    q = _project(attn.to_q, layers.to_q_lora, hidden, mode, strength, layers, "q")
    k = _project(attn.to_k, layers.to_k_lora, src, mode, strength, layers, "k")
    v = _project(attn.to_v, layers.to_v_lora, src, mode, strength, layers, "v")
    a = attention_fn(q, k, v, heads, mask)
    out = _project(attn.to_out[0], layers.to_out_lora, a, mode, strength, layers, "out")
    if len(attn.to_out) > 1:
        out = attn.to_out[1](out)

    if mode == MODE_DUAL and layers.has_saim and control.saim_strength != 0.0:
        out = out + _scaled(saim(layers, out), float(control.saim_strength))
    return out


def _bcm_mix(layers: DualBranchLayers, src: torch.Tensor, control: DualControl, layer_name: str) -> torch.Tensor:
    """Global rows' K/V input ``(1 - a) h + a MLP(h_bg)``; anomaly rows unchanged."""
    try:
        bg = control.bcm_cache[layer_name]
    except KeyError:
        raise LayoutError(
            f"BCM: no background features were recorded for layer {layer_name!r}; run the record pass first."
        ) from None
    n = src.shape[0] // BRANCHES
    if bg.shape[0] != n or bg.shape[1:] != src.shape[1:]:
        raise LayoutError(
            f"BCM: layer {layer_name!r} recorded background features of shape {tuple(bg.shape)}, but the batch "
            f"holds {n} pairs of {tuple(src.shape[1:])}; give one background row per pair."
        )
    a = layers.temporal_a.to(device=src.device, dtype=src.dtype) * float(control.bcm_strength)
    sv = src.view(n, BRANCHES, *src.shape[1:])
    g = sv[:, 0]
    mlp_dtype = layers.temporal_condition_mlp[0].weight.dtype
    mixed = (1 - a) * g + a * layers.temporal_condition_mlp(bg.to(mlp_dtype)).to(g.dtype)
    return torch.stack([mixed, sv[:, 1]], dim=1).flatten(0, 1)


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
            self, self.dual, hidden, context, control,
            layer_name=self.layer_name, is_self_attention=self.is_self_attention,
            attention_fn=attention_fn, mask=mask,
        )


def layers_for(attn: nn.Module, **kwargs) -> DualBranchLayers:
    """Build :class:`DualBranchLayers` sized for an attention module with ``to_q/to_k/to_v/to_out``."""
    return DualBranchLayers(
        query_dim=attn.to_q.in_features,
        context_dim=attn.to_k.in_features,
        inner_dim=attn.to_q.out_features,
        out_dim=attn.to_out[0].out_features,
        **kwargs,
    )


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
