"""The object-patch mechanism on a tiny in-process ComfyUI model (docs/comfyui.md, "How the pack hooks into
ComfyUI")."""

import logging

import comfy_env as ce
import pytest
import torch


def _inputs(seed=0, pairs=2, ctx_dim=64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * pairs, 4, 8, 8, generator=g)
    t = torch.full((2 * pairs,), 400.0)
    ctx = torch.randn(2 * pairs, 7, ctx_dim, generator=g)
    return x, t, ctx


def test_layer_names_come_from_the_live_model(env, tiny):
    sites = env.backend.attention_sites(tiny.model)
    # tiny UNet: 2 input + 1 middle + 4 output transformer blocks, attn1 and attn2 each
    assert len(sites) == 14
    by_ldm = {s.ldm: s for s in sites}
    s = by_ldm["middle_block.1.transformer_blocks.0.attn1"]
    assert s.diffusers == "mid_block.attentions.0.transformer_blocks.0.attn1" and s.replace_key == ("middle", 0, 0)
    s = by_ldm["output_blocks.3.1.transformer_blocks.0.attn2"]
    assert s.diffusers == "up_blocks.1.attentions.1.transformer_blocks.0.attn2" and s.replace_key == ("output", 3, 0)
    live = dict(tiny.model.model.diffusion_model.named_modules())
    for s in sites:
        assert type(live[s.ldm]).__name__ == "CrossAttention"


def test_install_and_uninstall_cleanly(env, tiny):
    m0 = tiny.model
    before = {k: v.clone() for k, v in m0.model.state_dict().items()}
    modules_before = dict(m0.model.diffusion_model.named_modules())
    w = ce.random_weights(env, m0, bcm=True)
    m = env.backend.install(m0, w)
    assert m0.object_patches == {} and env.backend.options(m0) == {}
    assert len(m.object_patches) == 14
    m.patch_model()
    try:
        live = dict(m.model.diffusion_model.named_modules())
        for s in env.backend.attention_sites(m0):
            mod = live[s.ldm]
            assert isinstance(mod, env.backend.ComfyDualAttention)
            # the original projections are the module's own children, under their own names
            assert mod.to_q is modules_before[s.ldm].to_q and mod.to_out is modules_before[s.ldm].to_out
            assert type(mod.dual.to_q_lora[0].down).__module__ == "comfy.ops"
        sd = m.model.state_dict()
        for k in before:
            assert k in sd
        assert any(k.endswith("attn1.dual.to_q_lora.1.up.weight") for k in sd)
    finally:
        m.unpatch_model()
    after = dict(m0.model.diffusion_model.named_modules())
    for s in env.backend.attention_sites(m0):
        assert after[s.ldm] is modules_before[s.ldm]
    sd = m0.model.state_dict()
    assert sd.keys() == before.keys()
    assert all(torch.equal(sd[k], before[k]) for k in before)


def test_zero_weights_give_the_plain_model_exactly(env, tiny):
    x, t, ctx = _inputs()
    plain = ce.forward(tiny.model, x, t, ctx)
    w = ce.random_weights(env, tiny.model, zero=True, bcm=True)
    m = env.backend.install(tiny.model, w)
    out = ce.forward(m, x, t, ctx)
    assert torch.equal(out, plain)


def test_branch1_lora_changes_only_odd_rows(env, tiny):
    x, t, ctx = _inputs()
    plain = ce.forward(tiny.model, x, t, ctx)
    w = ce.random_weights(env, tiny.model, branches=(1,), saim=False)
    out = ce.forward(env.backend.install(tiny.model, w), x, t, ctx)
    assert torch.equal(out[0::2], plain[0::2])
    assert (out[1::2] - plain[1::2]).abs().amax(dim=(1, 2, 3)).min() > 1e-4


def test_strengths_are_per_branch(env, tiny):
    x, t, ctx = _inputs()
    plain = ce.forward(tiny.model, x, t, ctx)
    w = ce.random_weights(env, tiny.model, saim=False)
    out = ce.forward(env.backend.install(tiny.model, w, strength_global=0.0, strength_anomaly=1.0), x, t, ctx)
    assert torch.equal(out[0::2], plain[0::2]) and not torch.allclose(out[1::2], plain[1::2])


