"""The DualAnoDiff Sampler's ``anomaly_noise_share``: each anomaly row's starting noise mixed with its global row's, as
``dualanodiff generate --anomaly-noise-share`` does it, on every sampling path of the node (tiny in-process models).
The noise is read where ComfyUI hands it to the sampler (``KSAMPLER.sample``), so these tests see what is sampled."""

import importlib
import math

import comfy_env as ce
import pytest
import torch
from test_comfy_nodes import _loaded, _prompts, _run
from test_comfy_placement import _kwargs, _region


@pytest.fixture()
def wdir(env, dirs):
    return dirs.models


@pytest.fixture()
def start_noise(env, monkeypatch):
    """Every starting noise ComfyUI gives a sampler during the test, in call order."""
    import comfy.samplers

    seen = []
    original = comfy.samplers.KSAMPLER.sample

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, *args, **kwargs):
        seen.append(noise.detach().float().cpu().clone())
        return original(self, model_wrap, sigmas, extra_args, callback, noise, *args, **kwargs)

    monkeypatch.setattr(comfy.samplers.KSAMPLER, "sample", sample)
    return seen


def _share_fn():
    return importlib.import_module(f"{ce.PACK}.dualanodiff_core.dataset.generate").share_anomaly_noise


def _sample(env, start_noise, **kw):
    """(global LATENT, anomaly LATENT, the starting noise of that one sampling)."""
    start_noise.clear()
    g, a = _run(env.sampler.DualSampler, **kw)
    (noise,) = start_noise
    return g, a, noise


def test_the_input_is_the_last_one_optional_with_the_module_default(env):
    opt = env.sampler.DualSampler.INPUT_TYPES()["optional"]
    assert list(opt)[-1] == "anomaly_noise_share", "new inputs at the end"
    kind, spec = opt["anomaly_noise_share"]
    assert kind == "FLOAT" and (spec["min"], spec["max"], spec["step"]) == (0.0, 1.0, 0.05)
    assert spec["default"] == env.sampler.DEFAULT_ANOMALY_NOISE_SHARE
    assert "ancestral" in spec["tooltip"], "says that the per-step noise of ancestral/SDE samplers is not shared"


def test_share_one_starts_each_anomaly_row_from_its_global_rows_noise(env, tiny, wdir, start_noise):
    import comfy.sample

    import nodes as comfy_nodes

    model, _, _, _ = _loaded(env, tiny, wdir, ce.random_weights(env, tiny.model, seed=2))
    prompts = _prompts(tiny)
    kw = _kwargs(model, prompts, pairs=3)
    comfy_noise = comfy.sample.prepare_noise(torch.zeros(6, 4, 4, 4), kw["seed"])  # what KSampler starts from
    old_g, old_a, old_noise = _sample(env, start_noise, **kw)  # a prompt without the input
    assert torch.equal(old_noise, comfy_noise)
    g0, a0, noise0 = _sample(env, start_noise, **kw, anomaly_noise_share=0.0)
    assert torch.equal(noise0, comfy_noise) and not torch.equal(noise0[1::2], noise0[0::2]), "independent"
    assert torch.equal(g0["samples"], old_g["samples"]) and torch.equal(a0["samples"], old_a["samples"])
    # share 0 is the node as it was: ComfyUI's own KSampler path, bit for bit
    start_noise.clear()
    with torch.inference_mode():
        (stock,) = comfy_nodes.common_ksampler(
            model, kw["seed"], kw["steps"], kw["cfg"], "euler", "normal",
            env.conditioning.pair_conditioning(*prompts[:2]), prompts[2], {"samples": torch.zeros(6, 4, 4, 4)},
        )  # fmt: skip
    assert torch.equal(g0["samples"], stock["samples"][0::2]) and torch.equal(a0["samples"], stock["samples"][1::2])
    g1, a1, noise1 = _sample(env, start_noise, **kw, anomaly_noise_share=1.0)
    assert torch.equal(noise1[1::2], noise1[0::2]), "each anomaly row starts from its global row's noise"
    assert torch.equal(noise1[0::2], comfy_noise[0::2]), "the global rows keep ComfyUI's noise"
    assert not torch.equal(a1["samples"], a0["samples"])
    # in between: the core's mixing (the CLI's and the Python API's), not a copy of it
    _, _, noise6 = _sample(env, start_noise, **kw, anomaly_noise_share=0.6)
    assert torch.equal(noise6, _share_fn()(comfy_noise, 0.6))
    assert abs(float(noise6[1::2].std()) - 1.0) < 0.25, "still unit noise"


@pytest.mark.parametrize("path", ["latent", "normal", "placement_shift", "placement_hold"])
def test_share_on_the_latent_normal_and_placement_paths(env, tiny, wdir, start_noise, path):
    model, _, _, _ = _loaded(env, tiny, wdir, ce.random_weights(env, tiny.model, seed=2))
    kw = _kwargs(model, _prompts(tiny), pairs=2)
    if path == "latent":
        kw.update(latent={"samples": torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1))}, denoise=0.7)
    elif path == "normal":
        kw.update(normal=torch.rand(2, 32, 32, 3, generator=torch.Generator().manual_seed(0)), vae=tiny.vae)
    else:
        steering = path.split("_")[1]
        kw.update(placement=_region(0, 16, 0, 16), vae=tiny.vae, placement_steering=steering, steps=6)
    old_g, old_a, old_noise = _sample(env, start_noise, **kw)
    assert not torch.equal(old_noise[1::2], old_noise[0::2]), "a prompt without the input: independent noise"
    g0, a0, noise0 = _sample(env, start_noise, **kw, anomaly_noise_share=0.0)
    assert torch.equal(noise0, old_noise)
    assert torch.equal(g0["samples"], old_g["samples"]) and torch.equal(a0["samples"], old_a["samples"])
    _, a1, noise1 = _sample(env, start_noise, **kw, anomaly_noise_share=1.0)
    assert noise1.shape == (4, 4, 4, 4)
    assert torch.equal(noise1[1::2], noise1[0::2]) and torch.equal(noise1[0::2], noise0[0::2])
    assert not torch.equal(a1["samples"], a0["samples"])


@pytest.mark.parametrize("bad", [1.5, -0.05, math.nan, "half"])
def test_a_share_outside_zero_to_one_is_one_clear_error(env, tiny, wdir, start_noise, bad):
    model, _, _, _ = _loaded(env, tiny, wdir, ce.random_weights(env, tiny.model))
    with pytest.raises(ValueError, match=r"anomaly_noise_share .*must lie in \[0, 1\]"):
        _run(env.sampler.DualSampler, **_kwargs(model, _prompts(tiny), pairs=1), anomaly_noise_share=bad)
    assert start_noise == [], "refused before sampling"
