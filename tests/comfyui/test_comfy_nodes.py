"""The nodes, called the way ComfyUI calls them, on tiny in-process models."""

import asyncio
import logging

import comfy_env as ce
import pytest
import torch


@pytest.fixture()
def weights_dir(env, tmp_path):
    folder = tmp_path / "dualanodiff"
    folder.mkdir()
    env.loaders.register_model_folder()
    env.folder_paths.add_model_folder_path("dualanodiff", str(folder))
    yield folder
    paths = env.folder_paths.folder_names_and_paths["dualanodiff"][0]
    if str(folder) in paths:
        paths.remove(str(folder))


def _run(node, **kwargs):
    with torch.inference_mode():
        return node.execute(**kwargs).result


def _loaded(env, tiny, weights_dir, weights, name="w.safetensors", **strengths):
    weights.save(weights_dir / name)
    s = dict(strength_global=1.0, strength_anomaly=1.0, strength_text=1.0)
    s.update(strengths)
    return _run(env.loaders.DualLoRALoader, model=tiny.model, clip=tiny.clip, weights=name, **s)


def _prompts(tiny):
    return ce.encode(tiny.clip, "a vfx with sks"), ce.encode(tiny.clip, "sks"), ce.encode(tiny.clip, "")


def _dual_sample(env, model, pos_g, pos_a, neg, pairs=2, seed=3, latent=None, steps=3, cfg=2.5):
    kwargs = dict(
        model=model,
        positive_global=pos_g,
        positive_anomaly=pos_a,
        negative=neg,
        pairs=pairs,
        width=32,
        height=32,
        seed=seed,
        steps=steps,
        cfg=cfg,
        sampler_name="euler",
        scheduler="normal",
        denoise=1.0,
    )
    if latent is not None:
        kwargs["latent"] = latent
    return _run(env.sampler.DualSampler, **kwargs)


def test_extension_registers_every_node_with_help(env):
    nodes = asyncio.run(env.extension.DualAnoDiffExtension().get_node_list())
    ids = [n.GET_SCHEMA().node_id for n in nodes]
    assert ids == [
        "DualAnoDiffLoRALoader",
        "DualAnoDiffAttentionPatch",
        "DualAnoDiffBackgroundCompensate",
        "DualAnoDiffSampler",
        "DualAnoDiffPairConditioning",
        "DualAnoDiffSplitLatentPairs",
        "DualAnoDiffSplitImagePairs",
        "DualAnoDiffMaskFromAnomalyBranch",
        "DualAnoDiffSaveDataset",
        "DualAnoDiffTrainer",
    ]
    for node in nodes:
        schema = node.GET_SCHEMA()
        assert schema.category.startswith("DualAnoDiff/") and len(schema.description) > 40, schema.node_id
        for i in schema.inputs:
            assert i.tooltip, f"{schema.node_id}.{i.id} has no tooltip"
        for o in schema.outputs:
            assert o.tooltip, f"{schema.node_id} output {o.display_name} has no tooltip"
        info = node.INPUT_TYPES()  # the /object_info path
        assert "required" in info


def test_loader_reads_our_format_and_the_reference_format(env, tiny, weights_dir):
    w = ce.random_weights(env, tiny.model, clip=tiny.clip, seed=4)
    model, clip, pg, pa = _loaded(env, tiny, weights_dir, w)
    assert (pg, pa) == ("a vfx with sks", "sks")
    torch.save(w.to_reference(), weights_dir / "pytorch_lora_weights.bin")
    model_ref, clip_ref, pg_ref, _ = _run(
        env.loaders.DualLoRALoader,
        model=tiny.model,
        clip=tiny.clip,
        weights="pytorch_lora_weights.bin",
        strength_global=1.0,
        strength_anomaly=1.0,
        strength_text=1.0,
    )
    assert pg_ref == "a vfx with sks"
    g = torch.Generator().manual_seed(0)
    x, t, ctx = torch.randn(4, 4, 8, 8, generator=g), torch.full((4,), 300.0), torch.randn(4, 7, 64, generator=g)
    assert torch.equal(ce.forward(model, x, t, ctx), ce.forward(model_ref, x, t, ctx))
    # the text LoRA patches the CLIP through ComfyUI's own weight patches
    assert len(clip.patcher.patches) == 8 and clip.patcher.patches.keys() == clip_ref.patcher.patches.keys()
    plain = ce.encode(tiny.clip, "sks")[0][0]
    assert not torch.allclose(ce.encode(clip, "sks")[0][0], plain)
    _, clip0, _, _ = _loaded(env, tiny, weights_dir, w, strength_text=0.0)
    assert clip0 is tiny.clip


