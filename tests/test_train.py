"""The training loop on tiny in-process models: learning, bit-identical resume, stop requests, checkpoints, BCM,
gradient checkpointing, and trained weights generating through DualAnoDiffPipeline."""

from __future__ import annotations

import json

import pytest
import torch
from defect_data import make_flat
from PIL import Image

from dualanodiff_core.method.attention import MODE_DUAL
from dualanodiff_core.method.weights import DualAnoDiffWeights
from dualanodiff_core.minidefect.tiny import tiny_components
from dualanodiff_core.sd15.training import DiffusersTrainingBackbone, train_from_folder
from dualanodiff_core.training.data import DefectDataset, find_defect_set
from dualanodiff_core.training.trainer import (
    CheckpointError,
    TrainConfig,
    Trainer,
    TrainingError,
    list_checkpoints,
    load_checkpoint,
)

RES = 16  # 16 px images -> 8x8 latents with the tiny VAE


def small_config(**kw) -> TrainConfig:
    base = dict(
        steps=6, batch_size=2, learning_rate=5e-3, rank=4, resolution=RES, checkpoint_every=3, keep_checkpoints=0
    )
    base.update(kw)
    return TrainConfig(**base)


def make_trainer(data_root, work_dir, config: TrainConfig, **kw) -> Trainer:
    ds = DefectDataset(find_defect_set(data_root), config.resolution, flips=config.flips, backgrounds=config.bcm)
    backbone = DiffusersTrainingBackbone.build(tiny_components(0), config, base_model="tiny")
    return Trainer(backbone, ds, config, work_dir, **kw)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_flat(tmp_path_factory.mktemp("defects"), n=4, size=RES, object_masks=True)


def test_loss_falls_on_a_few_shot_set(data_root, tmp_path):
    config = small_config(steps=30, checkpoint_every=0, checkpoint_weights=False)
    tr = make_trainer(data_root, tmp_path / "w", config)
    before = tr.evaluation_loss(n_timesteps=4)
    result = tr.run()
    after = tr.evaluation_loss(n_timesteps=4)
    losses = [h["loss"] for h in result.history]
    assert result.completed and len(losses) == 30
    assert after < 0.85 * before, (before, after)  # fixed-input loss (seeded: the same on every run)
    assert sum(losses[-10:]) / 10 < 0.9 * sum(losses[:10]) / 10, losses
    # the loss log and curve are on disk
    csv = (tmp_path / "w" / "loss.csv").read_text().splitlines()
    assert csv[0] == "step,loss,lr,grad_norm,seconds" and len(csv) == 31
    assert float(csv[-1].split(",")[1]) == pytest.approx(losses[-1], rel=1e-6)
    with Image.open(tmp_path / "w" / "loss.png") as im:
        assert im.size == (800, 450)
        assert len(set(im.convert("RGB").getdata())) > 3  # a curve, not a blank canvas


def _all_state(tr: Trainer) -> dict:
    return {n: p.detach().clone() for n, p in zip(tr.param_names, tr.params)}


