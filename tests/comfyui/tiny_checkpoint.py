"""A small checkpoint that ComfyUI's CheckpointLoaderSimple detects as SD1.5 (by its UNet and CLIP key shapes), and
DualAnoDiff weights for it. Generated at test time, never committed.

Detection needs model_channels 320 and context_dim 768 (the rest is read off the weights), a CLIP with every CLIP-L
key, and a VAE (TAESD here). Every large tensor is a strided view into a few shared random pools (overlapping rows),
so ``torch.save`` writes only the pools: the .ckpt is about 1 MB, yet every key has its real shape, and ComfyUI
loads it through its safe ``torch.load(weights_only=True)`` path like any checkpoint.
"""

from __future__ import annotations

import math

import torch

#: model_channels 320, context 768 (SD1.5 detection), one level, one res block: a 25.8 M-parameter UNet
UNET_CONFIG = dict(
    image_size=32,
    use_spatial_transformer=True,
    legacy=False,
    use_checkpoint=False,
    in_channels=4,
    out_channels=4,
    model_channels=320,
    num_res_blocks=[1],
    channel_mult=[1],
    transformer_depth=[1],
    transformer_depth_output=[1, 1],
    transformer_depth_middle=1,
    context_dim=768,
    use_linear_in_transformer=False,
    adm_in_channels=None,
    use_temporal_attention=False,
    use_temporal_resblock=False,
    num_heads=8,
    num_head_channels=-1,
)
_ROW_STRIDE = 7


def _shapes() -> dict[str, tuple]:
    """Every checkpoint key and shape, from ComfyUI's own classes built on the meta device."""
    import comfy.ldm.modules.diffusionmodules.openaimodel as openaimodel
    import comfy.ops
    import comfy.sd1_clip
    import comfy.taesd.taesd

    with torch.device("meta"):
        unet = openaimodel.UNetModel(
            **UNET_CONFIG, dtype=torch.float16, device="meta", operations=comfy.ops.disable_weight_init
        )
        clip = comfy.sd1_clip.SDClipModel(device="meta", dtype=torch.float16)
        taesd = comfy.taesd.taesd.TAESD()
    shapes = {f"model.diffusion_model.{k}": tuple(v.shape) for k, v in unet.state_dict().items()}
    for k, v in clip.state_dict().items():
        if k in ("transformer.text_projection.weight", "logit_scale") or "position_ids" in k:
            continue  # SD1.5 checkpoints have neither (ComfyUI drops them when it saves one)
        shapes[f"cond_stage_model.{k}"] = tuple(v.shape)
    for k, v in taesd.state_dict().items():
        shapes[f"first_stage_model.{k}"] = tuple(v.shape)
    return shapes


def _is_norm_scale(key: str, shape: tuple) -> bool:
    return len(shape) == 1 and key.endswith(".weight")


def state_dict(seed: int = 0, dtype=torch.float16) -> dict[str, torch.Tensor]:
    shapes = _shapes()
    g = torch.Generator().manual_seed(seed)
    pools: dict[float, torch.Tensor] = {}
    one, zero = torch.ones(1, dtype=dtype), torch.zeros(1, dtype=dtype)
    sd = {}
    need: dict[float, int] = {}
    plan = {}
    for key, shape in shapes.items():
        if _is_norm_scale(key, shape) or key.endswith("vae_scale"):
            plan[key] = ("const", 1.0)
        elif len(shape) == 0 or key.endswith(".bias") or key.endswith("vae_shift"):
            plan[key] = ("const", 0.0)
        else:
            fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
            std = 0.02 if "embedding" in key else round(min(0.1, fan_in**-0.5), 4)
            rest = math.prod(shape[1:])
            size = _ROW_STRIDE * (shape[0] - 1) + rest
            need[std] = max(need.get(std, 0), size)
            plan[key] = ("pool", std)
    for std, size in need.items():
        pools[std] = (torch.randn(size, generator=g) * std).to(dtype)
    for key, shape in shapes.items():
        kind, value = plan[key]
        if kind == "const":
            sd[key] = (one if value == 1.0 else zero).expand(shape) if shape else (one if value == 1.0 else zero)[0]
        else:
            inner = [math.prod(shape[i + 1 :]) for i in range(1, len(shape))]
            sd[key] = pools[value].as_strided(shape, (_ROW_STRIDE, *inner))
    return sd


def write(path, seed: int = 0) -> None:
    torch.save({"state_dict": state_dict(seed)}, str(path))


def dualanodiff_weights(weights_cls, seed: int = 0, rank: int = 4, bcm: bool = True):
    """Random DualAnoDiff weights (both branch LoRAs, SAIM, BCM, text LoRA) for the checkpoint above."""
    import comfy.utils

    from_core = weights_cls.__module__.rsplit(".", 1)[0]
    import importlib

    attention = importlib.import_module(f"{from_core}.attention")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    tensors = {}
    for diff_key in comfy.utils.unet_to_diffusers(UNET_CONFIG):
        for kind in ("attn1", "attn2"):
            if diff_key.endswith(f".{kind}.to_q.weight"):
                layer = diff_key[: -len(".to_q.weight")]
                context = 320 if kind == "attn1" else 768
                layers = attention.DualBranchLayers(320, context, 320, 320, rank=rank, saim=True, bcm=bcm)
                for k, v in layers.state_dict().items():
                    if ".up." in k:
                        v = torch.randn(v.shape, generator=g) * 0.02
                    elif k == "temporal_a":
                        v = torch.full_like(v, 0.2)
                    elif k.startswith("temporal_o."):
                        v = v * 0.1
                    tensors[f"unet.{layer}.{k}"] = v.detach().clone()
    for i in range(12):
        for proj in ("to_q", "to_k", "to_v", "to_out"):
            base = f"text_encoder.text_model.encoder.layers.{i}.self_attn.{proj}_lora"
            tensors[f"{base}.down.weight"] = torch.randn(rank, 768, generator=g) / rank
            tensors[f"{base}.up.weight"] = torch.randn(768, rank, generator=g) * 0.01
    return weights_cls(tensors, {"prompt_global": "a vfx with sks", "prompt_anomaly": "sks", "category": "test"})
