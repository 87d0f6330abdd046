"""Loading base models from local files only (nothing is ever downloaded)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..errors import DualAnoDiffError
from .scheduler import SD15_SCHEDULER_CONFIG
from .text import check_tokenizer

REQUIRED_SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer")


class ModelLoadError(DualAnoDiffError, ValueError):
    """A base model folder is missing or incomplete."""


#: SD1.x: the CLIP ViT-L/14 text encoder's width, which the UNet's cross-attention reads
SD1_CROSS_ATTENTION = 768
SD1_BLOCKS = (320, 640, 1280, 1280)


def read_config(path: Path, what: str) -> dict:
    """A component's ``config.json``, or :class:`ModelLoadError` naming the file."""
    if not path.is_file():
        raise ModelLoadError(f"{path}: missing; the {what} folder of a diffusers model needs its config.json.")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ModelLoadError(
            f"{path}: not a readable JSON config ({str(e).splitlines()[0][:120]}); the file is damaged, copy the model "
            "folder again."
        ) from None
    if not isinstance(cfg, dict):
        raise ModelLoadError(f"{path}: not a JSON object; the file is damaged, copy the model folder again.")
    return cfg


def check_sd1_shape(unet_cfg: dict, text_cfg: dict | None, where: str) -> None:
    """Raise :class:`ModelLoadError` unless the UNet (and text encoder) have the shape of Stable Diffusion 1.x:
    4 latent channels in and out, cross-attention as wide as the text encoder (768 at full size), no SDXL extras."""
    found: list[str] = []
    cin, cout = unet_cfg.get("in_channels"), unet_cfg.get("out_channels")
    if cin != 4:
        kind = " (an inpainting UNet)" if cin == 9 else (" (a depth or instruct-pix2pix UNet)" if cin in (5, 8) else "")
        found.append(f"in_channels={cin}{kind} (expected 4)")
    if cout != 4:
        found.append(f"out_channels={cout} (expected 4)")
    cross = unet_cfg.get("cross_attention_dim")
    extra = unet_cfg.get("addition_embed_type")
    if extra is not None:
        kind = " (Stable Diffusion XL)" if extra == "text_time" else ""
        found.append(f"addition_embed_type={extra!r}{kind} (expected none)")
    width = None if text_cfg is None else text_cfg.get("hidden_size")
    blocks = tuple(unet_cfg.get("block_out_channels") or ())
    if not isinstance(cross, int):
        found.append(f"cross_attention_dim={cross!r} (expected one width, {SD1_CROSS_ATTENTION} for SD1.5)")
    elif width is not None and cross != width:
        found.append(
            f"cross_attention_dim={cross} with a text encoder of width {width} (expected equal widths, "
            f"{SD1_CROSS_ATTENTION} for SD1.5)"
        )
    elif blocks == SD1_BLOCKS and cross != SD1_CROSS_ATTENTION:
        kind = " (Stable Diffusion 2.x)" if cross == 1024 else (" (Stable Diffusion XL)" if cross == 2048 else "")
        found.append(f"cross_attention_dim={cross}{kind} (expected {SD1_CROSS_ATTENTION})")
    types = list(unet_cfg.get("down_block_types") or []) + list(unet_cfg.get("up_block_types") or [])
    if not any("CrossAttn" in str(t) for t in types):
        found.append("no cross-attention blocks (expected CrossAttnDownBlock2D/CrossAttnUpBlock2D)")
    if found:
        raise ModelLoadError(
            f"{where}: not a Stable Diffusion 1.x model: found {', '.join(found)}. "
            "DualAnoDiff runs on SD1.x text-to-image models (e.g. Stable Diffusion 1.5); give such a model."
        )


def check_base_model(model_dir: str | os.PathLike) -> dict:
    """Cheap checks of a local diffusers folder before anything heavy is loaded: the subfolders, readable configs,
    the SD1.x shape. Returns ``{"unet": config, "text_encoder": config}``."""
    root = Path(model_dir)
    if not root.is_dir():
        raise ModelLoadError(
            f"{root}: not a folder. Give a local diffusers Stable Diffusion 1.5 folder (with unet/, vae/, "
            "text_encoder/, tokenizer/, scheduler/); nothing is downloaded."
        )
    missing = [s for s in REQUIRED_SUBFOLDERS if not (root / s).is_dir()]
    if missing:
        raise ModelLoadError(
            f"{root}: missing subfolder(s) {', '.join(missing)}; this is not a complete diffusers "
            "Stable Diffusion folder."
        )
    unet_cfg = read_config(root / "unet" / "config.json", "unet")
    text_cfg = read_config(root / "text_encoder" / "config.json", "text_encoder")
    read_config(root / "vae" / "config.json", "vae")
    check_sd1_shape(unet_cfg, text_cfg, str(root))
    return {"unet": unet_cfg, "text_encoder": text_cfg}


