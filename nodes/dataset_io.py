"""Writing generated pairs as an MVTec AD dataset from ComfyUI tensors (no ComfyUI import; the node is in
``dataset.py``).

Each call appends after the samples already in the dataset (indices continue from the highest one), through the
core's :class:`~dualanodiff_core.dataset.export.DatasetWriter`:
files are staged and renamed into place, then the sample's
manifest line is written, so an interrupted or failed run never leaves a half-written sample, and files the writer
did not make are never overwritten.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..dualanodiff_core.dataset.acceptance import FilterOptions, check_pair
from ..dualanodiff_core.dataset.export import DatasetError, DatasetWriter, ExportSample, check_name, iter_records
from ..dualanodiff_core.dataset.masks import MaskOptions, MaskResult, count_components, distance_from_gray, extract_mask
from ..dualanodiff_core.dataset.placement import check_region
from ..dualanodiff_core.method.placement import DEFAULT_MAX_OUTSIDE
from .images import ImageInputError, check_images, check_masks, to_numpy, to_pil

#: name width of a new dataset: 0000.png ... 9999.png (appending runs add up; an existing dataset keeps its width)
NEW_DATASET_DIGITS = 4
#: scalar widget values longer than this are left out of the provenance record
_MAX_VALUE_CHARS = 400


def dataset_dir(root: str | os.PathLike, dataset: str) -> Path:
    """``root/dataset`` for a relative folder name inside ``root`` (ComfyUI's output directory)."""
    text = str(dataset).strip().replace("\\", "/")
    parts = [p for p in text.split("/") if p]
    if not parts or text.startswith("/") or any(p in (".", "..") for p in parts) or ":" in text:
        raise DatasetError(
            f"dataset folder {dataset!r}: give a folder name inside ComfyUI's output directory, e.g. "
            "'DualAnoDiff_dataset' or 'datasets/bottle_gen' (no '..', no absolute path)."
        )
    for p in parts:
        check_name(p, "dataset folder part")
    root = Path(root).resolve()
    out = (root / Path(*parts)).resolve()
    if os.path.commonpath([root, out]) != str(root):
        raise DatasetError(f"dataset folder {dataset!r} points outside the output directory {root}.")
    return out


def mask_from_input(mask: np.ndarray, anomaly: np.ndarray | None) -> MaskResult:
    """A :class:`MaskResult` for a given binary mask (bool ``[H, W]``); the anomaly image, when known, supplies the
    gray-level statistics the quality filter checks."""
    h, w = mask.shape
    if anomaly is not None:
        dist, _raw, gray, median = distance_from_gray(anomaly, MaskOptions())
        gray_level, image_median, peak = tuple(map(float, gray)), tuple(map(float, median)), float(dist.max())
    else:
        gray_level, image_median, peak = (), (), 0.0
    n = count_components(mask) if mask.any() else 0
    return MaskResult(
        mask=np.where(mask, np.uint8(255), np.uint8(0)).astype(np.uint8),
        empty=n == 0,
        area_fraction=float(np.count_nonzero(mask)) / float(h * w),
        threshold=0.5,
        low_threshold=0.5,
        gray_level=gray_level,
        image_median=image_median,
        max_contrast=peak,
        components=n,
        note="the MASK input is empty" if n == 0 else "from the MASK input (binarized at 0.5)",
    )


def defect_on_gray(image: np.ndarray, mask: np.ndarray) -> Image.Image:
    """The anomaly-branch target made from an image and its mask: the defect pixels on mid-gray."""
    out = np.where(mask[..., None], image, 0.5)
    return Image.fromarray(np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8), mode="RGB")


def upstream_settings(prompt, node_id) -> dict:
    """Provenance from ComfyUI's API-format prompt: the widget values of every node upstream of ``node_id``
    (``{id: {"class_type", "inputs"}}``, links left out)."""
    if not isinstance(prompt, dict) or node_id is None:
        return {}
    seen, stack = set(), [str(node_id)]
    while stack:
        node = prompt.get(stack.pop())
        if not isinstance(node, dict):
            continue
        for value in (node.get("inputs") or {}).values():
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and value[0] not in seen:
                seen.add(value[0])
                stack.append(value[0])
    out = {}
    for nid in sorted(seen, key=lambda s: (len(s), s)):
        node = prompt.get(nid)
        if not isinstance(node, dict):
            continue
        widgets = {
            k: v
            for k, v in (node.get("inputs") or {}).items()
            if isinstance(v, (bool, int, float)) or (isinstance(v, str) and len(v) <= _MAX_VALUE_CHARS)
        }
        out[nid] = {"class_type": node.get("class_type"), "inputs": widgets}
    return out


