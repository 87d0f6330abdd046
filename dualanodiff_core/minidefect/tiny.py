"""Tiny Stable-Diffusion-1.x-shaped components built in-process (tests, benchmarks, offline demos).

Same architecture classes as SD1.5 (UNet2DConditionModel with cross-attention in every level, AutoencoderKL,
CLIPTextModel, a byte-level CLIP tokenizer), only narrow; seeded, nothing downloaded.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from ..sd15.scheduler import SD15_SCHEDULER_CONFIG


def _bytes_to_unicode() -> list[str]:
    """The byte -> printable character table of byte-level BPE (CLIP's tokenizer uses the same)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    order = sorted(range(256), key=lambda i: bs[i])
    return [chr(cs[i]) for i in order]


def byte_vocab() -> dict[str, int]:
    """A 514-token byte-level CLIP vocabulary without merges: every byte, every byte + ``</w>``, start, end."""
    chars = _bytes_to_unicode()
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab


def write_tokenizer_files(folder: str | os.PathLike) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(byte_vocab()), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    return folder


def tiny_tokenizer(max_length: int = 77):
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as d:
        write_tokenizer_files(d)
        tok = CLIPTokenizer(os.path.join(d, "vocab.json"), os.path.join(d, "merges.txt"), model_max_length=max_length)
    return tok


def tiny_unet(
    seed: int = 0,
    block_out_channels=(32, 64),
    cross_attention_dim: int = 32,
    heads: int = 4,
    layers_per_block: int = 1,
    sample_size: int = 8,
):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    n = len(block_out_channels)
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        down_block_types=("CrossAttnDownBlock2D",) * n,
        up_block_types=("CrossAttnUpBlock2D",) * n,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=heads,
        norm_num_groups=32,
    ).eval()


def tiny_vae(seed: int = 0, block_out_channels=(32, 32)):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    n = len(block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=tuple(block_out_channels),
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        norm_num_groups=32,
        sample_size=16,
    ).eval()


def tiny_text_encoder(seed: int = 0, hidden_size: int = 32, layers: int = 2, heads: int = 2, vocab_size: int = 514):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    return CLIPTextModel(cfg).eval()


def tiny_components(seed: int = 0, **unet_kwargs) -> dict:
    """``unet``, ``vae``, ``text_encoder``, ``tokenizer`` and an SD1.5 scheduler config, all tiny and frozen."""

    comps = dict(
        unet=tiny_unet(seed, **unet_kwargs),
        vae=tiny_vae(seed + 1),
        text_encoder=tiny_text_encoder(seed + 2),
        tokenizer=tiny_tokenizer(),
        scheduler_config=dict(SD15_SCHEDULER_CONFIG),
    )
    for k in ("unet", "vae", "text_encoder"):
        comps[k].requires_grad_(False)
    return comps


def save_tiny_model(folder: str | os.PathLike, seed: int = 0, **unet_kwargs) -> Path:
    """Write a tiny diffusers model folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/)."""
    from diffusers import PNDMScheduler

    folder = Path(folder)
    comps = tiny_components(seed, **unet_kwargs)
    comps["unet"].save_pretrained(folder / "unet")
    comps["vae"].save_pretrained(folder / "vae")
    comps["text_encoder"].save_pretrained(folder / "text_encoder")
    comps["tokenizer"].save_pretrained(folder / "tokenizer")
    PNDMScheduler.from_config(comps["scheduler_config"]).save_pretrained(folder / "scheduler")
    return folder
