"""DualBranchAttention on a diffusers UNet: exactness against the plain UNet and the reference math."""

import pytest
import torch
from helpers import randomize_, unet_inputs, zero_lora_
from reference_impl import install_reference

from dualanodiff_core.method.attention import DualBranchAttention, DualBranchLayers, DualControl, layers_for
from dualanodiff_core.method.layout import LayoutError
from dualanodiff_core.minidefect.tiny import tiny_unet
from dualanodiff_core.sd15.pipeline import DualUNet


@pytest.fixture(scope="module")
def unet():
    return tiny_unet(seed=0)


def plain(unet, x, t, ctx):
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=ctx).sample


def test_installs_on_every_attention_layer_and_uninstalls(unet):
    x, t, ctx = unet_inputs(unet)
    before = plain(unet, x, t, ctx)
    n_attn = sum(1 for n, _ in unet.named_modules() if n.endswith(("attn1", "attn2")))
    dual = DualUNet(unet, rank=4)
    assert len(dual.processors) == n_attn == 14
    assert sum(n.endswith("attn1") for n in dual.processors) == 7
    # the reference's key layout: <layer>.processor.to_q_lora.0.down.weight
    keys = unet.state_dict().keys()
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.1.down.weight" in keys
    assert "mid_block.attentions.0.transformer_blocks.0.attn2.processor.temporal_n.weight" in keys
    dual.uninstall()
    assert not any(".processor." in k for k in unet.state_dict())
    assert torch.equal(plain(unet, x, t, ctx), before)


@pytest.mark.parametrize("saim", [True, False])
def test_zero_lora_saim_off_bcm_off_equals_plain_unet_exactly(unet, saim):
    x, t, ctx = unet_inputs(unet)
    ref = plain(unet, x, t, ctx)
    dual = DualUNet(unet, rank=4, saim=saim, bcm=True)
    try:
        randomize_(dual)  # SAIM and BCM layers random ...
        zero_lora_(dual)  # ... but every LoRA delta exactly zero
        with torch.no_grad(), dual.control.using(saim_strength=0.0):
            out = dual(x, t, ctx)
        assert torch.equal(out, ref)
        # strength 0 skips the LoRA; zero LoRA at strength 1 adds exact zeros: both are the plain UNet
        with torch.no_grad(), dual.control.using(saim_strength=0.0, lora_strength=(0.0, 0.0)):
            assert torch.equal(dual(x, t, ctx), ref)
        with torch.no_grad(), dual.control.using(mode="off"):
            randomize_(dual, seed=3)
            assert torch.equal(dual(x, t, ctx), ref)
    finally:
        dual.uninstall()


def test_anomaly_lora_changes_only_odd_rows(unet):
    x, t, ctx = unet_inputs(unet, pairs=3)
    ref = plain(unet, x, t, ctx)
    dual = DualUNet(unet, rank=4, saim=False)
    try:
        randomize_(dual, seed=1)
        with torch.no_grad():
            for p in dual.processors.values():
                for proj in (p.to_q_lora, p.to_k_lora, p.to_v_lora, p.to_out_lora):
                    proj[0].up.weight.zero_()  # global branch: no LoRA
            out = dual(x, t, ctx)
        assert torch.equal(out[0::2], ref[0::2])
        assert (out[1::2] - ref[1::2]).abs().amax(dim=(1, 2, 3)).min() > 1e-4
    finally:
        dual.uninstall()


def test_saim_couples_each_pair_and_never_crosses_pairs(unet):
    x, t, ctx = unet_inputs(unet, pairs=3)
    dual = DualUNet(unet, rank=4)
    try:
        randomize_(dual, seed=2)
        x2 = x.clone()
        x2[3] += 0.5  # perturb the anomaly row of pair 1
        with torch.no_grad():
            a, b = dual(x, t, ctx), dual(x2, t, ctx)
            changed = (a - b).abs().amax(dim=(1, 2, 3))
            assert changed[2] > 1e-4, "SAIM must carry the anomaly row into its pair's global row"
            assert changed[3] > 1e-4
            for row in (0, 1, 4, 5):
                assert changed[row] == 0, f"row {row} of another pair changed"
            with dual.control.using(saim_strength=0.0):
                a, b = dual(x, t, ctx), dual(x2, t, ctx)
            assert torch.equal(a[2], b[2]), "without SAIM the branches are independent"
    finally:
        dual.uninstall()


