"""Sampling with the diffusers backbone: CFG layout, BCM passes, determinism, loading from folders."""

import pytest
import torch
from helpers import randomize_

from dualanodiff_core.method.weights import DualAnoDiffWeights
from dualanodiff_core.minidefect.tiny import save_tiny_model, tiny_components, tiny_text_encoder, tiny_tokenizer
from dualanodiff_core.sd15.loading import ModelLoadError
from dualanodiff_core.sd15.pipeline import DualAnoDiffPipeline, TextEncoderLoRA, encode_prompts


@pytest.fixture()
def pipe():
    c = tiny_components(seed=0)
    p = DualAnoDiffPipeline(c["unet"], c["vae"], c["text_encoder"], c["tokenizer"], c["scheduler_config"], rank=4)
    randomize_(p.dual, seed=1)
    randomize_(p.text_lora, seed=2)
    return p


class Spy:
    """Records the UNet calls (sample, timestep, context) made during sampling."""

    def __init__(self, unet):
        self.calls = []
        self.handle = unet.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        ctx = kwargs.get("encoder_hidden_states")
        self.calls.append((args[0].clone(), args[1], ctx.clone()))


@pytest.mark.parametrize("sampler", ["pndm", "ddim", "dpmpp"])
def test_cfg_sampling_returns_two_images_per_pair(pipe, sampler):
    spy = Spy(pipe.unet)
    res = pipe.generate(3, steps=3, cfg=2.5, seed=0, height=16, width=16, sampler=sampler)
    spy.handle.remove()
    for img in (res.global_images, res.anomaly_images):
        assert img.shape == (3, 3, 16, 16)
        assert torch.isfinite(img).all() and img.min() >= 0 and img.max() <= 1
    assert res.global_latents.shape == res.anomaly_latents.shape == (3, 4, 8, 8)
    g, a = pipe.to_pil() if hasattr(pipe, "to_pil") else res.to_pil()
    assert len(g) == len(a) == 3 and g[0].size == (16, 16)
    # CFG batch [(uncond_g, uncond_a) x N, (cond_g, cond_a) x N]
    sample, t, ctx = spy.calls[0]
    assert sample.shape[0] == ctx.shape[0] == 12
    with torch.no_grad():
        neg, cg, ca = encode_prompts(pipe.tokenizer, pipe.text_encoder, ["", "a vfx with sks", "sks"])
    assert all(torch.equal(ctx[i], neg) for i in range(6))
    assert all(torch.equal(ctx[6 + 2 * i], cg) and torch.equal(ctx[7 + 2 * i], ca) for i in range(3))
    assert torch.equal(sample[:6], sample[6:]), "both CFG halves denoise the same latents"


def test_sampling_is_deterministic_per_seed(pipe):
    a = pipe.generate(1, steps=2, seed=7, height=16, width=16)
    b = pipe.generate(1, steps=2, seed=7, height=16, width=16)
    c = pipe.generate(1, steps=2, seed=8, height=16, width=16)
    assert torch.equal(a.global_images, b.global_images) and torch.equal(a.anomaly_images, b.anomaly_images)
    assert not torch.equal(a.global_images, c.global_images)


def test_branches_start_from_independent_noise(pipe):
    spy = Spy(pipe.unet)
    pipe.generate(2, steps=1, seed=3, height=16, width=16, cfg=1.0)
    spy.handle.remove()
    sample, _, ctx = spy.calls[0]
    assert sample.shape[0] == 4, "no CFG: just the interleaved pairs"
    assert not torch.equal(sample[0], sample[1])


