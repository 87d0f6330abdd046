"""Sampling pairs: the DualAnoDiff Sampler, and the small nodes that let a stock sampler do the same."""

from __future__ import annotations

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview
import torch
from comfy_api.latest import io

import nodes as comfy_nodes

from ..dualanodiff_core.errors import InputError
from ..dualanodiff_core.method.layout import split
from ..dualanodiff_core.method.placement import HOLD_ONLY, Steering
from . import comfy_backend as backend
from .conditioning import check_negative, pair_conditioning, pair_latent, split_images, split_latent
from .placement import STEERING_CHOICES, PlacementError, pair_noise, placement_start, steered_sample

CATEGORY = "DualAnoDiff/sampling"

#: the ``anomaly_noise_share`` widget's default on a new node: 1 = each anomaly row starts from its global row's noise
#: (``dualanodiff generate --anomaly-noise-share``; on MiniDefect the two branches then place the defect alike)
DEFAULT_ANOMALY_NOISE_SHARE = 1.0
#: ``anomaly_noise_share`` when a prompt does not give it: prompts saved before the input existed sampled with
#: independent noise, so they keep doing so (the widget's default is only for new nodes)
ANOMALY_NOISE_SHARE_WHEN_MISSING = 0.0


def check_noise_share(value) -> float:
    """``anomaly_noise_share`` as a float in [0, 1], or one clear error naming the input."""
    share = backend.float_in_range(value, 0.0, 1.0)
    if share is None:
        raise InputError(
            f"anomaly_noise_share {value!r}: must lie in [0, 1] (0 = independent noise for the two branches, "
            "1 = each anomaly row starts from its global row's noise)."
        )
    return share


def sample_pairs(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, start, denoise, share):
    """What ``nodes.common_ksampler`` does with the start LATENTs this node builds (no ``batch_index``), with the
    starting noise from :func:`pair_noise` so that each anomaly row can share its global row's noise. Returns the
    sampled rows."""
    latent_image = comfy.sample.fix_empty_latent_channels(model, start["samples"])
    noise = pair_noise(latent_image, seed, share)
    return comfy.sample.sample(
        model, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise=denoise,
        noise_mask=start.get("noise_mask"), callback=latent_preview.prepare_callback(model, steps),
        disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed,
    )  # fmt: skip


class DualSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DualAnoDiffSampler",
            display_name="DualAnoDiff Sampler",
            category=CATEGORY,
            description=(
                "Samples (whole image, defect-only) pairs with a DualAnoDiff MODEL: both branches run together in one "
                "batch of interleaved rows [global, anomaly, global, anomaly, ...], each with its own prompt, and "
                "share attention through SAIM. Decode each output with the VAE. Same samplers, schedulers, "
                "previews and progress bar as KSampler."
            ),
            inputs=[
                io.Model.Input("model", tooltip="A MODEL from the DualAnoDiff LoRA Loader (optionally patched)."),
                io.Conditioning.Input(
                    "positive_global", tooltip="Prompt of the global branch (the whole image), e.g. 'a vfx with sks'."
                ),
                io.Conditioning.Input(
                    "positive_anomaly", tooltip="Prompt of the anomaly branch (the defect alone on gray), e.g. 'sks'."
                ),
                io.Conditioning.Input(
                    "negative", tooltip="Negative prompt for both branches (the reference uses an empty prompt)."
                ),
                io.Int.Input(
                    "pairs",
                    default=1,
                    min=1,
                    max=256,
                    tooltip="Number of (image, defect) pairs to generate; the batch is twice this. Ignored "
                    "when a latent is connected.",
                ),
                io.Int.Input(
                    "width",
                    default=512,
                    min=64,
                    max=comfy_nodes.MAX_RESOLUTION,
                    step=8,
                    tooltip="Width in pixels (DualAnoDiff is trained at 512). Ignored when a latent is connected.",
                ),
                io.Int.Input(
                    "height",
                    default=512,
                    min=64,
                    max=comfy_nodes.MAX_RESOLUTION,
                    step=8,
                    tooltip="Height in pixels. Ignored when a latent is connected.",
                ),
                io.Int.Input(
                    "seed",
                    default=0,
                    min=0,
                    max=0xFFFFFFFFFFFFFFFF,
                    control_after_generate=True,
                    tooltip="The random seed of the noise of both branches.",
                ),
                io.Int.Input("steps", default=30, min=1, max=10000, tooltip="Number of denoising steps."),
                io.Float.Input(
                    "cfg",
                    default=2.5,
                    min=0.0,
                    max=100.0,
                    step=0.1,
                    round=0.01,
                    tooltip="Classifier-free guidance scale; the reference samples with 2.5 (2.0 with "
                    "background compensation).",
                ),
                io.Combo.Input(
                    "sampler_name",
                    options=comfy.samplers.KSampler.SAMPLERS,
                    default="dpmpp_2m",
                    tooltip="The sampling algorithm.",
                ),
                io.Combo.Input(
                    "scheduler",
                    options=comfy.samplers.KSampler.SCHEDULERS,
                    default="karras",
                    tooltip="How the noise level decreases over the steps.",
                ),
                io.Float.Input(
                    "denoise",
                    default=1.0,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="1 = generate from noise; lower values keep the connected latent's structure "
                    "(image to image).",
                ),
                io.Latent.Input(
                    "latent",
                    optional=True,
                    tooltip="Optional starting latent: one pair per latent image, both rows of a pair "
                    "start from it; its size replaces width/height. A noise mask applies to the "
                    "global image only.",
                ),
                io.Mask.Input(
                    "placement",
                    optional=True,
                    tooltip="Optional placement region (white = a defect may appear there, the image size; one mask "
                    "or one per pair): the anomaly branch is held at the gray background outside it at every step. "
                    "Needs the vae input; not with a latent.",
                ),
                io.Image.Input(
                    "normal",
                    optional=True,
                    tooltip="Optional normal photos to put the defects on (one pair per photo; their size replaces "
                    "width/height): the whole image is held at the photo outside the placement region at every "
                    "step. Paste the decoded result back with DualAnoDiff Composite Onto Normal. Needs the vae input.",
                ),
                io.Vae.Input(
                    "vae", optional=True, tooltip="The VAE, to encode the normal photos and the gray background."
                ),
                io.Combo.Input(
                    "placement_steering",
                    options=list(STEERING_CHOICES),
                    default="shift",
                    optional=True,
                    tooltip="With a placement region: 'shift' probes the first steps to see where each defect forms "
                    "and shifts the starting noise so that it forms inside the region, then holds the anomaly branch "
                    "at gray outside it (ramped in); 'hold' only holds it there from the first step (erases more "
                    "defects than it moves).",
                ),
                # added after the others (widget order is an API); optional so that prompts saved before it
                # existed still validate, and they sample as they did (ANOMALY_NOISE_SHARE_WHEN_MISSING)
                io.Float.Input(
                    "anomaly_noise_share",
                    default=DEFAULT_ANOMALY_NOISE_SHARE,
                    min=0.0,
                    max=1.0,
                    step=0.05,
                    optional=True,
                    tooltip="How much each pair's anomaly row starts from the same noise as its global row: its "
                    "starting noise is share x the global row's + sqrt(1 - share^2) x its own (1 = the same noise, "
                    "so both branches tend to put the defect at the same spot; 0 = independent, the reference and "
                    "this node before the input existed). As dualanodiff generate --anomaly-noise-share. Only the "
                    "starting noise: the fresh noise that ancestral and SDE samplers add at each step stays "
                    "independent. Workflows saved without this input sample with 0.",
                ),
            ],
            outputs=[
                io.Latent.Output(display_name="global", tooltip="The whole images (one per pair)."),
                io.Latent.Output(display_name="anomaly", tooltip="The defect-only images on gray (one per pair)."),
            ],
        )

    @classmethod
    def validate_inputs(cls, sampler_name=None):
        # ComfyUI 0.3.64 does not check V3 combo values when a prompt is queued. It reports a validation error on
        # every input this method takes, so it takes one; a bad scheduler is refused when the node runs
        if sampler_name is not None and sampler_name not in comfy.samplers.KSampler.SAMPLERS:
            return f"unknown sampler {sampler_name!r}; choose one of {', '.join(comfy.samplers.KSampler.SAMPLERS)}"
        return True

    @classmethod
    def execute(
        cls,
        model,
        positive_global,
        positive_anomaly,
        negative,
        pairs,
        width,
        height,
        seed,
        steps,
        cfg,
        sampler_name,
        scheduler,
        denoise,
        latent=None,
        placement=None,
        normal=None,
        vae=None,
        placement_steering="shift",
        anomaly_noise_share=ANOMALY_NOISE_SHARE_WHEN_MISSING,
    ) -> io.NodeOutput:
        if scheduler not in comfy.samplers.KSampler.SCHEDULERS:
            raise ValueError(
                f"unknown scheduler {scheduler!r}; choose one of {', '.join(comfy.samplers.KSampler.SCHEDULERS)}"
            )
        backend.require_dual(model, "DualAnoDiff Sampler")
        positive = pair_conditioning(positive_global, positive_anomaly)
        check_negative(negative)
        if placement_steering not in STEERING_CHOICES:
            raise PlacementError(
                f"placement_steering {placement_steering!r}: choose one of {', '.join(STEERING_CHOICES)}."
            )
        share = check_noise_share(anomaly_noise_share)
        if placement is not None or normal is not None:
            if latent is not None:
                raise PlacementError("connect either a latent or placement / normal, not both.")
            if width % 8 or height % 8:
                raise ValueError(f"width and height must be multiples of 8, got {width}x{height}.")
            start, _, region = placement_start(vae, pairs, width, height, placement, normal)
            start = {k: v.to(comfy.model_management.intermediate_device()) for k, v in start.items()}
            if placement is not None:
                steering = Steering() if placement_steering == "shift" else HOLD_ONLY
                samples, _ = steered_sample(
                    model, seed, steps, cfg, sampler_name, scheduler, positive, negative, start, denoise, region,
                    steering, anomaly_noise_share=share,
                )  # fmt: skip
                g, a = split(samples, "the sampled batch")
                return io.NodeOutput({"samples": g.clone()}, {"samples": a.clone()})
        elif latent is not None:
            start = pair_latent(latent)
        else:
            if width % 8 or height % 8:
                raise ValueError(f"width and height must be multiples of 8, got {width}x{height}.")
            start = {
                "samples": torch.zeros(
                    [2 * pairs, 4, height // 8, width // 8], device=comfy.model_management.intermediate_device()
                )
            }
        samples = sample_pairs(
            model, seed, steps, cfg, sampler_name, scheduler, positive, negative, start, denoise, share
        )
        g, a = split(samples, "the sampled batch")
        out_g = dict(latent) if latent is not None else {}
        out_g.pop("batch_index", None)
        out_g["samples"] = g.clone()
        return io.NodeOutput(out_g, {"samples": a.clone()})


class PairConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DualAnoDiffPairConditioning",
            display_name="DualAnoDiff Pair Conditioning",
            category=CATEGORY,
            description=(
                "Builds the positive for sampling a DualAnoDiff MODEL with any stock sampler (KSampler, "
                "SamplerCustom...): one conditioning holding both prompts [global, anomaly], which ComfyUI repeats "
                "over the batch so even rows get the global prompt and odd rows the anomaly prompt. Use it with "
                "Empty Latent Image batch_size = 2 x pairs, then split the result with DualAnoDiff Split Latent "
                "Pairs."
            ),
            inputs=[
                io.Conditioning.Input(
                    "global_prompt",
                    tooltip="The encoded prompt of the global branch (a CONDITIONING from CLIP Text Encode, e.g. of "
                    "'a vfx with sks'). Shown as 'global conditioning'; the input id stays global_prompt.",
                ),
                io.Conditioning.Input(
                    "anomaly_prompt",
                    tooltip="The encoded prompt of the anomaly branch (a CONDITIONING from CLIP Text Encode, e.g. of "
                    "'sks'). Shown as 'anomaly conditioning'.",
                ),
            ],
            outputs=[
                io.Conditioning.Output(display_name="CONDITIONING", tooltip="The paired positive [global, anomaly].")
            ],
        )

    @classmethod
    def execute(cls, global_prompt, anomaly_prompt) -> io.NodeOutput:
        return io.NodeOutput(pair_conditioning(global_prompt, anomaly_prompt))


