"""Placement control: region-guided sampling, generating onto a normal photo (exact pixels outside the feathered
band), the outside_region filter, the CLI options, manifest fields and bad inputs (tiny model, 16x16 px)."""

import numpy as np
import pytest
import torch
from helpers import randomize_
from PIL import Image

from dualanodiff_core import cli
from dualanodiff_core.dataset.acceptance import FilterDecision
from dualanodiff_core.dataset.export import iter_records
from dualanodiff_core.dataset.placement import OUTSIDE_REGION, PlacementSet, check_region
from dualanodiff_core.fileio import tensor_to_pil
from dualanodiff_core.method.placement import (
    HOLD_ONLY,
    PlacementError,
    Steering,
    choose_shifts,
    composite,
    feather_alpha,
    forming_defect,
    keep_mask,
    latent_region,
    outside_fraction,
    ramp_anomaly_rows,
    ramp_weight,
    roll_pairs,
    shift_scores,
    signed_shift,
)
from dualanodiff_core.minidefect.tiny import save_tiny_model, tiny_components
from dualanodiff_core.sd15.pipeline import DualAnoDiffPipeline
from dualanodiff_core.sd15.scheduler import make_scheduler

S = 16


def make_pipe(bcm=False):
    c = tiny_components(seed=0)
    p = DualAnoDiffPipeline(
        c["unet"], c["vae"], c["text_encoder"], c["tokenizer"], c["scheduler_config"], rank=4, bcm=bcm
    )
    randomize_(p.dual, seed=1)
    return p


@pytest.fixture(scope="module")
def pipe():
    return make_pipe()


def box_region(y0, y1, x0, x1, size=S):
    r = torch.zeros(1, 1, size, size)
    r[..., y0:y1, x0:x1] = 1
    return r


def gray_latent(pipe, size=S):
    with torch.no_grad():
        return pipe.vae.encode(torch.zeros(1, 3, size, size)).latent_dist.mean * pipe.scaling_factor


# ---- tensor helpers ------------------------------------------------------------------------------------------------
def test_feather_alpha_ramps_over_the_band_and_is_zero_beyond():
    r = box_region(6, 10, 6, 10)
    a = feather_alpha(r, 2)[0, 0]
    assert torch.all(a[6:10, 6:10] == 1)
    assert a[5, 7] == pytest.approx(2 / 3) and a[4, 7] == pytest.approx(1 / 3)
    assert a[3, 7] == 0 and a[0, 0] == 0
    assert int((a > 0).sum()) == 8 * 8
    assert torch.equal(feather_alpha(r, 0), r)


def test_composite_keeps_normal_exactly_where_alpha_is_zero():
    gen, normal = torch.rand(1, 3, S, S), torch.rand(1, 3, S, S)
    alpha = feather_alpha(box_region(4, 8, 4, 8), 1)
    out = composite(gen, normal, alpha)
    outside = (alpha == 0).expand_as(out)
    assert torch.equal(out[outside], normal[outside])
    assert torch.equal(out[:, :, 5, 5], gen[:, :, 5, 5])


def test_latent_region_and_keep_mask_rows():
    r = box_region(4, 12, 0, 6)  # 6 px wide: latent cells 0..2 (cell 2 is 2/2 = full), rows 2..5
    lat = latent_region(r, (8, 8))
    assert lat[0, 0, 2:6, 0:3].all() and lat.sum() == 12
    thin = latent_region(box_region(4, 5, 4, 5), (8, 8))  # one pixel: keeps the cell it touches
    assert thin.sum() == 1 and thin[0, 0, 2, 2] == 1
    keep = keep_mask(lat, 2, tie_global=False)
    assert keep.shape == (4, 1, 8, 8)
    assert keep[0].sum() == 0 and keep[2].sum() == 0, "global rows free without a normal photo"
    assert torch.equal(keep[1], 1 - lat[0]) and torch.equal(keep[3], 1 - lat[0])
    assert torch.equal(keep_mask(lat, 1, tie_global=True)[0], 1 - lat[0])


