"""Training inside ComfyUI on tiny in-process models: the backbone under inference mode, learning, the text-encoder
LoRA's gradient, interrupt + resume through the node, and the written weights loading and generating."""

import importlib
import json
import logging

import comfy_env as ce
import pytest
import torch
from defect_data import make_flat

RES = 32  # 32 px images -> 4x4 latents with TAESD


def _inference_models():
    """MODEL, CLIP and VAE whose weights are inference tensors, as ComfyUI's loaders make them."""
    with torch.inference_mode():
        m, c, v = ce.tiny_model(0), ce.tiny_clip(1), ce.tiny_vae(2)
    assert next(m.model.diffusion_model.parameters()).is_inference()
    assert next(c.cond_stage_model.parameters()).is_inference()
    return m, c, v


def _config(env, model, **kw):
    base = dict(
        steps=4,
        batch_size=2,
        learning_rate=5e-3,
        rank=4,
        resolution=RES,
        checkpoint_every=0,
        keep_checkpoints=0,
        precision=env.comfy_train.plan_precision(model)[1],
    )
    base.update(kw)
    return env.core_train.TrainConfig(**base)


def _dataset(env, root, config):
    ds = env.core_data.find_defect_set(root)
    return env.core_data.DefectDataset(ds, config.resolution, backgrounds=config.bcm)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_flat(tmp_path_factory.mktemp("defects"), n=3, size=RES, object_masks=True)


def _train_node(env, hidden_id="9", **kw):
    args = dict(
        folder="toy",
        defect="",
        output_name="toy",
        steps=4,
        learning_rate=5e-3,
        rank=4,
        batch_size=2,
        resolution=RES,
        seed=3,
        resume=True,
        train_text_encoder=True,
        bcm=False,
        split="all",
        checkpoint_every=0,
    )
    args.update(kw)
    node = env.train.DualAnoDiffTrainer.PREPARE_CLASS_CLONE({"UNIQUE_ID": hidden_id})
    with torch.inference_mode():
        return node.execute(**args)


def test_a_training_step_runs_under_inference_mode_and_reaches_every_tensor(env, data_root, tmp_path):
    model, clip, vae = _inference_models()
    config = _config(env, model, bcm=True)
    with torch.inference_mode():  # as ComfyUI runs nodes
        with torch.inference_mode(False):
            bb = env.comfy_train.ComfyTrainingBackbone(model, clip, vae, config)
            try:
                bb.load()
                tr = env.core_train.Trainer(bb, _dataset(env, data_root, config), config, tmp_path / "w")
                loss = tr.compute_loss()
                loss.backward()
            finally:
                bb.release()
    names = [n for n, _ in bb.trainable_parameters()]
    assert any(n.startswith("text_encoder.text_model.encoder.layers.1.self_attn.to_out_lora") for n in names)
    assert any(n.endswith("temporal_condition_mlp.0.weight") for n in names)
    assert torch.isfinite(loss)
    for n, p in bb.trainable_parameters():
        if ".attn2.temporal" in n and ("condition_mlp" in n or n.endswith("temporal_a")):
            continue  # BCM acts on self-attention only; the reference keeps (unused) BCM tensors on attn2 too
        assert p.grad is not None, n
        assert not p.is_inference(), n
        # up projections start at zero, so only they (and SAIM, the BCM mix) get a non-zero gradient at step 1
        if n.endswith(".up.weight") or n.endswith("temporal_a") or ".temporal_q." in n:
            assert p.grad.abs().sum() > 0, n
    # released: the base model's modules are back and carry no training wrappers
    live = dict(model.model.diffusion_model.named_modules())
    assert type(live["middle_block.1.transformer_blocks.0.attn1"]).__name__ == "CrossAttention"
    assert all(not getattr(m, "weight_function", []) for m in live.values())


