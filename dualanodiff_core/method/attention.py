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
from collections.abc import Callable, Iterator

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


# ---- layout inside a layer ------------------------------------------------------------------------------------
# The UNet's rows are interleaved pairs [g0, a0, g1, a1, ...]. Inside a layer we work "branch-major": one copy to
# [2, pairs, tokens, C] makes each branch a contiguous half, so each branch's projection is one batched matmul, SAIM
# pairs are the two halves, and BCM mixes into half 0 -- a handful of kernels per layer instead of dozens (this
# matters on GPUs, where small kernels are launch-bound). One copy at the end restores the interleaved rows.


def to_branch_major(x: torch.Tensor) -> torch.Tensor:
    """``[(n f), L, C]`` -> contiguous ``[f, n, L, C]``."""
    n = x.shape[0] // BRANCHES
    return x.view(n, BRANCHES, *x.shape[1:]).transpose(0, 1).contiguous()


def from_branch_major(x: torch.Tensor) -> torch.Tensor:
    """``[f, n, L, C]`` -> contiguous ``[(n f), L, C]``."""
    return x.transpose(0, 1).reshape(-1, *x.shape[2:])


# ---- inference caches (exact fusions) ---------------------------------------------------------------------------
# Under torch.no_grad / inference_mode, weights derived from the parameters (stacked or merged branch LoRAs, SAIM's
# five linear maps folded into two) are computed once and cached on the layer. They equal the straightforward
# path within float rounding (tests guard 1e-5). With grad enabled (training) everything is computed afresh.

#: merge a branch LoRA into its base weight when the LoRA would add at least this share of the base matmul's work
MERGE_MIN_COST_SHARE = 0.125


def _param_token(t: torch.Tensor) -> tuple:
    try:
        version = t._version
    except RuntimeError:  # inference tensors carry no version counter; load_weights clears the cache
        version = -1
    return (t.data_ptr(), version, t.dtype, t.device)


def _cached(layers: DualBranchLayers, key, sources: tuple, build: Callable[[], object]):
    if torch.is_grad_enabled():
        return build()
    cache = layers.__dict__.setdefault("_fast_cache", {})
    token = tuple(_param_token(t) for t in sources)
    hit = cache.get(key)
    if hit is not None and hit[0] == token:
        return hit[1]
    value = build()
    cache[key] = (token, value)
    return value


def clear_fast_cache(module: nn.Module) -> None:
    """Drop cached derived weights (call after changing parameters in place under inference mode)."""
    for m in module.modules():
        m.__dict__.pop("_fast_cache", None)


def _mergeable(base: nn.Module, lora: LoRALinear) -> bool:
    if type(base) is not nn.Linear or torch.is_grad_enabled():
        return False  # only plain Linears: patched/cast layers (e.g. ComfyUI's) keep the LoRA path
    i, o, r = base.in_features, base.out_features, lora.rank
    return r * (i + o) >= MERGE_MIN_COST_SHARE * i * o


def _lora_stacks(layers, name: str, loras: nn.ModuleList, strengths, device, dtype):
    """``(D [f, in, r], U [f, r, out])`` with each branch's ``scale * strength`` folded into U."""

    def build():
        d = torch.stack([l.down.weight.t() for l in loras]).to(device=device, dtype=dtype)
        u = torch.stack([l.up.weight.t() * (l.scale * s) for l, s in zip(loras, strengths)])
        return d, u.to(device=device, dtype=dtype)

    srcs = tuple(t for l in loras for t in (l.down.weight, l.up.weight))
    return _cached(layers, ("stacks", name, strengths, device, dtype), srcs, build)


def _merged_stack(layers, name: str, base: nn.Linear, loras: nn.ModuleList, strengths) -> torch.Tensor:
    """``[f, in, out]``: each branch's base weight with its LoRA merged in, transposed for ``bmm``."""

    def build():
        w = base.weight.double()
        out = []
        for l, s in zip(loras, strengths):
            if s == 0.0:
                out.append(w.t())
            else:
                delta = (l.up.weight.double() @ l.down.weight.double()).to(w.device) * (l.scale * s)
                out.append((w + delta).t())
        return torch.stack(out).to(base.weight.dtype).contiguous()

    srcs = (base.weight,) + tuple(t for l in loras for t in (l.down.weight, l.up.weight))
    return _cached(layers, ("merged", name, strengths), srcs, build)


