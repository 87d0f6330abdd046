"""Pre-train the MiniDefect base model: a small Stable-Diffusion-1.x-architecture model (diffusers
``AutoencoderKL`` + ``UNet2DConditionModel`` + transformers ``CLIPTextModel`` with the byte-level CLIP tokenizer of
:mod:`dualanodiff_core.minidefect.tiny`) that generates MiniDefect's *normal* textures for prompts naming the product.

It stands in for SD1.5 where SD1.5 cannot be used (no GPU, no internet): the demo, the quality benchmark and the
tests fine-tune DualAnoDiff on top of it exactly as they would on SD1.5.

Two stages, both on CPU, seeded, deterministic on the same machine and software with one thread:

1. **VAE** (factor 4: 64 px image -> 16x16x4 latent) trained as an autoencoder on random crops of normal MiniDefect
   images (a pool of ``pool`` images per product, from a seed stream disjoint from the dataset's) *and* of generic
   "clutter" images (flat or gradient backgrounds, mid-gray among them, with random PIL ellipses, rectangles,
   polygons and lines). The clutter plays the role of the broad image data SD's VAE saw: without it the
   autoencoder could only reproduce the two textures, not a defect and not the anomaly branch's mid-gray
   background. No MiniDefect defect image and no defect generator is used. Loss: L1 + L1 of image gradients + a
   1e-6 KL term; the latent scaling factor is set to 1 / std of the training latents (as SD's 0.18215).
2. **UNet + text encoder** trained jointly from scratch on the normal pool only (latents of the frozen VAE),
   epsilon prediction with the SD1.5 noise schedule, min-SNR(5) loss weighting, captions "brushed metal" /
   "woven fabric" with optional colour/brightness words ("red woven fabric", "dark brushed metal"), 10 % empty
   captions (for classifier-free guidance), AdamW with warm-up and cosine decay, an EMA of the weights (saved).

Command (the shipped weights were made with it; the MiniDefect page in docs/ says how long it took)::

    OMP_NUM_THREADS=1 python scripts/pretrain_minidefect.py --out dualanodiff_core/assets/minidefect-sd
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..fileio import sha256_file, write_json_atomic
from ..sd15.scheduler import SD15_SCHEDULER_CONFIG, make_scheduler
from ..sd15.text import encode_prompts
from . import procedural as md
from .tiny import tiny_tokenizer, write_tokenizer_files

#: the architecture of the shipped model (SD1.x block types, narrow)
VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(32, 64, 64),
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    layers_per_block=1,
    norm_num_groups=16,
    sample_size=64,
    mid_block_add_attention=False,
)
UNET_CONFIG = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=64,
    attention_head_dim=4,
    norm_num_groups=16,
)
TEXT_CONFIG = dict(
    hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77
)

FABRIC_COLOUR_WORDS = ((0.6, "blue"), (0.08, "beige"), (0.0, "red"), (0.33, "green"), (0.12, "ochre"), (0.75, "violet"))


@dataclasses.dataclass
class PretrainConfig:
    seed: int = 0
    size: int = 64
    pool: int = 1500  # normal images per product
    clutter: int = 1500  # generic images for the VAE
    vae_steps: int = 3500
    vae_batch: int = 16
    vae_crop: int = 32
    vae_lr: float = 1e-3
    vae_grad_weight: float = 1.0
    vae_logvar_init: float = -6.0
    unet_steps: int = 2500
    unet_batch: int = 16
    unet_lr: float = 8e-4
    warmup: int = 100
    ema: float = 0.999
    uncond_prob: float = 0.1
    min_snr: float = 5.0
    #: std of a per-sample, per-channel constant added to the UNet stage's training noise ("offset noise"; 0 = off,
    #: the shipped model). Why: with SD's noise schedule the last timestep still holds a little of the image, so a
    #: model trained on plain noise never learns to set an image's mean colour; sampling from pure noise then leaves
    #: that colour to the noise's own mean, and gray ``brushed metal`` comes out tinted.
    unet_offset_noise: float = 0.0
    log_every: int = 50
    #: architecture (defaults = the shipped model): block widths of the VAE and the UNet, comma-separated, and
    #: resnet layers per block. A wider VAE is the lever for small high-contrast detail (docs/quality.md, capacity);
    #: the UNet sets the CPU cost of every DualAnoDiff training step and sample, the VAE barely does.
    vae_channels: str = "32,64,64"
    vae_layers: int = 1
    unet_channels: str = "32,64,64"
    unet_layers: int = 1

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def vae_config(self) -> dict:
        """The ``AutoencoderKL`` config of this run (the shipped :data:`VAE_CONFIG` with the defaults)."""
        ch = _widths("vae_channels", self.vae_channels, len(VAE_CONFIG["block_out_channels"]))
        return dict(VAE_CONFIG, block_out_channels=ch, layers_per_block=_at_least_one("vae_layers", self.vae_layers))

    def unet_config(self) -> dict:
        """The ``UNet2DConditionModel`` config of this run (the shipped :data:`UNET_CONFIG` with the defaults)."""
        ch = _widths("unet_channels", self.unet_channels, len(UNET_CONFIG["block_out_channels"]))
        return dict(UNET_CONFIG, block_out_channels=ch, layers_per_block=_at_least_one("unet_layers", self.unet_layers))


def _widths(name: str, text: str, n: int) -> tuple[int, ...]:
    """``"32,64,64"`` -> (32, 64, 64): ``n`` widths, each a positive multiple of the 16 normalisation groups."""
    try:
        ch = tuple(int(x) for x in str(text).split(","))
    except ValueError:
        ch = ()
    if len(ch) != n or any(c < 16 or c % 16 for c in ch):
        raise ValueError(
            f"--{name.replace('_', '-')} {text!r}: give {n} comma-separated block widths, each a multiple of 16 "
            f"(the shipped model: {','.join(str(c) for c in VAE_CONFIG['block_out_channels'])})"
        )
    return ch


def _at_least_one(name: str, v: int) -> int:
    if int(v) < 1:
        raise ValueError(f"--{name.replace('_', '-')} {v}: give 1 or more layers per block")
    return int(v)


# ---------------------------------------------------------------------------------------------------------------------
# data


def caption(product: str, params: dict, rng: np.random.Generator) -> str:
    """The caption of a normal image: the product prompt, half the time with a colour/brightness word."""
    base = md.PRODUCT_PROMPTS[product]
    if rng.random() < 0.5:
        return base
    if product == "fabric":
        if params.get("saturation", 1.0) < 0.1:
            word = "gray"
        else:
            h = params["hue"]
            word = min(FABRIC_COLOUR_WORDS, key=lambda hw: min(abs(h - hw[0]), 1 - abs(h - hw[0])))[1]
        return f"{word} {base}"
    return f"{'dark' if params['level'] < 0.57 else 'light'} {base}"


def normal_pool(config: PretrainConfig, log: Callable[[str], None]) -> tuple[np.ndarray, list[str], list[dict]]:
    """``pool`` normal images per product from the ``pretrain`` seed stream (never in the dataset)."""
    images, products, params = [], [], []
    t0 = time.time()
    for product in md.PRODUCTS:
        for i in range(config.pool):
            img, p = md.normal_image(product, config.seed, "pretrain", i, config.size)
            images.append(img)
            products.append(product)
            params.append(p)
    log(f"normal pool: {len(images)} images in {time.time() - t0:.0f} s")
    return np.stack(images), products, params


def clutter_image(rng: np.random.Generator, size: int, texture: np.ndarray | None = None) -> np.ndarray:
    """A generic image: a background (a given texture half of the time, else mid-gray, a flat colour or a
    gradient) with 1-8 random PIL shapes (ellipses, rectangles, polygons, lines) of log-uniform size from about
    half a pixel to 40 % of the image, so small high-contrast details are common. Drawn at 4x and downsampled."""
    s4 = size * 4
    kind = rng.random()
    if texture is not None and kind < 0.5:
        bg = Image.fromarray(texture).resize((s4, s4), Image.NEAREST)
    elif kind < 0.75:
        g = int(round(rng.uniform(120, 135)))
        bg = Image.new("RGB", (s4, s4), (g, g, g))
    else:
        c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        ramp = np.linspace(0, 1, s4)[None, :, None] if rng.random() < 0.5 else np.linspace(0, 1, s4)[:, None, None]
        arr = c0 * (1 - ramp) + c1 * ramp
        if rng.random() < 0.5:
            arr = np.broadcast_to(c0, (s4, s4, 3))
        bg = Image.fromarray(np.ascontiguousarray(np.broadcast_to(arr, (s4, s4, 3))).astype(np.uint8))
    draw = ImageDraw.Draw(bg)
    for _ in range(int(rng.integers(1, 9))):
        col = tuple(int(v) for v in rng.uniform(0, 255, 3))
        x0, y0 = rng.uniform(0, s4, 2)
        w, h = np.exp(rng.uniform(np.log(2.0), np.log(s4 * 0.4), 2))
        shape = rng.integers(0, 4)
        if shape == 0:
            draw.ellipse([x0, y0, x0 + w, y0 + h], fill=col)
        elif shape == 1:
            draw.rectangle([x0, y0, x0 + w, y0 + h], fill=col)
        elif shape == 2:
            pts = [tuple(float(v) for v in (x0, y0) + rng.uniform(-w, w, 2)) for _ in range(int(rng.integers(3, 7)))]
            draw.polygon(pts, fill=col)
        else:
            pts = [tuple(float(v) for v in rng.uniform(0, s4, 2)) for _ in range(int(rng.integers(2, 5)))]
            draw.line(pts, fill=col, width=int(rng.integers(2, 12)))
    small = bg.resize((size, size), Image.BOX)
    arr = np.asarray(small, dtype=np.float32)
    arr = arr + rng.normal(0, rng.uniform(0, 4), arr.shape)
    return np.clip(np.round(arr), 0, 255).astype(np.uint8)


def clutter_pool(config: PretrainConfig, normals: np.ndarray) -> np.ndarray:
    rng = np.random.Generator(np.random.PCG64(md.image_seed(config.seed, "clutter", "pretrain", "any", 0)))
    out = []
    for _ in range(config.clutter):
        tex = normals[int(rng.integers(0, len(normals)))]
        out.append(clutter_image(rng, config.size, tex))
    return np.stack(out)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


# ---------------------------------------------------------------------------------------------------------------------
# models


def build_models(seed: int = 0, config: PretrainConfig | None = None):
    """Fresh (VAE, UNet, text encoder, tokenizer) of ``config``'s architecture (default: the shipped one)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    config = config or PretrainConfig()
    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    vae = AutoencoderKL(**config.vae_config())
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(**config.unet_config())
    torch.manual_seed(seed + 2)
    v = len(tokenizer)
    text = CLIPTextModel(
        CLIPTextConfig(vocab_size=v, bos_token_id=v - 2, eos_token_id=v - 1, pad_token_id=v - 1, **TEXT_CONFIG)
    )
    return vae, unet, text, tokenizer


