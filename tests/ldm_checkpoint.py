"""Write a diffusers SD1.x model as one original-layout (LDM / "single-file") checkpoint, for the single-file tests.

Only what the tiny test models use: UNet with cross-attention blocks, AutoencoderKL with a mid-block attention, CLIP
text model. Key names follow the original Stable Diffusion layout (``model.diffusion_model.*``,
``first_stage_model.*``, ``cond_stage_model.transformer.text_model.*``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _sub(key: str, table: dict[str, str]) -> str:
    for a, b in table.items():
        if key.startswith(a + "."):
            return b + key[len(a) :]
    return key


def unet_to_ldm(sd: dict, config: dict) -> dict:
    L = config["layers_per_block"]
    out = {}
    for k, v in sd.items():
        p = k.split(".")
        if k.startswith("time_embedding.linear_"):
            nk = "time_embed." + ("0" if p[1] == "linear_1" else "2") + "." + p[2]
        elif p[0] == "conv_in":
            nk = "input_blocks.0.0." + p[1]
        elif p[0] == "conv_norm_out":
            nk = "out.0." + p[1]
        elif p[0] == "conv_out":
            nk = "out.2." + p[1]
        elif p[0] == "down_blocks":
            x = int(p[1])
            if p[2] == "downsamplers":
                nk = f"input_blocks.{1 + (L + 1) * x + L}.0.op." + ".".join(p[5:])
            else:
                n = 1 + (L + 1) * x + int(p[3])
                rest = ".".join(p[4:])
                nk = f"input_blocks.{n}.0." + _sub(rest, RESNET) if p[2] == "resnets" else f"input_blocks.{n}.1.{rest}"
        elif p[0] == "mid_block":
            rest = ".".join(p[3:])
            if p[1] == "attentions":
                nk = "middle_block.1." + rest
            else:
                nk = f"middle_block.{0 if p[2] == '0' else 2}." + _sub(rest, RESNET)
        elif p[0] == "up_blocks":
            x = int(p[1])
            has_attn = any(q.startswith(f"up_blocks.{x}.attentions.") for q in sd)
            if p[2] == "upsamplers":
                nk = f"output_blocks.{(L + 1) * x + L}.{2 if has_attn else 1}.conv." + p[-1]
            else:
                n = (L + 1) * x + int(p[3])
                rest = ".".join(p[4:])
                nk = (
                    f"output_blocks.{n}.0." + _sub(rest, RESNET) if p[2] == "resnets" else f"output_blocks.{n}.1.{rest}"
                )
        else:
            raise KeyError(k)
        out["model.diffusion_model." + nk] = v
    return out


def vae_to_ldm(sd: dict, config: dict) -> dict:
    n_up = len(config["block_out_channels"])
    out = {}
    for k, v in sd.items():
        p = k.split(".")
        side = p[0]
        if side in ("quant_conv", "post_quant_conv"):
            nk = k
        elif p[1] in ("conv_in", "conv_out"):
            nk = k
        elif p[1] == "conv_norm_out":
            nk = f"{side}.norm_out." + p[2]
        elif p[1] in ("down_blocks", "up_blocks"):
            i = int(p[2])
            level = i if side == "encoder" else n_up - 1 - i
            name = "down" if side == "encoder" else "up"
            if p[3] in ("downsamplers", "upsamplers"):
                nk = f"{side}.{name}.{level}.{'downsample' if side == 'encoder' else 'upsample'}.conv." + p[-1]
            else:
                rest = ".".join(p[5:]).replace("conv_shortcut", "nin_shortcut")
                nk = f"{side}.{name}.{level}.block.{p[4]}.{rest}"
        elif p[1] == "mid_block":
            if p[2] == "resnets":
                nk = f"{side}.mid.block_{int(p[3]) + 1}." + ".".join(p[4:])
            else:
                nk = f"{side}.mid.attn_1." + _sub(".".join(p[4:]), VAE_ATTN)
                if v.ndim == 2:
                    v = v[:, :, None, None]  # the original VAE attention uses 1x1 convolutions
        else:
            raise KeyError(k)
        out["first_stage_model." + nk] = v
    return out


def text_to_ldm(sd: dict) -> dict:
    return {
        "cond_stage_model.transformer." + (k if k.startswith("text_model.") else "text_model." + k): v
        for k, v in sd.items()
    }


def write_ldm_checkpoint(model_dir: Path, path: Path) -> Path:
    """``model_dir``: a diffusers folder (unet/, vae/, text_encoder/); also writes its ``model_index.json`` so the
    folder can serve as the configs of a single-file load."""
    model_dir = Path(model_dir)
    unet_cfg = json.loads((model_dir / "unet" / "config.json").read_text())
    vae_cfg = json.loads((model_dir / "vae" / "config.json").read_text())
    sd = {}
    sd.update(unet_to_ldm(load_file(model_dir / "unet" / "diffusion_pytorch_model.safetensors"), unet_cfg))
    sd.update(vae_to_ldm(load_file(model_dir / "vae" / "diffusion_pytorch_model.safetensors"), vae_cfg))
    sd.update(text_to_ldm(load_file(model_dir / "text_encoder" / "model.safetensors")))
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    index = {
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }
    (model_dir / "model_index.json").write_text(json.dumps(index))
    return path


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