def test_loader_errors_name_the_file_and_the_fix(env, tiny, weights_dir):
    from safetensors.torch import save_file

    save_file(
        {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(4, 2)},
        str(weights_dir / "plain_lora.safetensors"),
    )
    with pytest.raises(ValueError, match="LoraLoader"):
        _run(
            env.loaders.DualLoRALoader,
            model=tiny.model,
            clip=tiny.clip,
            weights="plain_lora.safetensors",
            strength_global=1.0,
            strength_anomaly=1.0,
            strength_text=1.0,
        )
    with pytest.raises(FileNotFoundError, match="models/dualanodiff"):
        _run(
            env.loaders.DualLoRALoader,
            model=tiny.model,
            clip=tiny.clip,
            weights="missing.safetensors",
            strength_global=1.0,
            strength_anomaly=1.0,
            strength_text=1.0,
        )
    names = env.loaders.weight_files()
    assert "plain_lora.safetensors" in names


def test_stock_ksampler_path_matches_the_dual_sampler(env, tiny, weights_dir):
    model, clip, _, _ = _loaded(env, tiny, weights_dir, ce.random_weights(env, tiny.model, seed=5))
    (patched,) = _run(env.patch.DualAttentionPatch, model=model, saim_strength=0.7)
    pos_g, pos_a, neg = ce.encode(clip, "a vfx with sks"), ce.encode(clip, "sks"), ce.encode(clip, "")
    g_dual, a_dual = _dual_sample(env, patched, pos_g, pos_a, neg, pairs=2, seed=11)
    (paired,) = _run(env.sampler.PairConditioning, global_prompt=pos_g, anomaly_prompt=pos_a)
    (empty,) = env.nodes.EmptyLatentImage().generate(32, 32, batch_size=4)
    out = ce.sample(env, patched, paired, neg, empty, seed=11)
    g_stock, a_stock = _run(env.sampler.SplitLatentPairs, latent=out)
    assert g_dual["samples"].shape == (2, 4, 4, 4)
    assert torch.equal(g_dual["samples"], g_stock["samples"]) and torch.equal(a_dual["samples"], a_stock["samples"])
    # and the branches really differ from each other
    assert not torch.allclose(g_dual["samples"], a_dual["samples"])


def test_sampler_reports_progress_like_ksampler(env, tiny, weights_dir):
    import comfy.utils

    model, clip, _, _ = _loaded(env, tiny, weights_dir, ce.random_weights(env, tiny.model))
    seen = []
    old = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: seen.append((value, total)))
    try:
        _dual_sample(env, model, *_prompts(tiny), steps=4)
    finally:
        comfy.utils.set_progress_bar_global_hook(old)
    assert seen[-1] == (4, 4) and len(seen) == 4


def test_sampler_and_stock_path_reject_bad_batches_clearly(env, tiny, weights_dir):
    model, clip, _, _ = _loaded(env, tiny, weights_dir, ce.random_weights(env, tiny.model))
    pos_g, pos_a, neg = _prompts(tiny)
    (paired,) = _run(env.sampler.PairConditioning, global_prompt=pos_g, anomaly_prompt=pos_a)
    with pytest.raises(ValueError, match="batch of 2 prompts"):
        _dual_sample(env, model, paired, pos_a, neg)
    (odd,) = env.nodes.EmptyLatentImage().generate(32, 32, batch_size=3)
    with pytest.raises(ValueError, match="DualAnoDiff Sampler"):
        ce.sample(env, model, paired, neg, odd)
    with pytest.raises(ValueError, match="no DualAnoDiff layers"):
        _dual_sample(env, tiny.model, pos_g, pos_a, neg)
    with pytest.raises(ValueError, match="even"):
        _run(env.sampler.SplitLatentPairs, latent=odd)


def test_stock_sampler_with_an_unpaired_positive_warns(env, tiny, weights_dir, caplog):
    model, _, _, _ = _loaded(env, tiny, weights_dir, ce.random_weights(env, tiny.model))
    pos_g, pos_a, neg = _prompts(tiny)
    (latent,) = env.nodes.EmptyLatentImage().generate(32, 32, batch_size=2)
    env.backend._told.clear()
    with caplog.at_level(logging.WARNING, logger="DualAnoDiff"):
        (paired,) = _run(env.sampler.PairConditioning, global_prompt=pos_g, anomaly_prompt=pos_a)
        ce.sample(env, model, paired, neg, latent, steps=1)
        assert not any("same prompt" in r.getMessage() for r in caplog.records)
        ce.sample(env, model, pos_g, neg, latent, steps=1)
    assert any("same prompt" in r.getMessage() and "Pair Conditioning" in r.getMessage() for r in caplog.records)


def test_sampler_latent_input_sets_pairs_and_size(env, tiny, weights_dir):
    model, _, _, _ = _loaded(env, tiny, weights_dir, ce.random_weights(env, tiny.model))
    latent = {"samples": torch.zeros(3, 4, 8, 4), "noise_mask": torch.ones(1, 8, 4)}
    g, a = _dual_sample(env, model, *_prompts(tiny), latent=latent)
    assert g["samples"].shape == (3, 4, 8, 4) and a["samples"].shape == (3, 4, 8, 4)
    assert "noise_mask" in g and "noise_mask" not in a