def test_resume_is_bit_identical_and_stop_leaves_a_checkpoint(data_root, tmp_path):
    """BCM on, text encoder on, flips on: an interrupted + resumed run equals an uninterrupted one bit for bit."""
    config = small_config(steps=4, bcm=True, checkpoint_every=0)
    full = make_trainer(data_root, tmp_path / "full", config)
    res_full = full.run()
    assert res_full.completed

    stop_after = 2  # between checkpoints (checkpoint_every=0): the stop itself must write one
    part = make_trainer(data_root, tmp_path / "part", config, should_stop=lambda: part.step >= stop_after)
    res_part = part.run()
    assert res_part.stopped and not res_part.completed and res_part.step == stop_after
    assert res_part.weights is None and res_part.output is None
    assert res_part.checkpoint == tmp_path / "part" / "checkpoints" / "checkpoint-000002.pt"
    state = load_checkpoint(res_part.checkpoint)  # loadable (weights_only) and complete
    assert state["step"] == stop_after
    w = DualAnoDiffWeights.load(res_part.checkpoint.with_suffix(".safetensors"))
    assert w.has_bcm and w.has_saim and w.has_text and w.metadata["trained_steps"] == "2"

    resumed = make_trainer(data_root, tmp_path / "part", config)  # a fresh model and optimizer
    res_resumed = resumed.run(resume=tmp_path / "part")  # the newest checkpoint of the work dir
    assert res_resumed.completed and res_resumed.step == config.steps
    a, b = _all_state(full), _all_state(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [h["loss"] for h in res_full.history] == [h["loss"] for h in res_resumed.history]
    for k, v in res_full.weights.tensors.items():
        assert torch.equal(v, res_resumed.weights.tensors[k]), k


def test_checkpoints_every_n_steps_keep_last_k(data_root, tmp_path):
    config = small_config(steps=3, checkpoint_every=1, keep_checkpoints=2)
    seen = []
    tr = make_trainer(
        data_root, tmp_path / "w", config, output=tmp_path / "out.safetensors", progress=lambda p: seen.append(p)
    )
    res = tr.run()
    assert [s for s, _ in list_checkpoints(tmp_path / "w")] == [2, 3]
    names = sorted(p.name for p in (tmp_path / "w" / "checkpoints").iterdir())
    assert names == [
        "checkpoint-000002.pt",
        "checkpoint-000002.safetensors",
        "checkpoint-000003.pt",
        "checkpoint-000003.safetensors",
    ]  # no temp files left
    assert [p.step for p in seen] == [1, 2, 3]
    assert all(p.checkpoint is not None for p in seen)
    assert all(p.rate > 0 and p.eta_seconds >= 0 and p.total_steps == 3 for p in seen)
    assert seen[-1].eta_seconds == 0
    assert res.output == tmp_path / "out.safetensors"
    w = DualAnoDiffWeights.load(res.output)
    md = w.metadata
    assert md["rank"] == "4" and md["prompt_global"] == "a vfx with sks" and md["prompt_anomaly"] == "sks"
    assert md["base_model"] == "tiny" and md["trained_steps"] == "3" and md["train_images"] == "4"
    training = json.loads(md["training"])
    assert training["learning_rate"] == 5e-3 and training["batch_size"] == 2 and training["resolution"] == RES
    assert not w.has_bcm and w.has_saim and w.has_text


def test_resume_refuses_other_settings_or_changed_data(data_root, tmp_path):
    root = make_flat(tmp_path / "data", n=3, size=RES)
    config = small_config(steps=1, checkpoint_every=1)
    make_trainer(root, tmp_path / "w", config).run()
    ckpt = tmp_path / "w" / "checkpoints" / "checkpoint-000001.pt"
    with pytest.raises(CheckpointError, match=r"other settings \(learning_rate: checkpoint 0\.005, now 0\.001\)"):
        make_trainer(root, tmp_path / "w", small_config(steps=4, checkpoint_every=1, learning_rate=1e-3)).run(ckpt)
    # more steps and other checkpoint options are fine
    res = make_trainer(root, tmp_path / "w", small_config(steps=2, checkpoint_every=0, keep_checkpoints=1)).run(ckpt)
    assert res.completed and res.step == 2
    with pytest.raises(CheckpointError, match=r"at step 2, but only 1 step\(s\) were asked for"):
        make_trainer(root, tmp_path / "w", config).run(tmp_path / "w")
    Image.new("L", (RES, RES), 255).save(root / "masks" / "001.png")
    with pytest.raises(CheckpointError, match=r"training data changed since this checkpoint \(mask masks/001\.png\)"):
        make_trainer(root, tmp_path / "w", small_config(steps=4)).run(tmp_path / "w")
    assert not ckpt.exists()  # keep_checkpoints=1 pruned it
    with pytest.raises(CheckpointError, match="not a DualAnoDiff training checkpoint"):
        load_checkpoint(tmp_path / "w" / "checkpoints" / "checkpoint-000002.safetensors")


def test_gradient_checkpointing_gives_the_same_gradients_with_bcm(data_root):
    """The BCM record pass and main pass recompute with their own attention mode during backward."""
    grads = []
    for gc in (False, True):
        config = small_config(bcm=True, gradient_checkpointing=gc)
        ds = DefectDataset(find_defect_set(data_root), RES, backgrounds=True)
        bb = DiffusersTrainingBackbone.build(tiny_components(0), config)
        tr = Trainer(bb, ds, config, "unused")
        loss = tr.compute_loss()
        loss.backward()
        assert bb.pipe.dual.control.mode == MODE_DUAL and bb.pipe.dual.control.bcm_cache is None
        grads.append({n: p.grad for n, p in bb.trainable_parameters()})
    assert grads[0].keys() == grads[1].keys()
    # BCM's alpha gets a gradient in every self-attention; cross-attention layers carry unused BCM tensors (as the
    # reference) that get none
    alphas = [n for n in grads[0] if n.endswith("temporal_a")]
    assert all((grads[0][n] is None) == (".attn2." in n) for n in alphas)
    assert all(grads[0][n].abs().sum() > 0 for n in alphas if ".attn1." in n)
    without_grad = sorted(n for n, g in grads[0].items() if g is None)
    assert without_grad and all(".attn2." in n and ("temporal_a" in n or "condition_mlp" in n) for n in without_grad)
    for n, g in grads[0].items():
        if g is None:
            assert grads[1][n] is None, n
        else:
            assert torch.allclose(g, grads[1][n], rtol=1e-4, atol=1e-7), n


def test_trainable_set_matches_the_reference(data_root):
    config = small_config(bcm=True)
    bb = DiffusersTrainingBackbone.build(tiny_components(0), config)
    names = [n for n, _ in bb.trainable_parameters()]
    unet_layers = {n.split(".to_")[0].split(".temporal_")[0] for n in names if n.startswith("unet.")}
    assert len(unet_layers) == len(bb.pipe.dual.processors)  # every attention layer
    for part in (
        "to_q_lora.0.down",
        "to_q_lora.1.up",
        "to_out_lora.1.down",
        "temporal_q.weight",
        "temporal_n.bias",
        "temporal_condition_mlp.1.weight",
        "temporal_a",
    ):
        assert any(part in n for n in names), part
    assert any(n.startswith("text_encoder.") and "to_v_lora.up" in n for n in names)
    assert all(p.requires_grad and p.dtype == torch.float32 for _, p in bb.trainable_parameters())
    base = [p for p in bb.pipe.unet.parameters() if not any(p is q for _, q in bb.trainable_parameters())]
    assert base and not any(p.requires_grad for p in base)
    no_text = DiffusersTrainingBackbone.build(tiny_components(0), small_config(train_text_encoder=False))
    assert not any(n.startswith("text_encoder.") for n, _ in no_text.trainable_parameters())


def test_saim_zero_init_and_mixed_precision(data_root, tmp_path):
    config = small_config(steps=1, saim_zero_init=True, precision="bf16", checkpoint_every=0)
    tr = make_trainer(data_root, tmp_path / "w", config)
    procs = tr.backbone.pipe.dual.processors.values()
    assert all(float(p.temporal_o.weight.detach().abs().sum()) == 0 for p in procs)
    assert tr.backbone.pipe.unet.conv_in.weight.dtype == torch.bfloat16
    assert tr.backbone.pipe.vae.encoder.conv_in.weight.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in tr.params)
    res = tr.run()
    assert res.completed and all(p.dtype == torch.float32 for p in res.weights.tensors.values())
    default = DiffusersTrainingBackbone.build(tiny_components(0), small_config())
    assert all(float(p.temporal_o.weight.detach().abs().sum()) > 0 for p in default.pipe.dual.processors.values())


