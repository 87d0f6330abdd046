"""Single-file Stable Diffusion 1.x checkpoints (``.safetensors`` / ``.ckpt`` as ComfyUI and A1111 use them).

diffusers' ``StableDiffusionPipeline.from_single_file`` converts such a file, but it needs the SD1.5 *configuration*
files and the CLIP *tokenizer* files, which the checkpoint does not contain. Without them it looks in the local
Hugging Face cache and, when they are absent there, it downloads them **even with** ``local_files_only=True``
(diffusers 0.42 overrides that flag, ``single_file.py``). DualAnoDiff never downloads anything, so here the hub is
forced offline for the call, and the file loads only when

* ``config_dir`` names a local diffusers SD1.5 folder (``model_index.json``, component configs, ``tokenizer/``):
  its configs and tokenizer are used, the weights come from the file; or
* the Hugging Face cache already holds the SD1.5 configs (someone ran diffusers online on this machine before).

Otherwise :class:`~dualanodiff_core.sd15.loading.ModelLoadError`
says how to convert the file to a diffusers folder once.
``.ckpt`` files are read by diffusers with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from .loading import ModelLoadError
from .text import check_tokenizer

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


def is_single_file(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_file() and p.suffix.lower() in SINGLE_FILE_SUFFIXES


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """Force the Hugging Face hub client offline for the duration (restored afterwards)."""
    import huggingface_hub.constants as hc

    old_const, old_env = hc.HF_HUB_OFFLINE, os.environ.get("HF_HUB_OFFLINE")
    hc.HF_HUB_OFFLINE = True
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        hc.HF_HUB_OFFLINE = old_const
        if old_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old_env


def _check_not_our_weights(path: Path) -> None:
    if path.suffix.lower() != ".safetensors":
        return
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            keys = list(f.keys())
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"{path}: not a readable .safetensors file ({e}).") from None
    if meta.get("format") == "dualanodiff" or any(".temporal_" in k or "_lora." in k for k in keys[:200]):
        raise ModelLoadError(
            f"{path}: this is a DualAnoDiff/LoRA weights file, not a base model. Give the Stable "
            "Diffusion 1.5 model (a diffusers folder or a full checkpoint) as the base model."
        )


def conversion_hint(path: Path) -> str:
    return (
        "Either pass a local diffusers Stable Diffusion 1.5 folder as the model config (its configs and tokenizer "
        "are used, the weights come from the file), or convert the file once to a diffusers folder on a machine "
        "with internet access:\n"
        f'  python -c "from diffusers import StableDiffusionPipeline as P; '
        f"P.from_single_file(r'{path}').save_pretrained(r'{path.with_suffix('')}_diffusers')\"\n"
        "and use that folder as the base model."
    )


def load_single_file_components(
    path: str | os.PathLike, config_dir: str | os.PathLike | None = None, device: str | torch.device = "cpu"
) -> dict:
    """Load a single-file SD1.x checkpoint into the components dict of
    :func:`dualanodiff_core.sd15.loading.load_diffusers_components`, offline only."""
    from diffusers import StableDiffusionPipeline

    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such file.")
    _check_not_our_weights(path)
    if config_dir is not None:
        config_dir = Path(config_dir)
        if not (config_dir / "model_index.json").is_file() or not (config_dir / "tokenizer").is_dir():
            raise ModelLoadError(
                f"{config_dir}: not a diffusers Stable Diffusion folder (needs model_index.json and tokenizer/); "
                "the model config must be a complete local diffusers SD1.5 folder."
            )
    with hub_offline():
        try:
            pipe = StableDiffusionPipeline.from_single_file(
                str(path),
                config=str(config_dir) if config_dir is not None else None,
                local_files_only=True,
                torch_dtype=torch.float32,
                safety_checker=None,
                requires_safety_checker=False,
            )
        except Exception as e:  # noqa: BLE001 - diffusers raises many kinds; all mean "cannot load offline"
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if config_dir is None:
                raise ModelLoadError(
                    f"{path}: cannot load this single-file checkpoint offline ({first}). diffusers needs the SD1.5 "
                    "configuration and tokenizer files, which a checkpoint does not contain and which are not in "
                    "the local Hugging Face cache; DualAnoDiff never downloads them. " + conversion_hint(path)
                ) from None
            raise ModelLoadError(
                f"{path}: diffusers could not load this checkpoint with the configs of {config_dir} ({first}). Is it "
                "a Stable Diffusion 1.x checkpoint, and the config folder an SD1.x model of the same shape?"
            ) from None
    tokenizer = pipe.tokenizer
    check_tokenizer(tokenizer)
    comps = dict(
        unet=pipe.unet,
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=tokenizer,
        scheduler_config={k: v for k, v in dict(pipe.scheduler.config).items() if not k.startswith("_")},
    )
    for k in ("unet", "vae", "text_encoder"):
        comps[k].to(device).requires_grad_(False)
        comps[k].eval()
    return comps
