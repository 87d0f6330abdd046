"""DualAnoDiff on a ComfyUI MODEL (see docs/comfyui.md).

* **One object patch per attention module** (``attn1`` and ``attn2`` of every transformer block): a
  :class:`ComfyDualAttention` that keeps the module's ``to_q``/``to_k``/``to_v``/``to_out`` as its own children under
  the same names (state-dict keys, stock LoRA patches, lowvram casting and device moves keep working), owns the
  layer's :class:`~dualanodiff_core.method.attention.DualBranchLayers` as ``dual`` (built from ``comfy.ops.manual_cast``
  layers so ModelPatcher casts and moves them like its own) and delegates to the core's
  :func:`~dualanodiff_core.method.attention.dual_branch_attention` with ComfyUI's ``optimized_attention``.
* **Layer names** are derived from the live model: ``comfy.utils.unet_to_diffusers`` maps the model's ldm paths to
  the diffusers paths our weights use; nothing is hard-coded.
* **Settings per clone** live in ``model_options["transformer_options"]["dualanodiff"]`` (small values only: ComfyUI
  deep-copies ``model_options`` on every clone). The attention modules are stateless and shared by clones.
* **One APPLY_MODEL wrapper** (:class:`DualApplyModel`) checks the pair layout of every model call, warns when another
  node replaced the attention of a block we patch, and, with a background (BCM), runs the record pass first.
* **The text-encoder LoRA** goes through ComfyUI's own CLIP weight patching (:func:`patch_clip`).
"""

from __future__ import annotations

import dataclasses
import logging
import re
import struct
import zlib

import comfy.ldm.modules.attention as comfy_attention
import comfy.lora
import comfy.ops
import comfy.patcher_extension
import comfy.utils
import torch
from torch import nn

from ..dualanodiff_core import errors
from ..dualanodiff_core.method.attention import (
    MODE_DUAL,
    MODE_RECORD,
    DualBranchAttention,
    DualBranchLayers,
    DualControl,
    RecordComplete,
    attention_dims,
    dual_branch_attention,
)
from ..dualanodiff_core.method.layout import LayoutError, validate_chunks
from ..dualanodiff_core.method.weights import DualAnoDiffWeights, WeightsError, WeightsKeyError

log = logging.getLogger("DualAnoDiff")

#: per-clone settings: ``model_options["transformer_options"][OPTIONS_KEY]``
OPTIONS_KEY = "dualanodiff"
#: per-call state (BCM mode and feature cache); only ever in the transformer_options of one model call
RUN_KEY = "dualanodiff_run"
#: key of our wrappers/callbacks on the ModelPatcher
PATCH_KEY = "dualanodiff"

_ATTENTION_PARTS = ("to_q", "to_k", "to_v", "to_out")
_LDM_SITE = re.compile(
    r"^(?:(?P<block>input_blocks|output_blocks)\.(?P<number>\d+)|middle_block)\.\d+\.transformer_blocks\.(?P<index>\d+)"
    r"\.attn[12]$"
)

_warned: set = set()


def warn_once(key, message: str, *args) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(message, *args)


_told: set = set()


def tell_user(key, message: str, node_id=None) -> None:
    """A warning the user must see: logged, and shown on the node in ComfyUI's web page (the node's progress text,
    which queue_batch.py prints too): on ``node_id``, else on the node being executed. Once per prompt and key."""
    context = None
    try:
        from comfy_execution.utils import get_executing_context

        context = get_executing_context()
    except ImportError:  # pragma: no cover - older ComfyUI
        pass
    prompt_id = getattr(context, "prompt_id", None)
    node_id = node_id if node_id is not None else getattr(context, "node_id", None)
    if (key, prompt_id, node_id) in _told:
        return
    if len(_told) > 10000:
        _told.clear()
    _told.add((key, prompt_id, node_id))
    log.warning("%s", message)
    if node_id is None:
        return
    try:
        from server import PromptServer

        if PromptServer.instance is not None:
            PromptServer.instance.send_progress_text(message, str(node_id))
    except Exception:  # noqa: BLE001 - a warning must never break a run (e.g. no server when run headless)
        log.debug("DualAnoDiff: could not show the warning on node %s", node_id, exc_info=True)


