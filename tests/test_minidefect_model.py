"""The shipped MiniDefect base model: complete, small, loads offline with DualAnoDiffPipeline, generates, follows
its prompts; and the pre-training code is deterministic."""

import dataclasses
import hashlib
import json

import numpy as np
import pytest
import torch

from dualanodiff_core.minidefect import pretrain as mp
from dualanodiff_core.minidefect import procedural as md
from dualanodiff_core.sd15.pipeline import DualAnoDiffPipeline

MODEL = md.base_model_dir()


def test_shipped_model_is_complete_and_small():
    files = [p for p in MODEL.rglob("*") if p.is_file()]
    total = sum(p.stat().st_size for p in files)
    assert total <= 25 * 1024 * 1024, f"{total / 1e6:.1f} MB"
    record = json.loads((MODEL / "pretrain.json").read_text())
    # every file is the one the pre-training run wrote
    for rel, digest in record["sha256"].items():
        assert hashlib.sha256((MODEL / rel).read_bytes()).hexdigest() == digest, rel
    assert {"unet", "vae", "text_encoder", "tokenizer", "scheduler"} <= {p.name for p in MODEL.iterdir()}
    assert not any(p.suffix in (".bin", ".ckpt", ".pt") for p in files), "weights must be safetensors"
    assert record["config"]["seed"] == 0 and record["seconds"]["total"] > 0


def test_docs_give_the_command_that_made_the_shipped_model():
    """docs/minidefect.md tells how to reproduce the shipped files: that command must be the one pretrain.json
    records (the shipped model is v2: the wider VAE and offset noise), and the mask floor the docs pair with it is
    the MiniDefect default."""
    record = json.loads((MODEL / "pretrain.json").read_text())
    docs = (MODEL.parents[2] / "docs" / "minidefect.md").read_text()
    commands = [" ".join(block.replace("\\\n", " ").split()) for block in docs.split("```bash")[1:]]
    commands = [c.split("```")[0].strip() for c in commands]
    assert " ".join(record["command"].split()) in commands
    assert "vae_reused_from" not in record  # one run of the script, not a stage reused from elsewhere
    assert record["config"]["vae_channels"] == "48,96,96" and record["config"]["unet_offset_noise"] == 0.1
    assert md.mask_options().min_contrast == 0.05


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    return DualAnoDiffPipeline.from_pretrained(MODEL, rank=4)


def test_loads_offline_and_generates_pairs(pipe):
    assert len(pipe.tokenizer) == 514
    assert pipe.vae_scale_factor == 4
    r = pipe.generate(2, steps=4, height=64, width=64, seed=0, sampler="ddim")
    assert r.global_images.shape == (2, 3, 64, 64) and r.anomaly_images.shape == (2, 3, 64, 64)
    assert torch.isfinite(r.global_images).all()
    assert 0.0 <= float(r.global_images.min()) and float(r.global_images.max()) <= 1.0
    again = pipe.generate(2, steps=4, height=64, width=64, seed=0, sampler="ddim")
    assert torch.equal(r.global_images, again.global_images)


def _chroma(images: torch.Tensor) -> float:
    return float((images.amax(1) - images.amin(1)).mean())


def test_base_model_draws_the_product_it_is_asked_for(pipe):
    """Plain text-to-image with the base model: 'woven fabric' images are colourful, 'brushed metal' images are
    nearly gray, as in the real normal images (guidance makes both more saturated than the real ones)."""
    prompts = ["brushed metal"] * 4 + ["woven fabric"] * 4
    imgs = mp.sample_base(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, prompts, steps=15, seed=1)
    metal, fabric = imgs[:4], imgs[4:]
    real_metal = (
        torch.from_numpy(np.stack([md.normal_image("metal", 0, "test", i)[0] for i in range(8)])).permute(0, 3, 1, 2)
        / 255
    )
    real_fabric = (
        torch.from_numpy(np.stack([md.normal_image("fabric", 0, "test", i)[0] for i in range(8)])).permute(0, 3, 1, 2)
        / 255
    )
    assert _chroma(real_metal) < 0.5 * _chroma(real_fabric)
    assert _chroma(metal) < 0.5 * _chroma(fabric)
    assert _chroma(metal) < 0.6 * _chroma(real_fabric) and _chroma(fabric) > 1.2 * _chroma(real_metal)