def test_loss_falls_on_a_tiny_set(env, data_root, tmp_path):
    model, clip, vae = _inference_models()
    config = _config(env, model, steps=60, checkpoint_weights=False)
    with torch.inference_mode(), torch.inference_mode(False):
        bb = env.comfy_train.ComfyTrainingBackbone(model, clip, vae, config)
        try:
            bb.load()
            tr = env.core_train.Trainer(bb, _dataset(env, data_root, config), config, tmp_path / "w")
            before = tr.evaluation_loss(n_timesteps=4)
            result = tr.run()
            after = tr.evaluation_loss(n_timesteps=4)
        finally:
            bb.release()
    assert result.completed and len(result.history) == 60
    assert after < 0.85 * before, (before, after)


def test_text_lora_gradient_matches_finite_differences(env):
    """The trainable CLIP LoRA (a weight wrapper, differentiated through ComfyUI's in-place CLIP residuals with
    copying saved-tensor hooks) has the right gradient, and its forward equals the Loader's weight patches."""
    model, clip, vae = _inference_models()
    config = _config(env, model)
    with torch.inference_mode(), torch.inference_mode(False):
        bb = env.comfy_train.ComfyTrainingBackbone(model, clip, vae, config)
        try:
            lora = bb.text_loras["text_model.encoder.layers.0.self_attn"]["to_v_lora"]
            g = torch.Generator().manual_seed(0)
            with torch.no_grad():
                lora.up.weight.copy_(torch.randn(lora.up.weight.shape, generator=g) * 0.1)
            probe = torch.randn(2, 77, 64, generator=g)

            def f():
                return (bb.encode_prompts(["a vfx with sks", "sks"]).float() * probe).sum()

            value = f()
            value.backward()
            direction = torch.randn(lora.up.weight.shape, generator=g)
            analytic = float((lora.up.weight.grad * direction).sum())
            eps = 1e-3
            with torch.no_grad():
                lora.up.weight.add_(direction, alpha=eps)
                plus = float(f())
                lora.up.weight.add_(direction, alpha=-2 * eps)
                minus = float(f())
                lora.up.weight.add_(direction, alpha=eps)
            numeric = (plus - minus) / (2 * eps)
            assert analytic == pytest.approx(numeric, rel=2e-2, abs=1e-4), (analytic, numeric)
            trained = bb.encode_prompts(["sks"]).detach()[0]
            weights = bb.to_weights({})
        finally:
            bb.release()
    patched = env.backend.patch_clip(clip, weights, 1.0)
    assert torch.allclose(ce.encode(patched, "sks")[0][0][0], trained, atol=1e-5)