def _seed_of(workflow: dict):
    seeds = [
        n["inputs"][k]
        for n in workflow.values()
        for k in ("seed", "noise_seed")
        if k in n["inputs"] and ("Sampler" in str(n.get("class_type", "")) or k == "noise_seed")
    ]
    return seeds[0] if len(seeds) == 1 else None


def save_pairs(
    out: str | os.PathLike,
    category: str,
    defect: str,
    images: torch.Tensor,
    anomaly: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    *,
    filter_options: FilterOptions | None = None,
    keep_rejected: bool = True,
    workflow: dict | None = None,
    placement: torch.Tensor | None = None,
    max_outside: float = DEFAULT_MAX_OUTSIDE,
) -> list[dict]:
    """Append one batch of generated pairs to the dataset in ``out``; returns the manifest records written.

    ``images``: the global images; ``anomaly``: the anomaly-branch images; ``mask``: their masks. Give ``anomaly``,
    ``mask`` or both: without ``mask`` it is extracted from ``anomaly`` with the default options; without
    ``anomaly`` the stored anomaly part is the image's masked region on mid-gray and the gray-background check is
    skipped. ``placement``: region masks (1 or one per image): pairs with more than ``max_outside`` of the mask
    outside the region are rejected (``outside_region``).
    """
    images = check_images(images, "images")
    b, h, w = images.shape[:3]
    if anomaly is None and mask is None:
        raise ImageInputError("connect the anomaly images, the mask, or both (the mask says where the defect is).")
    if anomaly is not None:
        anomaly = check_images(anomaly, "anomaly")
        if tuple(anomaly.shape[:3]) != (b, h, w):
            raise ImageInputError(
                f"anomaly is {tuple(anomaly.shape[:3])} (batch, height, width) but images are "
                f"{(b, h, w)}; connect the two decoded outputs of the same DualAnoDiff Sampler."
            )
    if mask is not None:
        mask = check_masks(mask, "mask")
        if tuple(mask.shape) != (b, h, w):
            raise ImageInputError(
                f"mask is {tuple(mask.shape)} (batch, height, width) but images are {(b, h, w)}; "
                "give one mask per image, at the image size."
            )
    regions = None
    if placement is not None:
        regions = check_masks(placement, "placement")
        if tuple(regions.shape[1:]) != (h, w) or regions.shape[0] not in (1, b):
            raise ImageInputError(
                f"placement is {tuple(regions.shape)} (batch, height, width) but images are {(b, h, w)}; give one "
                "region, or one per image, at the image size."
            )
        regions = regions.cpu().numpy() >= 0.5
    fo = filter_options or FilterOptions()
    out = Path(out)
    check_name(category, "category")
    check_name(defect, "defect")
    widths = {len(str(r.get("name", ""))) for r in iter_records(out, category, defect)} if out.is_dir() else set()
    digits = max(widths) if widths else NEW_DATASET_DIGITS
    settings = {"filter": fo.to_dict(), "keep_rejected": bool(keep_rejected)}
    workflow = workflow or {}
    seed = _seed_of(workflow)
    mask_source = "MASK input" if mask is not None else "extracted from the anomaly image (default options)"
    records = []
    with DatasetWriter(out, category, defect, digits=digits, keep_rejected=keep_rejected, settings=settings) as writer:
        start = max(writer.done) + 1 if writer.done else 0
        if len(str(start + b - 1)) > digits:
            raise DatasetError(
                f"{out}: {category}/{defect} uses {digits}-digit names and holds samples up to {start - 1}; "
                f"{b} more do not fit. Save to a new dataset folder or another defect name."
            )
        for i in range(b):
            img = to_numpy(images[i])
            an = to_numpy(anomaly[i]) if anomaly is not None else None
            if mask is not None:
                result = mask_from_input(mask[i].cpu().numpy() >= 0.5, an)
            else:
                result = extract_mask(an)
            fg = to_pil(anomaly[i]) if anomaly is not None else defect_on_gray(img, result.mask > 0)
            decision = check_pair(result, fo, global_image=img)  # the alignment check (off at min_alignment 0)
            info = {"source": "ComfyUI", "batch_index": i, "batch_size": b, "mask_source": mask_source}
            if regions is not None:
                decision, outside = check_region(
                    decision, result.mask, regions[i if len(regions) > 1 else 0], max_outside
                )
                info.update(placement="MASK input", outside_region=round(outside, 6))
            if seed is not None:
                info["seed"] = seed
            if workflow:
                info["workflow"] = workflow
            records.append(writer.write(ExportSample(start + i, to_pil(images[i]), fg, result, decision, info)))
    return records