def float_in_range(value, lo: float, hi: float) -> float | None:
    """``value`` as a float when it is a number in [lo, hi], else None (NaN too): a widget value in an API prompt can
    be anything, and each node refuses it with its own message naming the input."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if lo <= number <= hi else None


class DualAnoDiffError(errors.DualAnoDiffError, ValueError):
    """A MODEL, CLIP or input that DualAnoDiff cannot work with (the message says what to do); the nodes' subclass of
    the core's root error."""


# --------------------------------------------------------------------------------------------------------------
# where the attention layers are


@dataclasses.dataclass(frozen=True)
class AttentionSite:
    """One attention module of the UNet: its ldm path (under ``diffusion_model.``), its diffusers path (the name in
    our weights) and the ``(block_name, number, block_index)`` key ComfyUI's attention replace patches use."""

    ldm: str
    diffusers: str
    replace_key: tuple
    kind: str  # "attn1" (self-attention) or "attn2" (cross-attention)

    @property
    def patch_name(self) -> str:
        return "diffusion_model." + self.ldm


def replace_key_of(ldm_path: str) -> tuple | None:
    """``input_blocks.1.1.transformer_blocks.0.attn1`` -> ``("input", 1, 0)``; the middle block is number 0."""
    m = _LDM_SITE.match(ldm_path)
    if not m:
        return None
    if m.group("block") is None:
        return ("middle", 0, int(m.group("index")))
    return (m.group("block")[: -len("_blocks")], int(m.group("number")), int(m.group("index")))


def attention_sites(model) -> list[AttentionSite]:
    """Every attention module of a ComfyUI SD-UNet MODEL, read off the live model and its UNet config."""
    base = getattr(model, "model", None)
    config = getattr(getattr(base, "model_config", None), "unet_config", None)
    if not isinstance(config, dict) or "num_res_blocks" not in config:
        raise DualAnoDiffError(
            f"this MODEL ({type(base).__name__}) is not a Stable Diffusion UNet; DualAnoDiff works on SD1.x models "
            "(load an SD1.5 checkpoint)."
        )
    mapping = comfy.utils.unet_to_diffusers(config)
    diffusion_model = model.get_model_object("diffusion_model")
    live = {
        name
        for name, mod in diffusion_model.named_modules()
        if all(hasattr(mod, p) for p in _ATTENTION_PARTS) and hasattr(mod, "heads")
    }
    sites = []
    for diff_key, ldm_key in mapping.items():
        for kind in ("attn1", "attn2"):
            suffix = f".{kind}.to_q.weight"
            if diff_key.endswith(suffix) and ldm_key.endswith(suffix):
                ldm, diff = ldm_key[: -len(".to_q.weight")], diff_key[: -len(".to_q.weight")]
                key = replace_key_of(ldm)
                if ldm in live and key is not None:
                    sites.append(AttentionSite(ldm, diff, key, kind))
    if not sites:
        raise DualAnoDiffError("found no attention layers in this MODEL; DualAnoDiff works on SD1.x UNets.")
    unmapped = sorted(n for n in live - {s.ldm for s in sites} if n.endswith((".attn1", ".attn2")))
    if unmapped:
        warn_once(
            ("unmapped", tuple(unmapped)),
            "DualAnoDiff: %d attention layers of this MODEL have no diffusers "
            "name and run without DualAnoDiff (e.g. %s).",
            len(unmapped),
            unmapped[0],
        )
    return sorted(sites, key=lambda s: s.diffusers)


# --------------------------------------------------------------------------------------------------------------
# the attention module


