"""Issue 12's quality levers on known cases: the alignment check of the acceptance filter, the halo-free MiniDefect
mask defaults, zero-mean anomaly starting noise, the training recipe (offset noise on the anomaly rows, the
mask-weighted global loss), --recipe on the CLIs, and the benchmark's cache and summary table."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from defect_data import make_flat

from dualanodiff_core.dataset.acceptance import REASONS, FilterOptions, alignment_contrast, check_pair
from dualanodiff_core.dataset.generate import SamplingOptions, share_anomaly_noise, zero_mean_anomaly_rows
from dualanodiff_core.dataset.masks import extract_mask
from dualanodiff_core.evaluation import benchmark as ev
from dualanodiff_core.method.recipes import get_recipe, minidefect_prompts
from dualanodiff_core.minidefect import procedural as md
from dualanodiff_core.minidefect.tiny import tiny_components
from dualanodiff_core.sd15.training import DiffusersTrainingBackbone
from dualanodiff_core.training.data import DefectDataset, Draw, find_defect_set
from dualanodiff_core.training.trainer import TrainConfig, Trainer, mask_loss_weights

# ---------------------------------------------------------------------------------------------------------------------
# the alignment check


def _texture(seed=0, size=48):
    rng = np.random.default_rng(seed)
    return np.clip(rng.normal(120, 10, (size, size, 3)), 0, 255).astype(np.uint8)


def _square(size=48, y=10, x=12, s=8):
    m = np.zeros((size, size), bool)
    m[y : y + s, x : x + s] = True
    return m


def _anomaly_image(mask):
    """What the anomaly branch draws: the defect (dark) on mid-gray."""
    fg = np.full(mask.shape + (3,), 128, np.uint8)
    fg[mask] = 30
    return fg


def test_alignment_contrast_separates_shown_from_absent_defects():
    m = _square()
    img = _texture()
    shown = img.copy()
    shown[m] = 40  # a dark defect where the mask is
    assert alignment_contrast(shown, m) > 3.0
    assert alignment_contrast(img, m) < 0.57  # the same mask on plain texture
    assert alignment_contrast(shown, np.roll(m, 20, axis=1)) < 0.57  # the mask beside the defect
    assert alignment_contrast(shown, np.zeros_like(m)) == 0.0  # empty mask
    assert alignment_contrast(shown, np.ones_like(m)) == 0.0  # no ring around it


def test_filter_rejects_a_pair_whose_image_does_not_show_the_defect():
    m = _square()
    mres = extract_mask(_anomaly_image(m), min_area=2, open_radius=0, close_radius=0)
    plain = _texture()
    shown = plain.copy()
    shown[m] = 40
    ok = check_pair(mres, global_image=shown)
    assert ok.accepted and ok.alignment > 3.0 and "alignment contrast" in ok.detail
    bad = check_pair(mres, global_image=plain)
    assert not bad.accepted and bad.reason == "misaligned" and bad.alignment < 0.57
    assert "does not show" in bad.detail and bad.to_record()["alignment"] == pytest.approx(bad.alignment, abs=1e-6)
    # 0 turns the check off; without the global image it is not run
    assert check_pair(mres, FilterOptions(min_alignment=0), global_image=plain).accepted
    no_image = check_pair(mres)
    assert no_image.accepted and no_image.alignment is None
    assert "misaligned" in REASONS
    with pytest.raises(ValueError, match="min_alignment"):
        FilterOptions(min_alignment=-1)
    with pytest.raises(ValueError, match="alignment_ring"):
        FilterOptions(alignment_ring=0)


def test_real_minidefect_defects_pass_the_alignment_check(tmp_path):
    """The default threshold keeps (nearly all) real defects: they are what a generated pair should look like."""
    data = md.write_minidefect(
        tmp_path / "d", md.MiniDefectSpec(seed=3, train_good=4, test_good=4, test_defect=6, products=("fabric",))
    )
    kept = total = 0
    for defect in md.PRODUCTS["fabric"]:
        real = ev.load_pairs(data / "fabric" / "test" / defect, data / "fabric" / "ground_truth" / defect)
        normals = ev.load_images(data / "fabric" / "test" / "good")
        for img, m, normal in zip(real.images, real.masks, np.resize(normals, real.images.shape)):
            total += 1
            kept += alignment_contrast(img, m) >= FilterOptions().min_alignment
            # the same mask on a normal image (a defect the image does not show) scores lower
            assert alignment_contrast(normal, m) < alignment_contrast(img, m)
    assert kept >= 0.9 * total, (kept, total)  # seed 3: 17 of 18


def test_generate_cli_exposes_the_alignment_threshold():
    from dualanodiff_core.cli import generate as cmd_generate

    p = argparse.ArgumentParser()
    cmd_generate.add_arguments(p)
    base = ["--weights", "w", "--base", "b", "--out", "o"]
    assert p.parse_args(base).min_alignment == FilterOptions().min_alignment
    assert p.parse_args(base + ["--min-alignment", "0"]).min_alignment == 0.0


# ---------------------------------------------------------------------------------------------------------------------
# masks without a halo


def test_minidefect_mask_defaults_leave_out_a_faint_halo():
    """A generated anomaly image: a clear defect (0.3 from gray) inside a faint rim (0.065 from gray) -- the rim is
    not in the global image. The defaults mark the defect only (the Otsu threshold, not grown); hysteresis growth
    (0.5, the earlier default) grew into the rim."""
    size = 64
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(yy - 32, xx - 32)
    fg = np.full((size, size, 3), 0.5, np.float32)
    fg[r < 10] = 0.435  # rim
    fg[r < 5] = 0.2  # defect
    core = r < 5
    new = md.mask_options()
    assert new.min_contrast == 0.05 and new.hysteresis == 1.0
    m_new = extract_mask(fg, new).bool_mask()
    m_old = extract_mask(fg, new.replace(hysteresis=0.5)).bool_mask()
    assert m_new.sum() <= 1.2 * core.sum() and (m_new & core).sum() >= 0.9 * core.sum()
    assert m_old.sum() > 2 * core.sum()


def test_minidefect_mask_floor_keeps_a_faint_gray_defect():
    """A gray-metal defect drawn on the anomaly branch's mid-gray: 0.06 from gray. The shipped model's floor (0.05)
    keeps it; the first model's (0.08) emptied such masks."""
    fg = np.full((64, 64, 3), 0.5, np.float32)
    fg[30:34, 10:50] = 0.44  # a scratch, 4 px wide
    truth = np.zeros((64, 64), bool)
    truth[30:34, 10:50] = True
    m = extract_mask(fg, md.mask_options()).bool_mask()
    assert (m & truth).sum() >= 0.9 * truth.sum() and m.sum() <= 1.3 * truth.sum()
    assert not extract_mask(fg, md.mask_options(min_contrast=0.08)).bool_mask().any()


