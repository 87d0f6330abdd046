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


def load_diffusers_components(
    model_dir: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> dict:
    """Load ``unet``, ``vae``, ``text_encoder``, ``tokenizer`` and the scheduler config from a local diffusers
    Stable Diffusion 1.x folder."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

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
    kw = dict(local_files_only=True)
    unet = UNet2DConditionModel.from_pretrained(root / "unet", torch_dtype=dtype, **kw).to(device)
    vae = AutoencoderKL.from_pretrained(root / "vae", torch_dtype=dtype, **kw).to(device)
    text_encoder = CLIPTextModel.from_pretrained(root / "text_encoder", torch_dtype=dtype, **kw).to(device)
    tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer", **kw)
    check_tokenizer(tokenizer)
    sched_file = root / "scheduler" / "scheduler_config.json"
    scheduler_config = dict(SD15_SCHEDULER_CONFIG)
    if sched_file.is_file():
        scheduler_config.update({k: v for k, v in json.loads(sched_file.read_text()).items() if not k.startswith("_")})
    for m in (unet, vae, text_encoder):
        m.requires_grad_(False)
        m.eval()
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler_config=scheduler_config)