def _comfy_attention_fn(attn_precision, transformer_options):
    """The core's ``attention_fn(q, k, v, heads, mask)`` on ComfyUI's optimized attention (looked up at call time, so
    other nodes' ``optimized_attention_override`` and the chosen backend apply)."""

    def attention(q, k, v, heads, mask=None):
        if mask is None:
            return comfy_attention.optimized_attention(
                q, k, v, heads, attn_precision=attn_precision, transformer_options=transformer_options
            )
        return comfy_attention.optimized_attention_masked(
            q, k, v, heads, mask, attn_precision=attn_precision, transformer_options=transformer_options
        )

    return attention


def control_from_options(transformer_options: dict) -> DualControl:
    """The :class:`DualControl` of one call: per-clone settings plus the per-call BCM state."""
    opts = transformer_options.get(OPTIONS_KEY) or {}
    run = transformer_options.get(RUN_KEY) or {}
    lora = opts.get("lora", (1.0, 1.0))
    return DualControl(
        mode=run.get("mode", MODE_DUAL),
        lora_strength=(float(lora[0]), float(lora[1])),
        saim_strength=float(opts.get("saim", 1.0)),
        bcm_strength=float(opts.get("bcm", 1.0)),
        bcm_cache=run.get("cache"),
        record_stop_after=run.get("stop_after"),
    )


class ComfyDualAttention(DualBranchAttention):
    """Replaces one ComfyUI ``CrossAttention``; same children names, same ``forward`` signature."""

    def __init__(self, attn: nn.Module, layers: DualBranchLayers, site: AttentionSite):
        if isinstance(attn, DualBranchAttention):  # re-wrapping ours: its children are the original projections
            original_class = getattr(attn, "wrapped_class", type(attn))
        else:
            original_class = type(attn)
        super().__init__(attn, layers, layer_name=site.diffusers, is_self_attention=site.kind == "attn1")
        self.wrapped_class = original_class
        self.dim_head = getattr(attn, "dim_head", None)
        self.attn_precision = getattr(attn, "attn_precision", None)
        self.site = site

    def forward(self, x, context=None, value=None, mask=None, transformer_options={}):  # noqa: B006 (ComfyUI's signature)
        if (
            value is not None
            and value is not context
            and not (context is not None and value.shape == context.shape and torch.equal(value, context))
        ):
            warn_once(
                ("value", self.layer_name),
                "DualAnoDiff: another node's attention patch gives %s separate values; DualAnoDiff is "
                "bypassed on that layer.",
                self.layer_name,
            )
            return self._plain(x, context, value, mask, transformer_options)
        return dual_branch_attention(
            self,
            self.dual,
            x,
            context,
            control_from_options(transformer_options),
            layer_name=self.layer_name,
            is_self_attention=self.is_self_attention,
            attention_fn=_comfy_attention_fn(self.attn_precision, transformer_options),
            mask=mask,
        )

    def _plain(self, x, context, value, mask, transformer_options):
        q = self.to_q(x)
        context = x if context is None else context
        k, v = self.to_k(context), self.to_v(value)
        out = _comfy_attention_fn(self.attn_precision, transformer_options)(q, k, v, self.heads, mask)
        return self.to_out(out)


def _to_comfy_ops(module: nn.Module) -> nn.Module:
    """Swap every ``nn.Linear``/``nn.LayerNorm`` for ``comfy.ops.manual_cast`` twins holding the same parameters, so
    ModelPatcher's lowvram path casts them to the input's device and dtype at each call like its own layers."""
    ops = comfy.ops.manual_cast
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and not hasattr(child, "comfy_cast_weights"):
                new = ops.Linear(child.in_features, child.out_features, bias=child.bias is not None, device="meta")
            elif isinstance(child, nn.LayerNorm) and not hasattr(child, "comfy_cast_weights"):
                new = ops.LayerNorm(
                    child.normalized_shape, eps=child.eps, elementwise_affine=child.elementwise_affine, device="meta"
                )
            else:
                continue
            new.weight = child.weight
            new.bias = child.bias
            setattr(parent, name, new)
    return module