# ---------------------------------------------------------------------------------------------------------------------
# sampling: zero-mean starting noise on the anomaly rows


def test_zero_mean_anomaly_rows_touch_only_the_anomaly_rows():
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(6, 4, 8, 8, generator=g) + 0.3
    out = zero_mean_anomaly_rows(lat)
    assert torch.equal(out[0::2], lat[0::2])
    assert out[1::2].mean(dim=(-2, -1)).abs().max() < 1e-6
    assert torch.allclose(out[1::2] - lat[1::2], -lat[1::2].mean(dim=(-2, -1), keepdim=True))
    assert lat[1::2].mean(dim=(-2, -1)).abs().min() > 0.05  # the input did have a mean (not changed in place)
    assert SamplingOptions().zero_mean_anomaly_noise is True


def test_generate_cli_recipe_sets_the_starting_noise():
    from dualanodiff_core.cli import generate as cmd_generate

    p = argparse.ArgumentParser()
    cmd_generate.add_arguments(p)
    base = ["--weights", "w", "--base", "b", "--out", "o"]
    assert p.parse_args(base).recipe == "shared-noise"  # the default: the reference's training and zero-mean setting
    assert p.parse_args(base + ["--recipe", "reference"]).zero_mean_anomaly_noise is None
    assert p.parse_args(base + ["--no-zero-mean-anomaly-noise"]).zero_mean_anomaly_noise is False
    assert get_recipe("reference").zero_mean_anomaly_noise is False and get_recipe("ours").zero_mean_anomaly_noise


