"""Placement control in ComfyUI: the DualAnoDiff Sampler's placement / normal / vae inputs, DualAnoDiff Composite
Onto Normal (exact photo pixels outside the band) and Save Dataset's placement check (tiny in-process models)."""

import asyncio
import importlib
import json

import comfy_env as ce
import pytest
import torch
from test_comfy_nodes import _dual_sample, _loaded, _prompts, _run


@pytest.fixture()
def wdir(env, dirs):
    return dirs.models


def _region(y0, y1, x0, x1, size=32):
    m = torch.zeros(1, size, size)
    m[:, y0:y1, x0:x1] = 1.0
    return m


def test_new_nodes_and_inputs_are_registered(env):
    nodes = asyncio.run(env.extension.DualAnoDiffExtension().get_node_list())
    ids = [n.GET_SCHEMA().node_id for n in nodes]
    assert "DualAnoDiffCompositeOnNormal" in ids
    opt = env.sampler.DualSampler.INPUT_TYPES()["optional"]
    assert list(opt) == ["latent", "placement", "normal", "vae", "placement_steering", "anomaly_noise_share"], (
        "new inputs at the end"
    )
    assert opt["placement_steering"][0] == "COMBO" and opt["placement_steering"][1]["options"] == ["shift", "hold"]
    assert opt["placement_steering"][1]["default"] == "shift"
    assert env.dataset.SaveDataset.INPUT_TYPES()["optional"]["placement"][0] == "MASK"


def test_sampler_holds_rows_outside_the_region(env, tiny, wdir):
    model, _, _, _ = _loaded(env, tiny, wdir, ce.random_weights(env, tiny.model, seed=2))
    prompts = _prompts(tiny)
    photos = torch.rand(2, 32, 32, 3, generator=torch.Generator().manual_seed(0))
    region = _region(0, 16, 0, 16)  # latent cells [0:2, 0:2] of 4x4
    g, a = _run(
        env.sampler.DualSampler,
        **_kwargs(model, prompts, pairs=1),
        placement=region,
        normal=photos,
        vae=tiny.vae,
    )
    assert g["samples"].shape == (2, 4, 4, 4), "one pair per photo"
    photo_lat = tiny.vae.encode(photos)
    gray = tiny.vae.encode(torch.full((1, 32, 32, 3), 0.5))
    out = torch.ones(4, 4, dtype=torch.bool)
    out[:2, :2] = False
    assert torch.allclose(g["samples"][..., out], photo_lat[..., out].float(), atol=1e-4)
    assert torch.allclose(a["samples"][..., out], gray.expand(2, -1, -1, -1)[..., out].float(), atol=1e-4)
    assert not torch.allclose(a["samples"][..., ~out], gray.expand(2, -1, -1, -1)[..., ~out].float(), atol=1e-2)
    # placement alone: the global rows are free, the anomaly rows still held at gray
    g2, a2 = _run(env.sampler.DualSampler, **_kwargs(model, prompts, pairs=2), placement=region, vae=tiny.vae)
    assert torch.allclose(a2["samples"][..., out], gray.expand(2, -1, -1, -1)[..., out].float(), atol=1e-4)
    assert not torch.allclose(g2["samples"][..., out], photo_lat[..., out].float(), atol=1e-2)
    # nothing connected: unchanged
    plain_g, _ = _dual_sample(env, model, *prompts, pairs=2, seed=4, steps=2)
    g3, _ = _run(env.sampler.DualSampler, **_kwargs(model, prompts, pairs=2), vae=tiny.vae)
    assert torch.equal(plain_g["samples"], g3["samples"])


def _kwargs(model, prompts, pairs):
    return dict(
        model=model,
        positive_global=prompts[0],
        positive_anomaly=prompts[1],
        negative=prompts[2],
        pairs=pairs,
        width=32,
        height=32,
        seed=4,
        steps=2,
        cfg=2.5,
        sampler_name="euler",
        scheduler="normal",
        denoise=1.0,
    )


def test_sampler_placement_errors(env, tiny, wdir):
    model, _, _, _ = _loaded(env, tiny, wdir, ce.random_weights(env, tiny.model))
    kw = _kwargs(model, _prompts(tiny), pairs=1)
    with pytest.raises(ValueError, match="vae input"):
        _run(env.sampler.DualSampler, **kw, placement=_region(0, 8, 0, 8))
    with pytest.raises(ValueError, match="16x16 but the images are 32x32"):
        _run(env.sampler.DualSampler, **kw, placement=torch.ones(1, 16, 16), vae=tiny.vae)
    with pytest.raises(ValueError, match="empty"):
        _run(env.sampler.DualSampler, **kw, placement=torch.zeros(1, 32, 32), vae=tiny.vae)
    with pytest.raises(ValueError, match="either a latent"):
        latent = {"samples": torch.zeros(1, 4, 4, 4)}
        _run(env.sampler.DualSampler, **kw, latent=latent, normal=torch.rand(1, 32, 32, 3), vae=tiny.vae)