def build_layers(
    attn: nn.Module,
    *,
    rank: int,
    alpha: float | None,
    saim: bool,
    bcm: bool,
    state: dict[str, torch.Tensor] | None = None,
    where: str = "",
) -> DualBranchLayers:
    """The :class:`DualBranchLayers` of one attention module.

    With ``state`` (``{param: tensor}`` of one layer) the layers take those tensors without copying them and without
    gradients; without it they are freshly initialised (as the reference initialises them, for training).
    Call it inside ``torch.inference_mode(False)`` to get trainable parameters.
    """
    dims = attention_dims(attn)
    kwargs = dict(rank=rank, alpha=alpha, saim=saim, bcm=bcm)
    if state is None:
        return _to_comfy_ops(DualBranchLayers(**dims, **kwargs))
    with torch.device("meta"):
        layers = DualBranchLayers(**dims, **kwargs)
    layers.requires_grad_(False)
    expected = layers.state_dict()
    missing = sorted(set(expected) - set(state))
    unknown = sorted(set(state) - set(expected))
    if missing or unknown:
        raise WeightsKeyError(
            [f"{where}.{k}" for k in missing],
            [f"{where}.{k}" for k in unknown],
            "DualAnoDiff weights",
            "Every layer must hold the same parts (LoRA, and SAIM/BCM when present).",
        )
    for k, v in state.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise WeightsError(
                f"{where}.{k}: shape {tuple(v.shape)} in the weights, {tuple(expected[k].shape)} for this MODEL's "
                f"layer ({dims}). The weights were trained for a different base model (DualAnoDiff uses SD1.x)."
            )
    layers.load_state_dict(state, strict=True, assign=True)
    return _to_comfy_ops(layers)


def layer_bytes(layers: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in layers.parameters())


# --------------------------------------------------------------------------------------------------------------
# installing on a MODEL


def installed_layers(model) -> dict[str, ComfyDualAttention]:
    """``{diffusers layer name: module}`` of the DualAnoDiff layers this MODEL clone carries (empty if none)."""
    out = {}
    for obj in getattr(model, "object_patches", {}).values():
        if isinstance(obj, ComfyDualAttention):
            out[obj.layer_name] = obj
    return out


def options(model) -> dict:
    return dict(model.model_options.get("transformer_options", {}).get(OPTIONS_KEY) or {})


def set_options(model, **changes) -> None:
    """Update this clone's settings (``model`` must be a fresh clone: its model_options are its own copy)."""
    to = model.model_options.setdefault("transformer_options", {})
    current = dict(to.get(OPTIONS_KEY) or {})
    current.update(changes)
    to[OPTIONS_KEY] = current


def require_dual(model, node: str) -> dict:
    """The settings of a MODEL that carries DualAnoDiff layers; a clear error otherwise."""
    opts = options(model)
    if not installed_layers(model) or not opts:
        raise DualAnoDiffError(
            f"{node}: this MODEL has no DualAnoDiff layers. Connect it through a 'DualAnoDiff LoRA Loader' first "
            "(checkpoint -> DualAnoDiff LoRA Loader -> ...)."
        )
    return opts


def _warn_replaced(patches_replace: dict, sites, where: str) -> None:
    for site in sites:
        table = (patches_replace or {}).get(site.kind) or {}
        if site.replace_key in table or site.replace_key[:2] in table:
            warn_once(
                ("replace", site.kind, site.replace_key),
                "DualAnoDiff: another node replaced the %s attention of block %s (%s); that replacement bypasses "
                "DualAnoDiff's branch LoRAs, SAIM and BCM on this layer, so the result differs from the trained "
                "model (%s).",
                site.kind,
                site.replace_key,
                site.diffusers,
                where,
            )


