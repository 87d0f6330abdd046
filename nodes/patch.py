"""DualAnoDiff Attention Patch: the cross-branch attention (SAIM) strength of a DualAnoDiff MODEL."""

from __future__ import annotations

import logging

from comfy_api.latest import io

from . import comfy_backend as backend

log = logging.getLogger("DualAnoDiff")


class DualAttentionPatch(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DualAnoDiffAttentionPatch",
            display_name="DualAnoDiff Attention Patch (SAIM)",
            category="DualAnoDiff/model",
            description=(
                "Sets how strongly the two branches share information through the Self-Attention Interaction Module "
                "(SAIM), which keeps the defect in the whole image and the defect-only image consistent. "
                "1 = as trained, 0 = off (the branches run independently). Only this MODEL clone changes."
            ),
            inputs=[
                io.Model.Input("model", tooltip="A MODEL from the DualAnoDiff LoRA Loader."),
                io.Float.Input(
                    "saim_strength",
                    default=1.0,
                    min=0.0,
                    max=2.0,
                    step=0.01,
                    tooltip="Scale of SAIM's output in every attention layer: 1 = as trained, 0 = off.",
                ),
            ],
            outputs=[io.Model.Output(display_name="MODEL", tooltip="The model with the new SAIM strength.")],
        )

    @classmethod
    def execute(cls, model, saim_strength) -> io.NodeOutput:
        opts = backend.require_dual(model, "DualAnoDiff Attention Patch")
        if not opts.get("has_saim") and saim_strength != 0.0:
            log.warning("DualAnoDiff: these weights were trained without SAIM; the SAIM strength has no effect.")
        m = model.clone()
        backend.set_options(m, saim=float(saim_strength))
        return io.NodeOutput(m)


NODES = [DualAttentionPatch]