class _NaNBackbone:
    """A wrapping backbone: the protocol is small enough to decorate (here: a diverging model)."""

    def __init__(self, inner):
        self.inner = inner
        self.device, self.alphas_cumprod = inner.device, inner.alphas_cumprod
        self.prediction_type, self.base_model = inner.prediction_type, "nan"

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def denoise(self, *a, **kw):
        return self.inner.denoise(*a, **kw) * float("nan")


def test_non_finite_loss_stops_with_a_clear_error(data_root, tmp_path):
    config = small_config(steps=3)
    ds = DefectDataset(find_defect_set(data_root), RES)
    bb = _NaNBackbone(DiffusersTrainingBackbone.build(tiny_components(0), config))
    with pytest.raises(TrainingError, match=r"loss became nan at step 1.*Lower the learning rate"):
        Trainer(bb, ds, config, tmp_path / "w").run()


def test_training_works_when_called_under_inference_mode(data_root, tmp_path):
    """ComfyUI executes nodes under torch.inference_mode(); the loop turns autograd back on for itself."""
    config = small_config(steps=1, checkpoint_every=0, checkpoint_weights=False)
    tr = make_trainer(data_root, tmp_path / "w", config)
    before = {n: p.detach().clone() for n, p in zip(tr.param_names, tr.params)}
    with torch.inference_mode():
        res = tr.run()
    assert res.completed
    changed = [n for n, p in zip(tr.param_names, tr.params) if not torch.equal(p.detach(), before[n])]
    assert len(changed) > len(before) // 2