def install(
    model, weights: DualAnoDiffWeights, strength_global: float = 1.0, strength_anomaly: float = 1.0, source: str = ""
):
    """A clone of ``model`` with DualAnoDiff on every attention layer, configured from ``weights``."""
    sites = attention_sites(model)
    file_layers = weights.unet_layers()
    if not file_layers:
        raise WeightsError(f"{source or 'the weights'}: no UNet layers in this file.")
    model_names = {s.diffusers for s in sites}
    if set(file_layers) != model_names:
        missing = sorted(model_names - set(file_layers))
        unknown = sorted(set(file_layers) - model_names)
        raise WeightsKeyError(
            missing,
            unknown,
            f"the layers of {source or 'these weights'}",
            f"This MODEL has {len(model_names)} attention layers, the file {len(file_layers)}. DualAnoDiff weights "
            "belong to the base model they were trained on (SD1.x): check the checkpoint.",
        )
    layers = {
        site.diffusers: build_layers(
            model.get_model_object(site.patch_name),
            rank=weights.rank,
            alpha=weights.alpha,
            saim=weights.has_saim,
            bcm=weights.has_bcm,
            state=file_layers[site.diffusers],
            where=f"unet.{site.diffusers}",
        )
        for site in sites
    }
    return install_layers(model, layers, strength_global, strength_anomaly, source=source)


def new_layers(
    model, rank: int = 32, alpha: float | None = None, saim: bool = True, bcm: bool = False
) -> dict[str, DualBranchLayers]:
    """Freshly initialised layers for every attention module of ``model`` (``{diffusers name: layers}``), e.g. to
    train them: call inside ``torch.inference_mode(False)`` so the parameters are trainable."""
    return {
        site.diffusers: build_layers(
            model.get_model_object(site.patch_name), rank=rank, alpha=alpha, saim=saim, bcm=bcm
        )
        for site in attention_sites(model)
    }


def install_layers(
    model,
    layers: dict[str, DualBranchLayers],
    strength_global: float = 1.0,
    strength_anomaly: float = 1.0,
    source: str = "",
):
    """A clone of ``model`` whose attention modules run the given layers (``{diffusers name: layers}``, one per
    attention module; :func:`install` builds them from a weights file, :func:`new_layers` fresh)."""
    sites = attention_sites(model)
    names = {s.diffusers for s in sites}
    if set(layers) != names:
        raise WeightsKeyError(sorted(names - set(layers)), sorted(set(layers) - names), "DualAnoDiff layers")
    first = next(iter(layers.values()))
    before = options(model)
    upstream = apply_model_wrapper(model)
    if upstream is not None and upstream.background is not None:
        log.warning(
            "DualAnoDiff: new DualAnoDiff layers replace the ones loaded upstream, and with them the "
            "background compensation set up there; put Background Compensate after the last loader."
        )
    m = model.clone()
    extra = 0
    for site in sites:
        extra += layer_bytes(layers[site.diffusers])
        m.add_object_patch(
            site.patch_name, ComfyDualAttention(m.get_model_object(site.patch_name), layers[site.diffusers], site)
        )
    # ModelPatcher sizes the model once; count our layers so memory planning includes them
    m.size = max(0, model.model_size() - int(before.get("extra_bytes", 0))) + extra
    set_options(
        m,
        lora=[float(strength_global), float(strength_anomaly)],
        saim=1.0,
        bcm=1.0,
        has_saim=first.has_saim,
        has_bcm=first.has_bcm,
        extra_bytes=extra,
        source=source,
    )
    set_apply_model_wrapper(m, DualApplyModel(sites))
    _warn_replaced(
        m.model_options.get("transformer_options", {}).get("patches_replace"),
        sites,
        "registered before the DualAnoDiff LoRA Loader",
    )
    return m


def set_apply_model_wrapper(model, wrapper: DualApplyModel) -> None:
    """Replace this clone's DualAnoDiff APPLY_MODEL wrapper (exactly one per clone)."""
    model.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, PATCH_KEY)
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, PATCH_KEY, wrapper)


def apply_model_wrapper(model) -> DualApplyModel | None:
    ws = model.get_wrappers(comfy.patcher_extension.WrappersMP.APPLY_MODEL, PATCH_KEY)
    return ws[-1] if ws else None


# --------------------------------------------------------------------------------------------------------------
# the model call: layout check, replace-patch warning, BCM