def test_shared_anomaly_noise_is_correlated_with_the_global_rows_and_still_standard_normal():
    g = torch.Generator().manual_seed(1)
    lat = torch.randn(2 * 400, 4, 8, 8, generator=g)
    same = share_anomaly_noise(lat, 1.0)
    assert torch.equal(same[0::2], lat[0::2]) and torch.equal(same[1::2], lat[0::2])
    assert torch.equal(share_anomaly_noise(lat, 0.0), lat)
    half = share_anomaly_noise(lat, 0.6)
    assert torch.equal(half[0::2], lat[0::2])
    a, b = half[0::2].flatten(), half[1::2].flatten()
    assert float(torch.corrcoef(torch.stack([a, b]))[0, 1]) == pytest.approx(0.6, abs=0.02)
    assert float(b.std()) == pytest.approx(1.0, abs=0.02)
    # off by default, and left out of the recorded settings then (older datasets' settings still match)
    # the default (recipe shared-noise) is recorded; 0 is left out, as datasets from before the option recorded it
    assert SamplingOptions().anomaly_noise_share == 1.0 and SamplingOptions().to_dict()["anomaly_noise_share"] == 1.0
    assert "anomaly_noise_share" not in SamplingOptions(anomaly_noise_share=0.0).to_dict()
    with pytest.raises(ValueError, match="anomaly_noise_share"):
        SamplingOptions(anomaly_noise_share=1.5)


def test_pipeline_draws_shared_anomaly_noise_when_asked():
    """``DualAnoDiffPipeline.generate(anomaly_noise_share=...)`` starts from the seed's noise with the anomaly rows
    replaced as :func:`share_anomaly_noise` says; 0 is the reference's independent noise; given latents are kept."""
    from dualanodiff_core.sd15.pipeline import DualAnoDiffPipeline

    c = tiny_components(seed=0)
    pipe = DualAnoDiffPipeline(c["unet"], c["vae"], c["text_encoder"], c["tokenizer"], c["scheduler_config"], rank=4)
    kw = dict(steps=2, sampler="ddim", height=16, width=16, decode=False)
    h = 16 // pipe.vae_scale_factor
    lat = torch.randn((4, pipe.unet.config.in_channels, h, h), generator=torch.Generator().manual_seed(5))

    def run(**extra):
        r = pipe.generate(2, seed=5, **kw, **extra)
        return torch.cat([r.global_latents, r.anomaly_latents])

    shared = run(anomaly_noise_share=1.0)
    assert torch.equal(shared, run(latents=share_anomaly_noise(lat, 1.0)))
    assert torch.equal(run(anomaly_noise_share=0.0), run(latents=lat))
    assert not torch.equal(shared, run(latents=lat))
    assert torch.equal(run(latents=lat, anomaly_noise_share=1.0), run(latents=lat))
    with pytest.raises(ValueError, match="anomaly_noise_share"):
        run(anomaly_noise_share=1.5)


def test_generate_cli_noise_share_and_visible_mask_options():
    from dualanodiff_core.cli import generate as cmd_generate

    p = argparse.ArgumentParser()
    cmd_generate.add_arguments(p)
    base = ["--weights", "w", "--base", "b", "--out", "o"]
    a = p.parse_args(base)
    assert a.mask_visible == 0.0
    a = p.parse_args(base + ["--anomaly-noise-share", "1", "--mask-visible", "2"])
    assert a.anomaly_noise_share == 1.0 and a.mask_visible == 2.0


def test_generate_cli_noise_settings_follow_the_recipe_unless_given():
    from dualanodiff_core.cli import generate as cmd_generate
    from dualanodiff_core.method.recipes import DEFAULT_RECIPE, get_recipe

    p = argparse.ArgumentParser()
    cmd_generate.add_arguments(p)
    base = ["--weights", "w", "--base", "b", "--out", "o"]

    def noise(*extra):
        return cmd_generate.recipe_noise(p.parse_args(base + list(extra)))

    default = get_recipe(DEFAULT_RECIPE)
    assert noise() == (default.zero_mean_anomaly_noise, default.anomaly_noise_share)
    assert noise("--recipe", "reference") == (False, 0.0)  # the paper: independent, plain Gaussian noise
    assert noise("--recipe", "ours") == (True, 0.0)
    assert noise("--recipe", "shared-noise") == (False, 1.0)
    assert noise("--recipe", "shared-noise", "--anomaly-noise-share", "0.5") == (False, 0.5)
    assert noise("--recipe", "reference", "--anomaly-noise-share", "1", "--zero-mean-anomaly-noise") == (True, 1.0)
    # shared-noise trains like the reference recipe but for the anomaly contrast (faint defects amplified on the
    # anomaly branch's target); with it turned off, the reference's weights serve both
    ref, shared = get_recipe("reference"), get_recipe("shared-noise")
    assert shared.train_settings() == {**ref.train_settings(), "anomaly_contrast": 0.4}
    assert ref.train_settings()["anomaly_contrast"] == 0.0 == get_recipe("ours").anomaly_contrast
    assert (shared.product_prompts, shared.minidefect_cfg) == (ref.product_prompts, ref.minidefect_cfg)