def _project_branches(
    base: nn.Module, loras: nn.ModuleList, xb: torch.Tensor, strengths, layers: DualBranchLayers, name: str
) -> torch.Tensor:
    """Branch-major ``xb [f, n, L, in]`` -> ``[f, n, L, out]``: ``base(x) + strength_i * lora_i(x)`` for branch i."""
    f, n, length, c_in = xb.shape
    if strengths == (0.0, 0.0):
        return base(xb)
    if _mergeable(base, loras[0]):
        w = _merged_stack(layers, name, base, loras, strengths)
        x2 = xb.reshape(f, n * length, c_in)
        y = torch.bmm(x2, w) if base.bias is None else torch.baddbmm(base.bias, x2, w)
        return y.view(f, n, length, -1)
    y = base(xb)
    dt = loras[0].down.weight.dtype
    d, u = _lora_stacks(layers, name, loras, strengths, xb.device, dt)
    delta = torch.bmm(torch.bmm(xb.reshape(f, n * length, c_in).to(dt), d), u)
    return y + delta.view(f, n, length, -1).to(y.dtype)


def _project_record(
    base: nn.Module, lora: LoRALinear, x: torch.Tensor, s: float, layers: DualBranchLayers, name: str
) -> torch.Tensor:
    """Background rows: the global branch's LoRA on every row."""
    if s == 0.0:
        return base(x)
    if _mergeable(base, lora):
        w = _merged_stack(layers, name + "@record", base, nn.ModuleList([lora]), (s,))[0]
        return F.linear(x, w.t(), base.bias)
    return base(x) + _scaled(lora(x), s)


# ---- SAIM -------------------------------------------------------------------------------------------------------


#: with gradients, fold SAIM's weights (a few C x C products per step) when each branch has at least this many tokens
#: per channel: the per-token work then drops from 5 C^2 to 2 C^2 multiply-adds, which outweighs the products
FOLD_MIN_TOKENS_PER_CHANNEL = 2


def saim(layers: DualBranchLayers, ob: torch.Tensor) -> torch.Tensor:
    """SAIM's residual for branch-major attention outputs ``ob [2, n, N, C]``.

    The reference runs a single-head attention over the two branch tokens of every pixel. A softmax over two scores
    is the sigmoid of their difference, so for token i: ``out_i = v_1 + sigmoid((q_i . (k_0 - k_1)) / sqrt(C)) *
    (v_0 - v_1)`` -- the same numbers without a generic attention call on sequences of length 2. The five linear
    maps can further be folded into two (:func:`_saim_fold`): cached in double precision for inference, and, with
    gradients, recomputed each step when there are enough tokens to pay for the products.
    """
    if not torch.is_grad_enabled():
        return _saim_apply(layers, ob, _saim_folded_weights(layers, ob.device))
    tokens, c = ob.shape[1] * ob.shape[2], ob.shape[-1]
    if tokens >= FOLD_MIN_TOKENS_PER_CHANNEL * c:
        return _saim_apply(layers, ob, _saim_fold(layers, ob.device, layers.temporal_i.weight.dtype, exact=False))
    return _saim_unfolded(layers, ob)


def _saim_unfolded(layers: DualBranchLayers, ob: torch.Tensor) -> torch.Tensor:
    dtype = layers.temporal_i.weight.dtype  # the new layers may be kept in fp32 under a half-precision UNet
    x = layers.temporal_i(layers.temporal_n(ob.to(dtype)))
    if type(layers.temporal_q) is nn.Linear:
        # q, k, v in one matmul (same numbers; one larger GEMM forward and backward instead of three)
        w = torch.cat([layers.temporal_q.weight, layers.temporal_k.weight, layers.temporal_v.weight])
        b = torch.cat([layers.temporal_q.bias, layers.temporal_k.bias, layers.temporal_v.bias])
        q, k, v = F.linear(x, w, b).chunk(3, dim=-1)
    else:  # cast/patched layers (ComfyUI) go through their own forward
        q, k, v = layers.temporal_q(x), layers.temporal_k(x), layers.temporal_v(x)
    dk = k[0] - k[1]  # [n, N, C]; broadcast over both query tokens
    w0 = torch.sigmoid((q * dk).sum(-1, keepdim=True) * (1.0 / math.sqrt(x.shape[-1])))  # weight of token 0
    out = torch.addcmul(v[1], w0, v[0] - v[1])  # v1 + w0 * (v0 - v1), [2, n, N, C]
    return layers.temporal_o(out).to(ob.dtype)