@dataclasses.dataclass
class Background:
    """BCM backgrounds: unscaled VAE latents (as the reference: not multiplied by the scaling factor, not
    ``process_latent_in``) of the backgrounds ``[1 or P, C, h, w]`` and of a mid-gray image ``[1, C, h, w]`` for the
    unconditional half; ``pixels`` is the encoded image size (for messages); ``seed`` seeds the re-noising."""

    latents: torch.Tensor
    gray: torch.Tensor
    pixels: tuple[int, int]
    seed: int = 0


def _noise_for(shape, sigma: float, seed: int) -> torch.Tensor:
    """The background's fresh noise for one model call: reproducible from (seed, sigma)."""
    g = torch.Generator(device="cpu")
    g.manual_seed((zlib.crc32(struct.pack("<d", float(sigma))) ^ (int(seed) * 0x9E3779B1)) & 0xFFFFFFFFFFFF)
    return torch.randn(shape, generator=g, dtype=torch.float32)


def _rows(value, step_slice: slice, rows: int):
    """Slice a per-row model input to the record pass's rows (leave anything else alone)."""
    if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == rows:
        return value[step_slice]
    if isinstance(value, list):
        return [_rows(v, step_slice, rows) for v in value]
    return value


class DualApplyModel:
    """``WrappersMP.APPLY_MODEL`` wrapper installed with the DualAnoDiff layers.

    Every call: the batch must be whole (global, anomaly) pairs in every CFG chunk; attention replace patches on our
    blocks are reported. With a :class:`Background` and a non-zero BCM strength, the call runs the UNet twice: a
    record pass over the noised backgrounds (one row per pair; the global row's prompt; global LoRA, no SAIM) that
    stores every self-attention input, then the main pass, which fuses them into the global rows (docs/method.md,
    "BCM: background compensation").
    """

    def __init__(self, sites, background: Background | None = None):
        self.sites = list(sites)
        self.background = background
        # the record pass only needs the self-attention inputs: stop after the last one the UNet runs
        order = {"input": 0, "middle": 1, "output": 2}
        attn1 = [s for s in self.sites if s.kind == "attn1"]
        last = max(attn1, key=lambda s: (order[s.replace_key[0]], *s.replace_key[1:]), default=None)
        self.record_stop_after = last.diffusers if last is not None else None

    def with_background(self, background: Background | None) -> DualApplyModel:
        return DualApplyModel(self.sites, background)

    def __deepcopy__(self, memo):  # holds tensors; it is immutable, so copies may share it
        return self

    def __call__(self, executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        rows = x.shape[0]
        chunks = list(transformer_options.get("cond_or_uncond") or [0])
        if rows % len(chunks) == 0:
            chunk_rows = rows // len(chunks)
        else:
            chunk_rows = rows
        try:
            validate_chunks(rows, chunk_rows, "the latent batch")
        except LayoutError as e:
            what = f"the sampler got a batch of {chunk_rows} latent images, an odd number" if chunk_rows % 2 else str(e)
            raise LayoutError(
                f"{what}. This MODEL carries DualAnoDiff layers, so it draws images in (global, anomaly) pairs and "
                "every batch must hold whole (global, anomaly) pairs. Use the 'DualAnoDiff Sampler', or a stock "
                f"sampler with Empty Latent Image batch_size = 2 x pairs (e.g. {chunk_rows + chunk_rows % 2} for "
                f"{(chunk_rows + 1) // 2} pairs) and a 'DualAnoDiff Pair Conditioning' positive."
            ) from None
        _warn_replaced(transformer_options.get("patches_replace"), self.sites, "found while sampling")
        if isinstance(c_crossattn, torch.Tensor) and c_crossattn.shape[0] == rows and 0 in chunks:
            first = chunks.index(0) * chunk_rows  # the first pair of a positive chunk
            if torch.equal(c_crossattn[first], c_crossattn[first + 1]):
                tell_user(
                    "same-prompt",
                    "DualAnoDiff: both images of a pair got the same prompt, so the anomaly branch is not "
                    "prompted with its own text; give the sampler a 'DualAnoDiff Pair Conditioning' positive "
                    "(or use the DualAnoDiff Sampler).",
                )

        opts = transformer_options.get(OPTIONS_KEY) or {}
        bg = self.background
        if bg is None or float(opts.get("bcm", 1.0)) == 0.0 or not opts.get("has_bcm"):
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)

        pairs = chunk_rows // 2
        if bg.latents.shape[0] not in (1, pairs):
            raise DualAnoDiffError(
                f"BackgroundCompensate got {bg.latents.shape[0]} background images but the batch holds {pairs} "
                f"pairs; give 1 background (used for every pair) or exactly {pairs}."
            )
        if tuple(bg.latents.shape[-2:]) != tuple(x.shape[-2:]):
            h, w = x.shape[-2:]
            ph, pw = bg.pixels
            lh, lw = bg.latents.shape[-2:]
            scale_h, scale_w = ph // max(lh, 1), pw // max(lw, 1)
            raise DualAnoDiffError(
                f"the background is {pw}x{ph} pixels but the images being generated are {w * scale_w}x"
                f"{h * scale_h}; scale the background image to the generation size (e.g. with 'Upscale Image')."
            )
        backgrounds = []
        for c in chunks:
            src = bg.gray if c == 1 else bg.latents  # the unconditional half sees a mid-gray background
            backgrounds.append(src.expand(pairs, *src.shape[1:]))
        bg_x0 = torch.cat(backgrounds).to(device=x.device, dtype=x.dtype)
        sigma = t[0::2]
        noise = _noise_for(tuple(bg_x0.shape), float(t.reshape(-1)[0]), bg.seed).to(device=x.device, dtype=x.dtype)
        base = executor.class_obj
        x_bg = base.model_sampling.noise_scaling(sigma, noise, bg_x0)

        cache: dict[str, torch.Tensor] = {}
        record = dict(transformer_options)
        record[RUN_KEY] = {"mode": MODE_RECORD, "cache": cache, "stop_after": self.record_stop_after}
        if isinstance(record.get("sigmas"), torch.Tensor) and record["sigmas"].shape[0] == chunk_rows:
            record["sigmas"] = record["sigmas"][0::2]
        every_other = slice(0, None, 2)
        try:
            executor(
                x_bg,
                sigma,
                _rows(c_concat, every_other, rows),
                _rows(c_crossattn, every_other, rows),
                None,
                record,
                **{k: _rows(v, every_other, rows) for k, v in kwargs.items()},
            )
        except RecordComplete:  # raised after the last self-attention input is recorded (no grad): output unused
            pass
        main = dict(transformer_options)
        main[RUN_KEY] = {"mode": MODE_DUAL, "cache": cache}
        return executor(x, t, c_concat, c_crossattn, control, main, **kwargs)