def test_composite_keeps_photo_pixels_outside_the_band(env):
    g = torch.Generator().manual_seed(0)
    images, photos = torch.rand(2, 32, 32, 3, generator=g), torch.rand(2, 32, 32, 3, generator=g)
    region = _region(8, 16, 8, 16)
    (out,) = _run(env.placement.CompositeOnNormal, images=images, normal=photos, feather=3, placement=region)
    outside = torch.ones(32, 32, dtype=torch.bool)
    outside[5:19, 5:19] = False
    assert torch.equal(out[:, outside], photos[:, outside])
    assert torch.equal(out[:, 8:16, 8:16], images[:, 8:16, 8:16])
    (same,) = _run(env.placement.CompositeOnNormal, images=images, normal=photos, feather=3)
    assert torch.equal(same, images), "no region: the whole image was generated"
    with pytest.raises(ValueError, match="16x16"):
        _run(env.placement.CompositeOnNormal, images=images, normal=photos[:, :16, :16], feather=3)


def test_save_dataset_rejects_masks_outside_the_region(env, dirs):
    images = torch.rand(2, 32, 32, 3, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(2, 32, 32)
    mask[0, 2:8, 2:8] = 1  # inside the region
    mask[1, 20:30, 20:30] = 1  # outside
    node = env.dataset.SaveDataset.PREPARE_CLASS_CLONE({})
    with torch.inference_mode():
        node.execute(
            images=images,
            dataset="gen",
            category="bottle",
            defect="crack",
            max_area=0.5,
            max_gray_offset=0.2,
            keep_rejected=True,
            mask=mask,
            placement=_region(0, 16, 0, 16),
        )
    lines = (dirs.output / "gen" / "manifest.jsonl").read_text().splitlines()
    recs = sorted((json.loads(x) for x in lines if '"index"' in x), key=lambda r: r["index"])
    assert [r["reason"] for r in recs] == ["ok", "outside_region"]
    assert recs[0]["outside_region"] == 0.0 and recs[1]["outside_region"] == 1.0
    assert recs[1]["placement"] == "MASK input"


def test_sampler_steering_shift_and_hold(env, tiny, wdir):
    """'hold' is the sampler as it was (common_ksampler with the region as noise mask); 'shift' (the default) rolls
    the latents mid-sampling, is deterministic, and still ends with the anomaly rows at gray outside the region."""
    import nodes as comfy_nodes

    model, _, _, _ = _loaded(env, tiny, wdir, ce.random_weights(env, tiny.model, seed=2))
    prompts = _prompts(tiny)
    region = _region(0, 16, 0, 16)
    kw = dict(**_kwargs(model, prompts, pairs=2), placement=region, vae=tiny.vae)
    kw["steps"] = 6
    hold_g, hold_a = _run(env.sampler.DualSampler, **kw, placement_steering="hold")
    start, _, _ = env.placement.placement_start(tiny.vae, 2, 32, 32, region)
    with torch.inference_mode():
        (old,) = comfy_nodes.common_ksampler(
            model, kw["seed"], 6, kw["cfg"], "euler", "normal", env.conditioning.pair_conditioning(*prompts[:2]),
            prompts[2], start,
        )  # fmt: skip
    assert torch.equal(hold_a["samples"], old["samples"][1::2]) and torch.equal(hold_g["samples"], old["samples"][0::2])
    g, a = _run(env.sampler.DualSampler, **kw)
    g2, a2 = _run(env.sampler.DualSampler, **kw, placement_steering="shift")
    assert torch.equal(a["samples"], a2["samples"]) and torch.equal(g["samples"], g2["samples"]), "deterministic"
    assert not torch.equal(a["samples"], hold_a["samples"])
    gray = tiny.vae.encode(torch.full((1, 32, 32, 3), 0.5))
    out = torch.ones(4, 4, dtype=torch.bool)
    out[:2, :2] = False
    assert torch.allclose(a["samples"][..., out], gray.expand(2, -1, -1, -1)[..., out].float(), atol=1e-4)
    with pytest.raises(ValueError, match="placement_steering 'sideways'"):
        _run(env.sampler.DualSampler, **kw, placement_steering="sideways")


def test_steered_sample_records_one_shift_per_pair(env, tiny, wdir):
    Steering = importlib.import_module(f"{ce.PACK}.dualanodiff_core.method.placement").Steering
    model, _, _, _ = _loaded(env, tiny, wdir, ce.random_weights(env, tiny.model, seed=2))
    prompts = _prompts(tiny)
    region = _region(16, 32, 16, 32)
    start, _, lat_region = env.placement.placement_start(tiny.vae, 3, 32, 32, region)
    positive = env.conditioning.pair_conditioning(*prompts[:2])
    args = (model, 5, 10, 2.5, "dpmpp_2m", "karras", positive, prompts[2], start, 1.0, lat_region)
    with torch.inference_mode():
        samples, records = env.placement.steered_sample(*args, Steering())
        again, records2 = env.placement.steered_sample(*args, Steering())
        _, none = env.placement.steered_sample(*args, Steering(probe=0.0, ramp=0.0))
    assert torch.equal(samples, again) and records == records2 and none is None
    assert len(records) == 3 and all(r["probe_steps"] == 2 for r in records)
    for r in records:
        assert all(-16 <= v <= 16 and v % 8 == 0 for v in r["shift_px"]), "whole latent cells of 8 px"
        assert r["inside_predicted_after"] >= r["inside_predicted_before"]
