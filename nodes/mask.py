"""DualAnoDiff Mask From Anomaly Branch: the decoded anomaly-branch image (defect alone on mid-gray) -> a MASK."""

from __future__ import annotations

import logging

import numpy as np
import torch
from comfy_api.latest import io

from ..dualanodiff_core.dataset.export import mask_overlay
from ..dualanodiff_core.dataset.masks import MaskOptions, extract_mask
from .images import ImageInputError, check_images, from_pil, to_numpy, to_pil

log = logging.getLogger("DualAnoDiff")

GRAY_CHOICES = ["median", "border", "0.5"]


def mask_options(
    gray="median",
    threshold=0.0,
    min_contrast=0.1,
    hysteresis=0.5,
    blur=1.0,
    reduce="max",
    open_radius=1,
    close_radius=2,
    fill_holes=True,
    min_area=20,
    dilate=0,
) -> MaskOptions:
    """The node's widgets as :class:`MaskOptions` (threshold 0 = Otsu); a bad value raises ValueError."""
    return MaskOptions(
        gray=gray,
        reduce=reduce,
        blur_sigma=float(blur),
        threshold="otsu" if float(threshold) <= 0 else float(threshold),
        min_contrast=float(min_contrast),
        hysteresis=float(hysteresis),
        open_radius=int(open_radius),
        close_radius=int(close_radius),
        fill_holes=bool(fill_holes),
        min_area=int(min_area),
        dilate=int(dilate),
    )


def describe(i: int, result) -> str:
    if result.empty:
        return f"{i}: empty mask ({result.note or 'nothing stands out from gray'})"
    return (
        f"{i}: {result.area_fraction:.2%} of the image in {result.components} component(s) "
        f"(threshold {result.threshold:.3f}, gray {', '.join(f'{v:.2f}' for v in result.gray_level)})"
    )


def masks_from_anomaly(anomaly: torch.Tensor, options: MaskOptions, image: torch.Tensor | None = None):
    """``(MASK [B, H, W] of exact 0/1, overlay IMAGE, report lines, MaskResults)`` for an IMAGE batch."""
    anomaly = check_images(anomaly, "anomaly")
    if image is not None:
        image = check_images(image, "image")
        if tuple(image.shape[1:3]) != tuple(anomaly.shape[1:3]):
            raise ImageInputError(
                f"image is {image.shape[2]}x{image.shape[1]} but anomaly is {anomaly.shape[2]}x{anomaly.shape[1]}; "
                "connect the two decoded outputs of the same DualAnoDiff Sampler."
            )
        if image.shape[0] not in (1, anomaly.shape[0]):
            raise ImageInputError(
                f"image holds {image.shape[0]} images but anomaly {anomaly.shape[0]}; connect the "
                "two decoded outputs of the same DualAnoDiff Sampler."
            )
    results, masks, overlays, lines = [], [], [], []
    for i in range(anomaly.shape[0]):
        result = extract_mask(to_numpy(anomaly[i]), options)
        results.append(result)
        masks.append(torch.from_numpy((result.mask > 0).astype(np.float32)))
        base = image[i if image.shape[0] > 1 else 0] if image is not None else anomaly[i]
        overlays.append(mask_overlay(to_pil(base), result.mask))
        lines.append(describe(i, result))
    return torch.stack(masks), from_pil(overlays), lines, results