# --------------------------------------------------------------------------------------------------------------
# the text-encoder LoRA through ComfyUI's own CLIP patching


def patch_clip(clip, weights: DualAnoDiffWeights, strength: float, source: str = ""):
    """A clone of ``clip`` with the shared text-encoder LoRA as ComfyUI weight patches (or ``clip`` unchanged when the
    weights have none or ``strength`` is 0)."""
    if clip is None or not weights.has_text or strength == 0.0:
        return clip
    lora = {k: v for k, v in weights.branch_lora(0, include_text=True).items() if k.startswith("lora_te_")}
    key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {})
    prefixes = sorted({k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in lora})
    unknown = [p for p in prefixes if p not in key_map]
    if unknown:
        raise WeightsError(
            f"{source or 'the weights'}: the text-encoder LoRA targets {len(unknown)} layers this CLIP does not have "
            f"(e.g. {unknown[0]}). DualAnoDiff weights need the CLIP of the SD1.x checkpoint they were trained with."
        )
    patches = comfy.lora.load_lora(lora, key_map)
    c = clip.clone()
    loaded = c.add_patches(patches, float(strength))
    if len(loaded) != len(patches):
        raise WeightsError(
            f"{source or 'the weights'}: only {len(loaded)} of {len(patches)} text-encoder LoRA "
            "layers could be applied to this CLIP."
        )
    return c
