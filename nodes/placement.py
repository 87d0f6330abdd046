"""Placement control in ComfyUI (docs/placement.md): the DualAnoDiff Sampler's ``placement`` / ``normal`` inputs build
an inpainting-style start latent (and, with a region, steer the defect into it: :func:`steered_sample`), and
DualAnoDiff Composite Onto Normal pastes the result into the photo."""

from __future__ import annotations

import torch
from comfy_api.latest import io

from ..dualanodiff_core.method.layout import interleave, share_anomaly_noise
from ..dualanodiff_core.method.placement import (
    DEFAULT_FEATHER,
    PlacementError,
    as_region,
    composite,
    feather_alpha,
    latent_region,
    plan_steering,
    ramp_anomaly_rows,
    ramp_weight,
    roll_pairs,
)
from .images import check_images, check_masks


def _rows(t: torch.Tensor, n: int, what: str) -> torch.Tensor:
    if t.shape[0] == n:
        return t
    if t.shape[0] == 1:
        return t.expand(n, *t.shape[1:])
    raise PlacementError(f"{what}: {t.shape[0]} in the batch for {n} pair(s); give 1 or {n}.")


def placement_start(
    vae, pairs: int, width: int, height: int, placement=None, normal=None
) -> tuple[dict, int, torch.Tensor]:
    """The sampler's start LATENT for a placement region and/or normal photos: rows ``[g, a, g, a, ...]`` hold the
    photo's latent (or zeros) and the mid-gray latent, and ``noise_mask`` (1 = generate) is the region on anomaly
    rows and, with a photo, on global rows (everything elsewhere). Returns (latent, pairs, region on the latent grid
    ``[pairs, 1, h, w]``)."""
    if vae is None:
        raise PlacementError("placement / normal need the vae input (to encode the photo and the gray background).")
    if normal is not None:
        normal = check_images(normal, "normal")[..., :3]
        pairs, height, width = normal.shape[0], normal.shape[1], normal.shape[2]
        if width % 8 or height % 8:
            raise PlacementError(f"normal: the photos are {width}x{height}; width and height must be multiples of 8.")
    if placement is not None:
        m = check_masks(placement, "placement")
        if tuple(m.shape[1:]) != (height, width):
            raise PlacementError(
                f"placement: the mask is {m.shape[2]}x{m.shape[1]} but the images are {width}x{height}; give a "
                "mask of the image size."
            )
        region = _rows(as_region(m.float().cpu()), pairs, "placement")
    else:
        region = torch.ones((pairs, 1, height, width))
    lat_region = latent_region(region, (height // 8, width // 8))
    gray = vae.encode(torch.full((1, height, width, 3), 0.5))
    if normal is not None:
        photo = vae.encode(normal)
        g_mask = lat_region.to(photo.device)
    else:
        photo = torch.zeros_like(gray).expand(pairs, -1, -1, -1)
        g_mask = torch.ones_like(lat_region).to(photo.device)
    samples = interleave(photo.float(), gray.float().expand(pairs, -1, -1, -1).to(photo.device))
    mask = interleave(g_mask[:, 0], lat_region[:, 0].to(photo.device))
    return {"samples": samples.contiguous(), "noise_mask": mask.contiguous()}, pairs, lat_region


#: the DualAnoDiff Sampler's ``placement_steering`` choices: ``shift`` steers (probe, shift, ramped hold), ``hold``
#: holds the anomaly branch at gray outside the region from the first step (the behaviour before steering)
STEERING_CHOICES = ("shift", "hold")


def pair_noise(latent_image: torch.Tensor, seed: int, anomaly_noise_share: float = 0.0) -> torch.Tensor:
    """The starting noise of the interleaved rows ``[g0, a0, g1, a1, ...]``: ComfyUI's own
    (``comfy.sample.prepare_noise``, as KSampler makes it; our start latents have no ``batch_index``), with each
    anomaly row then correlated ``anomaly_noise_share`` with its global row's as the CLI and the Python API do it
    (``share_anomaly_noise``). Share 0 returns ComfyUI's noise untouched, so prompts without the input sample exactly
    as before."""
    import comfy.sample

    noise = comfy.sample.prepare_noise(latent_image, seed)
    if anomaly_noise_share:
        noise = share_anomaly_noise(noise, anomaly_noise_share)
    return noise


def steered_sample(
    model, seed, steps, cfg, sampler_name, scheduler, positive, negative, start, denoise, region_latent, steering,
    anomaly_noise_share=0.0,
):  # fmt: skip
    """What ``nodes.common_ksampler`` does, with steering (dualanodiff_core.method.placement.Steering), as the core
    sampler does it: the chosen sampler runs the first ``steering.probe`` share of the steps with the anomaly rows
    free; the core (:func:`plan_steering`) picks each pair's shift from the anomaly branch's predicted clean latent;
    the latents and the noise the held rows are noised with are rolled; the sampler runs the remaining steps (a
    multistep sampler restarts its history there) with the anomaly rows' hold outside the region ramped in (through
    ComfyUI's ``denoise_mask_function``). Pair ``j``'s shift is picked by ``seed + j``, as the Python API does.
    The starting noise is :func:`pair_noise` (``anomaly_noise_share``). Returns (samples, per-pair steering records
    or None)."""
    import comfy.sample
    import comfy.samplers
    import comfy.utils
    import latent_preview

    latent_image = comfy.sample.fix_empty_latent_channels(model, start["samples"])
    noise = pair_noise(latent_image, seed, anomaly_noise_share)
    mask = start["noise_mask"]
    callback = latent_preview.prepare_callback(model, steps)
    disable_pbar = not comfy.utils.PROGRESS_BAR_ENABLED
    sigmas = comfy.samplers.KSampler(
        model, steps=steps, device=model.load_device, sampler=sampler_name, scheduler=scheduler, denoise=denoise,
        model_options=model.model_options,
    ).sigmas  # fmt: skip
    n = len(sigmas) - 1
    k = steering.probe_steps(n) if n > 1 else 0
    k = k if k < n else 0
    if k == 0 and steering.ramp <= 0:  # the hold alone: exactly common_ksampler
        samples = comfy.sample.sample(
            model, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise=denoise,
            noise_mask=mask, callback=callback, disable_pbar=disable_pbar, seed=seed,
        )  # fmt: skip
        return samples, None
    base = comfy.samplers.sampler_object(sampler_name)
    pairs = latent_image.shape[0] // 2
    records = [] if k > 0 else None
    sampler = base
    if k > 0:
        inner = base.sampler_function
        seeds = [int(seed) + j for j in range(pairs)]
        gray = latent_image[1:2]

        def steered(model_k, x, sigmas_, extra_args=None, callback=None, disable=None, **kw):
            seen = {}

            def first(d):
                seen["x0"] = d["denoised"]
                if callback is not None:
                    callback(d)

            def rest(d):
                if callback is not None:
                    callback({**d, "i": d["i"] + k})

            x = inner(model_k, x, sigmas_[: k + 1], extra_args=extra_args, callback=first, disable=disable, **kw)
            g = model.model.process_latent_in(gray.to(x.device)).float().cpu()
            shifts, recs = plan_steering(seen["x0"][1::2].float().cpu(), g, region_latent.cpu(), seeds, steering, k, 8)
            records.extend(recs)
            model_k.noise = roll_pairs(model_k.noise, shifts)
            x = roll_pairs(x, shifts)
            return inner(model_k, x, sigmas_[k:], extra_args=extra_args, callback=rest, disable=disable, **kw)

        sampler = comfy.samplers.KSAMPLER(steered, base.extra_options, base.inpaint_options)
    model = model.clone()
    previous = model.model_options.get("denoise_mask_function")

    def ramped(sigma, denoise_mask, extra_options):
        if previous is not None:
            denoise_mask = previous(sigma, denoise_mask, extra_options)
        all_sigmas = extra_options["sigmas"]
        i = int((all_sigmas - sigma.reshape(-1)[0].to(all_sigmas)).abs().argmin())
        # model call i: the core's weight after step i; 0 while the anomaly branch still runs free
        w = 0.0 if i < k else ramp_weight(i, len(all_sigmas) - 1, steering.ramp, k)
        return ramp_anomaly_rows(denoise_mask, w, generate=True)

    model.model_options["denoise_mask_function"] = ramped
    samples = comfy.sample.sample_custom(
        model, noise, cfg, sampler, sigmas, positive, negative, latent_image, noise_mask=mask, callback=callback,
        disable_pbar=disable_pbar, seed=seed,
    )  # fmt: skip
    return samples, records


class CompositeOnNormal(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DualAnoDiffCompositeOnNormal",
            display_name="DualAnoDiff Composite Onto Normal",
            category="DualAnoDiff/sampling",
            description=(
                "Pastes decoded images generated onto normal photos (DualAnoDiff Sampler with a normal input) back "
                "into those photos: inside the placement region the generated pixels, fading out over a feathered "
                "band, and outside the band the photo's pixels exactly (the VAE would otherwise change them a "
                "little)."
            ),
            inputs=[
                io.Image.Input("images", tooltip="The decoded global-branch images."),
                io.Image.Input("normal", tooltip="The normal photos the images were generated onto (same order)."),
                io.Int.Input(
                    "feather",
                    default=DEFAULT_FEATHER,
                    min=0,
                    max=256,
                    tooltip="Width in pixels of the band outside the region where the result fades into the photo.",
                ),
                io.Mask.Input(
                    "placement",
                    optional=True,
                    tooltip="The placement region given to the sampler (white = defects allowed); without it the "
                    "whole image is generated and nothing is pasted.",
                ),
            ],
            outputs=[io.Image.Output(display_name="IMAGE", tooltip="The photos with the generated region.")],
        )

    @classmethod
    def execute(cls, images, normal, feather, placement=None) -> io.NodeOutput:
        images = check_images(images, "images")
        normal = check_images(normal, "normal")[..., :3]
        b, h, w = images.shape[:3]
        if tuple(normal.shape[1:3]) != (h, w):
            raise PlacementError(
                f"normal: the photos are {normal.shape[2]}x{normal.shape[1]} but the images are {w}x{h}; connect the "
                "photos given to the sampler."
            )
        normal = _rows(normal, b, "normal")
        if placement is None:
            return io.NodeOutput(images)
        m = check_masks(placement, "placement")
        if tuple(m.shape[1:]) != (h, w):
            raise PlacementError(f"placement: the mask is {m.shape[2]}x{m.shape[1]} but the images are {w}x{h}.")
        alpha = feather_alpha(_rows(as_region(m.float().cpu()), b, "placement"), int(feather))
        out = composite(
            images[..., :3].movedim(-1, 1).float().cpu(), normal.movedim(-1, 1).float().cpu(), alpha
        ).movedim(1, -1)
        return io.NodeOutput(out.contiguous())


NODES = [CompositeOnNormal]