def test_generate_cli_sampler_and_steps_follow_the_recipe_unless_given():
    """The default recipe samples DDIM 50 (measured against PNDM 100 by bench/sampler_cost.py); the reference recipe
    keeps the paper's PNDM 100; given options win; the Python default (SamplingOptions) is the default recipe's."""
    from dualanodiff_core.cli import generate as cmd_generate
    from dualanodiff_core.dataset.generate import REFERENCE_SAMPLER, REFERENCE_STEPS, SamplingOptions
    from dualanodiff_core.method.recipes import DEFAULT_RECIPE, get_recipe

    p = argparse.ArgumentParser()
    cmd_generate.add_arguments(p)
    base = ["--weights", "w", "--base", "b", "--out", "o"]

    def schedule(*extra):
        return cmd_generate.recipe_schedule(p.parse_args(base + list(extra)))

    assert schedule() == ("ddim", 50) == get_recipe(DEFAULT_RECIPE).schedule()
    assert schedule("--recipe", "reference") == ("pndm", 100) == (REFERENCE_SAMPLER, REFERENCE_STEPS)
    assert schedule("--recipe", "ours") == ("pndm", 100)
    assert schedule("--recipe", "reference", "--steps", "30") == ("pndm", 30)
    assert schedule("--sampler", "dpmpp", "--steps", "20") == ("dpmpp", 20)
    assert schedule("--recipe", "reference", "--sampler", "ddim") == ("ddim", 100)
    opts = SamplingOptions()
    assert (opts.sampler, opts.steps) == get_recipe(DEFAULT_RECIPE).schedule()
    assert opts.anomaly_noise_share == get_recipe(DEFAULT_RECIPE).anomaly_noise_share


@pytest.mark.parametrize("recipe", ["reference", "ours", "shared-noise"])
@pytest.mark.parametrize("zero_mean, share", [(None, None), (True, None), (None, 0.5), (False, 0.0)])
def test_generate_cli_and_benchmark_resolve_the_recipe_alike(recipe, zero_mean, share):
    """`dualanodiff generate` and bench/quality.py fall back to the recipe through the same method: the same
    (unset or given) options give the same sampling noise in both."""
    from dualanodiff_core.cli import generate as cmd_generate
    from dualanodiff_core.minidefect.bench import RunSettings, sampling_options

    p = argparse.ArgumentParser()
    cmd_generate.add_arguments(p)
    argv = ["--weights", "w", "--base", "b", "--out", "o", "--recipe", recipe]
    if zero_mean is not None:
        argv.append("--zero-mean-anomaly-noise" if zero_mean else "--no-zero-mean-anomaly-noise")
    if share is not None:
        argv += ["--anomaly-noise-share", str(share)]
    cli = cmd_generate.recipe_noise(p.parse_args(argv))
    opts = sampling_options(RunSettings(recipe=recipe, zero_mean_noise=zero_mean, noise_share=share), 64)
    assert cli == (opts.zero_mean_anomaly_noise, opts.anomaly_noise_share)
    if share is not None:
        assert cli[1] == share
    if zero_mean is not None:
        assert cli[0] is zero_mean


def test_run_settings_variants_get_their_own_folders():
    from dualanodiff_core.minidefect.bench import RunSettings

    d = RunSettings()
    assert d.suffix(d.TRAINING + d.SAMPLING) == ""  # the defaults keep the folders used so far
    v = RunSettings(recipe="reference", lr=1e-3, mask_visible=2.0, noise_share=1.0)
    assert v.suffix(v.TRAINING) == "-lr=0.001"
    assert v.suffix(v.TRAINING + v.SAMPLING) == "-lr=0.001-mask_visible=2-noise_share=1"
    # a recipe's own noise share is no variant of it; another value is
    s = RunSettings(recipe="shared-noise")
    assert s.suffix(s.SAMPLING) == "" and s.resolved_noise_share() == 1.0 and s.to_dict()["noise_share"] == 1.0
    assert RunSettings(recipe="shared-noise", noise_share=1.0).suffix(s.SAMPLING) == ""
    assert RunSettings(recipe="shared-noise", noise_share=0.0).suffix(s.SAMPLING) == "-noise_share=0"
    assert RunSettings(recipe="reference", noise_share=0.0).suffix(s.SAMPLING) == ""
    assert v.mask_options().visible_min_deviation == 2.0 and d.mask_options().visible_min_deviation == 0.0
    # the mask floor: the MiniDefect default unless given; another floor is another generated set
    from dualanodiff_core.minidefect import procedural as md

    f = RunSettings(mask_min_contrast=0.08)
    assert d.mask_options().min_contrast == md.mask_options().min_contrast != 0.08
    assert f.mask_options().min_contrast == 0.08 and f.suffix(f.SAMPLING) == "-mask_min_contrast=0.08"
    assert f.suffix(f.TRAINING) == ""  # same weights


