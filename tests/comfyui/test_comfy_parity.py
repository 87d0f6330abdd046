"""The ComfyUI forward equals the core/diffusers implementation with the same weights (within 1e-4).

The reference (a tiny diffusers UNet, DualAnoDiff weights, inputs and outputs) is built by tests/test_comfyui.py in
the project's environment, where diffusers is installed, and handed over in DUALANODIFF_REFERENCE.
"""

import json
import os
from pathlib import Path

import comfy_env as ce
import pytest
import torch

REFERENCE = os.environ.get("DUALANODIFF_REFERENCE")
pytestmark = pytest.mark.skipif(
    not REFERENCE and ce.skip_reason() is None,
    reason="DUALANODIFF_REFERENCE is not set: the diffusers reference is built by tests/test_comfyui.py (run "
    "`python -m pytest tests/test_comfyui.py` in the project's environment)",
)
TOL = 1e-4


@pytest.fixture(scope="module")
def ref(env):
    import comfy.utils
    from safetensors.torch import load_file

    folder = Path(REFERENCE)
    config = json.loads((folder / "config.json").read_text())
    unet_config = config["unet_config"]
    diffusers_sd = load_file(str(folder / "unet_diffusers.safetensors"))
    mapping = comfy.utils.unet_to_diffusers(unet_config)  # diffusers name -> ldm name
    missing = sorted(set(diffusers_sd) - set(mapping))
    assert not missing, f"diffusers keys without an ldm name: {missing[:5]}"
    ldm_sd = {mapping[k]: v for k, v in diffusers_sd.items()}
    model = ce.tiny_model(unet_config=unet_config, state_dict=ldm_sd)
    weights = env.core_weights.DualAnoDiffWeights.load(folder / "weights.safetensors")
    return dict(config=config, model=model, weights=weights, t=load_file(str(folder / "tensors.safetensors")))


def _close(a, b):
    err = (a - b).abs().max().item()
    assert err < TOL, f"max abs difference {err:.3g} (values up to {b.abs().max().item():.3g})"


def test_plain_unet_matches_diffusers(ref):
    t = ref["t"]
    _close(ce.forward(ref["model"], t["x"], t["t"], t["ctx"]), t["plain"])


def test_dual_forward_matches_diffusers(env, ref):
    t, cfg = ref["t"], ref["config"]["dual"]
    m = env.backend.install(ref["model"], ref["weights"], *cfg["lora"])
    env.backend.set_options(m, saim=cfg["saim"])
    out = ce.forward(m, t["x"], t["t"], t["ctx"])
    _close(out, t["dual"])
    assert (out - t["plain"]).abs().max() > 100 * TOL  # the weights do something


def test_background_compensation_through_apply_model_matches_diffusers(env, ref, monkeypatch):
    """The APPLY_MODEL wrapper: noise scaling of the unscaled background, gray for the unconditional chunk, the
    record pass with the global rows' prompts, then the fused main pass -- against diffusers + DDPM add_noise."""
    import comfy.patcher_extension as pe

    t, cfg = ref["t"], ref["config"]["bcm"]
    m = env.backend.install(ref["model"], ref["weights"], *cfg["lora"])
    env.backend.set_options(m, saim=cfg["saim"], bcm=cfg["bcm"])
    bg = env.backend.Background(latents=t["bg"], gray=t["gray"], pixels=(64, 64), seed=0)
    wrapper = env.backend.apply_model_wrapper(m).with_background(bg)
    monkeypatch.setattr(env.backend, "_noise_for", lambda shape, sigma, seed: t["noise"])
    base = m.model
    sigma = base.model_sampling.sigmas[ref["config"]["t"]].reshape(1)
    assert abs(sigma.item() - t["sigma"].item()) < 1e-5
    x = t["x_cfg"]
    rows = x.shape[0]
    options = dict(m.model_options["transformer_options"])
    options.update(
        cond_or_uncond=[1, 0],
        sigmas=sigma.expand(rows // 2),
        wrappers={pe.WrappersMP.APPLY_MODEL: {"dualanodiff": [wrapper]}},
    )
    import comfy.ldm.modules.attention as attention

    modes = []
    original = attention.optimized_attention

    def spy(q, k, v, heads, *args, **kwargs):
        modes.append(((kwargs.get("transformer_options") or {}).get(env.backend.RUN_KEY) or {}).get("mode"))
        return original(q, k, v, heads, *args, **kwargs)

    monkeypatch.setattr(attention, "optimized_attention", spy)
    m.patch_model()
    try:
        with torch.inference_mode():
            denoised = base.apply_model(x, sigma.expand(rows), c_crossattn=t["ctx_cfg"], transformer_options=options)
    finally:
        m.unpatch_model()
    eps = (x - denoised) / sigma.item()
    _close(eps, t["bcm_eps"])
    sites = env.backend.attention_sites(m)
    # the record pass stops once the last self-attention input is stored (neither that layer's attention nor the
    # last attn2 run); then the full main pass
    assert modes.count("record") == len(sites) - 2 and modes.count("dual") == len(sites)