def test_saim_couples_the_two_rows_of_a_pair_and_nothing_else(env, tiny):
    x, t, ctx = _inputs()
    w = ce.random_weights(env, tiny.model)
    m = env.backend.install(tiny.model, w)
    base = ce.forward(m, x, t, ctx)
    x2 = x.clone()
    x2[3] += torch.randn_like(x2[3])  # the anomaly row of pair 1
    out = ce.forward(m, x2, t, ctx)
    assert torch.equal(out[0:2], base[0:2])  # pair 0 untouched
    assert not torch.allclose(out[2], base[2], atol=1e-5)  # its partner sees the change through SAIM
    # without SAIM the branches are independent
    off = m.clone()
    env.backend.set_options(off, saim=0.0)
    assert torch.equal(ce.forward(off, x2, t, ctx)[2], ce.forward(off, x, t, ctx)[2])


def test_clones_stay_isolated(env, tiny):
    x, t, ctx = _inputs()
    w = ce.random_weights(env, tiny.model)
    a = env.backend.install(tiny.model, w)
    out_a = ce.forward(a, x, t, ctx)
    (b,) = env.patch.DualAttentionPatch.execute(model=a, saim_strength=0.0).result
    assert env.backend.options(a)["saim"] == 1.0 and env.backend.options(b)["saim"] == 0.0
    assert b.object_patches == a.object_patches  # the modules are shared and stateless
    out_b = ce.forward(b, x, t, ctx)
    assert not torch.allclose(out_a, out_b)
    assert torch.equal(ce.forward(a, x, t, ctx), out_a)
    # loading b, then a again, restores a's configuration; the base model still runs plain
    plain = ce.forward(tiny.model, x, t, ctx)
    assert not torch.allclose(plain, out_a)


def test_stock_lora_patch_still_applies_under_the_object_patch(env, tiny):
    import comfy.lora

    x, t, ctx = _inputs()
    site = env.backend.attention_sites(tiny.model)[0]
    key = f"diffusion_model.{site.ldm}.to_q.weight"
    w_q = tiny.model.model.state_dict()[key]
    g = torch.Generator().manual_seed(5)
    lora = {
        f"diffusion_model.{site.ldm}.to_q.lora_up.weight": torch.randn(w_q.shape[0], 2, generator=g),
        f"diffusion_model.{site.ldm}.to_q.lora_down.weight": torch.randn(2, w_q.shape[1], generator=g),
    }
    patches = comfy.lora.load_lora(lora, comfy.lora.model_lora_keys_unet(tiny.model.model, {}))
    with_lora = tiny.model.clone()
    assert with_lora.add_patches(patches, 1.0)
    reference = ce.forward(with_lora, x, t, ctx)
    assert not torch.allclose(reference, ce.forward(tiny.model, x, t, ctx))
    zero = ce.random_weights(env, tiny.model, zero=True)
    before = env.backend.install(with_lora, zero)  # LoRA first, DualAnoDiff on top
    assert torch.equal(ce.forward(before, x, t, ctx), reference)
    after = env.backend.install(tiny.model, zero).clone()  # DualAnoDiff first, LoRA on top
    assert after.add_patches(patches, 1.0)
    assert torch.equal(ce.forward(after, x, t, ctx), reference)


def test_reinstalling_replaces_instead_of_nesting(env, tiny):
    w1 = ce.random_weights(env, tiny.model, seed=1)
    w2 = ce.random_weights(env, tiny.model, seed=2)
    once = env.backend.install(tiny.model, w2)
    twice = env.backend.install(env.backend.install(tiny.model, w1), w2)
    x, t, ctx = _inputs()
    assert torch.equal(ce.forward(twice, x, t, ctx), ce.forward(once, x, t, ctx))
    assert twice.model_size() == once.model_size()


