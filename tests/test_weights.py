"""DualAnoDiffWeights: our format, the official reference layout, strict keys, safe loading, stock-LoRA export."""

import re

import pytest
import torch
from helpers import randomize_, unet_inputs
from safetensors.torch import save_file

from dualanodiff_core.method.weights import DualAnoDiffWeights, WeightsError, WeightsKeyError
from dualanodiff_core.minidefect.tiny import tiny_text_encoder, tiny_unet
from dualanodiff_core.sd15.pipeline import DualUNet, TextEncoderLoRA


def reference_checkpoint(bcm: bool, seed: int = 0):
    """A synthetic checkpoint in the official layout, written the way the reference saves it: the UNet's own
    state-dict keys of the installed processors (``<layer>.processor.<param>``, attn1 wrapped as
    ``processor.chained_proc`` in the BCM model) under ``unet.``, and the text-encoder LoRA under ``text_encoder.``."""
    unet = tiny_unet(seed)
    dual = DualUNet(unet, rank=4, bcm=bcm)
    randomize_(dual, seed=seed + 1)
    sd = {}
    for k, v in unet.state_dict().items():
        if ".processor." not in k:
            continue
        if bcm and ".attn1.processor." in k:
            k = k.replace(".attn1.processor.", ".attn1.processor.chained_proc.")
        sd["unet." + k] = v.clone()
    te = tiny_text_encoder()
    lora = TextEncoderLoRA(te, rank=4)
    randomize_(lora, seed=seed + 2)
    for name, block in zip(lora.names, lora.blocks):
        for k, v in block.state_dict().items():
            sd[f"text_encoder.{name}.{k}"] = v.clone()
    return sd, unet, dual


@pytest.mark.parametrize("bcm", [False, True])
@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_reference_checkpoint_imports_and_round_trips_bit_exactly(tmp_path, bcm, suffix):
    sd, unet, dual = reference_checkpoint(bcm)
    assert any("chained_proc" in k for k in sd) == bcm
    path = tmp_path / f"pytorch_lora_weights{suffix}"
    if suffix == ".bin":
        torch.save(sd, path)
    else:
        save_file(sd, str(path))
    w = DualAnoDiffWeights.load(path)
    assert w.has_bcm == bcm and w.has_saim and w.has_text
    assert w.rank == 4 and w.alpha == 4.0 and w.metadata["source"] == "reference"
    assert w.prompts == ("a vfx with sks", "sks")
    ours = tmp_path / "ours.safetensors"
    w.save(ours)
    w2 = DualAnoDiffWeights.load(ours)
    assert w2.metadata["format"] == "dualanodiff" and w2.has_bcm == bcm
    assert w2.tensors.keys() == w.tensors.keys()
    assert all(torch.equal(w2.tensors[k], w.tensors[k]) for k in w.tensors)
    back = w2.to_reference()
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)

    # the imported weights drive a fresh model to exactly the original output
    x, t, ctx = unet_inputs(unet)
    with torch.no_grad():
        ref = dual(x, t, ctx)
        fresh = DualUNet.from_weights(tiny_unet(0), w2)
        assert torch.equal(fresh(x, t, ctx), ref)
        te = tiny_text_encoder()
        lora = TextEncoderLoRA(te, rank=4)
        lora.load_weights(w2)  # strict: every text-encoder key matches


def test_unknown_and_missing_keys_are_listed(tmp_path):
    sd, unet, dual = reference_checkpoint(False)
    w = DualAnoDiffWeights.load(_save(tmp_path, sd))
    bad = dict(w.tensors)
    dropped = "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_v_lora.1.up.weight"
    bad.pop(dropped)
    bad["unet.down_blocks.9.attentions.0.transformer_blocks.0.attn1.temporal_q.weight"] = torch.zeros(1)
    with pytest.raises(WeightsKeyError) as e:
        DualUNet(tiny_unet(0), rank=4).load_weights(DualAnoDiffWeights(bad))
    msg = str(e.value)
    assert "1 missing and 1 unknown" in msg
    assert dropped in msg and "down_blocks.9" in msg
    assert e.value.missing == [dropped]


def test_model_without_bcm_rejects_bcm_weights_with_a_hint(tmp_path):
    sd, _, _ = reference_checkpoint(True)
    w = DualAnoDiffWeights.load(_save(tmp_path, sd))
    with pytest.raises(WeightsKeyError, match="from_weights"):
        DualUNet(tiny_unet(0), rank=4, bcm=False).load_weights(w)