def _lr(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def _grad_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    dx = lambda t: t[..., :, 1:] - t[..., :, :-1]  # noqa: E731
    dy = lambda t: t[..., 1:, :] - t[..., :-1, :]  # noqa: E731
    return (dx(a) - dx(b)).abs().mean() + (dy(a) - dy(b)).abs().mean()


class _Log:
    def __init__(self, log, total: int, what: str, every: int):
        self.log, self.total, self.what, self.every = log, total, what, every
        self.t0 = time.time()
        self.acc: list[float] = []

    def step(self, i: int, loss: float) -> None:
        self.acc.append(loss)
        if (i + 1) % self.every == 0 or i + 1 == self.total:
            el = time.time() - self.t0
            eta = el / (i + 1) * (self.total - i - 1)
            self.log(
                f"{self.what} {i + 1}/{self.total} loss {np.mean(self.acc):.4f}  {el / 60:.1f} min, "
                f"eta {eta / 60:.1f} min"
            )
            self.acc = []


def train_vae(vae, data: torch.Tensor, config: PretrainConfig, log) -> list[float]:
    dev = data.device
    g = torch.Generator().manual_seed(config.seed + 10)
    opt = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    vae.train()
    c = config.vae_crop
    n, _, h, w = data.shape
    history = []
    lg = _Log(log, config.vae_steps, "vae", config.log_every)
    for step in range(config.vae_steps):
        for group in opt.param_groups:
            group["lr"] = _lr(step, config.vae_steps, config.vae_lr, config.warmup)
        idx = torch.randint(0, n, (config.vae_batch,), generator=g)
        ys = torch.randint(0, h - c + 1, (config.vae_batch,), generator=g)
        xs = torch.randint(0, w - c + 1, (config.vae_batch,), generator=g)
        x = torch.stack(
            [data[i, :, y : y + c, xx : xx + c] for i, y, xx in zip(idx.tolist(), ys.tolist(), xs.tolist())]
        )
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g).to(dev)
        rec = vae.decode(z).sample
        kl = post.kl().mean() / (c * c * 3)
        loss = (rec - x).abs().mean() + config.vae_grad_weight * _grad_l1(rec, x) + 1e-6 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        history.append(float(loss.detach()))
        lg.step(step, history[-1])
    vae.eval()
    return history