class SplitLatentPairs(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DualAnoDiffSplitLatentPairs",
            display_name="DualAnoDiff Split Latent Pairs",
            category=CATEGORY,
            description="Splits an interleaved batch [global, anomaly, global, anomaly, ...] (a stock sampler's "
            "output on a DualAnoDiff MODEL) into the global latents and the anomaly latents.",
            inputs=[io.Latent.Input("latent", tooltip="The interleaved latent batch (an even number of rows).")],
            outputs=[
                io.Latent.Output(display_name="global", tooltip="Rows 0, 2, 4, ...: the whole images."),
                io.Latent.Output(display_name="anomaly", tooltip="Rows 1, 3, 5, ...: the defect-only images."),
            ],
        )

    @classmethod
    def execute(cls, latent) -> io.NodeOutput:
        return io.NodeOutput(*split_latent(latent))


class SplitImagePairs(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DualAnoDiffSplitImagePairs",
            display_name="DualAnoDiff Split Image Pairs",
            category=CATEGORY,
            description="Splits an interleaved IMAGE batch [global, anomaly, global, anomaly, ...] (e.g. a decoded "
            "stock-sampler result) into the whole images and the defect-only images.",
            inputs=[io.Image.Input("images", tooltip="The interleaved image batch (an even number of images).")],
            outputs=[
                io.Image.Output(display_name="global", tooltip="Images 0, 2, 4, ...: the whole images."),
                io.Image.Output(display_name="anomaly", tooltip="Images 1, 3, 5, ...: the defect-only images."),
            ],
        )

    @classmethod
    def execute(cls, images) -> io.NodeOutput:
        return io.NodeOutput(*split_images(images))


NODES = [DualSampler, PairConditioning, SplitLatentPairs, SplitImagePairs]