def test_outside_fraction_and_region_rejection():
    region = np.zeros((S, S), bool)
    region[:8] = True
    mask = np.zeros((S, S), np.uint8)
    mask[6:10, 0:4] = 255  # half of it below the region
    assert outside_fraction(mask, region) == 0.5
    assert outside_fraction(np.zeros_like(mask), region) == 0.0
    ok = FilterDecision(True, "ok", "fine", 0.06, 0.0)
    dec, out = check_region(ok, mask, region, 0.05)
    assert not dec.accepted and dec.reason == OUTSIDE_REGION and "50.0%" in dec.detail and out == 0.5
    dec, _ = check_region(ok, mask, region, 0.6)
    assert dec.accepted
    rejected = FilterDecision(False, "empty_mask", "x", 0.0, 0.0)
    assert check_region(rejected, mask, region, 0.0)[0].reason == "empty_mask", "the first failing reason stays"


# ---- steering helpers ---------------------------------------------------------------------------------------------
def test_shift_scores_and_choose_shifts_move_a_forming_defect_into_the_region():
    gray = torch.zeros(1, 4, 8, 8)
    x0 = gray.clone()
    x0[0, :, 1:3, 1:3] = 2.0  # a 2x2 defect forming at rows/cols 1-2
    region = torch.zeros(1, 1, 8, 8)
    region[..., 4:8, 4:8] = 1  # 4x4 region at rows/cols 4-7
    weight = forming_defect(x0, gray)
    assert torch.equal(weight[0] > 0, x0[0, 0] > 0), "only the defect deviates from the background"
    scores = shift_scores(weight, region)
    assert scores[0, 0, 0] == 0.0 and scores.max() == pytest.approx(1.0)
    # the rolls that put the whole 2x2 defect inside: 3..5 in each direction (9 of them)
    fits = {(dy, dx) for dy in (3, 4, 5) for dx in (3, 4, 5)}
    assert {tuple(v) for v in torch.nonzero(scores[0] > 1 - 1e-6).tolist()} == fits
    chosen = [choose_shifts(scores, [seed], slack=0.0)[0] for seed in range(200)]
    assert set(chosen) == fits, "the seed spreads defects over every position that fits"
    assert chosen == [choose_shifts(scores, [seed], slack=0.0)[0] for seed in range(200)], "deterministic"
    for dy, dx in chosen[:5]:
        moved = torch.roll(weight[0], (dy, dx), dims=(-2, -1))
        assert float(moved[region[0, 0] == 0].sum()) == 0.0
    # nothing forming: every shift scores 0 and the choice is still deterministic
    flat = shift_scores(torch.zeros(1, 8, 8), region)
    assert flat.abs().max() == 0 and choose_shifts(flat, [7], 0.05) == choose_shifts(flat, [7], 0.05)
    with pytest.raises(PlacementError, match="2 seeds for 1 samples"):
        choose_shifts(scores, [0, 1], 0.0)


def test_roll_pairs_moves_both_rows_of_each_pair_and_signed_shift():
    lat = torch.arange(4 * 1 * 4 * 4, dtype=torch.float32).reshape(4, 1, 4, 4)
    out = roll_pairs(lat, [(1, 0), (0, 3)])
    assert torch.equal(out[0], torch.roll(lat[0], (1, 0), (-2, -1)))
    assert torch.equal(out[1], torch.roll(lat[1], (1, 0), (-2, -1)))
    assert torch.equal(out[3], torch.roll(lat[3], (0, 3), (-2, -1)))
    with pytest.raises(PlacementError, match="1 shifts for 2 pairs"):
        roll_pairs(lat, [(0, 0)])
    assert signed_shift((1, 3), (4, 4), 8) == [8, -8] and signed_shift((2, 0), (4, 4)) == [2, 0]