def vae_stage(vae, normals: np.ndarray, clutter: np.ndarray, config: PretrainConfig, log) -> tuple[list[float], float]:
    """Stage 1 on a freshly built VAE (already on its device): (loss history, seconds). Shared by :func:`pretrain`
    and ``bench/vae_capacity.py``, so the VAE that benchmark measures is the one a whole run would train."""
    with torch.no_grad():  # start with a small posterior std (the decoder sees the code, not mostly noise)
        vae.quant_conv.bias[vae.config.latent_channels :].fill_(config.vae_logvar_init)
    data = to_tensor(np.concatenate([normals, clutter])).to(next(vae.parameters()).device)
    t0 = time.time()
    history = train_vae(vae, data, config, log)
    return history, time.time() - t0


@torch.no_grad()
def encode_pool(vae, data: torch.Tensor, batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for i in range(0, len(data), batch):
        post = vae.encode(data[i : i + batch]).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    return torch.cat(means), torch.cat(stds)


def train_unet(unet, text, tokenizer, means, stds, captions_fn, config: PretrainConfig, scaling: float, log):
    dev = means.device
    from diffusers import DDPMScheduler

    sched = DDPMScheduler.from_config({k: v for k, v in SD15_SCHEDULER_CONFIG.items() if k != "skip_prk_steps"})
    abar = sched.alphas_cumprod.float().to(dev)
    snr = abar / (1 - abar)
    weight = torch.clamp(snr, max=config.min_snr) / snr
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=config.unet_lr, weight_decay=1e-2)
    ema = [p.detach().clone() for p in params]
    g = torch.Generator().manual_seed(config.seed + 20)
    rng = np.random.Generator(np.random.PCG64(md.image_seed(config.seed, "captions", "pretrain", "any", 0)))
    unet.train()
    text.train()
    n = len(means)
    history = []
    lg = _Log(log, config.unet_steps, "unet", config.log_every)
    for step in range(config.unet_steps):
        for group in opt.param_groups:
            group["lr"] = _lr(step, config.unet_steps, config.unet_lr, config.warmup)
        idx = torch.randint(0, n, (config.unet_batch,), generator=g)
        noise0 = torch.randn((config.unet_batch, *means.shape[1:]), generator=g).to(dev)
        idx = idx.to(dev)
        z0 = (means[idx] + stds[idx] * noise0) * scaling
        caps = [captions_fn(int(i), rng) for i in idx]
        caps = ["" if rng.random() < config.uncond_prob else c for c in caps]
        ids = tokenizer(
            caps, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(dev)
        ctx = text(ids)[0]
        t = torch.randint(0, len(abar), (config.unet_batch,), generator=g).to(dev)
        eps = torch.randn(z0.shape, generator=g).to(dev)
        if config.unet_offset_noise > 0:  # drawn only when on: the default run's random stream is unchanged
            offset = torch.randn((z0.shape[0], z0.shape[1], 1, 1), generator=g).to(dev)
            eps = eps + config.unet_offset_noise * offset
        a = abar[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * eps
        pred = unet(zt, t, encoder_hidden_states=ctx).sample
        loss = ((pred - eps) ** 2).mean(dim=(1, 2, 3))
        loss = (loss * weight[t]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        d = min(config.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema, params):
                e.mul_(d).add_(p.detach(), alpha=1 - d)
        history.append(float(loss.detach()))
        lg.step(step, history[-1])
    with torch.no_grad():
        for e, p in zip(ema, params):
            p.copy_(e)
    unet.eval()
    text.eval()
    return history


# ---------------------------------------------------------------------------------------------------------------------
# sampling a plain text-to-image grid (no DualAnoDiff layers), for a look at the base model


@torch.no_grad()
def sample_base(
    unet,
    vae,
    text,
    tokenizer,
    prompts: Sequence[str],
    *,
    steps: int = 30,
    cfg: float = 3.0,
    seed: int = 0,
    sampler: str = "ddim",
    size: int = 64,
) -> torch.Tensor:
    """Plain classifier-free-guided text-to-image sampling; images ``[N, 3, H, W]`` in [0, 1]."""

    sched = make_scheduler(sampler, SD15_SCHEDULER_CONFIG)
    sched.set_timesteps(steps)
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    g = torch.Generator().manual_seed(seed)
    dev = next(unet.parameters()).device
    x = torch.randn((len(prompts), unet.config.in_channels, size // f, size // f), generator=g).to(dev)
    x = x * sched.init_noise_sigma
    cond = encode_prompts(tokenizer, text, list(prompts))
    uncond = encode_prompts(tokenizer, text, [""]).expand_as(cond)
    ctx = torch.cat([uncond, cond])
    for t in sched.timesteps:
        inp = sched.scale_model_input(torch.cat([x, x]), t)
        eu, ec = unet(inp, t, encoder_hidden_states=ctx).sample.chunk(2)
        x = sched.step(eu + cfg * (ec - eu), t, x).prev_sample
    img = vae.decode(x / vae.config.scaling_factor).sample
    return (img / 2 + 0.5).clamp(0, 1)


def image_grid(images: torch.Tensor, columns: int) -> Image.Image:
    arr = (images.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    n, h, w, _ = arr.shape
    rows = math.ceil(n / columns)
    out = np.zeros((rows * h, columns * w, 3), dtype=np.uint8)
    for k in range(n):
        r, c = divmod(k, columns)
        out[r * h : (r + 1) * h, c * w : (c + 1) * w] = arr[k]
    return Image.fromarray(out)


GRID_PROMPTS = (
    "brushed metal",
    "dark brushed metal",
    "light brushed metal",
    "woven fabric",
    "red woven fabric",
    "blue woven fabric",
    "green woven fabric",
    "",
)


# ---------------------------------------------------------------------------------------------------------------------
# saving


#: the settings that decide stage 1 (the VAE): a VAE reused with ``--vae-from`` must have been made with these
VAE_STAGE_FIELDS = (
    "seed", "size", "pool", "clutter", "vae_steps", "vae_batch", "vae_crop", "vae_lr", "vae_grad_weight",
    "vae_logvar_init", "warmup", "vae_channels", "vae_layers",
)  # fmt: skip

VAE_WEIGHTS = "vae/diffusion_pytorch_model.safetensors"


def load_vae_stage(folder: str | os.PathLike, vae, config: PretrainConfig) -> dict:
    """Load stage 1's result from a model folder this script wrote into the freshly built ``vae``, in place of
    training it, and return what the record says of it.

    Why: the VAE stage is most of a run's time on a CPU (46 of 55 minutes for the wider VAE), and the UNet stage does
    not depend on anything else of it, so trying another UNet stage on the same VAE need not train that VAE again.
    The result is the same file a whole run would write only if the reused VAE is: the folder's ``pretrain.json``
    must record the same stage-1 settings as this run and the VAE file's sha256 must match its record."""
    from safetensors.torch import load_file

    folder = Path(folder)
    rec_path, weights = folder / "pretrain.json", folder / VAE_WEIGHTS
    if not rec_path.is_file() or not weights.is_file():
        raise ValueError(
            f"--vae-from {folder}: not a model folder written by this script (it needs pretrain.json and "
            f"{VAE_WEIGHTS}); give the --out folder of an earlier pre-training"
        )
    try:
        record = json.loads(rec_path.read_text())
        theirs, digest = record["config"], record["sha256"][VAE_WEIGHTS]
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"--vae-from {folder}: {rec_path.name} is unreadable or has no config/sha256 record") from None
    ours = config.to_dict()
    differ = [f"{k} {theirs.get(k)!r} (this run: {ours[k]!r})" for k in VAE_STAGE_FIELDS if theirs.get(k) != ours[k]]
    if differ:
        raise ValueError(
            f"--vae-from {folder}: its VAE was trained with other stage-1 settings: {'; '.join(differ)}. "
            "Give this run the same settings, or leave --vae-from out to train the VAE"
        )
    if sha256_file(weights) != digest:
        raise ValueError(f"--vae-from {folder}: {VAE_WEIGHTS} does not match the sha256 in its pretrain.json")
    state = load_file(str(weights))
    own = vae.state_dict()
    if state.keys() != own.keys() or any(state[k].shape != own[k].shape for k in own):
        raise ValueError(f"--vae-from {folder}: its VAE weights do not fit this run's VAE architecture")
    vae.load_state_dict(state)
    vae.eval()
    return {
        "folder": str(folder),
        "sha256": digest,
        "seconds": (record.get("seconds") or {}).get("vae"),
        "final_loss": (record.get("final_loss") or {}).get("vae"),
    }


def save_model(folder: Path, vae, unet, text, tokenizer, record: dict) -> None:
    """A diffusers Stable Diffusion folder (fp32 safetensors) + ``pretrain.json`` (how it was made)."""
    from diffusers import PNDMScheduler

    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    unet.save_pretrained(tmp / "unet", safe_serialization=True)
    vae.save_pretrained(tmp / "vae", safe_serialization=True)
    text.save_pretrained(tmp / "text_encoder", safe_serialization=True)
    tokenizer.save_pretrained(tmp / "tokenizer")
    write_tokenizer_files(tmp / "tokenizer")  # vocab.json + merges.txt too, for the slow CLIPTokenizer
    PNDMScheduler.from_config(SD15_SCHEDULER_CONFIG).save_pretrained(tmp / "scheduler")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": _version("diffusers"),
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }
    write_json_atomic(tmp / "model_index.json", index)
    files = {}
    for p in sorted(tmp.rglob("*")):
        if p.is_file() and p.name != "pretrain.json":
            files[str(p.relative_to(tmp))] = sha256_file(p)
    write_json_atomic(tmp / "pretrain.json", dict(record, sha256=files))
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)


def _version(pkg: str) -> str:
    try:
        from importlib.metadata import version

        return version(pkg)
    except Exception:  # pragma: no cover
        return "unknown"


# ---------------------------------------------------------------------------------------------------------------------
# the whole run


def pretrain(
    out: str | os.PathLike,
    config: PretrainConfig | None = None,
    log: Callable[[str], None] | None = None,
    grid: str | os.PathLike | None = None,
    device: str = "cpu",
    command: str | None = None,
    vae_from: str | os.PathLike | None = None,
) -> Path:
    """Run both stages and write the model folder ``out``. Returns it.

    ``vae_from``: take stage 1 (the VAE) from that earlier model folder instead of training it
    (:func:`load_vae_stage`: same stage-1 settings, verified file); the record names it.

    On CUDA, deterministic algorithms are switched on (and cuBLAS is given a fixed workspace) so that a rerun on
    the same GPU and software reproduces the files bit for bit, as a CPU run with one thread does."""
    config = config or PretrainConfig()
    config.vae_config(), config.unet_config()  # a bad architecture option fails before any work
    if str(device).startswith("cuda"):
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    out = Path(out)
    t_start = time.time()
    log(f"MiniDefect base model pre-training, {torch.get_num_threads()} thread(s), config {config.to_dict()}")
    normals, products, params = normal_pool(config, log)
    clutter = clutter_pool(config, normals)
    vae, unet, text, tokenizer = build_models(config.seed, config)
    vae, unet, text = vae.to(device), unet.to(device), text.to(device)
    reused = None
    if vae_from is not None:
        reused = load_vae_stage(vae_from, vae, config)
        vae_hist, vae_time = [], 0.0  # its loss is in its own record (``vae_reused_from``)
        log(f"vae stage reused from {vae_from} (sha256 {reused['sha256'][:12]}...)")
    else:
        vae_hist, vae_time = vae_stage(vae, normals, clutter, config, log)
    means, stds = encode_pool(vae, to_tensor(normals).to(device))
    std = float(
        (
            means
            + stds * torch.randn(means.shape, generator=torch.Generator().manual_seed(config.seed + 30)).to(device)
        ).std()
    )
    scaling = round(1.0 / std, 5)
    vae.register_to_config(scaling_factor=scaling)
    log(f"vae done in {vae_time / 60:.1f} min; latent std {std:.4f} -> scaling_factor {scaling}")

    def captions_fn(i: int, rng: np.random.Generator) -> str:
        return caption(products[i], params[i], rng)

    t0 = time.time()
    unet_hist = train_unet(unet, text, tokenizer, means, stds, captions_fn, config, scaling, log)
    unet_time = time.time() - t0
    log(f"unet done in {unet_time / 60:.1f} min")
    with torch.no_grad():
        sub = to_tensor(normals[:: max(1, len(normals) // 256)]).to(device)
        rec_l1 = float((vae.decode(vae.encode(sub).latent_dist.mean).sample - sub).abs().mean() / 2)
    record = {
        "what": "MiniDefect base model (SD1.x architecture), pre-trained on MiniDefect normal images",
        "command": command
        or "OMP_NUM_THREADS=1 python scripts/pretrain_minidefect.py --out dualanodiff_core/assets/minidefect-sd",
        "config": config.to_dict(),
        "vae_config": _jsonable(config.vae_config()),
        "unet_config": _jsonable(config.unet_config()),
        "text_config": TEXT_CONFIG,
        "scaling_factor": scaling,
        "seconds": {"vae": round(vae_time, 1), "unet": round(unet_time, 1), "total": round(time.time() - t_start, 1)},
        "threads": torch.get_num_threads(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if str(device).startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "diffusers": _version("diffusers"),
        "transformers": _version("transformers"),
        "numpy": np.__version__,
        "final_loss": {
            "vae": reused["final_loss"] if reused else float(np.mean(vae_hist[-100:])),
            "unet": float(np.mean(unet_hist[-200:])),
        },
        "vae_reconstruction_l1_normals": round(rec_l1, 5),
        "prompts": {p: md.PRODUCT_PROMPTS[p] for p in md.PRODUCTS},
    }
    if reused is not None:
        record["vae_reused_from"] = reused
    vae, unet, text = vae.cpu(), unet.cpu(), text.cpu()
    save_model(out, vae, unet, text, tokenizer, record)
    log(
        f"wrote {out} ({sum(p.stat().st_size for p in out.rglob('*') if p.is_file()) / 1e6:.1f} MB) in "
        f"{(time.time() - t_start) / 60:.1f} min"
    )
    if grid is not None:
        imgs = sample_base(unet, vae, text, tokenizer, [p for p in GRID_PROMPTS for _ in range(6)], seed=config.seed)
        image_grid(imgs, 6).save(grid)
        log(f"sample grid: {grid} (rows: {', '.join(repr(p) for p in GRID_PROMPTS)})")
    return out


def _jsonable(d: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="Pre-train the MiniDefect base model (CPU; see module doc).")
    p.add_argument("--out", required=True, help="model folder to write (replaced if it exists)")
    p.add_argument("--grid", help="also write a sample grid PNG here")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda (the shipped model was made on CPU)")
    p.add_argument(
        "--vae-from",
        help="reuse the VAE of an earlier pre-training (its --out folder, made with the same stage-1 settings) "
        "instead of training it: only the UNet stage runs",
    )
    for f in dataclasses.fields(PretrainConfig):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    a = p.parse_args(argv)
    cfg = PretrainConfig(**{f.name: getattr(a, f.name) for f in dataclasses.fields(PretrainConfig)})
    try:
        cfg.vae_config(), cfg.unet_config()
        if a.vae_from is not None:  # a bad folder fails here, before the data is built
            load_vae_stage(a.vae_from, build_models(cfg.seed, cfg)[0], cfg)
    except ValueError as e:
        p.error(str(e))
    args = sys.argv[1:] if argv is None else list(argv)
    command = " ".join(
        [f"OMP_NUM_THREADS={torch.get_num_threads()}", "python", "scripts/pretrain_minidefect.py", *args]
    )
    pretrain(a.out, cfg, grid=a.grid, device=a.device, command=command, vae_from=a.vae_from)
    return 0


if __name__ == "__main__":
    sys.exit(main())