def test_bcm_sampling_runs_a_record_pass_per_step(tmp_path):
    c = tiny_components(seed=0)
    pipe = DualAnoDiffPipeline(
        c["unet"], c["vae"], c["text_encoder"], c["tokenizer"], c["scheduler_config"], rank=4, bcm=True
    )
    randomize_(pipe.dual, seed=4, bcm_alpha=0.3)
    bg = torch.rand(1, 3, 16, 16) * 2 - 1
    zeros = torch.zeros(4, 4, 8, 8)
    spy = Spy(pipe.unet)
    res = pipe.generate(2, steps=2, cfg=2.0, seed=0, height=16, width=16, background=bg, bcm_noise=zeros)
    spy.handle.remove()
    from dualanodiff_core.sd15.pipeline import make_scheduler

    sched = make_scheduler("pndm", pipe.scheduler_config)
    sched.set_timesteps(2)
    assert len(spy.calls) == 2 * len(sched.timesteps), "each UNet call: one record pass + one main pass"
    assert [c[0].shape[0] for c in spy.calls] == [4, 8] * len(sched.timesteps)
    rec_sample, rec_t, rec_ctx = spy.calls[0]
    main_sample, _, main_ctx = spy.calls[1]
    assert rec_sample.shape[0] == 4 and main_sample.shape[0] == 8
    assert torch.equal(rec_ctx, main_ctx[0::2]), "record pass uses the global prompt of every pair (uncond, cond)"
    # with zero noise the noised background is sqrt(alpha_bar_t) * latent: gray rows (uncond) then background rows
    from diffusers import DDPMScheduler

    ab = DDPMScheduler.from_config(pipe.scheduler_config).alphas_cumprod[int(rec_t)]
    gen = torch.Generator().manual_seed(0)
    torch.randn((4, 4, 8, 8), generator=gen)  # the initial latents are drawn first from the same generator
    with torch.no_grad():
        bg_lat = pipe.vae.encode(bg).latent_dist.sample(gen)
        gray_lat = pipe.vae.encode(torch.zeros_like(bg)).latent_dist.sample(gen)
    expect = torch.cat([gray_lat, gray_lat, bg_lat, bg_lat]) * ab.sqrt()
    assert torch.allclose(rec_sample, expect, atol=1e-6), "background latent is the unscaled VAE sample"
    assert res.global_images.shape == (2, 3, 16, 16)

    # background noise from a seeded generator is reproducible; different noise gives different images
    r1 = pipe.generate(
        1, steps=2, seed=0, height=16, width=16, background=bg, bcm_noise=torch.Generator().manual_seed(1)
    )
    r2 = pipe.generate(
        1, steps=2, seed=0, height=16, width=16, background=bg, bcm_noise=torch.Generator().manual_seed(1)
    )
    r3 = pipe.generate(
        1, steps=2, seed=0, height=16, width=16, background=bg, bcm_noise=torch.Generator().manual_seed(2)
    )
    assert torch.equal(r1.global_images, r2.global_images)
    assert not torch.equal(r1.global_images, r3.global_images)


def test_background_without_bcm_weights_is_refused(pipe):
    with pytest.raises(ValueError, match="no BCM layers"):
        pipe.generate(1, steps=1, height=16, width=16, background=torch.zeros(1, 3, 16, 16))


def test_bad_sizes_and_counts_are_refused(pipe):
    with pytest.raises(ValueError, match="multiples of 2"):
        pipe.generate(1, steps=1, height=15, width=16)
    with pytest.raises(ValueError, match="n_pairs"):
        pipe.generate(0, steps=1, height=16, width=16)
    with pytest.raises(ValueError, match="unknown sampler"):
        pipe.generate(1, steps=1, height=16, width=16, sampler="euler_magic")


def test_text_encoder_lora_zero_is_identity_and_strength_scales():
    te = tiny_text_encoder()
    tok = tiny_tokenizer()
    with torch.no_grad():
        base = encode_prompts(tok, te, ["a vfx with sks"])
        lora = TextEncoderLoRA(te, rank=4)
        assert torch.equal(encode_prompts(tok, te, ["a vfx with sks"]), base)
        randomize_(lora, seed=3)
        changed = encode_prompts(tok, te, ["a vfx with sks"])
        lora.strength = 0.0
        assert torch.equal(encode_prompts(tok, te, ["a vfx with sks"]), base)
        lora.uninstall()
        assert torch.equal(encode_prompts(tok, te, ["a vfx with sks"]), base)
    assert not torch.allclose(changed, base)
    assert len(lora.names) == 2 and lora.names[0] == "text_model.encoder.layers.0.self_attn"


def test_from_pretrained_folder_with_weights_file(tmp_path, pipe):
    model = save_tiny_model(tmp_path / "model", seed=0)
    wfile = pipe.to_weights({"base_model": "tiny"}).save(tmp_path / "w.safetensors")
    loaded = DualAnoDiffPipeline.from_pretrained(model, wfile)
    assert loaded.metadata["base_model"] == "tiny"
    a = pipe.generate(1, steps=2, seed=5, height=16, width=16)
    b = loaded.generate(1, steps=2, seed=5, height=16, width=16)
    assert torch.allclose(a.global_images, b.global_images, atol=1e-5)
    assert torch.allclose(a.anomaly_images, b.anomaly_images, atol=1e-5)
    w = DualAnoDiffWeights.load(wfile)
    assert w.rank == 4 and w.has_text


def test_from_pretrained_errors_name_the_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="not a folder"):
        DualAnoDiffPipeline.from_pretrained(tmp_path / "nope")
    (tmp_path / "half" / "unet").mkdir(parents=True)
    with pytest.raises(ModelLoadError, match="missing subfolder"):
        DualAnoDiffPipeline.from_pretrained(tmp_path / "half")


def test_missing_tokenizer_vocabulary_is_detected():
    from dualanodiff_core.sd15.pipeline import check_tokenizer

    class Empty:
        def __len__(self):
            return 2

    with pytest.raises(ValueError, match="tokenizer has 2 tokens"):
        check_tokenizer(Empty())
