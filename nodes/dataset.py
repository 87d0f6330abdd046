"""DualAnoDiff Save Dataset: generated pairs -> an MVTec AD dataset with its manifest, under ComfyUI's output."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import folder_paths
from comfy_api.latest import io, ui

from ..dualanodiff_core.dataset.acceptance import DEFAULT_MIN_ALIGNMENT, FilterOptions
from ..dualanodiff_core.errors import DualAnoDiffError
from .dataset_io import dataset_dir, save_pairs, upstream_settings

log = logging.getLogger("DualAnoDiff")

#: ``min_alignment`` when a prompt does not give it: workflows saved before the widget existed ran without the
#: alignment check, so they keep running without it (the widget's own default, for new nodes, is the CLI's)
MIN_ALIGNMENT_WHEN_MISSING = 0.0


class SaveDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DualAnoDiffSaveDataset",
            display_name="DualAnoDiff Save Dataset (MVTec)",
            category="DualAnoDiff/dataset",
            description=(
                "Appends generated (image, mask) pairs to an MVTec AD-style dataset under ComfyUI's output folder: "
                "<dataset>/<category>/test/<defect>/0000.png and <dataset>/<category>/ground_truth/<defect>/"
                "0000_mask.png (single-channel, exactly 0/255), the anomaly part in fg/, and one line per sample in "
                "manifest.jsonl (mask and filter numbers, the upstream settings of the workflow). Each run continues "
                "after the samples already there. Pairs the quality filter rejects (empty mask, mask too large, "
                "anomaly branch not on gray, image not showing the defect under the mask) never enter the MVTec "
                "tree; they go to rejected/ with their reason. "
                "anomalib's MVTec and Folder loaders read the result unchanged."
            ),
            inputs=[
                io.Image.Input(
                    "images", tooltip="The decoded global-branch images (the whole product with the defect)."
                ),
                io.String.Input(
                    "dataset",
                    default="DualAnoDiff_dataset",
                    tooltip="Dataset folder inside ComfyUI's output folder (sub-folders with '/').",
                ),
                io.String.Input(
                    "category",
                    default="my_object",
                    tooltip="MVTec category name, e.g. 'bottle' (letters, digits, . _ + -).",
                ),
                io.String.Input(
                    "defect",
                    default="my_defect",
                    tooltip="Defect type name, e.g. 'broken_large' (letters, digits, . _ + -; not 'good').",
                ),
                io.Float.Input(
                    "max_area",
                    default=0.5,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="Reject a pair whose mask covers more than this share of the image (usually "
                    "a failed anomaly branch).",
                ),
                io.Float.Input(
                    "max_gray_offset",
                    default=0.2,
                    min=0.01,
                    max=1.0,
                    step=0.01,
                    tooltip="Reject a pair whose anomaly image's median is further than this from "
                    "mid-gray (the branch did not draw the defect on gray). 1 = off. Needs the "
                    "anomaly input.",
                ),
                io.Boolean.Input(
                    "keep_rejected",
                    default=True,
                    tooltip="Keep rejected pairs under rejected/ (outside the MVTec tree) for checking; "
                    "off = only their manifest line is written.",
                ),
                io.Image.Input(
                    "anomaly",
                    optional=True,
                    tooltip="The decoded anomaly-branch images (defect on gray). Without a mask, the mask "
                    "is extracted from them with the default options.",
                ),
                io.Mask.Input(
                    "mask",
                    optional=True,
                    tooltip="The defect masks, e.g. from DualAnoDiff Mask From Anomaly Branch (>= 0.5 = defect).",
                ),
                io.Mask.Input(
                    "placement",
                    optional=True,
                    tooltip="The placement region given to the sampler (one mask or one per image): a pair with "
                    "more than 5% of its mask outside it is rejected (reason outside_region).",
                ),
                # added after the others (widget order is an API); optional so that prompts saved before it
                # existed still validate, and they run without the check as they did (MIN_ALIGNMENT_WHEN_MISSING)
                io.Float.Input(
                    "min_alignment",
                    default=DEFAULT_MIN_ALIGNMENT,
                    min=0.0,
                    max=100.0,
                    step=0.01,
                    optional=True,
                    tooltip="Reject a pair whose image does not show the defect its mask marks (reason "
                    "misaligned): the alignment contrast (how much the image's colour inside the mask differs "
                    "from a 3-pixel ring around it, in units of the ring's own spread) must reach this. 0 = off; "
                    f"default {DEFAULT_MIN_ALIGNMENT}, as dualanodiff generate --min-alignment. Workflows saved "
                    "without this input run without the check.",
                ),
            ],
            outputs=[],
            hidden=[io.Hidden.prompt, io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, dataset=None):
        # ComfyUI reports a validation error on every input this method takes: one input, so one problem marks one
        # widget; category and defect are checked when the node runs, before anything is written
        try:
            if isinstance(dataset, str):
                dataset_dir(folder_paths.get_output_directory(), dataset)
        except DualAnoDiffError as e:
            return str(e)
        return True

    @classmethod
    def execute(
        cls,
        images,
        dataset,
        category,
        defect,
        max_area,
        max_gray_offset,
        keep_rejected,
        anomaly=None,
        mask=None,
        placement=None,
        min_alignment=MIN_ALIGNMENT_WHEN_MISSING,
    ) -> io.NodeOutput:
        root = Path(folder_paths.get_output_directory()).resolve()
        out = dataset_dir(root, dataset)
        fo = FilterOptions(
            max_area=float(max_area), max_gray_offset=float(max_gray_offset), min_alignment=float(min_alignment)
        )
        hidden = cls.hidden
        workflow = upstream_settings(getattr(hidden, "prompt", None), getattr(hidden, "unique_id", None))
        records = save_pairs(
            out,
            category,
            defect,
            images,
            anomaly,
            mask,
            filter_options=fo,
            keep_rejected=bool(keep_rejected),
            workflow=workflow,
            placement=placement,
        )
        results = []
        for rec in records:
            files = rec.get("files") or {}
            rel = files.get("image") or files.get("rejected_image")
            if rel:
                path = (out / rel).relative_to(root)
                results.append(ui.SavedResult(path.name, path.parent.as_posix(), io.FolderType.output))
        reasons = Counter(r["reason"] for r in records if not r["accepted"])
        accepted = sum(1 for r in records if r["accepted"])
        log.info(
            "DualAnoDiff: %d of %d pairs accepted into %s/%s/test/%s%s",
            accepted,
            len(records),
            out,
            category,
            defect,
            (" (rejected: " + ", ".join(f"{k} x{v}" for k, v in sorted(reasons.items())) + ")") if reasons else "",
        )
        return io.NodeOutput(ui=ui.SavedImages(results))


NODES = [SaveDataset]