def test_background_compensation(env, tiny, weights_dir):
    w = ce.random_weights(env, tiny.model, bcm=True, seed=7)
    model, clip, _, _ = _loaded(env, tiny, weights_dir, w)
    (model,) = _run(env.patch.DualAttentionPatch, model=model, saim_strength=0.0)  # branches independent
    prompts = _prompts(tiny)
    base_g, base_a = _dual_sample(env, model, *prompts)
    gen = torch.Generator().manual_seed(1)
    bg1 = torch.rand(1, 32, 32, 3, generator=gen)
    bg2 = torch.rand(1, 32, 32, 3, generator=gen)

    def bcm(image, strength=1.0, **kw):
        (m,) = _run(
            env.background.BackgroundCompensate,
            model=model,
            vae=tiny.vae,
            background=image,
            strength=strength,
            seed=0,
            **kw,
        )
        return _dual_sample(env, m, *prompts)

    off_g, off_a = bcm(bg1, strength=0.0)
    assert torch.equal(off_g["samples"], base_g["samples"]) and torch.equal(off_a["samples"], base_a["samples"])
    g1, a1 = bcm(bg1)
    g2, a2 = bcm(bg2)
    # the background reaches the global rows only (SAIM is off, so the anomaly rows cannot see it)
    assert not torch.allclose(g1["samples"], base_g["samples"]) and not torch.allclose(g1["samples"], g2["samples"])
    assert torch.equal(a1["samples"], base_a["samples"]) and torch.equal(a2["samples"], base_a["samples"])
    # reproducible
    assert torch.equal(bcm(bg1)[0]["samples"], g1["samples"])
    # a blacked-out object region changes the background
    mask = torch.zeros(1, 32, 32)
    mask[:, 8:24, 8:24] = 1.0
    gm, _ = bcm(bg1, object_mask=mask)
    assert not torch.allclose(gm["samples"], g1["samples"])
    # Load Image's all-zero 64x64 mask (no alpha) means "no mask"
    g0, _ = bcm(bg1, object_mask=torch.zeros(1, 64, 64))
    assert torch.equal(g0["samples"], g1["samples"])


def test_background_errors(env, tiny, weights_dir):
    prompts = _prompts(tiny)
    plain_model, _, _, _ = _loaded(env, tiny, weights_dir, ce.random_weights(env, tiny.model), name="nobcm.safetensors")
    with pytest.raises(ValueError, match="without background compensation"):
        _run(
            env.background.BackgroundCompensate,
            model=plain_model,
            vae=tiny.vae,
            background=torch.rand(1, 32, 32, 3),
            strength=1.0,
            seed=0,
        )
    model, _, _, _ = _loaded(env, tiny, weights_dir, ce.random_weights(env, tiny.model, bcm=True))
    (m,) = _run(
        env.background.BackgroundCompensate,
        model=model,
        vae=tiny.vae,
        background=torch.rand(1, 64, 64, 3),
        strength=1.0,
        seed=0,
    )
    with pytest.raises(ValueError, match="64x64 pixels but the images being generated are 32x32"):
        _dual_sample(env, m, *prompts)
    (m3,) = _run(
        env.background.BackgroundCompensate,
        model=model,
        vae=tiny.vae,
        background=torch.rand(3, 32, 32, 3),
        strength=1.0,
        seed=0,
    )
    with pytest.raises(ValueError, match="3 background images but the batch holds 2 pairs"):
        _dual_sample(env, m3, *prompts, pairs=2)
    with pytest.raises(ValueError, match="same size"):
        _run(
            env.background.BackgroundCompensate,
            model=model,
            vae=tiny.vae,
            background=torch.rand(1, 32, 32, 3),
            strength=1.0,
            seed=0,
            object_mask=torch.ones(1, 16, 16),
        )


def test_attention_patch_needs_a_dual_model_and_warns_without_saim(env, tiny, weights_dir, caplog):
    with pytest.raises(ValueError, match="DualAnoDiff LoRA Loader"):
        _run(env.patch.DualAttentionPatch, model=tiny.model, saim_strength=1.0)
    model, _, _, _ = _loaded(env, tiny, weights_dir, ce.random_weights(env, tiny.model, saim=False))
    with caplog.at_level(logging.WARNING, logger="DualAnoDiff"):
        _run(env.patch.DualAttentionPatch, model=model, saim_strength=1.0)
    assert any("without SAIM" in r.getMessage() for r in caplog.records)


def test_loader_gives_the_command_line_messages_for_bad_strengths_and_files(env, tiny, weights_dir):
    w = ce.random_weights(env, tiny.model, clip=tiny.clip, seed=4)
    errors = __import__(f"{ce.PACK}.dualanodiff_core.errors", fromlist=["DualAnoDiffError"])
    with pytest.raises(errors.DualAnoDiffError, match="strength_anomaly=nan: give a finite number"):
        _loaded(env, tiny, weights_dir, w, strength_anomaly=float("nan"))
    (weights_dir / "junk.bin").write_bytes(bytes(range(256)) * 16)
    with pytest.raises(errors.DualAnoDiffError, match="junk.bin: not a PyTorch weights file"):
        _run(
            env.loaders.DualLoRALoader,
            model=tiny.model,
            clip=tiny.clip,
            weights="junk.bin",
            strength_global=1.0,
            strength_anomaly=1.0,
            strength_text=1.0,
        )