# ---------------------------------------------------------------------------------------------------------------------
# training: offset noise on the anomaly rows, mask-weighted global loss

RES = 16


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_flat(tmp_path_factory.mktemp("defects"), n=4, size=RES)


class _Spy:
    """Wraps a backbone: records x0 and the UNet input/output of one loss computation."""

    def __init__(self, bb):
        self.bb, self.seen = bb, {}

    def __getattr__(self, name):
        return getattr(self.bb, name)

    def encode_images(self, images, generator):
        self.seen["x0"] = self.bb.encode_images(images, generator)
        return self.seen["x0"]

    def denoise(self, x_t, t, context, background=None):
        pred = self.bb.denoise(x_t, t, context, background)
        self.seen.update(x_t=x_t.detach().clone(), t=t.clone(), pred=pred.detach().clone())
        return pred


def _loss(data_root, tmp_path, **kw):
    config = TrainConfig(steps=1, batch_size=2, rank=4, resolution=RES, checkpoint_every=0, **kw).validate()
    ds = DefectDataset(find_defect_set(data_root), RES)
    spy = _Spy(DiffusersTrainingBackbone.build(tiny_components(0), config, base_model="tiny"))
    tr = Trainer(spy, ds, config, tmp_path / f"w{len(kw)}{kw}")
    batch = ds.batch([Draw(0, False, False, 0.5), Draw(1, False, False, 0.5)])
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        loss = tr._loss(batch, gen, torch.tensor([500, 900]))
    spy.seen["ac"] = spy.bb.alphas_cumprod.float()
    return float(loss), spy.seen, batch


def test_offset_noise_shifts_only_the_anomaly_rows_by_a_constant(data_root, tmp_path):
    ref_loss, ref, _ = _loss(data_root, tmp_path)
    _, off, _ = _loss(data_root, tmp_path, anomaly_offset_noise=0.5)
    assert torch.equal(ref["x0"], off["x0"])
    d = off["x_t"] - ref["x_t"]
    assert torch.equal(d[0::2], torch.zeros_like(d[0::2]))  # global rows: the same noise
    per_channel = d[1::2].flatten(2)
    assert per_channel.std(dim=2).max() < 1e-5  # a constant per channel ...
    assert per_channel.mean(dim=2).abs().max() > 1e-3  # ... that is not zero
    # the reference recipe is the plain MSE on the same draws (its random stream is unchanged)
    noise = _noise(ref)
    assert ref_loss == pytest.approx(float(torch.nn.functional.mse_loss(ref["pred"], noise)), rel=1e-4)


def test_shared_training_noise_correlates_the_anomaly_rows_with_the_global_rows(data_root, tmp_path):
    _, ref, _ = _loss(data_root, tmp_path)
    _, same, _ = _loss(data_root, tmp_path, anomaly_noise_share=1.0)
    n_ref, n_same = _noise(ref), _noise(same)
    assert torch.allclose(n_same[0::2], n_ref[0::2], atol=1e-5)  # global rows: the draws of the reference
    assert torch.allclose(n_same[1::2], n_ref[0::2], atol=1e-5)  # anomaly rows: their pair's global noise
    _, half, _ = _loss(data_root, tmp_path, anomaly_noise_share=0.6)
    assert torch.allclose(_noise(half)[1::2], 0.6 * n_ref[0::2] + 0.8 * n_ref[1::2], atol=1e-5)
    with pytest.raises(ValueError, match="anomaly noise share"):
        TrainConfig(anomaly_noise_share=2).validate()


def _noise(seen):
    """The training noise, recovered from x_t = sqrt(abar) x0 + sqrt(1 - abar) noise."""
    abar = seen["ac"][seen["t"]].view(-1, 1, 1, 1)
    return (seen["x_t"] - abar.sqrt() * seen["x0"]) / (1 - abar).sqrt()


