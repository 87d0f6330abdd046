"""DualAnoDiff LoRA Loader: a weights file -> a MODEL with DualAnoDiff on every attention layer, and a CLIP with the
text-encoder LoRA."""

from __future__ import annotations

import logging
import os
import threading

import folder_paths
from comfy_api.latest import io

from ..dualanodiff_core.method.weights import WEIGHT_SUFFIXES, DualAnoDiffWeights
from . import comfy_backend as backend

log = logging.getLogger("DualAnoDiff")

#: our model folder: ``models/dualanodiff`` (extra paths: a ``dualanodiff:`` entry in extra_model_paths.yaml)
FOLDER = "dualanodiff"
CATEGORY = "DualAnoDiff/loaders"


def register_model_folder() -> None:
    """Register ``models/dualanodiff`` listing only weight files (idempotent: keeps user-configured paths and, once
    registered, their order; the trainer writes into the first path)."""
    default = os.path.join(folder_paths.models_dir, FOLDER)
    entry = folder_paths.folder_names_and_paths.get(FOLDER)
    if entry is None or default not in entry[0]:
        folder_paths.add_model_folder_path(FOLDER, default, is_default=True)
    paths, _exts = folder_paths.folder_names_and_paths[FOLDER]
    folder_paths.folder_names_and_paths[FOLDER] = (paths, set(WEIGHT_SUFFIXES))


def weight_files() -> list[str]:
    """Files of ``models/dualanodiff`` first, then ``models/loras`` (the combo's options)."""
    register_model_folder()
    ours = folder_paths.get_filename_list(FOLDER)
    loras = [n for n in folder_paths.get_filename_list("loras") if n not in set(ours)]
    return list(ours) + loras


def resolve(name: str) -> str:
    register_model_folder()
    for folder in (FOLDER, "loras"):
        path = folder_paths.get_full_path(folder, name)
        if path is not None:
            return path
    raise FileNotFoundError(
        f"DualAnoDiff weights {name!r} are not in models/{FOLDER} or models/loras (was the file moved or renamed?). "
        "Put the .safetensors file there and refresh the node list."
    )


register_model_folder()

_cache_lock = threading.Lock()
_cache: dict = {}


def load_weights(path: str) -> DualAnoDiffWeights:
    """Read a weights file, keeping the last one in memory (re-reading when the file changes)."""
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_mtime_ns, st.st_size)
    with _cache_lock:
        if key in _cache:
            return _cache[key]
    weights = DualAnoDiffWeights.load(path)
    with _cache_lock:
        _cache.clear()
        _cache[key] = weights
    return weights


class DualLoRALoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DualAnoDiffLoRALoader",
            display_name="DualAnoDiff LoRA Loader",
            category=CATEGORY,
            description=(
                "Loads trained DualAnoDiff weights (this pack's .safetensors or the official reference "
                "pytorch_lora_weights.bin) onto an SD1.5 MODEL and CLIP: a global-branch and an anomaly-branch LoRA "
                "in every attention layer, the cross-branch attention (SAIM) and, when trained, background "
                "compensation (BCM); the text-encoder LoRA goes onto the CLIP. The MODEL then samples "
                "(whole image, defect-only) pairs with the DualAnoDiff Sampler. Also outputs the prompts the "
                "weights were trained with."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The SD1.5 model the weights were trained on."),
                io.Clip.Input("clip", tooltip="The CLIP of the same checkpoint; receives the text-encoder LoRA."),
                io.Combo.Input(
                    "weights",
                    options=weight_files(),
                    tooltip="DualAnoDiff weights from models/dualanodiff (listed first) or models/loras: this pack's "
                    ".safetensors or the official reference .bin.",
                ),
                io.Float.Input(
                    "strength_global",
                    default=1.0,
                    min=-2.0,
                    max=2.0,
                    step=0.01,
                    tooltip="Strength of the global-branch LoRA (the whole image). 1 = as trained.",
                ),
                io.Float.Input(
                    "strength_anomaly",
                    default=1.0,
                    min=-2.0,
                    max=2.0,
                    step=0.01,
                    tooltip="Strength of the anomaly-branch LoRA (the defect alone on gray). 1 = as trained.",
                ),
                io.Float.Input(
                    "strength_text",
                    default=1.0,
                    min=-2.0,
                    max=2.0,
                    step=0.01,
                    tooltip="Strength of the shared text-encoder LoRA applied to the CLIP. 1 = as "
                    "trained; 0 leaves the CLIP unchanged.",
                ),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="The model with DualAnoDiff layers."),
                io.Clip.Output(display_name="CLIP", tooltip="The CLIP with the text-encoder LoRA."),
                io.String.Output(
                    display_name="prompt_global",
                    tooltip="The global-branch prompt the weights were trained with (e.g. 'a vfx with "
                    "sks'); connect it to a CLIP Text Encode.",
                ),
                io.String.Output(
                    display_name="prompt_anomaly",
                    tooltip="The anomaly-branch prompt the weights were trained with (e.g. 'sks').",
                ),
            ],
        )

    @classmethod
    def validate_inputs(cls, weights=None):
        # ComfyUI 0.3.64 does not check V3 combo values when a prompt is queued; refuse a missing file up front
        if weights is None:  # connected to another node
            return True
        try:
            resolve(weights)
        except FileNotFoundError as e:
            return str(e)
        return True

    @classmethod
    def fingerprint_inputs(cls, weights=None, **kwargs):
        # re-run when the file changes on disk (e.g. retrained under the same name)
        try:
            st = os.stat(resolve(weights))
            return f"{st.st_mtime_ns}:{st.st_size}"
        except (OSError, TypeError, ValueError):
            return weights

    @classmethod
    def execute(cls, model, clip, weights, strength_global, strength_anomaly, strength_text) -> io.NodeOutput:
        path = resolve(weights)
        w = load_weights(path)
        m = backend.install(model, w, strength_global, strength_anomaly, source=weights)
        c = backend.patch_clip(clip, w, strength_text, source=weights)
        if not w.has_text and strength_text != 0.0:
            log.info("DualAnoDiff: %s has no text-encoder LoRA; the CLIP is unchanged.", weights)
        prompt_global, prompt_anomaly = w.prompts
        return io.NodeOutput(m, c, prompt_global, prompt_anomaly)


NODES = [DualLoRALoader]