def test_unknown_reference_keys_are_reported(tmp_path):
    sd, _, _ = reference_checkpoint(False)
    sd["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.mystery.weight"] = torch.zeros(2)
    with pytest.raises(WeightsKeyError, match="mystery"):
        DualAnoDiffWeights.load(_save(tmp_path, sd))


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.bin"
    torch.save({"unet.x": torch.zeros(1), "payload": _Payload()}, path)
    with pytest.raises(WeightsError, match="refused: it holds Python objects besides tensors") as e:
        DualAnoDiffWeights.load(path)
    assert "weights_only" not in str(e.value)  # never the advice to switch the safety off


def test_unrecognised_files_get_clear_errors(tmp_path):
    with pytest.raises(WeightsError, match="no such file"):
        DualAnoDiffWeights.load(tmp_path / "missing.safetensors")
    plain_lora = tmp_path / "plain.safetensors"
    save_file({"lora_unet_down_blocks_0_attn1_to_q.lora_up.weight": torch.zeros(2, 2)}, str(plain_lora))
    with pytest.raises(WeightsError, match="not a DualAnoDiff weights file") as e:
        DualAnoDiffWeights.load(plain_lora)
    assert "plain LoRA" in str(e.value) and "LoraLoader" in str(e.value)
    # random tensors are not told they are a LoRA
    random_file = tmp_path / "random.safetensors"
    save_file({"a": torch.randn(3), "b.weight": torch.randn(2, 2)}, str(random_file))
    with pytest.raises(WeightsError, match="not a DualAnoDiff weights file") as e:
        DualAnoDiffWeights.load(random_file)
    assert "LoRA" not in str(e.value) and "written by the DualAnoDiff trainer" in str(e.value)
    # a trainer resume checkpoint (optimizer state and all) is named as such, with the file to use instead
    resume = tmp_path / "checkpoint-000002.pt"
    torch.save({"format": "x", "step": 2, "params": {"p": torch.zeros(1)}, "optimizer": {"state": {}}}, resume)
    with pytest.raises(WeightsError, match="a training checkpoint .* use the .safetensors weights written beside it"):
        DualAnoDiffWeights.load(resume)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x00\x01garbage")
    with pytest.raises(WeightsError, match="broken.safetensors"):
        DualAnoDiffWeights.load(broken)
    txt = tmp_path / "notes.txt"
    txt.write_text("hi")
    with pytest.raises(WeightsError, match="unsupported"):
        DualAnoDiffWeights.load(txt)


def test_newer_format_version_is_refused(tmp_path):
    sd, _, _ = reference_checkpoint(False)
    w = DualAnoDiffWeights.load(_save(tmp_path, sd))
    w.metadata["format_version"] = "99"
    p = w.save(tmp_path / "future.safetensors")
    with pytest.raises(WeightsError, match="newer DualAnoDiff"):
        DualAnoDiffWeights.load(p)


def test_save_is_atomic_and_keeps_metadata(tmp_path):
    sd, _, _ = reference_checkpoint(False)
    w = DualAnoDiffWeights.from_reference(sd, {"base_model": "sd15", "training": {"steps": 5}})
    p = w.save(tmp_path / "w.safetensors")
    assert [f.name for f in tmp_path.iterdir() if f.name.startswith(".")] == []
    meta = DualAnoDiffWeights.load(p).metadata
    assert meta["base_model"] == "sd15" and meta["training"] == '{"steps": 5}'
    assert meta["rank"] == "4" and meta["bcm"] == "false" and meta["format_version"] == "1"
    with pytest.raises(WeightsError, match=".safetensors"):
        w.save(tmp_path / "w.bin")


def test_branch_lora_export_uses_stock_kohya_keys(tmp_path):
    sd, _, _ = reference_checkpoint(False)
    w = DualAnoDiffWeights.from_reference(sd)
    for branch in (0, 1):
        lora = w.branch_lora(branch)
        layer = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
        stem = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_"
        for proj, mod in (("to_q", "to_q"), ("to_k", "to_k"), ("to_v", "to_v"), ("to_out", "to_out_0")):
            assert torch.equal(
                lora[f"{stem}{mod}.lora_down.weight"], w.tensors[f"unet.{layer}.{proj}_lora.{branch}.down.weight"]
            )
            assert torch.equal(
                lora[f"{stem}{mod}.lora_up.weight"], w.tensors[f"unet.{layer}.{proj}_lora.{branch}.up.weight"]
            )
            assert lora[f"{stem}{mod}.alpha"].item() == 4.0
        assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in lora
        assert not any("temporal" in k for k in lora)
        assert all(re.match(r"^lora_(unet|te)_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)$", k) for k in lora)
    p = w.save_branch_lora(1, tmp_path / "anomaly.safetensors")
    assert p.exists()


def _save(tmp_path, sd):
    p = tmp_path / "ref.bin"
    torch.save(sd, p)
    return p


class _Payload:
    pass