class MaskFromAnomalyBranch(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DualAnoDiffMaskFromAnomalyBranch",
            display_name="DualAnoDiff Mask From Anomaly Branch",
            category="DualAnoDiff/mask",
            description=(
                "Makes the defect mask from the decoded anomaly-branch image (the defect drawn alone on mid-gray): "
                "the pixels that differ from the gray level, thresholded (Otsu by default) and cleaned (opening, "
                "closing, hole filling, small specks removed). Every mask value is exactly 0 or 1. An anomaly image "
                "with nothing in it gives an empty mask (all 0), never NaN. Numpy and torch only, about 0.1 s per "
                "512x512 image; the same algorithm as `dualanodiff generate`."
            ),
            inputs=[
                io.Image.Input(
                    "anomaly",
                    tooltip="The decoded anomaly-branch images (the DualAnoDiff Sampler's "
                    "'anomaly' output through VAE Decode).",
                ),
                io.Combo.Input(
                    "gray",
                    options=GRAY_CHOICES,
                    default="median",
                    tooltip="The background gray the defect is measured against: 'median' of the whole "
                    "image (default; robust to a slightly shifted gray), 'border' (median of the "
                    "border ring), or the fixed mid-gray '0.5'.",
                ),
                io.Float.Input(
                    "threshold",
                    default=0.0,
                    min=0.0,
                    max=0.99,
                    step=0.01,
                    tooltip="Distance from gray (0-1 of full scale) that counts as defect. 0 = automatic "
                    "(Otsu, never below min_contrast).",
                ),
                io.Float.Input(
                    "min_contrast",
                    default=0.1,
                    min=0.01,
                    max=0.99,
                    step=0.01,
                    tooltip="Absolute floor: if no pixel differs from gray by at least this much, the "
                    "mask is empty (0.1 = 25 gray levels).",
                ),
                io.Float.Input(
                    "hysteresis",
                    default=0.5,
                    min=0.01,
                    max=1.0,
                    step=0.01,
                    tooltip="Grow the mask into connected pixels above this share of the threshold, so "
                    "faint rims of a defect stay in. 1 = off.",
                ),
                io.Float.Input(
                    "blur",
                    default=1.0,
                    min=0.0,
                    max=10.0,
                    step=0.1,
                    tooltip="Gaussian smoothing (pixels) before measuring; averages out pixel noise. 0 = off.",
                ),
                io.Combo.Input(
                    "reduce",
                    options=["max", "mean", "l2"],
                    default="max",
                    tooltip="How the three colour channels' distances combine: 'max' (a defect that "
                    "changes one channel counts), 'mean' or 'l2'.",
                ),
                io.Int.Input(
                    "open_radius",
                    default=1,
                    min=0,
                    max=32,
                    tooltip="Opening radius in pixels: removes specks and thin spurs. Use 0 for hairline "
                    "defects 1-2 px wide.",
                ),
                io.Int.Input(
                    "close_radius",
                    default=2,
                    min=0,
                    max=32,
                    tooltip="Closing radius in pixels: joins fragments and fills pinholes. 0 = off.",
                ),
                io.Boolean.Input("fill_holes", default=True, tooltip="Fill holes enclosed by the mask."),
                io.Int.Input(
                    "min_area",
                    default=20,
                    min=0,
                    max=1_000_000,
                    tooltip="Drop connected regions smaller than this many pixels.",
                ),
                io.Int.Input(
                    "dilate", default=0, min=0, max=64, tooltip="Grow the final mask by this many pixels (0 = off)."
                ),
                io.Image.Input(
                    "image",
                    optional=True,
                    tooltip="Optional: the decoded global-branch images; the overlay is drawn on them "
                    "instead of on the anomaly images.",
                ),
            ],
            outputs=[
                io.Mask.Output(
                    display_name="mask", tooltip="One mask per image: 1 = defect, 0 = background (exactly 0 or 1)."
                ),
                io.Image.Output(
                    display_name="overlay",
                    tooltip="The mask tinted and outlined in red on the global images (or on the "
                    "anomaly images when no global image is connected), for checking.",
                ),
                io.String.Output(
                    display_name="report",
                    tooltip="One line per image: mask area, components and threshold, or why it is empty.",
                ),
            ],
        )

    @classmethod
    def validate_inputs(cls, gray=None):
        # ComfyUI 0.3.64 does not check V3 drop-down values when a prompt is queued. It reports a validation error
        # on every input this method takes (and skips their min/max checks), so it takes one: a bad `reduce` is
        # refused when the node runs, naming the option
        if gray is not None and gray not in GRAY_CHOICES:
            return f"gray must be one of {', '.join(GRAY_CHOICES)}, got {gray!r}"
        return True

    @classmethod
    def execute(
        cls,
        anomaly,
        gray,
        threshold,
        min_contrast,
        hysteresis,
        blur,
        reduce,
        open_radius,
        close_radius,
        fill_holes,
        min_area,
        dilate,
        image=None,
    ) -> io.NodeOutput:
        options = mask_options(
            gray,
            threshold,
            min_contrast,
            hysteresis,
            blur,
            reduce,
            open_radius,
            close_radius,
            fill_holes,
            min_area,
            dilate,
        )
        masks, overlay, lines, results = masks_from_anomaly(anomaly, options, image)
        empty = sum(1 for r in results if r.empty)
        if empty:
            log.info("DualAnoDiff: %d of %d anomaly images gave an empty mask.", empty, len(results))
        return io.NodeOutput(masks, overlay, "\n".join(lines))


NODES = [MaskFromAnomalyBranch]