def test_trainer_node_interrupt_leaves_a_checkpoint_and_resume_continues(env, dirs):
    import comfy.model_management as mm
    import comfy.utils

    make_flat(dirs.input / "toy", n=3, size=RES)
    old = comfy.utils.PROGRESS_BAR_HOOK
    seen = []

    def hook(value, total, preview, node_id=None):  # what ComfyUI's server hook does: report, then check Cancel
        seen.append((value, total, node_id, preview is not None))
        if value == 2:
            mm.interrupt_current_processing(True)
        mm.throw_exception_if_processing_interrupted()

    m, c, v = _inference_models()
    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            _train_node(env, model=m, clip=c, vae=v)
    finally:
        comfy.utils.set_progress_bar_global_hook(old)
        mm.interrupt_current_processing(False)
    assert [s[:3] for s in seen] == [(0, 4, "9"), (1, 4, "9"), (2, 4, "9")]
    assert seen[1][3]  # the first step sends a loss-curve preview
    work = dirs.models / "toy_train"
    state = env.core_train.load_checkpoint(work)  # the newest checkpoint, read with weights_only
    assert state["step"] == 2
    partial = env.core_weights.DualAnoDiffWeights.load(work / "checkpoints" / "checkpoint-000002.safetensors")
    assert partial.has_text and partial.metadata["trained_steps"] == "2"
    assert not (dirs.models / "toy.safetensors").exists()  # final weights only for a finished run
    # the base model is restored after the interrupted run
    live = dict(m.model.diffusion_model.named_modules())
    assert type(live["input_blocks.1.1.transformer_blocks.0.attn2"]).__name__ == "CrossAttention"

    # a fresh start under the same name is refused; resume continues to the end
    with pytest.raises(ValueError, match="taken"):
        _train_node(env, model=m, clip=c, vae=v, resume=False)
    out = _train_node(env, model=m, clip=c, vae=v, resume=True)
    model_out, clip_out, name, loss = out.result
    assert name == "toy.safetensors" and loss.shape[0] == 1 and loss.shape[-1] == 3
    resumed = env.core_weights.DualAnoDiffWeights.load(dirs.models / "toy.safetensors")
    assert resumed.metadata["trained_steps"] == "4"
    assert (work / "loss.csv").read_text().count("\n") == 5  # header + 4 steps, across the resume

    # the same run without interruption gives the same weights
    out2 = _train_node(env, model=m, clip=c, vae=v, output_name="toy_straight")
    straight = env.core_weights.DualAnoDiffWeights.load(dirs.models / "toy_straight.safetensors")
    assert straight.tensors.keys() == resumed.tensors.keys()
    for k in straight.tensors:
        assert torch.allclose(straight.tensors[k], resumed.tensors[k], atol=1e-6), k
    assert out2.result[2] == "toy_straight.safetensors"


def test_trained_weights_load_in_the_loader_and_generate(env, dirs):
    make_flat(dirs.input / "toy2", n=2, size=RES)
    m, c, v = _inference_models()
    model_out, clip_out, name, _ = _train_node(
        env, model=m, clip=c, vae=v, folder="toy2", output_name="gen", steps=2, train_text_encoder=True
    ).result
    assert name in env.loaders.weight_files()
    with torch.inference_mode():
        loaded, clip_l, pg, pa = env.loaders.DualLoRALoader.execute(
            model=m, clip=c, weights=name, strength_global=1.0, strength_anomaly=1.0, strength_text=1.0
        ).result
    assert (pg, pa) == ("a vfx with sks", "sks")
    x, t = torch.randn(4, 4, 4, 4, generator=torch.Generator().manual_seed(1)), torch.full((4,), 500.0)
    ctx = torch.cat([ce.encode(clip_l, "a vfx with sks")[0][0], ce.encode(clip_l, "sks")[0][0]]).repeat(2, 1, 1)
    assert torch.equal(ce.forward(loaded, x, t, ctx), ce.forward(model_out, x, t, ctx))
    assert torch.equal(ce.encode(clip_l, "sks")[0][0], ce.encode(clip_out, "sks")[0][0])
    pos_g, pos_a, neg = ce.encode(clip_l, "a vfx with sks"), ce.encode(clip_l, "sks"), ce.encode(clip_l, "")
    with torch.inference_mode():
        g, a = env.sampler.DualSampler.execute(
            model=loaded,
            positive_global=pos_g,
            positive_anomaly=pos_a,
            negative=neg,
            pairs=1,
            width=RES,
            height=RES,
            seed=0,
            steps=2,
            cfg=2.5,
            sampler_name="euler",
            scheduler="normal",
            denoise=1.0,
        ).result
        images = v.decode(torch.cat([g["samples"], a["samples"]]))
    assert images.shape == (2, RES, RES, 3) and torch.isfinite(images).all()