def test_pretraining_is_deterministic():
    torch.set_num_threads(1)
    cfg = mp.PretrainConfig(vae_steps=2, vae_batch=2, unet_steps=2, unet_batch=2, warmup=1, log_every=100)
    data = mp.to_tensor(np.stack([md.normal_image("metal", 0, "pretrain", i)[0] for i in range(4)]))
    states = []
    for _ in range(2):
        vae, unet, text, tok = mp.build_models(0)
        mp.train_vae(vae, data, cfg, log=lambda s: None)
        means, stds = mp.encode_pool(vae, data)
        mp.train_unet(unet, text, tok, means, stds, lambda i, rng: "brushed metal", cfg, 0.33, log=lambda s: None)
        states.append(
            {
                **{f"v.{k}": v for k, v in vae.state_dict().items()},
                **{f"u.{k}": v for k, v in unet.state_dict().items()},
            }
        )
    # offset noise in the UNet stage is a different run (and off by default)
    assert mp.PretrainConfig().unet_offset_noise == 0
    vae, unet, text, tok = mp.build_models(0)
    mp.train_vae(vae, data, cfg, log=lambda s: None)
    means, stds = mp.encode_pool(vae, data)
    off = dataclasses.replace(cfg, unet_offset_noise=0.1)
    mp.train_unet(unet, text, tok, means, stds, lambda i, rng: "brushed metal", off, 0.33, log=lambda s: None)
    assert any(not torch.equal(v, states[0]["u." + k]) for k, v in unet.state_dict().items())
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    fresh = mp.build_models(0)[1].state_dict()
    assert any(not torch.equal(fresh[k], states[0]["u." + k]) for k in fresh), "training changed nothing"


def test_pretraining_another_architecture_end_to_end(tmp_path):
    """The pre-training script with a wider VAE (the capacity lever): a tiny run writes a complete model folder
    with that architecture, recorded in pretrain.json, that DualAnoDiffPipeline loads and samples from."""
    torch.set_num_threads(1)
    out = tmp_path / "model"
    argv = ["--out", str(out), "--pool", "3", "--clutter", "4", "--vae-steps", "2", "--vae-batch", "2"]
    argv += ["--unet-steps", "2", "--unet-batch", "2", "--warmup", "1", "--log-every", "100"]
    argv += ["--vae-channels", "48,96,96", "--vae-layers", "2"]
    assert mp.main(argv) == 0
    record = json.loads((out / "pretrain.json").read_text())
    assert record["vae_config"]["block_out_channels"] == [48, 96, 96] and record["vae_config"]["layers_per_block"] == 2
    assert record["unet_config"]["block_out_channels"] == [32, 64, 64]  # the shipped UNet unless told otherwise
    assert record["config"]["vae_channels"] == "48,96,96" and "--vae-channels 48,96,96" in record["command"]
    assert record["device"] == "cpu" and record["device_name"] == "cpu"
    for rel, digest in record["sha256"].items():
        assert hashlib.sha256((out / rel).read_bytes()).hexdigest() == digest, rel
    vae_config = json.loads((out / "vae" / "config.json").read_text())
    assert vae_config["block_out_channels"] == [48, 96, 96] and vae_config["layers_per_block"] == 2
    p = DualAnoDiffPipeline.from_pretrained(out, rank=4)
    assert p.vae_scale_factor == 4
    r = p.generate(1, steps=2, height=64, width=64, seed=0, sampler="ddim")
    assert r.global_images.shape == r.anomaly_images.shape == (1, 3, 64, 64)
    assert torch.isfinite(r.global_images).all() and torch.isfinite(r.anomaly_images).all()
    # the default architecture is still the shipped one
    assert mp.PretrainConfig().vae_config() == mp.VAE_CONFIG and mp.PretrainConfig().unet_config() == mp.UNET_CONFIG