def test_bcm_with_alpha_zero_changes_nothing(unet):
    x, t, ctx = unet_inputs(unet, pairs=2)
    dual = DualUNet(unet, rank=4, bcm=True)
    try:
        randomize_(dual, seed=4, bcm_alpha=0.0)
        bg = torch.randn(2, 4, 8, 8)
        with torch.no_grad():
            ref = dual(x, t, ctx)
            out = dual.forward_with_background(x, t, ctx, bg, t, ctx[0::2])
            assert torch.equal(out, ref)
            for p in dual.processors.values():
                p.temporal_a.fill_(0.4)
            out = dual.forward_with_background(x, t, ctx, bg, t, ctx[0::2])
        diff = (out - ref).abs().amax(dim=(1, 2, 3))
        assert diff[0] > 1e-4 and diff[2] > 1e-4, "BCM must change the global rows"
        with torch.no_grad(), dual.control.using(saim_strength=0.0):
            ref0 = dual(x, t, ctx)
            out0 = dual.forward_with_background(x, t, ctx, bg, t, ctx[0::2])
        assert torch.equal(out0[1::2], ref0[1::2]), "without SAIM the anomaly rows must not see the background"
    finally:
        dual.uninstall()


@pytest.mark.parametrize("fused", [True, False])
def test_dual_forward_matches_reference_math(unet, fused):
    x, t, ctx = unet_inputs(unet, pairs=2)
    dual = DualUNet(unet, rank=4)
    try:
        randomize_(dual, seed=5)
        with torch.no_grad(), dual.control.using(fused=fused):
            ours = dual(x, t, ctx)
            state = {"mode": "r"}
            install_reference(unet, dual.processors, state)
            ref = unet(x, t, encoder_hidden_states=ctx).sample
        assert (ours - ref).abs().max() < 1e-4
        assert (ours - ref).abs().max() / ref.abs().max() < 1e-5
    finally:
        dual.uninstall()


@pytest.mark.parametrize("fused", [True, False])
def test_bcm_forward_matches_reference_math(unet, fused):
    """Record pass (global LoRA, no SAIM, attn1 inputs stored) then inject pass, as the reference's
    RefOnlyNoisedUNet + ReferenceOnlyAttnProc."""
    x, t, ctx = unet_inputs(unet, pairs=2)
    bg = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(9))
    dual = DualUNet(unet, rank=4, bcm=True)
    try:
        randomize_(dual, seed=6, bcm_alpha=0.35)
        with torch.no_grad():
            with dual.control.using(fused=fused):
                ours = dual.forward_with_background(x, t, ctx, bg, t, ctx[0::2])
            state = {"mode": "w", "ref": {}}
            install_reference(unet, dual.processors, state)
            unet(bg, t, encoder_hidden_states=ctx[0::2])
            assert len(state["ref"]) == 7
            state["mode"] = "r"
            ref = unet(x, t, encoder_hidden_states=ctx).sample
            assert not state["ref"], "every recorded layer must be used once"
        assert (ours - ref).abs().max() < 1e-4
    finally:
        dual.uninstall()


def test_odd_batch_is_rejected_with_a_clear_error(unet):
    x, t, ctx = unet_inputs(unet, pairs=2)
    dual = DualUNet(unet, rank=4)
    try:
        with torch.no_grad(), pytest.raises(LayoutError, match="even number"):
            dual(x[:3], t, ctx[:3])
    finally:
        dual.uninstall()


def test_generic_wrapper_keeps_base_names_and_matches_function():
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attn = Attention(query_dim=32, cross_attention_dim=16, heads=4, dim_head=8)
    layers = layers_for(attn, rank=4)
    randomize_(layers, seed=1)
    wrapped = DualBranchAttention(attn, layers, "blk.attn2", is_self_attention=False)
    keys = set(wrapped.state_dict())
    assert {"to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight", "to_out.0.bias"} <= keys
    assert "dual.to_q_lora.1.up.weight" in keys and "dual.temporal_o.bias" in keys
    h = torch.randn(4, 10, 32)
    c = torch.randn(4, 5, 16)
    from reference_impl import reference_processor

    with torch.no_grad():
        out = wrapped(h, c, DualControl())
        ref = reference_processor(attn, layers, h, c, "r")
    assert (out - ref).abs().max() < 1e-5


def test_branch_strengths_scale_the_lora_delta():
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attn = Attention(query_dim=16, heads=2, dim_head=8)
    layers = DualBranchLayers(16, 16, 16, 16, rank=2, saim=False)
    randomize_(layers, seed=3)
    w = DualBranchAttention(attn, layers, "b.attn1", True)
    h = torch.randn(2, 6, 16)
    with torch.no_grad():
        base = w(h, None, DualControl(mode="off"))
        full = w(h, None, DualControl(lora_strength=(1.0, 1.0)))
        half = w(h, None, DualControl(lora_strength=(0.5, 0.0)))
    assert torch.equal(half[1], base[1])
    assert not torch.allclose(half[0], base[0]) and not torch.allclose(half[0], full[0])


