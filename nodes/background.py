"""DualAnoDiff Background Compensate: condition the global branch on a normal product background (BCM)."""

from __future__ import annotations

import torch
from comfy_api.latest import io

from . import comfy_backend as backend


def background_pixels(image: torch.Tensor, object_mask: torch.Tensor | None) -> torch.Tensor:
    """The reference's background: the image with the object region blacked out, ``image * (1 - mask)``.

    ``image`` is a ComfyUI IMAGE ``[B, H, W, C]``, ``object_mask`` a MASK ``[B, H, W]`` (white = object). An all-zero
    mask (what Load Image gives for a picture without transparency) means there is nothing to black out.
    """
    if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[-1] < 3:
        raise backend.DualAnoDiffError("background: expected an IMAGE [batch, height, width, channels].")
    image = image[..., :3].float()
    if object_mask is None:
        return image
    m = object_mask.float()
    if m.ndim == 2:
        m = m[None]
    if m.ndim != 3:
        raise backend.DualAnoDiffError(f"object_mask: expected a MASK [batch, height, width], got {tuple(m.shape)}.")
    if not bool((m > 0).any()):
        return image
    if tuple(m.shape[-2:]) != tuple(image.shape[1:3]):
        raise backend.DualAnoDiffError(
            f"object_mask is {m.shape[-1]}x{m.shape[-2]} but the background image is {image.shape[2]}x"
            f"{image.shape[1]}; give a mask of the same size (white = object, blacked out)."
        )
    if m.shape[0] != image.shape[0]:
        if m.shape[0] == 1:
            m = m.expand(image.shape[0], -1, -1)
        elif image.shape[0] == 1:
            image = image.expand(m.shape[0], -1, -1, -1)
        else:
            raise backend.DualAnoDiffError(
                f"{image.shape[0]} background images but {m.shape[0]} object masks; give one mask, or one per image."
            )
    return image * (1.0 - m.clamp(0.0, 1.0))[..., None]


class BackgroundCompensate(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DualAnoDiffBackgroundCompensate",
            display_name="DualAnoDiff Background Compensate (BCM)",
            category="DualAnoDiff/model",
            description=(
                "Background compensation (for weights trained with BCM): at every step the UNet first runs over the "
                "noised background (a normal product image with the object blacked out) and the global branch "
                "then blends those features into its self-attention, so the generated image keeps that background. "
                "The unconditional (CFG) half sees a mid-gray background, as in the reference. Costs one extra "
                "UNet pass per pair and step. Works with the DualAnoDiff Sampler and with stock samplers."
            ),
            inputs=[
                io.Model.Input("model", tooltip="A MODEL from the DualAnoDiff LoRA Loader whose weights include BCM."),
                io.Vae.Input("vae", tooltip="The VAE of the checkpoint; encodes the background."),
                io.Image.Input(
                    "background",
                    tooltip="Normal (defect-free) product image(s) at the generation size: 1 image for "
                    "every pair, or one per pair.",
                ),
                io.Float.Input(
                    "strength",
                    default=1.0,
                    min=0.0,
                    max=2.0,
                    step=0.01,
                    tooltip="Scale of the learned background fusion: 1 = as trained, 0 = off.",
                ),
                io.Int.Input(
                    "seed",
                    default=0,
                    min=0,
                    max=0xFFFFFFFFFFFFFFFF,
                    tooltip="Seed of the fresh noise added to the background at every step (the reference "
                    "re-noises it each step); fixed for reproducible results.",
                ),
                io.Mask.Input(
                    "object_mask",
                    optional=True,
                    tooltip="Optional object mask (white = object). The object region is blacked out, as "
                    "in the reference. Load Image's MASK works: transparent pixels = object.",
                ),
            ],
            outputs=[io.Model.Output(display_name="MODEL", tooltip="The model with background compensation.")],
        )

    @classmethod
    def execute(cls, model, vae, background, strength, seed, object_mask=None) -> io.NodeOutput:
        opts = backend.require_dual(model, "DualAnoDiff Background Compensate")
        if not opts.get("has_bcm"):
            raise backend.DualAnoDiffError(
                "DualAnoDiff Background Compensate: these weights were trained without background compensation "
                "(no BCM layers). Remove this node or load weights trained with BCM."
            )
        pixels = background_pixels(background, object_mask)
        latents = vae.encode(pixels)  # ComfyUI's raw VAE latent: no scaling factor, no process_latent_in
        gray = vae.encode(torch.full((1, pixels.shape[1], pixels.shape[2], 3), 0.5))
        ratio = vae.downscale_ratio if isinstance(vae.downscale_ratio, int) else 8
        bg = backend.Background(
            latents=latents.detach().float().cpu(),
            gray=gray.detach().float().cpu(),
            pixels=(latents.shape[-2] * ratio, latents.shape[-1] * ratio),
            seed=int(seed),
        )
        m = model.clone()
        wrapper = backend.apply_model_wrapper(m) or backend.DualApplyModel(backend.attention_sites(m))
        backend.set_apply_model_wrapper(m, wrapper.with_background(bg))
        backend.set_options(m, bcm=float(strength))
        return io.NodeOutput(m)


NODES = [BackgroundCompensate]
