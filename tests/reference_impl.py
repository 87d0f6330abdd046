"""A deliberately naive, independent re-statement of the reference processor (docs/method.md: per-branch LoRA,
SAIM, BCM), used as the oracle in tests and as the "reference-style" case in bench/: a Python loop over the two
branches, multi-head SDPA, a generic 2-token SDPA for SAIM (no closed form), and the BCM mix written out as in the
reference. It reads the parameters of our ``DualBranchLayers`` by their reference names, so the same tensors drive
both implementations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _lora(layer, x, scale):
    return scale * (x @ layer.down.weight.T @ layer.up.weight.T) * (layer.alpha / layer.rank)


def _mha(q, k, v, heads):
    b, lq, inner = q.shape
    d = inner // heads
    q = q.reshape(b, lq, heads, d).permute(0, 2, 1, 3)
    k = k.reshape(b, -1, heads, d).permute(0, 2, 1, 3)
    v = v.reshape(b, -1, heads, d).permute(0, 2, 1, 3)
    return F.scaled_dot_product_attention(q, k, v).permute(0, 2, 1, 3).reshape(b, lq, inner)


def reference_processor(attn, p, hidden, context=None, mode="r", condition=None, scale=1.0):
    """``mode`` 'w': the background pass (LoRA[0], no SAIM); 'r': the dual pass; ``condition``: the recorded
    background attn1 input for BCM (attn1 only)."""
    if mode == "w":
        src = hidden if context is None else context
        q = attn.to_q(hidden) + _lora(p.to_q_lora[0], hidden, scale)
        k = attn.to_k(src) + _lora(p.to_k_lora[0], src, scale)
        v = attn.to_v(src) + _lora(p.to_v_lora[0], src, scale)
        a = _mha(q, k, v, attn.heads)
        return attn.to_out[0](a) + _lora(p.to_out_lora[0], a, scale)

    b2, n_tok, c = hidden.shape
    b = b2 // 2
    h = hidden.reshape(b, 2, n_tok, c).transpose(0, 1)  # '(b f) d c -> f b d c'
    ctx = None if context is None else context.reshape(b, 2, *context.shape[1:]).transpose(0, 1)
    outs = []
    for i in range(2):
        hi = h[i]
        si = hi if ctx is None else ctx[i]
        if condition is not None and i == 0:
            a_ = p.temporal_a
            si = (1 - a_) * si + a_ * p.temporal_condition_mlp(condition)
        q = attn.to_q(hi) + _lora(p.to_q_lora[i], hi, scale)
        k = attn.to_k(si) + _lora(p.to_k_lora[i], si, scale)
        v = attn.to_v(si) + _lora(p.to_v_lora[i], si, scale)
        a = _mha(q, k, v, attn.heads)
        outs.append(attn.to_out[0](a) + _lora(p.to_out_lora[i], a, scale))
    o = torch.stack(outs, 0).transpose(0, 1).reshape(b2, n_tok, -1)  # 'f b d c -> (b f) d c'
    if not getattr(p, "has_saim", True):
        return o
    x = p.temporal_i(p.temporal_n(o))
    cdim = x.shape[-1]
    x = x.reshape(b, 2, n_tok, cdim).permute(0, 2, 1, 3).reshape(b * n_tok, 2, cdim)  # '(b f) d c -> (b d) f c'
    q, k, v = p.temporal_q(x), p.temporal_k(x), p.temporal_v(x)
    y = p.temporal_o(F.scaled_dot_product_attention(q, k, v))
    y = y.reshape(b, n_tok, 2, cdim).permute(0, 2, 1, 3).reshape(b2, n_tok, cdim)  # '(b d) f c -> (b f) d c'
    return o + y


class ReferenceProcessor(torch.nn.Module):
    """Installs :func:`reference_processor` on a diffusers Attention, sharing the parameters of ``layers``.

    ``state`` is a dict shared by all processors: {"mode": "w"|"r", "ref": {layer: tensor}}.
    """

    def __init__(self, layers, layer_name, state):
        super().__init__()
        self.p = [layers]  # not registered: the oracle owns no parameters
        self.layer_name = layer_name
        self.state = state

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **_):
        mode = self.state.get("mode", "r")
        cond = None
        if self.layer_name.endswith("attn1") and "ref" in self.state:
            if mode == "w":
                self.state["ref"][self.layer_name] = hidden_states
            elif self.state["ref"]:
                cond = self.state["ref"].pop(self.layer_name)
        return reference_processor(attn, self.p[0], hidden_states, encoder_hidden_states, mode, cond)


def install_reference(unet, layers_by_name, state):
    procs = {f"{name}.processor": ReferenceProcessor(layers, name, state) for name, layers in layers_by_name.items()}
    unet.set_attn_processor(procs)