def test_ramp_weight_and_ramped_rows():
    assert ramp_weight(-1, 10, 0.0) == 1.0, "ramp 0: full hold from the start (the behaviour before steering)"
    assert [ramp_weight(i, 10, 0.5) for i in (-1, 0, 1, 3, 4, 9)] == [0.0, 0.2, 0.4, 0.8, 1.0, 1.0]
    keep = torch.ones(4, 1, 2, 2)
    assert ramp_anomaly_rows(keep, 0.25)[1::2].eq(0.25).all() and ramp_anomaly_rows(keep, 0.25)[0::2].eq(1).all()
    gen = torch.zeros(4, 1, 2, 2)  # ComfyUI's noise mask: 0 = held
    assert ramp_anomaly_rows(gen, 0.25, generate=True)[1::2].eq(0.75).all()


@pytest.mark.parametrize("kw", [dict(probe=-0.1), dict(probe="0.2"), dict(ramp=1.5), dict(slack=float("nan"))])
def test_steering_settings_are_checked(kw):
    with pytest.raises(PlacementError, match="steering"):
        Steering(**kw)


def test_bad_steering_values_are_refused(pipe, tmp_path):
    kw = dict(steps=2, seed=0, height=S, width=S, placement=box_region(0, 8, 0, 8))
    with pytest.raises(PlacementError, match="steering='shift'"):
        pipe.generate(1, steering="shift", **kw)
    with pytest.raises(PlacementError, match="placement_seeds: 1 seeds for 2 pair"):
        pipe.generate(2, placement_seeds=[3], **kw)
    region = tmp_path / "r.png"
    Image.fromarray(np.full((S, S), 255, np.uint8)).save(region)
    with pytest.raises(PlacementError, match="placement steering=1"):
        PlacementSet.from_paths(None, region, steering=1)
    assert PlacementSet.from_paths(None, region, steering=False).steering == HOLD_ONLY


def test_probe_steps_is_a_share_of_the_schedule():
    assert Steering(probe=0.2).probe_steps(25) == 5 and Steering(probe=0.2).probe_steps(100) == 20
    assert Steering(probe=0.01).probe_steps(10) == 1, "at least one step"
    assert Steering(probe=1.0).probe_steps(3) == 3 and HOLD_ONLY.probe_steps(50) == 0


