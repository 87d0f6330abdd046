"""DualAnoDiff LoRA Loader: a weights file -> a MODEL with DualAnoDiff on every attention layer, and a CLIP with the
text-encoder LoRA."""

from __future__ import annotations

import logging
import os
import re
import threading

import folder_paths
from comfy_api.latest import io

from ..dualanodiff_core.errors import require_finite
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


#: the trainer's resume checkpoints (``<name>_train/checkpoints/checkpoint-<step>.pt``): optimizer and training
#: state for continuing a run, not weights; the ``.safetensors`` beside each one is
_RESUME_FILE = re.compile(r"(^|/)checkpoint-\d+\.pt$")


def is_weights_name(name: str) -> bool:
    """False for files in the weights folders that are not weights (the trainer's resume checkpoints)."""
    return not _RESUME_FILE.search(str(name).replace("\\", "/"))


def weight_files() -> list[str]:
    """Weights files of ``models/dualanodiff`` first, then ``models/loras`` (the combo's options)."""
    register_model_folder()
    ours = [n for n in folder_paths.get_filename_list(FOLDER) if is_weights_name(n)]
    loras = [n for n in folder_paths.get_filename_list("loras") if n not in set(ours) and is_weights_name(n)]
    return list(ours) + loras


def resolve(name: str) -> str:
    register_model_folder()
    if not is_weights_name(name):
        stem = str(name).replace("\\", "/").rsplit(".", 1)[0]
        raise FileNotFoundError(
            f"{name!r} is a training checkpoint (the state for resuming a run in the DualAnoDiff Trainer), not "
            f"weights; choose {stem}.safetensors beside it, or the finished <output_name>.safetensors."
        )
    for folder in (FOLDER, "loras"):
        path = folder_paths.get_full_path(folder, name)
        if path is not None:
            return path
    raise FileNotFoundError(
        f"DualAnoDiff weights {name!r} are not in models/{FOLDER} or models/loras (was the file moved or renamed?). "
        "Put the .safetensors file there and refresh the node list."
    )


def source_of(prompt, node_id, input_name: str) -> str:
    """A short description of where a linked input comes from, e.g. ``CheckpointLoaderSimple
    (ckpt_name=v1-5-pruned-emaonly-fp16.safetensors)`` (the base model recorded in, and checked against, weights)."""
    if not isinstance(prompt, dict):
        return ""
    node, seen = prompt.get(str(node_id)), set()
    link = (node or {}).get("inputs", {}).get(input_name)
    while isinstance(link, list) and len(link) == 2 and str(link[0]) not in seen:
        seen.add(str(link[0]))
        node = prompt.get(str(link[0])) or {}
        inputs = node.get("inputs") or {}
        names = {
            k: v for k, v in inputs.items() if k in ("ckpt_name", "unet_name", "model_name") and isinstance(v, str)
        }
        if names:
            return f"{node.get('class_type')} ({', '.join(f'{k}={v}' for k, v in sorted(names.items()))})"
        link = inputs.get(input_name) if input_name in inputs else inputs.get("model")
    return ""


def _model_name(text: str) -> str:
    """The model file/folder name in a base-model description (``Loader (ckpt_name=a/b.ckpt)``, a path, a repo id),
    without folders and extension, lower case; "" when there is none."""
    text = str(text or "").strip()
    m = re.search(r"(?:ckpt_name|unet_name|model_name)=([^,)]+)", text)
    if m:
        text = m.group(1)
    elif text.startswith("ComfyUI "):  # no file name was known when it was recorded
        return ""
    name = text.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    for ext in (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".sft", ".gguf"):
        if name.lower().endswith(ext):
            name = name[: -len(ext)]
    return name.lower()


def base_model_warning(recorded: str, current: str) -> str | None:
    """A warning when the weights were trained on another base model than the MODEL they are loaded onto."""
    a, b = _model_name(recorded), _model_name(current)
    if not a or not b or a == b:
        return None
    return (
        f"DualAnoDiff: these weights were trained on {a!r} but are loaded onto {b!r}; on another base model the "
        f"defects may come out weaker or wrong. Load {a!r} in the checkpoint loader if the results look off."
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
                    ".safetensors or the official reference .bin. The trainer's resume checkpoints (.pt) are not "
                    "listed.",
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
            hidden=[io.Hidden.prompt, io.Hidden.unique_id],
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
        require_finite(strength_global=strength_global, strength_anomaly=strength_anomaly, strength_text=strength_text)
        path = resolve(weights)
        w = load_weights(path)
        m = backend.install(model, w, strength_global, strength_anomaly, source=weights)
        c = backend.patch_clip(clip, w, strength_text, source=weights)
        if not w.has_text and strength_text != 0.0:
            log.info("DualAnoDiff: %s has no text-encoder LoRA; the CLIP is unchanged.", weights)
        hidden = cls.hidden
        node_id = getattr(hidden, "unique_id", None)
        warning = base_model_warning(
            w.metadata.get("base_model", ""), source_of(getattr(hidden, "prompt", None), node_id, "model")
        )
        if warning:
            backend.tell_user("base-model", warning, node_id)
        prompt_global, prompt_anomaly = w.prompts
        return io.NodeOutput(m, c, prompt_global, prompt_anomaly)


NODES = [DualLoRALoader]