def _load_component(load, folder: Path, what: str):
    try:
        return load()
    except ModelLoadError:
        raise
    except Exception as e:  # noqa: BLE001 - diffusers/transformers/safetensors raise many kinds
        text = str(e).strip()
        first = text.splitlines()[0][:200] if text else type(e).__name__
        pickled = any(folder.glob("*.bin")) and not any(folder.glob("*.safetensors"))
        if pickled or "weights_only" in text or "pickle" in text.lower() or "torch.load" in text:
            raise ModelLoadError(
                f"{folder}: the {what} weights are a pickled .bin file that could not be read safely (only plain "
                "tensors are read from pickles: it holds more, or it is damaged); use a copy of the model with "
                ".safetensors weights."
            ) from None
        raise ModelLoadError(
            f"{folder}: cannot load the {what} ({first}); its files are incomplete or damaged: copy the model "
            "folder again."
        ) from None


def load_diffusers_components(
    model_dir: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> dict:
    """Load ``unet``, ``vae``, ``text_encoder``, ``tokenizer`` and the scheduler config from a local diffusers
    Stable Diffusion 1.x folder."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    root = Path(model_dir)
    check_base_model(root)
    kw = dict(local_files_only=True)
    unet = _load_component(
        lambda: UNet2DConditionModel.from_pretrained(root / "unet", torch_dtype=dtype, **kw).to(device),
        root / "unet",
        "UNet",
    )
    vae = _load_component(
        lambda: AutoencoderKL.from_pretrained(root / "vae", torch_dtype=dtype, **kw).to(device), root / "vae", "VAE"
    )
    text_encoder = _load_component(
        lambda: CLIPTextModel.from_pretrained(root / "text_encoder", torch_dtype=dtype, **kw).to(device),
        root / "text_encoder",
        "text encoder",
    )
    tokenizer = _load_component(
        lambda: CLIPTokenizer.from_pretrained(root / "tokenizer", **kw), root / "tokenizer", "tokenizer"
    )
    check_tokenizer(tokenizer)
    sched_file = root / "scheduler" / "scheduler_config.json"
    scheduler_config = dict(SD15_SCHEDULER_CONFIG)
    if sched_file.is_file():
        sched = read_config(sched_file, "scheduler")
        scheduler_config.update({k: v for k, v in sched.items() if not k.startswith("_")})
    for m in (unet, vae, text_encoder):
        m.requires_grad_(False)
        m.eval()
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler_config=scheduler_config)


def check_weights_fit(weights, unet_cfg: dict, text_cfg: dict | None, weights_path, base_path) -> None:
    """Whether DualAnoDiff weights fit a base model, from its configs (a shape-only UNet on the ``meta`` device, no
    memory): the same attention layers and widths. Raises :class:`ModelLoadError` naming both files and the base
    model the weights record."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config({k: v for k, v in unet_cfg.items() if not k.startswith("_")})
    modules = dict(unet.named_modules())
    expected: dict[str, dict[str, int]] = {}
    for name in unet.attn_processors:
        layer = name[: -len(".processor")]
        a = modules[layer]
        expected[layer] = {
            "to_q": a.to_q.in_features,
            "to_k": a.to_k.in_features,
            "to_v": a.to_v.in_features,
            "to_out": a.to_out[0].in_features,
        }
    problem = None
    have = weights.unet_layers()
    missing = sorted(set(expected) - set(have))
    unknown = sorted(set(have) - set(expected))
    if missing or unknown:
        problem = f"the weights adapt {len(have)} attention layers, the base model's UNet has {len(expected)}" + (
            f" (e.g. {(unknown or missing)[0]} is only in the {'weights' if unknown else 'base model'})"
        )
    else:
        for layer, params in have.items():
            for proj, width in expected[layer].items():
                for key in (f"{proj}_lora.0.down.weight", f"{proj}_lora.down.weight"):
                    t = params.get(key)
                    if t is not None and t.ndim == 2 and t.shape[1] != width:
                        problem = (
                            f"{layer}.{proj} takes {t.shape[1]} features in the weights, {width} in the base model"
                        )
                        break
                if problem:
                    break
            if problem:
                break
    if problem is None and text_cfg is not None and weights.has_text:
        width = text_cfg.get("hidden_size")
        for params in weights.text_layers().values():
            t = params.get("to_q_lora.down.weight")
            if t is not None and width is not None and t.shape[1] != width:
                problem = f"the text-encoder LoRA is {t.shape[1]} wide, the base model's text encoder {width}"
                break
    if problem is None:
        return
    recorded = (getattr(weights, "metadata", None) or {}).get("base_model")
    said = (
        f"They record the base model {recorded!r}; use that one"
        if recorded
        else "They do not record their base model; use the one they were trained on"
    )
    raise ModelLoadError(
        f"weights {weights_path} do not fit the base model {base_path}: {problem}. {said}, or train weights on "
        f"{base_path}."
    )