def _blob_unet(pipe, gray, strength=4.0):
    """A stand-in UNet that is exactly translation-equivariant and whose answer is known: it predicts a clean latent
    that is the gray background plus a one-cell "defect" where the channel sum of its input is largest."""
    acp = make_scheduler("ddim", pipe.scheduler_config).alphas_cumprod

    def forward(sample, timestep, encoder_hidden_states=None, return_dict=False, **_):
        a = acp[int(timestep)]
        x0 = gray.expand_as(sample).clone()
        idx = sample.sum(1).flatten(1).argmax(1)
        w = sample.shape[-1]
        for r, k in enumerate(idx.tolist()):
            x0[r, :, k // w, k % w] += strength
        return ((sample - a.sqrt() * x0) / (1 - a).sqrt(),)

    pipe.unet.forward = forward
    return pipe


def _defect_cell(latents, gray):
    d = (latents - gray).norm(dim=1)  # [N, h, w]
    k = d.flatten(1).argmax(1)
    return [(int(i) // d.shape[-1], int(i) % d.shape[-1]) for i in k]


def test_steering_moves_the_defect_into_the_region_on_a_known_case():
    pipe = make_pipe()
    gray = gray_latent(pipe)
    _blob_unet(pipe, gray)
    region = box_region(0, 6, 0, 6)  # latent cells rows/cols 0-2 of 8x8
    inside = latent_region(region, (8, 8))[0, 0].bool()
    kw = dict(steps=6, height=S, width=S, sampler="ddim", cfg=1.0, placement=region, decode=False)

    def strength(res):
        return float((res.anomaly_latents[0] - gray[0]).norm(dim=0).max())

    free = {s: pipe.generate(1, seed=s, guide_placement=False, **kw) for s in range(16)}
    outside = [s for s, r in free.items() if not inside[_defect_cell(r.anomaly_latents, gray)[0]]][:8]
    assert len(outside) == 8 and all(strength(free[s]) > 4 for s in outside), "defects form outside without guidance"
    erased = 0
    for s in outside:
        res = pipe.generate(1, seed=s, **kw)
        (rec,) = res.steering
        dy, dx = (v // 2 for v in rec["shift_px"])  # 2 px per latent cell
        y, x = _defect_cell(free[s].anomaly_latents, gray)[0]
        cell = _defect_cell(res.anomaly_latents, gray)[0]
        assert cell == ((y + dy) % 8, (x + dx) % 8), "the defect moved by exactly the recorded shift"
        assert inside[cell] and strength(res) > 4, f"seed {s}: a full defect inside the region"
        assert rec["probe_steps"] == Steering().probe_steps(6)
        assert rec["inside_predicted_before"] == 0.0 and rec["inside_predicted_after"] == 1.0
        again = pipe.generate(1, seed=s, **kw)
        assert torch.equal(again.anomaly_latents, res.anomaly_latents) and again.steering == res.steering
        held = pipe.generate(1, seed=s, steering=False, **kw)
        assert held.steering is None
        erased += strength(held) < 1
    assert erased >= 4, "holding alone mostly erases these defects instead of moving them"


@pytest.mark.parametrize("sampler", ["pndm", "dpmpp"])
def test_steering_rolls_the_multistep_schedulers_memory(pipe, sampler):
    """PNDM and DPM-Solver remember earlier steps; steering must roll that memory with the latents: with the blob
    model the defect still lands inside the region and the result is deterministic."""
    p = make_pipe()
    gray = gray_latent(p)
    _blob_unet(p, gray)
    region = box_region(0, 6, 0, 6)
    inside = latent_region(region, (8, 8))[0, 0].bool()
    kw = dict(steps=8, height=S, width=S, sampler=sampler, cfg=1.0, placement=region, decode=False)
    for s in range(3):
        res = p.generate(1, seed=s, **kw)
        assert inside[_defect_cell(res.anomaly_latents, gray)[0]]
        assert torch.equal(p.generate(1, seed=s, **kw).anomaly_latents, res.anomaly_latents)
    sched = make_scheduler(sampler, p.scheduler_config)
    sched.set_timesteps(4)
    x = torch.randn(2, 4, 8, 8)
    for t in sched.timesteps[:3]:
        x = sched.step(torch.randn_like(x), t, x, return_dict=False)[0]
    memory = [v for v in vars(sched).values() if isinstance(v, list) and v and torch.is_tensor(v[-1])]
    before = [t.clone() for t in memory[0] if t is not None]
    from dualanodiff_core.sd15.pipeline import _roll_scheduler_state

    _roll_scheduler_state(sched, [(1, 2)], x.shape)
    after = [t for t in memory[0] if t is not None]
    assert before and all(torch.equal(torch.roll(b, (1, 2), (-2, -1)), a) for b, a in zip(before, after))
    assert torch.equal(sched.alphas_cumprod, make_scheduler(sampler, p.scheduler_config).alphas_cumprod)


def test_hold_only_steering_is_the_earlier_behaviour(pipe):
    region = box_region(0, 8, 0, 8)
    kw = dict(steps=3, seed=2, height=S, width=S, placement=region)
    a = pipe.generate(1, steering=False, **kw)
    b = pipe.generate(1, steering=HOLD_ONLY, **kw)
    c = pipe.generate(1, **kw)
    assert torch.equal(a.anomaly_latents, b.anomaly_latents) and a.steering is None
    assert c.steering is not None and not torch.equal(a.anomaly_latents, c.anomaly_latents)
    d = pipe.generate(1, placement_seeds=[12345], **kw)
    assert torch.equal(pipe.generate(1, placement_seeds=[12345], **kw).anomaly_latents, d.anomaly_latents)


# ---- sampler ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sampler", ["pndm", "dpmpp"])
def test_generate_onto_normal_keeps_photo_outside_band_and_gray_outside_region(pipe, sampler):
    region = box_region(4, 10, 6, 12)
    normal = torch.randint(0, 256, (2, 3, S, S)).float() / 255 * 2 - 1
    res = pipe.generate(
        2, steps=3, seed=0, height=S, width=S, sampler=sampler, placement=region, normal=normal, feather=2
    )
    alpha = feather_alpha(region, 2)[0, 0]
    photo = [np.asarray(im) for im in tensor_to_pil((normal + 1) / 2)]
    for j, img in enumerate(tensor_to_pil(res.global_images)):
        diff = (np.asarray(img) != photo[j]).any(-1)
        assert not diff[alpha.numpy() == 0].any(), "every pixel outside the band is the photo's"
        assert diff[alpha.numpy() > 0].any(), "something was generated inside"
    keep = (1 - latent_region(region, (8, 8)))[0, 0].bool()
    gray = gray_latent(pipe)[0]
    with torch.no_grad():
        photo_lat = pipe.vae.encode(normal).latent_dist.mean * pipe.scaling_factor
    for j in range(2):
        assert torch.allclose(res.anomaly_latents[j][:, keep], gray[:, keep], atol=1e-5)
        assert torch.allclose(res.global_latents[j][:, keep], photo_lat[j][:, keep], atol=1e-5)
        assert not torch.allclose(res.anomaly_latents[j][:, ~keep], gray[:, ~keep], atol=1e-3)


def test_placement_without_guidance_or_normal(pipe):
    region = box_region(0, 8, 0, 8)
    keep = (1 - latent_region(region, (8, 8)))[0, 0].bool()
    gray = gray_latent(pipe)[0]
    guided = pipe.generate(1, steps=2, seed=1, height=S, width=S, placement=region)
    free = pipe.generate(1, steps=2, seed=1, height=S, width=S, placement=region, guide_placement=False)
    plain = pipe.generate(1, steps=2, seed=1, height=S, width=S)
    assert torch.allclose(guided.anomaly_latents[0][:, keep], gray[:, keep], atol=1e-5)
    assert torch.equal(free.anomaly_latents, plain.anomaly_latents), "no guidance: sampling unchanged"
    assert torch.equal(free.global_images, plain.global_images)


def test_generate_with_bcm_weights_uses_the_normal_photo_as_background():
    p = make_pipe(bcm=True)
    calls = []
    h = p.unet.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    normal = torch.rand(1, 3, S, S) * 2 - 1
    kw = dict(steps=2, seed=0, height=S, width=S, cfg=1.0, sampler="ddim")
    a = p.generate(1, normal=normal, **kw)
    h.remove()
    assert calls == [1, 2, 1, 2], "a BCM record pass (one background row) before each main pass"
    b = p.generate(1, normal=normal, background=normal, **kw)
    assert torch.equal(a.global_latents, b.global_latents), "the photo is the BCM background"


def test_generate_rejects_bad_regions_and_photos(pipe):
    kw = dict(steps=1, seed=0, height=S, width=S)
    with pytest.raises(PlacementError, match="empty"):
        pipe.generate(1, placement=torch.zeros(1, 1, S, S), **kw)
    with pytest.raises(PlacementError, match="exactly 16x16"):
        pipe.generate(1, placement=torch.ones(1, 1, 8, 8), **kw)
    with pytest.raises(PlacementError, match="exactly 16x16"):
        pipe.generate(1, normal=torch.zeros(1, 3, 8, 8), **kw)
    with pytest.raises(PlacementError, match=r"\[1 or N, 3, H, W\]"):
        pipe.generate(1, normal=torch.zeros(1, 4, S, S), **kw)


# ---- dataset / CLI ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("placement_assets")
    save_tiny_model(root / "model")
    make_pipe().to_weights().save(root / "w.safetensors")
    photos = root / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((S, S, 3)) * 255).astype(np.uint8)).save(photos / "p0.png")
    Image.fromarray((rng.random((S, S)) * 255).astype(np.uint8), mode="L").save(photos / "p1.png")
    m = np.zeros((S, S), np.uint8)
    m[4:10, 4:10] = 255
    Image.fromarray(m).save(root / "region.png")
    corner = np.zeros((S, S), np.uint8)
    corner[:2, :2] = 255
    Image.fromarray(corner).save(root / "corner.png")
    return root


LOOSE = ["--max-area", "1", "--max-gray-offset", "1", "--mask-min-contrast", "0.01", "--mask-min-area", "1"]
LOOSE += ["--mask-open", "0", "--mask-threshold", "0.01", "--min-alignment", "0"]


def gen(assets, out, *extra, n=3):
    argv = ["generate", "--weights", str(assets / "w.safetensors"), "--base", str(assets / "model")]
    argv += ["--out", str(out), "--n", str(n), "--size", str(S), "--steps", "2", "--batch-size", "2"]
    argv += ["--device", "cpu", "--no-progress", "--category", "widget", "--defect", "dent", *LOOSE, *extra]
    return cli.main(argv)


def test_cli_generates_onto_photos_with_region_and_records_it(assets, tmp_path):
    out = tmp_path / "out"
    assert gen(assets, out, "--normal", str(assets / "photos"), "--placement", str(assets / "region.png"),
               "--feather", "1") == 0  # fmt: skip
    records = sorted(iter_records(out), key=lambda r: r["index"])
    assert [r["normal"].endswith(n) for r, n in zip(records, ("p0.png", "p1.png", "p0.png"))] == [True] * 3
    alpha = feather_alpha(box_region(4, 10, 4, 10), 1)[0, 0].numpy()
    for r in records:
        assert r["placement"].endswith("region.png") and r["feather"] == 1 and r["placement_guidance"] is True
        assert 0.0 <= r["outside_region"] <= 1.0
        image = np.asarray(Image.open(out / r["files"]["image" if r["accepted"] else "rejected_image"]))
        photo = np.asarray(Image.open(r["normal"]).convert("RGB"))
        assert np.array_equal(image[alpha == 0], photo[alpha == 0])


def test_cli_steering_option_and_manifest_fields(assets, tmp_path, capsys):
    out = tmp_path / "steered"
    assert gen(assets, out, "--placement", str(assets / "region.png"), n=2) == 0
    records = sorted(iter_records(out), key=lambda r: r["index"])
    for r in records:
        st = r["placement_steering"]
        assert set(st) == {"probe_steps", "shift_px", "inside_predicted_before", "inside_predicted_after"}
        assert st["probe_steps"] == 1 and all(v % 2 == 0 and abs(v) <= S // 2 for v in st["shift_px"])
        assert r["settings"]["placement"]["steering"] == {"probe": 0.2, "ramp": 0.3, "slack": 0.05}
    again = tmp_path / "again"
    assert gen(assets, again, "--placement", str(assets / "region.png"), n=2) == 0
    assert [r["placement_steering"] for r in sorted(iter_records(again), key=lambda r: r["index"])] == [
        r["placement_steering"] for r in records
    ], "same seed, same steering"
    held = tmp_path / "held"
    assert gen(assets, held, "--placement", str(assets / "region.png"), "--placement-steering", "hold", n=2) == 0
    for r in iter_records(held):
        assert r["placement_steering"] is None and r["placement_guidance"] is True
        assert r["settings"]["placement"]["steering"] is None
    with pytest.raises(SystemExit) as e:
        gen(assets, tmp_path / "bad", "--placement", str(assets / "region.png"), "--placement-steering", "up")
    assert e.value.code == 2 and "invalid choice: 'up'" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_cli_rejects_masks_outside_the_region(assets, tmp_path):
    out = tmp_path / "out"
    code = gen(assets, out, "--placement", str(assets / "corner.png"), "--no-placement-guidance",
               "--max-outside-region", "0", n=2)  # fmt: skip
    assert code == 0
    records = list(iter_records(out))
    assert all(r["normal"] is None and r["placement_guidance"] is False for r in records)
    outside = [r for r in records if r["reason"] == OUTSIDE_REGION]
    assert outside and all(r["outside_region"] > 0 and not r["accepted"] for r in outside)


def _bad(tmp_path, name, array, mode=None):
    p = tmp_path / name
    Image.fromarray(array, mode=mode).save(p)
    return p


@pytest.mark.parametrize(
    "option, make, words",
    [
        ("--placement", lambda t: _bad(t, "big.png", np.full((20, 20), 255, np.uint8)), ["big.png", "20x20", "16x16"]),
        ("--placement", lambda t: _bad(t, "black.png", np.zeros((S, S), np.uint8)), ["black.png", "empty"]),
        ("--normal", lambda t: _bad(t, "n.png", np.zeros((8, 24, 3), np.uint8)), ["n.png", "24x8", "--size"]),
        ("--normal", lambda t: _bad(t, "rgba.png", np.zeros((S, S, 4), np.uint8)), ["rgba.png", "RGBA", "RGB"]),
        ("--normal", lambda t: t / "missing_dir", ["missing_dir", "no such file"]),
    ],
)
def test_cli_bad_inputs_name_the_file_and_write_nothing(assets, tmp_path, capsys, option, make, words):
    out = tmp_path / "out"
    assert gen(assets, out, option, str(make(tmp_path))) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and all(w in err for w in words), err
    assert not out.exists()


def test_region_folder_needs_one_mask_per_photo(assets, tmp_path, capsys):
    masks = tmp_path / "masks"
    masks.mkdir()
    Image.open(assets / "region.png").save(masks / "p0_mask.png")
    with pytest.raises(PlacementError, match="p1.png"):
        PlacementSet.from_paths(assets / "photos", masks)
    Image.open(assets / "region.png").save(masks / "p1.png")
    ps = PlacementSet.from_paths(assets / "photos", masks)
    assert [p.name for p in ps.regions] == ["p0_mask.png", "p1.png"]
    assert gen(assets, tmp_path / "o", "--normal", str(assets / "photos"), "--backgrounds", str(assets / "photos")) == 2
    assert "drop --backgrounds" in capsys.readouterr().err


def test_dataset_with_bcm_weights_uses_each_photo_as_its_background(assets, tmp_path):
    from dualanodiff_core.dataset.generate import SamplingOptions, generate_dataset, sample_seed
    from dualanodiff_core.fileio import pil_to_tensor

    pipe = make_pipe(bcm=True)
    seen = []
    real = pipe.generate
    pipe.generate = lambda *a, **kw: seen.append(kw) or real(*a, **kw)
    ps = PlacementSet.from_paths(assets / "photos", assets / "region.png")
    generate_dataset(
        pipe, tmp_path / "o", 2, batch_size=2, sampling=SamplingOptions(steps=1, height=S, width=S), placement=ps,
        progress=False, contact_sheets=False,
    )  # fmt: skip
    (kw,) = seen
    photos = pil_to_tensor([ps.get(0, (S, S)).normal, ps.get(1, (S, S)).normal], signed=True)
    assert torch.equal(kw["normal"], photos) and kw["placement"].shape == (2, 1, S, S)
    assert kw["background_latents"].shape == (2, 4, 8, 8), "one BCM background per sample: its photo"
    gens = [torch.Generator().manual_seed(sample_seed(0, i)) for i in (0, 1)]
    for g in gens:  # the sample's own generator: first its starting noise, then its background encoding
        torch.randn((2, 4, 8, 8), generator=g)
    with torch.no_grad():
        want = torch.cat([pipe.encode_background(photos[i : i + 1], g) for i, g in enumerate(gens)])
    assert torch.equal(kw["background_latents"], want), "encoded from the photos"