@pytest.mark.parametrize(
    "option, value", [("--vae-channels", "32,64"), ("--unet-channels", "32,60,64"), ("--vae-layers", "0")]
)
def test_pretraining_rejects_a_bad_architecture(tmp_path, capsys, option, value):
    with pytest.raises(SystemExit) as e:
        mp.main(["--out", str(tmp_path / "m"), option, value])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert option in err and value in err and "Traceback" not in err
    assert not (tmp_path / "m").exists()


def _tiny_pretrain_argv(out) -> list[str]:
    argv = ["--out", str(out), "--pool", "3", "--clutter", "4", "--vae-steps", "2", "--vae-batch", "2"]
    return argv + ["--unet-steps", "2", "--unet-batch", "2", "--warmup", "1", "--log-every", "100"]


def test_pretraining_reuses_a_vae_stage_bit_exactly(tmp_path, capsys):
    """--vae-from skips stage 1: with the same settings the model files are those of the whole run, bit for bit;
    with another UNet stage the VAE is kept and the record names where it came from."""
    torch.set_num_threads(1)
    whole, again, longer = tmp_path / "whole", tmp_path / "again", tmp_path / "longer"
    assert mp.main(_tiny_pretrain_argv(whole)) == 0
    assert mp.main(_tiny_pretrain_argv(again) + ["--vae-from", str(whole)]) == 0
    first = json.loads((whole / "pretrain.json").read_text())
    second = json.loads((again / "pretrain.json").read_text())
    assert first["sha256"] == second["sha256"]  # every file of the model, the VAE and the UNet stage's
    assert "vae_reused_from" not in first
    assert second["vae_reused_from"]["folder"] == str(whole)
    assert second["vae_reused_from"]["sha256"] == first["sha256"][mp.VAE_WEIGHTS]
    assert second["scaling_factor"] == first["scaling_factor"] and "--vae-from" in second["command"]
    assert second["final_loss"]["vae"] == first["final_loss"]["vae"]  # strict JSON: no NaN for the skipped stage
    json.loads((again / "pretrain.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in pretrain.json"))
    argv = _tiny_pretrain_argv(longer)
    argv[argv.index("--unet-steps") + 1] = "3"
    assert mp.main(argv + ["--vae-from", str(whole)]) == 0
    third = json.loads((longer / "pretrain.json").read_text())
    assert third["sha256"][mp.VAE_WEIGHTS] == first["sha256"][mp.VAE_WEIGHTS]
    unet = "unet/diffusion_pytorch_model.safetensors"
    assert third["sha256"][unet] != first["sha256"][unet]


def test_pretraining_refuses_a_vae_from_other_settings(tmp_path, capsys):
    torch.set_num_threads(1)
    whole = tmp_path / "whole"
    assert mp.main(_tiny_pretrain_argv(whole)) == 0
    capsys.readouterr()
    cases = [
        (["--vae-steps", "3"], "vae_steps 2 (this run: 3)"),
        (["--vae-channels", "48,96,96"], "vae_channels '32,64,64' (this run: '48,96,96')"),
    ]
    for extra, said in cases:
        with pytest.raises(SystemExit) as e:
            mp.main(_tiny_pretrain_argv(tmp_path / "x") + extra + ["--vae-from", str(whole)])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert said in err and str(whole) in err and "Traceback" not in err
    # not a pre-training folder; an edited VAE file
    for folder, said in ((tmp_path, "not a model folder"), (whole, "does not match the sha256")):
        if folder == whole:
            w = whole / mp.VAE_WEIGHTS
            w.write_bytes(w.read_bytes()[:-1] + bytes([w.read_bytes()[-1] ^ 1]))
        with pytest.raises(SystemExit) as e:
            mp.main(_tiny_pretrain_argv(tmp_path / "x") + ["--vae-from", str(folder)])
        assert e.value.code == 2 and said in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