def test_an_incomplete_backbone_is_named(data_root, tmp_path):
    class Half:
        device = torch.device("cpu")

        def denoise(self, *a):
            raise AssertionError

    ds = DefectDataset(find_defect_set(data_root), RES)
    with pytest.raises(
        TypeError,
        match="Half is not a TrainingBackbone: it lacks alphas_cumprod, prediction_type, "
        "trainable_parameters, encode_prompts, encode_images, encode_backgrounds, "
        "to_weights",
    ):
        Trainer(Half(), ds, small_config(), tmp_path)


def test_trained_weights_load_into_the_pipeline_and_generate(tmp_path):
    """Train from a diffusers folder on disk (BCM on), then generate with DualAnoDiffPipeline from the file."""
    from dualanodiff_core.minidefect.tiny import save_tiny_model
    from dualanodiff_core.sd15.pipeline import DualAnoDiffPipeline

    model = save_tiny_model(tmp_path / "model")
    data = make_flat(tmp_path / "data", n=3, size=RES, object_masks=True)
    out = tmp_path / "defect.safetensors"
    res = train_from_folder(find_defect_set(data), model, out, small_config(steps=2, bcm=True, checkpoint_every=0))
    assert res.completed and out.is_file()
    pipe = DualAnoDiffPipeline.from_pretrained(model, out)
    trained = res.weights.tensors
    for k, v in pipe.to_weights().tensors.items():
        assert torch.equal(v, trained[k]), k
    assert pipe.metadata["base_model"] == str(model)
    bg = torch.zeros(1, 3, RES, RES)
    r = pipe.generate(2, steps=2, cfg=2.0, seed=0, height=RES, width=RES, background=bg)
    assert r.global_images.shape == (2, 3, RES, RES) and r.anomaly_images.shape == (2, 3, RES, RES)
    assert torch.isfinite(r.global_images).all() and torch.isfinite(r.anomaly_images).all()


def test_training_settings_leave_out_only_checkpoint_bookkeeping():
    """What the weights record as ``training`` and what a reused weights file must match: every setting that changes
    what is learnt, none of the checkpoint options."""
    base = TrainConfig(steps=3).training_settings()
    assert TrainConfig(
        steps=3, checkpoint_every=7, keep_checkpoints=2, checkpoint_weights=True
    ).training_settings() == (base)
    assert set(TrainConfig().to_dict()) - set(base) == set(TrainConfig.BOOKKEEPING)
    assert TrainConfig(steps=3, anomaly_contrast=0.2).training_settings() != base
    assert TrainConfig.from_dict(base).training_settings() == base  # the recorded settings read back as a config