def test_mask_weighted_loss_counts_the_defect_more(data_root, tmp_path):
    loss, seen, batch = _loss(data_root, tmp_path, mask_loss_weight=20.0)
    noise = _noise(seen)
    err = (seen["pred"] - noise) ** 2
    w = mask_loss_weights(batch.masks, err.shape[-2:], 20.0)
    assert loss == pytest.approx(float((err * w).sum() / (w.sum() * err.shape[1])), rel=1e-4)
    assert loss != pytest.approx(float(err.mean()), rel=1e-3)


def test_mask_loss_weights():
    m = torch.zeros(2, 1, 16, 16)
    m[0, 0, 0, 0] = 1.0  # one pixel: its whole latent cell counts
    w = mask_loss_weights(m, (8, 8), 20.0)
    assert w.shape == (4, 1, 8, 8)
    assert w[0, 0, 0, 0] == 20.0 and w[0].sum() == 20.0 + 63
    assert torch.equal(w[1], torch.ones(1, 8, 8)) and torch.equal(w[3], torch.ones(1, 8, 8))  # anomaly rows
    assert torch.equal(w[2], torch.ones(1, 8, 8))  # no defect
    with pytest.raises(ValueError, match="mask loss weight"):
        TrainConfig(mask_loss_weight=0.5).validate()
    with pytest.raises(ValueError, match="offset noise"):
        TrainConfig(anomaly_offset_noise=-0.1).validate()


def test_train_cli_recipe_and_overrides():
    from dualanodiff_core.cli import train as cmd_train

    p = argparse.ArgumentParser()
    cmd_train.add_arguments(p)
    base = ["x", "--model", "m", "-o", "w.safetensors"]
    default = cmd_train.config_from_args(p.parse_args(base))
    assert (default.anomaly_offset_noise, default.mask_loss_weight) == (0.0, 1.0)  # the default recipe: reference
    ours = cmd_train.config_from_args(p.parse_args(base + ["--recipe", "ours"]))
    assert (ours.anomaly_offset_noise, ours.mask_loss_weight) == (0.1, 20.0)
    ref = cmd_train.config_from_args(p.parse_args(base + ["--recipe", "reference"]))
    assert (ref.anomaly_offset_noise, ref.mask_loss_weight) == (0.0, 1.0)
    d = TrainConfig()
    assert (d.anomaly_offset_noise, d.mask_loss_weight) == (0.0, 1.0)  # the Python default: the reference
    assert default.anomaly_noise_share == 0.0 and d.anomaly_noise_share == 0.0
    shared = cmd_train.config_from_args(p.parse_args(base + ["--anomaly-noise-share", "1"]))
    assert shared.anomaly_noise_share == 1.0
    mixed = cmd_train.config_from_args(p.parse_args(base + ["--recipe", "reference", "--mask-loss-weight", "5"]))
    assert (mixed.anomaly_offset_noise, mixed.mask_loss_weight) == (0.0, 5.0)
    # the anomaly contrast: the default recipe's 0.4, the reference's 0, the option over either
    assert (default.anomaly_contrast, ref.anomaly_contrast, ours.anomaly_contrast, d.anomaly_contrast) == (
        0.4,
        0.0,
        0.0,
        0.0,
    )
    off = cmd_train.config_from_args(p.parse_args(base + ["--anomaly-contrast", "0"]))
    assert off.anomaly_contrast == 0.0
    on = cmd_train.config_from_args(p.parse_args(base + ["--recipe", "reference", "--anomaly-contrast", "0.25"]))
    assert on.anomaly_contrast == 0.25
    with pytest.raises(ValueError, match="anomaly contrast"):
        cmd_train.config_from_args(p.parse_args(base + ["--anomaly-contrast", "0.9"]))


def test_minidefect_prompts():
    assert minidefect_prompts("woven fabric", get_recipe("ours")) == ("woven fabric with sks", "sks")
    assert minidefect_prompts("woven fabric", get_recipe("reference")) == ("a vfx with sks", "sks")
    with pytest.raises(ValueError, match="--recipe"):
        get_recipe("best")


# ---------------------------------------------------------------------------------------------------------------------
# the benchmark: cache and summary