def test_sd15_layer_count_and_parameter_counts():
    """docs/method.md: 32 processors; SAIM 124,078,720 params; UNet LoRA (2 branches) 12,754,944 at rank 32."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(
            block_out_channels=(320, 640, 1280, 1280),
            cross_attention_dim=768,
            attention_head_dim=8,
            layers_per_block=2,
        )
        dual = DualUNet(unet, rank=32, bcm=False)
    assert len(dual.processors) == 32
    saim = lora = 0
    for p in dual.processors.values():
        for name, t in p.named_parameters():
            if name.startswith("temporal_"):
                saim += t.numel()
            else:
                lora += t.numel()
    assert saim == 124_078_720
    assert lora == 12_754_944


def test_inference_fast_paths_equal_the_straightforward_path(unet):
    """Under no_grad the LoRA is merged into per-branch weights, SAIM's linear maps are folded and the background
    pass stops after its last recorded layer; with grad enabled everything runs unfused. Both must agree."""
    x, t, ctx = unet_inputs(unet, pairs=2)
    bg = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    dual = DualUNet(unet, rank=32, bcm=True)
    try:
        randomize_(dual, seed=8, bcm_alpha=0.3)
        for strengths in [dict(), dict(lora_strength=(0.7, 1.3), saim_strength=0.5)]:
            with dual.control.using(**strengths):
                with torch.no_grad():
                    fast = dual(x, t, ctx)
                    fast_bcm = dual.forward_with_background(x, t, ctx, bg, t, ctx[0::2])
                    assert dual.control.record_stop_after is not None
                with torch.enable_grad():
                    slow = dual(x, t, ctx)
                    slow_bcm = dual.forward_with_background(x, t, ctx, bg, t, ctx[0::2])
            assert (fast - slow).abs().max() < 1e-5
            assert (fast_bcm - slow_bcm).abs().max() < 1e-5
        assert dual.control.record_stop_after.endswith("attn1")
    finally:
        dual.uninstall()


@pytest.mark.parametrize("grad", [False, True])
def test_plain_forms_equal_the_fused_fast_paths(unet, grad):
    """method/attention.py's plain forms (a loop over branches, LoRA as base + delta, SAIM as a 2-token softmax
    attention) and method/fused.py's fast paths give the same UNet output, with BCM and non-default strengths too."""
    x, t, ctx = unet_inputs(unet, pairs=2)
    bg = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    dual = DualUNet(unet, rank=32, bcm=True)
    try:
        randomize_(dual, seed=12, bcm_alpha=0.3)
        for strengths in [dict(), dict(lora_strength=(0.7, 0.0), saim_strength=0.5, bcm_strength=2.0)]:
            with torch.set_grad_enabled(grad), dual.control.using(**strengths):
                outs = {}
                for fused in (True, False):
                    with dual.control.using(fused=fused):
                        outs[fused] = (dual(x, t, ctx), dual.forward_with_background(x, t, ctx, bg, t, ctx[0::2]))
            for a, b in zip(outs[True], outs[False]):
                assert (a - b).abs().max() < 1e-5
            assert (outs[True][0] - outs[True][1]).abs().max() > 1e-3, "BCM must make a difference here"
    finally:
        dual.uninstall()


def test_fast_path_cache_follows_parameter_changes(unet):
    x, t, ctx = unet_inputs(unet, pairs=1)
    dual = DualUNet(unet, rank=32)
    try:
        randomize_(dual, seed=9)
        with torch.no_grad():
            a = dual(x, t, ctx)
            for p in dual.processors.values():
                p.to_q_lora[1].up.weight.mul_(2.0)
                p.temporal_o.weight.mul_(0.5)
            b = dual(x, t, ctx)
        with torch.enable_grad():
            c = dual(x, t, ctx)
        assert not torch.allclose(a, b)
        assert (b - c).abs().max() < 1e-5
    finally:
        dual.uninstall()


def test_saim_folded_forms_match_the_unfolded_one_including_gradients():
    """SAIM's five linear maps folded into two (inference cache in float64, training in fp32 with autograd through
    the products) give the unfolded numbers and the same parameter gradients."""
    from dualanodiff_core.method.attention import saim_plain
    from dualanodiff_core.method.fused import _saim_apply, _saim_fold, _saim_unfolded

    layers = DualBranchLayers(48, 48, 48, 48, rank=4)
    randomize_(layers, seed=11)
    ob = torch.randn(2, 3, 20, 48, generator=torch.Generator().manual_seed(2))
    ref = _saim_unfolded(layers, ob)
    assert (saim_plain(layers, ob) - ref).abs().max() < 1e-5
    exact = _saim_apply(layers, ob, _saim_fold(layers, ob.device, torch.float32, exact=True))
    fp32 = _saim_apply(layers, ob, _saim_fold(layers, ob.device, torch.float32, exact=False))
    assert (exact - ref).abs().max() < 1e-5 and (fp32 - ref).abs().max() < 1e-5

    params = [p for n, p in layers.named_parameters() if n.startswith("temporal_")]
    g = torch.randn_like(ref)
    grads_ref = torch.autograd.grad((_saim_unfolded(layers, ob) * g).sum(), params)
    folded = _saim_apply(layers, ob, _saim_fold(layers, ob.device, torch.float32, exact=False))
    grads = torch.autograd.grad((folded * g).sum(), params)
    for a, b in zip(grads, grads_ref):
        assert (a - b).abs().max() <= 1e-4 * (1 + b.abs().max())