def test_trainer_node_input_errors(env, dirs):
    m, c, v = _inference_models()
    assert "does not exist" in env.train.DualAnoDiffTrainer.validate_inputs(folder="nope")
    assert "sub-folder" in env.train.DualAnoDiffTrainer.validate_inputs(folder="../")
    make_flat(dirs.input / "flat", n=2, size=RES)
    # output_name and split are refused first thing when the node runs (validate_inputs takes only `folder`)
    with pytest.raises(ValueError, match="letters, digits"):
        _train_node(env, model=m, clip=c, vae=v, folder="flat", output_name="../evil")
    with pytest.raises(ValueError, match="split must be one of"):
        _train_node(env, model=m, clip=c, vae=v, folder="flat", split="half")
    (dirs.input / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        _train_node(env, model=m, clip=c, vae=v, folder="empty")
    with pytest.raises(ValueError, match="not an MVTec category folder"):
        _train_node(env, model=m, clip=c, vae=v, folder="flat", defect="scratch")
    with pytest.raises(ValueError, match="object mask"):
        _train_node(env, model=m, clip=c, vae=v, folder="flat", bcm=True)
    assert not any(dirs.models.iterdir())  # nothing written by the refused runs


def test_trainer_node_anomaly_contrast(env, dirs, caplog):
    """The input added last (optional, so that old prompts validate): a new node trains with the default recipe's
    contrast; a prompt without it trains as before (the reference); the value reaches the training and its metadata,
    and a bad one is refused by name before anything is written."""
    from_recipe = importlib.import_module(f"{ce.PACK}.dualanodiff_core.method.recipes").SHARED_NOISE_ANOMALY_CONTRAST
    opt = env.train.DualAnoDiffTrainer.INPUT_TYPES()["optional"]
    assert list(opt)[-1] == "anomaly_contrast", "new inputs at the end"
    kind, spec = opt["anomaly_contrast"]
    assert kind == "FLOAT" and (spec["min"], spec["max"]) == (0.0, 0.5)
    assert spec["default"] == env.train.DEFAULT_ANOMALY_CONTRAST == from_recipe

    make_flat(dirs.input / "contrast", n=2, size=RES)  # red squares: 0.38 from mid-gray, under 0.4
    m, c, v = _inference_models()
    kw = dict(model=m, clip=c, vae=v, folder="contrast", steps=2, seed=5)
    _train_node(env, output_name="old_prompt", **kw)  # a prompt saved before the input existed
    old = env.core_weights.DualAnoDiffWeights.load(dirs.models / "old_prompt.safetensors")
    assert json.loads(old.metadata["training"])["anomaly_contrast"] == 0.0 and "anomaly_gain" not in old.metadata

    caplog.set_level(logging.INFO, logger="DualAnoDiff")
    _train_node(env, output_name="amplified", anomaly_contrast=0.4, **kw)
    new = env.core_weights.DualAnoDiffWeights.load(dirs.models / "amplified.safetensors")
    ds = env.core_data.DefectDataset(env.core_data.find_defect_set(dirs.input / "contrast"), RES)
    gain = env.core_train.anomaly_gain(ds.defect_contrast(), 0.4)
    assert 1.0 < gain < 1.1
    assert json.loads(new.metadata["training"])["anomaly_contrast"] == 0.4
    assert float(new.metadata["anomaly_gain"]) == pytest.approx(gain, rel=1e-5)
    assert any(
        f"amplified {gain:.2f}x" in r.getMessage() and "anomaly_contrast 0.4" in r.getMessage() for r in caplog.records
    )
    assert new.tensors.keys() == old.tensors.keys()
    assert any(not torch.equal(new.tensors[k], old.tensors[k]) for k in new.tensors)  # the same seed, other targets

    # a run resumes only with the value it started with
    with pytest.raises(ValueError, match="other settings"):
        _train_node(
            env, output_name="amplified", anomaly_contrast=0.0, steps=3, **{k: w for k, w in kw.items() if k != "steps"}
        )
    for bad in (0.9, -0.1, float("nan"), "x"):
        with pytest.raises(ValueError, match="anomaly_contrast"):
            _train_node(env, output_name="bad", anomaly_contrast=bad, **kw)
    assert not (dirs.models / "bad.safetensors").exists() and not (dirs.models / "bad_train").exists()