def _saim_fold(layers: DualBranchLayers, device, dtype, exact: bool):
    """Fold temporal_i into q/k/v and temporal_o into v. With z = LN(o), d = z_0 - z_1, A = Wq Wi, B = Wk Wi,
    V = Wv Wi, P = Wo V:

      score_i / sqrt(C) = z_i . u + m . d,   u = (A^T B / sqrt(C)) d,   m = B^T (Wq bi + bq) / sqrt(C)
      y_i = P (z_1 + sigmoid(score_i) d) + p,   p = Wo (Wv bi + bv) + bo

    ``exact``: compute in float64 (inference cache); otherwise in the parameters' dtype, differentiably.
    """
    work = torch.float64 if exact else dtype

    def wb(lin):
        return lin.weight.to(device=device, dtype=work), lin.bias.to(device=device, dtype=work)

    wi, bi = wb(layers.temporal_i)
    wq, bq = wb(layers.temporal_q)
    wk, bk = wb(layers.temporal_k)
    wv, bv = wb(layers.temporal_v)
    wo, bo = wb(layers.temporal_o)
    inv = 1.0 / math.sqrt(wi.shape[0])
    a_mat, b_mat = wq @ wi, wk @ wi
    m_mat = (a_mat.T @ b_mat) * inv
    m_vec = (b_mat.T @ (wq @ bi + bq)) * inv
    if not exact:
        # the key bias cancels in k_0 - k_1, so its true gradient is zero; keep it in the graph so that it gets a
        # zero gradient (and weight decay) as in the unfolded reference, instead of none at all
        m_vec = m_vec + 0.0 * bk.sum()
    p_mat = wo @ (wv @ wi)
    p_vec = wo @ (wv @ bi + bv) + bo
    return tuple(t.to(dtype) for t in (m_mat, m_vec.unsqueeze(0), p_mat, p_vec))


def _saim_folded_weights(layers: DualBranchLayers, device):
    mods = (layers.temporal_i, layers.temporal_q, layers.temporal_k, layers.temporal_v, layers.temporal_o)
    sources = tuple(t for m in mods for t in (m.weight, m.bias))
    dtype = layers.temporal_i.weight.dtype
    return _cached(layers, ("saim", device), sources, lambda: _saim_fold(layers, device, dtype, exact=True))


def _saim_apply(layers: DualBranchLayers, ob: torch.Tensor, folded) -> torch.Tensor:
    m_mat, m_vec, p_mat, p_vec = folded
    z = layers.temporal_n(ob.to(m_mat.dtype))  # [2, n, N, C]
    d = z[0] - z[1]
    u = F.linear(d, m_mat)
    scores = (z * u).sum(-1, keepdim=True) + F.linear(d, m_vec)  # [2, n, N, 1]
    g = torch.addcmul(z[1], torch.sigmoid(scores), d)  # z_1 + sigmoid(score_i) d
    return F.linear(g, p_mat, p_vec).to(ob.dtype)


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
    interleaved (global, anomaly) pairs; in ``record`` mode they are background rows.
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
        q = _project_record(attn.to_q, layers.to_q_lora[0], hidden, s, layers, "q")
        k = _project_record(attn.to_k, layers.to_k_lora[0], src, s, layers, "k")
        v = _project_record(attn.to_v, layers.to_v_lora[0], src, s, layers, "v")
        a = attention_fn(q, k, v, heads, mask)
        return finish(_project_record(attn.to_out[0], layers.to_out_lora[0], a, s, layers, "out"))

    # ---- dual mode: interleaved pairs
    rows = hidden.shape[0]
    n = validate_pairs(rows, f"input of attention layer {layer_name or '?'}")
    if src.shape[0] != rows:
        raise LayoutError(f"attention layer {layer_name}: {rows} query rows but {src.shape[0]} context rows.")
    strengths = (float(control.lora_strength[0]), float(control.lora_strength[1]))
    hb = to_branch_major(hidden)
    sb = hb if context is None else to_branch_major(context)
    if is_self_attention and layers.has_bcm and control.bcm_cache is not None and control.bcm_strength != 0.0:
        sb = _bcm_mix(layers, sb, control, layer_name)
    if mask is not None and mask.shape[0] == rows:
        mask = to_branch_major(mask).flatten(0, 1)

    q = _project_branches(attn.to_q, layers.to_q_lora, hb, strengths, layers, "q")
    k = _project_branches(attn.to_k, layers.to_k_lora, sb, strengths, layers, "k")
    v = _project_branches(attn.to_v, layers.to_v_lora, sb, strengths, layers, "v")
    a = attention_fn(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), heads, mask)
    ob = finish(
        _project_branches(
            attn.to_out[0], layers.to_out_lora, a.view(BRANCHES, n, *a.shape[1:]), strengths, layers, "out"
        )
    )
    if layers.has_saim and control.saim_strength != 0.0:
        y = saim(layers, ob)
        s = float(control.saim_strength)
        ob = ob + y if s == 1.0 else torch.add(ob, y, alpha=s)
    return from_branch_major(ob)


def _bcm_mix(layers: DualBranchLayers, sb: torch.Tensor, control: DualControl, layer_name: str) -> torch.Tensor:
    """Branch-major K/V input: the global half becomes ``(1 - a) h + a MLP(h_bg)``; the anomaly half is unchanged."""
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
