"""``dualanodiff train``: help text, a short run from a diffusers folder, resume, refusals and offline single files."""

from __future__ import annotations

import argparse

import pytest
import torch
from defect_data import make_flat, make_mvtec

from dualanodiff_core.cli import build_parser, main
from dualanodiff_core.method.weights import DualAnoDiffWeights


def _train_parser() -> argparse.ArgumentParser:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["train"]


def test_help_explains_every_option(capsys):
    p = _train_parser()
    for action in p._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help and len(action.help) > 15, action.dest
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for word in (
        "--defect",
        "--split",
        "reference",
        "--resume",
        "--bcm",
        "--model-config",
        "--precision",
        "--checkpoint-every",
        "Ctrl-C",
        "ground_truth",
        "x_mask.png",
        "(default: 5000)",
        "(default: 2e-05)",
    ):
        assert word in out, word
    assert "(default: None)" not in out and "(default: True)" not in out and "(default: False)" not in out


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from dualanodiff_core.minidefect.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("model"))


def _args(data, model, out, *extra):
    return [
        "train",
        str(data),
        "--model",
        str(model),
        "-o",
        str(out),
        "--resolution",
        "16",
        "--rank",
        "4",
        "--batch-size",
        "2",
        "--lr",
        "1e-3",
        "--no-progress",
        *extra,
    ]


def test_train_resume_and_refusals(tiny_model, tmp_path, capsys):
    data = make_mvtec(tmp_path / "widget", n=6, size=16)
    out = tmp_path / "scratch.safetensors"
    work = tmp_path / "scratch_train"
    assert (
        main(
            _args(
                data,
                tiny_model,
                out,
                "--defect",
                "scratch",
                "--split",
                "reference",
                "--steps",
                "2",
                "--checkpoint-every",
                "1",
                "--keep-checkpoints",
                "1",
            )
        )
        == 0
    )
    err = capsys.readouterr().err
    assert "split 'reference': 3 of 6" in err and f"weights: {out}" in err
    assert sorted(p.name for p in (work / "checkpoints").iterdir()) == [
        "checkpoint-000002.pt",
        "checkpoint-000002.safetensors",
    ]
    for name in ("loss.csv", "loss.png", "train_config.json"):
        assert (work / name).is_file(), name
    w = DualAnoDiffWeights.load(out)
    assert w.metadata["defect"] == "scratch" and w.metadata["trained_steps"] == "2"
    assert w.metadata["train_image_names"] == '["000", "001", "002"]'

    # the same command again: refused, the earlier run is not touched
    assert main(_args(data, tiny_model, out, "--defect", "scratch", "--split", "reference", "--steps", "2")) == 2
    assert "holds checkpoints of an earlier run (up to step 2). Add --resume" in capsys.readouterr().err
    # resume with more steps extends the run
    assert (
        main(
            _args(
                data,
                tiny_model,
                out,
                "--defect",
                "scratch",
                "--split",
                "reference",
                "--steps",
                "3",
                "--checkpoint-every",
                "1",
                "--keep-checkpoints",
                "1",
                "--resume",
            )
        )
        == 0
    )
    assert DualAnoDiffWeights.load(out).metadata["trained_steps"] == "3"
    assert len((work / "loss.csv").read_text().splitlines()) == 4
    # resume with another setting is refused with the difference named
    assert main(_args(data, tiny_model, out, "--defect", "scratch", "--split", "all", "--steps", "4", "--resume")) == 2
    assert "split: checkpoint 'reference', now 'all'" in capsys.readouterr().err
    # --overwrite starts over
    assert (
        main(
            _args(
                data, tiny_model, out, "--defect", "scratch", "--steps", "1", "--checkpoint-every", "0", "--overwrite"
            )
        )
        == 0
    )
    assert [p.name for p in (work / "checkpoints").glob("*.pt")] == ["checkpoint-000001.pt"]