def test_odd_batch_and_wrong_weights_give_clear_errors(env, tiny):
    w = ce.random_weights(env, tiny.model)
    m = env.backend.install(tiny.model, w)
    x, t, ctx = _inputs(pairs=2)
    # the attention layers' own check (a direct forward; sampling meets the apply-model check first, see
    # test_comfy_server's bad-batch test)
    with pytest.raises(env.core_layout.LayoutError, match="even number"):
        ce.forward(m, x[:3], t[:3], ctx[:3])
    other = ce.tiny_model(0, unet_config=dict(ce.TINY_UNET, channel_mult=[1, 1]))
    with pytest.raises(env.core_weights.WeightsError, match="shape"):
        env.backend.install(other, w)
    smaller = ce.tiny_model(0, unet_config=dict(ce.TINY_UNET, transformer_depth_middle=0))
    with pytest.raises(env.core_weights.WeightsKeyError, match="base model"):
        env.backend.install(smaller, w)


def test_warns_about_attention_replace_patches_on_our_blocks(env, tiny, caplog):
    m = tiny.model.clone()
    m.set_model_attn1_replace(lambda q, k, v, extra: q, "middle", 0, 0)
    env.backend._warned.clear()
    with caplog.at_level(logging.WARNING, logger="DualAnoDiff"):
        env.backend.install(m, ce.random_weights(env, tiny.model))
    assert any("('middle', 0, 0)" in r.getMessage() and "bypasses" in r.getMessage() for r in caplog.records)


def test_attention_runs_through_comfy_optimized_attention(env, tiny, monkeypatch):
    import comfy.ldm.modules.attention as attention

    calls = []
    original = attention.optimized_attention

    def spy(q, k, v, heads, *args, **kwargs):
        calls.append(kwargs.get("transformer_options", {}).get("dualanodiff"))
        return original(q, k, v, heads, *args, **kwargs)

    monkeypatch.setattr(attention, "optimized_attention", spy)
    m = env.backend.install(tiny.model, ce.random_weights(env, tiny.model))
    x, t, ctx = _inputs()
    ce.forward(m, x, t, ctx)
    assert len(calls) == 14 and all(c is not None and c["lora"] == [1.0, 1.0] for c in calls)


def test_our_layers_take_part_in_lowvram_loading(env, tiny):
    x, t, ctx = _inputs()
    m = env.backend.install(tiny.model, ce.random_weights(env, tiny.model, bcm=True))
    full = ce.forward(m, x, t, ctx)
    to = dict(m.model_options["transformer_options"])
    m.patch_model(device_to=torch.device("cpu"), lowvram_model_memory=64 * 1024)  # most layers left to cast per call
    try:
        names = [name for _, name, _, _ in m._load_list()]  # what ModelPatcher loads, moves and casts
        assert any(n.endswith("attn1.dual.to_q_lora.0.down") for n in names)
        assert any(n.endswith("attn2.dual.temporal_q") for n in names)
        assert m.model.model_lowvram
        ours = [mod for name, mod in m.model.named_modules() if ".dual." in name and hasattr(mod, "comfy_cast_weights")]
        assert ours and sum(1 for mod in ours if hasattr(mod, "prev_comfy_cast_weights")) > len(ours) // 2
        with torch.inference_mode():
            partial = m.model.diffusion_model(x, t, context=ctx, transformer_options=to)
    finally:
        m.unpatch_model()
    assert torch.equal(partial, full)


def test_fresh_layers_are_trainable_outside_inference_mode(env, tiny):
    x, t, ctx = _inputs()
    with torch.inference_mode():  # how ComfyUI runs nodes
        with torch.inference_mode(False):
            layers = env.backend.new_layers(tiny.model, rank=4, bcm=True)
            m = env.backend.install_layers(tiny.model, layers)
            params = [p for lay in layers.values() for p in lay.parameters()]
            assert params and all(p.requires_grad and not p.is_inference() for p in params)
            m.patch_model()
            try:
                to = dict(m.model_options["transformer_options"])
                out = m.model.diffusion_model(x, t, context=ctx, transformer_options=to)
                out.square().mean().backward()
            finally:
                m.unpatch_model()
    ups = [p for lay in layers.values() for name, p in lay.named_parameters() if ".up." in name]
    assert ups and all(p.grad is not None and p.grad.abs().sum() > 0 for p in ups)
    saim_params = [p for lay in layers.values() for name, p in lay.named_parameters() if name.startswith("temporal_q")]
    assert all(p.grad is not None for p in saim_params)
