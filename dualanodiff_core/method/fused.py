"""The fast paths of :mod:`.attention`: the same numbers as its plain forms, computed with fewer, larger kernels.

* **Branch-major batching.** The two branches' projections run as one batched matmul each (``bmm`` over the branch
  axis) instead of a Python loop over branches.
* **Merged LoRA.** Under ``torch.no_grad`` a branch's LoRA is merged into its base weight when the LoRA would add at
  least :data:`MERGE_MIN_COST_SHARE` of the base matmul's work; otherwise the two branches' LoRA factors are stacked
  so that both run in one ``bmm``.
* **Folded SAIM.** A softmax over two scores is the sigmoid of their difference, and SAIM's five linear maps
  (``temporal_i``, ``_q``, ``_k``, ``_v``, ``_o``) fold into two (:func:`_saim_fold`).

Derived weights (merged / stacked LoRA, folded SAIM) are cached on the layer under ``torch.no_grad`` and rebuilt when
a parameter changes; with gradients (training) everything is computed afresh. ``tests/test_attention.py`` and
``tests/test_architecture.py`` check every path against the plain one (1e-5). Nothing here depends on
:mod:`.attention`: the layers are used through their reference attribute names only.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

#: merge a branch LoRA into its base weight when the LoRA would add at least this share of the base matmul's work
MERGE_MIN_COST_SHARE = 0.125

#: with gradients, fold SAIM's weights (a few C x C products per step) when each branch has at least this many tokens
#: per channel: the per-token work then drops from 5 C^2 to 2 C^2 multiply-adds, which outweighs the products
FOLD_MIN_TOKENS_PER_CHANNEL = 2


# ---- the cache of derived weights -------------------------------------------------------------------------------


def _param_token(t: torch.Tensor) -> tuple:
    try:
        version = t._version
    except RuntimeError:  # inference tensors carry no version counter; load_weights clears the cache
        version = -1
    return (t.data_ptr(), version, t.dtype, t.device)


def _cached(layers: nn.Module, key, sources: tuple, build: Callable[[], object]):
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


# ---- LoRA projections -------------------------------------------------------------------------------------------


def _mergeable(base: nn.Module, lora: nn.Module) -> bool:
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


def project_branches(
    base: nn.Module, loras: nn.ModuleList, xb: torch.Tensor, strengths, layers: nn.Module, name: str
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


def project_record(base: nn.Module, lora: nn.Module, x: torch.Tensor, s: float, layers: nn.Module, name: str):
    """Background rows: the global branch's LoRA on every row (merged into the base weight where it pays)."""
    if s == 0.0:
        return base(x)
    if _mergeable(base, lora):
        w = _merged_stack(layers, name + "@record", base, nn.ModuleList([lora]), (s,))[0]
        return F.linear(x, w.t(), base.bias)
    y = lora(x)
    return base(x) + (y if s == 1.0 else y * s)


def attend_branches(attn, layers, hb, sb, strengths, attention_fn, mask, finish) -> torch.Tensor:
    """Both branches' attention in one go: branch-major ``hb``/``sb`` ``[2, n, L, C]`` -> ``[2, n, L, C_out]``."""
    n = hb.shape[1]
    q = project_branches(attn.to_q, layers.to_q_lora, hb, strengths, layers, "q")
    k = project_branches(attn.to_k, layers.to_k_lora, sb, strengths, layers, "k")
    v = project_branches(attn.to_v, layers.to_v_lora, sb, strengths, layers, "v")
    a = attention_fn(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), attn.heads, mask)
    a = a.view(hb.shape[0], n, *a.shape[1:])
    return finish(project_branches(attn.to_out[0], layers.to_out_lora, a, strengths, layers, "out"))


# ---- SAIM -------------------------------------------------------------------------------------------------------


def saim(layers: nn.Module, ob: torch.Tensor) -> torch.Tensor:
    """SAIM's residual for branch-major attention outputs ``ob [2, n, N, C]``, as :func:`.attention.saim_plain`.

    For token i: ``out_i = v_1 + sigmoid((q_i . (k_0 - k_1)) / sqrt(C)) * (v_0 - v_1)`` -- the two-token softmax
    without a generic attention call on sequences of length 2. The five linear maps are folded into two
    (:func:`_saim_fold`): cached in double precision for inference, and, with gradients, recomputed each step when
    there are enough tokens to pay for the products.
    """
    if not torch.is_grad_enabled():
        return _saim_apply(layers, ob, _saim_folded_weights(layers, ob.device))
    tokens, c = ob.shape[1] * ob.shape[2], ob.shape[-1]
    if tokens >= FOLD_MIN_TOKENS_PER_CHANNEL * c:
        return _saim_apply(layers, ob, _saim_fold(layers, ob.device, layers.temporal_i.weight.dtype, exact=False))
    return _saim_unfolded(layers, ob)


def _saim_unfolded(layers: nn.Module, ob: torch.Tensor) -> torch.Tensor:
    """The sigmoid form with the five linear maps applied one after another (q, k, v in one matmul)."""
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


def _saim_fold(layers: nn.Module, device, dtype, exact: bool):
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


def _saim_folded_weights(layers: nn.Module, device):
    mods = (layers.temporal_i, layers.temporal_q, layers.temporal_k, layers.temporal_v, layers.temporal_o)
    sources = tuple(t for m in mods for t in (m.weight, m.bias))
    dtype = layers.temporal_i.weight.dtype
    return _cached(layers, ("saim", device), sources, lambda: _saim_fold(layers, device, dtype, exact=True))


def _saim_apply(layers: nn.Module, ob: torch.Tensor, folded) -> torch.Tensor:
    m_mat, m_vec, p_mat, p_vec = folded
    z = layers.temporal_n(ob.to(m_mat.dtype))  # [2, n, N, C]
    d = z[0] - z[1]
    u = F.linear(d, m_mat)
    scores = (z * u).sum(-1, keepdim=True) + F.linear(d, m_vec)  # [2, n, N, 1]
    g = torch.addcmul(z[1], torch.sigmoid(scores), d)  # z_1 + sigmoid(score_i) d
    return F.linear(g, p_mat, p_vec).to(ob.dtype)