def test_dry_run_checks_data_without_a_model(tmp_path, capsys):
    data = make_flat(tmp_path / "d", n=3, size=16)
    assert (
        main(
            [
                "train",
                str(data),
                "--model",
                str(tmp_path / "nowhere"),
                "-o",
                str(tmp_path / "o.safetensors"),
                "--dry-run",
                "--resolution",
                "16",
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert "checked 3 image(s): 000, 001, 002" in err
    (data / "masks" / "002.png").unlink()
    assert main(["train", str(data), "--model", "x", "-o", str(tmp_path / "o.safetensors"), "--dry-run"]) == 2
    assert "002.png: image without mask" in capsys.readouterr().err


def test_single_file_checkpoint_offline_gives_clear_instructions(tmp_path, capsys, monkeypatch):
    from safetensors.torch import save_file

    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf_home"))  # nothing cached
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty_hf_home" / "hub"))
    ckpt = tmp_path / "my_sd15.safetensors"
    save_file(
        {
            "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(320, 768),
            "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": torch.zeros(77, 768),
        },
        str(ckpt),
    )
    data = make_flat(tmp_path / "d", n=2, size=16)
    assert main(_args(data, ckpt, tmp_path / "o.safetensors", "--steps", "1")) == 2
    err = capsys.readouterr().err
    assert "cannot load this single-file checkpoint offline" in err
    assert "from_single_file" in err and "save_pretrained" in err and "model config" in err

    ours = tmp_path / "ours.safetensors"
    DualAnoDiffWeights({"unet.a.attn1.to_q_lora.0.down.weight": torch.zeros(4, 8)}).save(ours)
    assert main(_args(data, ours, tmp_path / "o.safetensors", "--steps", "1")) == 2
    assert "DualAnoDiff/LoRA weights file, not a base model" in capsys.readouterr().err


def test_bad_output_name_and_missing_model(tmp_path, capsys):
    data = make_flat(tmp_path / "d", n=2, size=16)
    assert main(["train", str(data), "--model", "m", "-o", str(tmp_path / "o.bin")]) == 2
    assert "use a name ending in .safetensors" in capsys.readouterr().err
    assert main(_args(data, tmp_path / "no_model", tmp_path / "o.safetensors", "--steps", "1")) == 2
    assert "no_model: not a folder" in capsys.readouterr().err


def test_single_file_checkpoint_loads_offline_with_a_local_config_folder(tiny_model, tmp_path, capsys, monkeypatch):
    """A single-file (original layout) checkpoint + --model-config <diffusers folder>: loads offline, bit-exact."""
    import shutil

    from ldm_checkpoint import same_weights, write_ldm_checkpoint

    from dualanodiff_core.sd15.loading import ModelLoadError, load_diffusers_components
    from dualanodiff_core.sd15.single_file import load_single_file_components

    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf_home"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty_hf_home" / "hub"))
    config_dir = shutil.copytree(tiny_model, tmp_path / "sd15_config")
    ckpt = write_ldm_checkpoint(config_dir, tmp_path / "my_sd15.safetensors")
    comps = load_single_file_components(ckpt, config_dir=config_dir)
    ref = load_diffusers_components(tiny_model)
    for k in ("unet", "vae", "text_encoder"):
        assert same_weights(comps[k], ref[k]), k
    assert len(comps["tokenizer"]) == len(ref["tokenizer"])
    with pytest.raises(ModelLoadError, match="not a diffusers Stable Diffusion folder"):
        load_single_file_components(ckpt, config_dir=tmp_path)

    data = make_flat(tmp_path / "d", n=2, size=16)
    out = tmp_path / "o.safetensors"
    assert main(_args(data, ckpt, out, "--model-config", str(config_dir), "--steps", "1")) == 0
    assert DualAnoDiffWeights.load(out).metadata["base_model"] == str(ckpt)
    assert main(_args(data, tiny_model, tmp_path / "p.safetensors", "--model-config", str(config_dir))) == 2
    assert "--model-config is only for single-file checkpoints" in capsys.readouterr().err


def test_ctrl_c_stops_after_the_step_with_a_checkpoint_and_resume_finishes(tiny_model, tmp_path, capsys, monkeypatch):
    import os
    import signal

    from dualanodiff_core.training.trainer import Trainer

    data = make_flat(tmp_path / "d", n=2, size=16)
    out = tmp_path / "o.safetensors"
    real_step = Trainer.train_step

    def step_then_interrupt(self):
        result = real_step(self)
        if self.step == 0:  # during the first step: as if the user pressed Ctrl-C now
            os.kill(os.getpid(), signal.SIGINT)
        return result

    monkeypatch.setattr(Trainer, "train_step", step_then_interrupt)
    handler = signal.getsignal(signal.SIGINT)
    assert main(_args(data, tiny_model, out, "--steps", "3", "--checkpoint-every", "0")) == 130
    assert signal.getsignal(signal.SIGINT) is handler  # restored
    err = capsys.readouterr().err
    assert "stopping after this step" in err and "stopped at step 1/3" in err and "plus --resume" in err
    assert not out.exists()
    assert [p.name for p in (tmp_path / "o_train" / "checkpoints").glob("*.pt")] == ["checkpoint-000001.pt"]
    monkeypatch.setattr(Trainer, "train_step", real_step)
    assert main(_args(data, tiny_model, out, "--steps", "3", "--checkpoint-every", "0", "--resume")) == 0
    assert DualAnoDiffWeights.load(out).metadata["trained_steps"] == "3"