def test_benchmark_cache_reuses_reference_rows_and_keys_generated_rows(tmp_path):
    torch.set_num_threads(1)
    data = md.write_minidefect(
        tmp_path / "data", md.MiniDefectSpec(seed=1, train_good=8, test_good=3, test_defect=6, products=("fabric",))
    )
    cfg = ev.BenchConfig(
        sources=("real", "cutpaste"),
        seeds=(0,),
        seg=ev.SegConfig(steps=3, batch=4, width=4),
        n_synthetic=6,
        max_diversity_items=5,
        cache_dir=str(tmp_path / "cache"),
    )
    r1 = ev.benchmark(data, "fabric", "hole", None, cfg, log=lambda s: None)
    r2 = ev.benchmark(data, "fabric", "hole", None, cfg, log=lambda s: None)
    assert r1["cached_runs"] == 0 and r2["cached_runs"] == 2
    for src in ("real", "cutpaste"):
        assert r1["usefulness"][src]["scores"] == r2["usefulness"][src]["scores"]
    # other settings or other data: not reused
    import dataclasses

    r3 = ev.benchmark(
        data,
        "fabric",
        "hole",
        None,
        dataclasses.replace(cfg, seg=ev.SegConfig(steps=4, batch=4, width=4)),
        log=lambda s: None,
    )
    assert r3["cached_runs"] == 0
    r4 = ev.benchmark(data, "fabric", "stain", None, cfg, log=lambda s: None)
    assert r4["cached_runs"] == 0


def test_summary_row_and_table():
    def res(cat, defect, aps, hit=(0.5, 1.0), area=(0.02, 0.01)):
        use = {s: {"scores": {"pixel_ap": v}, "std": {"pixel_ap": 0.01}} for s, v in aps.items()}
        return {
            "category": cat,
            "defect": defect,
            "usefulness": use,
            "alignment": {
                "generated": {"hit_rate": hit[0], "mask_area": area[0]},
                "real_held_out": {"hit_rate": hit[1], "mask_area": area[1]},
            },
            "counts": {"generated": 40, "generated_rejected": 8},
        }

    aps = {"generated": 0.6, "real": 0.5, "real+generated": 0.7, "cutpaste": 0.2, "perlin": 0.4}
    rows = [ev.summary_row(res("fabric", "hole", aps)), ev.summary_row(res("metal", "scratch", aps))]
    assert rows[0]["hit_ratio"] == 0.5 and rows[0]["mask_area_ratio"] == 2.0 and rows[0]["pixel_ap"]["perlin"] == 0.4
    table = ev.format_summary(rows)
    assert "| fabric/hole | 0.600 ± 0.010 | 0.500 ± 0.010 | 0.700 ± 0.010 |" in table
    assert "| 0.50 | 2.00 | 40/48 |" in table and "**mean** | 0.600" in table
    assert rows[0]["defects_per_image_ratio"] is None  # results written before the defect count existed
    split = res("fabric", "hole", aps)
    split["alignment"]["generated"].update(defects_per_image=2.5, defect_area=0.008)
    split["alignment"]["real_held_out"].update(defects_per_image=1.0, defect_area=0.01)
    row = ev.summary_row(split)
    assert row["defects_per_image_ratio"] == 2.5 and row["defect_area_ratio"] == pytest.approx(0.8)


# ---------------------------------------------------------------------------------------------------------------------
# end to end on MiniDefect (the shipped base model, a few steps) and the demo's --recipe


def test_train_and_generate_under_each_recipe(tmp_path):
    from dualanodiff_core.method.weights import DualAnoDiffWeights
    from dualanodiff_core.minidefect.bench import RunSettings, train_and_generate

    torch.set_num_threads(1)
    data = md.write_minidefect(
        tmp_path / "data", md.MiniDefectSpec(seed=1, train_good=4, test_good=2, test_defect=6, products=("fabric",))
    )
    logs = []
    for recipe in ("ours", "reference", "shared-noise"):
        s = RunSettings(recipe=recipe, train_steps=2, samples=2, sampling_steps=2)
        info = train_and_generate(data, "fabric", "stain", tmp_path / recipe, s, log=logs.append)
        meta = DualAnoDiffWeights.load(info["weights"]).metadata
        training = json.loads(meta["training"])
        recs = [json.loads(x) for x in (Path(info["generated"]) / "manifest.jsonl").read_text().splitlines()]
        assert len(recs) == 2 and info["accepted"] + info["rejected"] == 2
        if recipe == "ours":
            assert meta["prompt_global"] == "woven fabric with sks"
            assert (training["anomaly_offset_noise"], training["mask_loss_weight"]) == (0.1, 20.0)
            assert all(r["cfg"] == 1.0 and r["zero_mean_anomaly_noise"] for r in recs)
        else:  # shared-noise trains like reference but for the anomaly contrast; it starts from shared noise
            assert meta["prompt_global"] == "a vfx with sks"
            assert (training["anomaly_offset_noise"], training["mask_loss_weight"]) == (0.0, 1.0)
            assert training["anomaly_contrast"] == (0.4 if recipe == "shared-noise" else 0.0)
            assert all(r["cfg"] == 2.5 and not r["zero_mean_anomaly_noise"] for r in recs)
            share = 1.0 if recipe == "shared-noise" else 0.0
            assert all(r["anomaly_noise_share"] == share for r in recs)
        assert all(r["filter"]["alignment"] is not None or r["reason"] == "empty_mask" for r in recs)
    # a second call reuses what is there
    again = train_and_generate(
        data,
        "fabric",
        "stain",
        tmp_path / "reference",
        RunSettings(recipe="reference", train_steps=2, samples=2, sampling_steps=2),
        log=logs.append,
    )
    assert again["accepted"] + again["rejected"] == 2 and any("reusing" in x for x in logs)
    # a sampling variant reuses the weights and writes its own folder; it oversamples towards accept_target
    v = RunSettings(
        recipe="reference",
        train_steps=2,
        samples=2,
        sampling_steps=2,
        accept_target=3,
        mask_visible=2.0,
        noise_share=1.0,
    )
    info = train_and_generate(data, "fabric", "stain", tmp_path / "reference", v, log=logs.append)
    assert info["weights"] == again["weights"] and info["generated"] != again["generated"]
    assert info["generated"].endswith(
        "fabric_stain-train_steps=2-samples=2-sampling_steps=2-mask_visible=2-accept_target=3-noise_share=1"
    )
    assert info["weights"].endswith("fabric_stain-train_steps=2.safetensors")
    n = info["generated_samples"]
    assert info["accepted"] + info["rejected"] == n and (info["accepted"] >= 3 or n == 8) and 2 < n <= 8
    recs = [json.loads(x) for x in (Path(info["generated"]) / "manifest.jsonl").read_text().splitlines()]
    assert len(recs) == n and all(r["settings"]["sampling"]["anomaly_noise_share"] == 1.0 for r in recs)
    assert all(r["mask"]["visible_share"] is not None for r in recs if r["reason"] != "empty_mask")
    # weights kept under a default name are reused only when they were trained with the settings asked for (a
    # changed default, such as the recipe's anomaly contrast, leaves the old file under the same name)
    from dualanodiff_core.errors import InputError

    w = DualAnoDiffWeights.load(info["weights"])
    old = json.loads(w.metadata["training"])
    old["anomaly_contrast"] = 0.2
    DualAnoDiffWeights(w.tensors, {**w.metadata, "training": json.dumps(old)}).save(info["weights"])
    v2 = dataclasses.replace(v, gen_seed=5)
    with pytest.raises(InputError, match=r"other settings \(anomaly_contrast 0\.2 \(now 0\.0\)\); delete"):
        train_and_generate(data, "fabric", "stain", tmp_path / "reference", v2, log=logs.append)


def test_demo_recipe_option():
    from dualanodiff_core.cli import demo as cmd_demo
    from dualanodiff_core.method.recipes import DEFAULT_RECIPE
    from dualanodiff_core.minidefect.bench import sampling_options

    p = argparse.ArgumentParser()
    cmd_demo.add_arguments(p)
    default = cmd_demo.config_from_args(p.parse_args([]))
    # the demo runs what `dualanodiff generate` runs by default: the shared-noise recipe, its noise in every sample
    assert default.recipe == DEFAULT_RECIPE == "shared-noise" and default.cfg == 2.5
    assert sampling_options(cmd_demo._run_settings(default), default.size).anomaly_noise_share == 1.0
    ours = cmd_demo.config_from_args(p.parse_args(["--recipe", "ours"]))
    assert ours.recipe == "ours" and ours.cfg == 1.0
    ref = cmd_demo.config_from_args(p.parse_args(["--recipe", "reference"]))
    assert ref.recipe == "reference" and ref.cfg == 2.5
    assert cmd_demo.config_from_args(p.parse_args(["--recipe", "reference", "--cfg", "3"])).cfg == 3.0
    assert ours.stage_settings("train")["recipe"] == "ours"
    # the recipe's training settings are part of what a rerun compares (OUT/demo.json): weights trained under the
    # same recipe name before its anomaly contrast changed are trained again, not reused
    assert default.stage_settings("train")["recipe_training"]["anomaly_contrast"] == 0.4
    assert ref.stage_settings("generate")["recipe_training"]["anomaly_contrast"] == 0.0
    assert "recipe_training" not in default.stage_settings("dataset")
