"""Training DualAnoDiff inside ComfyUI:
a :class:`~dualanodiff_core.training.trainer.TrainingBackbone` on a ComfyUI MODEL, CLIP
and VAE, for the core's :class:`~dualanodiff_core.training.trainer.Trainer` (see docs/comfyui.md).

Everything here must be built and run inside ``torch.inference_mode(False)`` (ComfyUI runs nodes in inference mode,
so the loaded checkpoint's weights are inference tensors, which autograd cannot save for backward):

* **UNet.** Fresh DualAnoDiff layers (both branch LoRAs, SAIM, optionally BCM) are created as normal tensors on the
  model's device and installed as object patches on a clone of the MODEL (:func:`comfy_backend.install_layers`, the
  same mechanism as sampling). Every base layer of the clone gets an identity weight wrapper, so ComfyUI's casting
  hands autograd a normal copy of each weight at every forward instead of the inference tensor (what ComfyUI's own
  TrainLoraNode does). The prediction is the raw UNet's: ``diffusion_model(x_t, t, context)`` with DDPM-form
  ``x_t`` and integer-valued timesteps returns eps for SD1.x (``v`` for v-prediction models).
* **Text encoder.** ComfyUI applies a CLIP LoRA as weight patches, which cannot be trained. Here every
  ``q_proj``/``k_proj``/``v_proj``/``out_proj`` of the CLIP gets a *weight wrapper* ``W + scale * up @ down`` whose
  ``up``/``down`` are trainable: mathematically the same LoRA as the reference's (``W x + scale * up(down(x))``), and
  the same weights the DualAnoDiff LoRA Loader later merges into the CLIP. Its other layers get identity wrappers
  (normal-tensor weights, as for the UNet). ComfyUI's CLIP layers add their residuals in place (``x += ...``),
  which autograd refuses to differentiate through; the CLIP forward therefore runs with saved-tensor hooks that store
  a copy of every tensor autograd keeps. The CLIP runs twice per step on two short prompts, so this costs little.
* **VAE.** ComfyUI's ``VAE.encode`` returns the posterior *mean* (the reference draws a sample of the posterior; the
  SD VAE's posterior spread is tiny). Latents are therefore deterministic and cached per training view, so the VAE
  runs once per (image, flip) instead of at every step.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import math
import re
from collections.abc import Sequence

import comfy.model_base
import comfy.model_management as mm
import torch
from torch import nn

from ..dualanodiff_core.errors import DualAnoDiffError
from ..dualanodiff_core.method.attention import MODE_DUAL, MODE_RECORD, LoRALinear
from ..dualanodiff_core.method.weights import DualAnoDiffWeights
from ..dualanodiff_core.training.trainer import BackgroundPass, TrainConfig
from . import comfy_backend as backend

log = logging.getLogger("DualAnoDiff")

_TEXT_PROJ = {"to_q_lora": "q_proj", "to_k_lora": "k_proj", "to_v_lora": "v_proj", "to_out_lora": "out_proj"}
_CLIP_ATTN = re.compile(r"^(?P<prefix>.*)text_model\.encoder\.layers\.(?P<layer>\d+)\.self_attn\.q_proj\.weight$")
#: latents kept per training view (image x flip x crop); 64x64x4 fp32 latents take 64 KiB each
LATENT_CACHE_SIZE = 4096


class TrainingSetupError(DualAnoDiffError, ValueError):
    """The MODEL/CLIP/VAE cannot be trained as asked (the message says what to do)."""


def _identity(weight):
    return weight


class _TextLoRAWrapper:
    """Weight wrapper ``W -> W + scale * up @ down`` (ComfyUI calls it with the cast weight at every forward)."""

    def __init__(self, lora: LoRALinear):
        self.lora = lora

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        lora = self.lora
        delta = lora.up.weight @ lora.down.weight
        if lora.scale != 1.0:
            delta = delta * lora.scale
        return weight + delta.to(device=weight.device, dtype=weight.dtype)


def _clone_saved(t: torch.Tensor) -> torch.Tensor:
    return t.clone()


def _unpack(t: torch.Tensor) -> torch.Tensor:
    return t


def same_device(a: torch.device, b: torch.device) -> bool:
    a, b = torch.device(a), torch.device(b)
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def compute_dtype(model) -> torch.dtype:
    base = model.model
    dtype = getattr(base, "manual_cast_dtype", None) or base.get_dtype()
    return dtype


def precision_of(dtype: torch.dtype) -> str:
    return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "fp32")


def plan_precision(model) -> tuple[torch.dtype, str]:
    """The dtype the UNet computes in while training, and the matching TrainConfig precision: the model's own dtype,
    except fp16 becomes bf16 where the device supports it (no loss scaling needed)."""
    dtype = compute_dtype(model)
    if dtype == torch.float16 and mm.should_use_bf16(model.load_device, prioritize_performance=False):
        dtype = torch.bfloat16
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        dtype = torch.float32  # e.g. fp8-stored weights: compute in fp32
    return dtype, precision_of(dtype)


def prediction_type(model) -> str:
    kind = getattr(model.model, "model_type", None)
    if kind == comfy.model_base.ModelType.EPS:
        return "epsilon"
    if kind == comfy.model_base.ModelType.V_PREDICTION:
        return "v_prediction"
    raise TrainingSetupError(
        f"this MODEL predicts {getattr(kind, 'name', kind)}; DualAnoDiff trains SD1.x models (epsilon or v-prediction)."
    )


class ComfyTrainingBackbone:
    """DualAnoDiff on a ComfyUI MODEL + CLIP + VAE, ready for :class:`~dualanodiff_core.training.trainer.Trainer`.

    Build it inside ``torch.inference_mode(False)``; call :meth:`release` when done (restores the base model).
    """

    def __init__(self, model, clip, vae, config: TrainConfig, *, base_model: str = ""):
        if torch.is_inference_mode_enabled():
            raise RuntimeError("build ComfyTrainingBackbone inside torch.inference_mode(False)")
        config.validate()
        self.config = config
        self.vae = vae
        self.base_model = base_model
        self.device = torch.device(model.load_device)
        self.prediction_type = prediction_type(model)
        self.dtype, precision = plan_precision(model)
        if config.precision != precision:
            raise TrainingSetupError(f"internal: config precision {config.precision!r}, model needs {precision!r}")
        base = model.model
        sigmas = base.model_sampling.sigmas.detach().to("cpu", torch.float64)
        self.alphas_cumprod = (1.0 / (sigmas**2 + 1.0)).float().clone()
        self.latent_in = base.process_latent_in
        self._latents: collections.OrderedDict[bytes, torch.Tensor] = collections.OrderedDict()
        self._text_cache: dict[tuple, torch.Tensor] = {}

        if backend.installed_layers(model):
            log.warning(
                "DualAnoDiff: the MODEL given to the trainer already carries DualAnoDiff layers (from a "
                "LoRA Loader); training starts fresh layers in their place. Connect the checkpoint's MODEL "
                "directly to train from the base model."
            )
        # ---- UNet: fresh layers, reproducible from the seed, on the model's device
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            layers = backend.new_layers(model, rank=config.rank, saim=config.saim, bcm=config.bcm)
        for lay in layers.values():
            lay.to(self.device)
            if config.saim_zero_init and lay.has_saim:
                with torch.no_grad():
                    lay.temporal_o.weight.zero_()
                    lay.temporal_o.bias.zero_()
        self.unet = backend.install_layers(model, layers, 1.0, 1.0, source="training")
        # identity weight wrappers on every base layer: normal-tensor copies of the inference-tensor weights
        for name, module in self.unet.get_model_object("diffusion_model").named_modules():
            if ".dual." in f".{name}." or not hasattr(module, "weight_function"):
                continue
            for param in ("weight", "bias"):
                if isinstance(getattr(module, param, None), torch.Tensor):
                    self.unet.add_weight_wrapper(f"diffusion_model.{name}.{param}", _identity)
        if self.dtype != compute_dtype(model):
            self.unet.set_model_compute_dtype(self.dtype)
        self._named: list[tuple[str, nn.Parameter]] = []
        for layer in sorted(layers):
            for pname, p in layers[layer].named_parameters():
                self._named.append((f"unet.{layer}.{pname}", p))

        # ---- text encoder
        self.clip = clip.clone()
        self.train_text_encoder = bool(config.train_text_encoder)
        self.text_loras: dict[str, nn.ModuleDict] = {}
        if self.train_text_encoder:
            self._install_text_lora(config)
        for _, p in self._named:
            p.requires_grad_(True)

    # ---- construction helpers -------------------------------------------------------------------------------------
    def _install_text_lora(self, config: TrainConfig) -> None:
        sd = self.clip.cond_stage_model.state_dict()
        found: dict[str, list[tuple[int, str]]] = {}
        for key in sd:
            m = _CLIP_ATTN.match(key)
            if m:
                found.setdefault(m.group("prefix"), []).append((int(m.group("layer")), key))
        if len(found) != 1:
            what = "no CLIP self-attention layers" if not found else f"{len(found)} text encoders"
            raise TrainingSetupError(
                f"the CLIP has {what}; DualAnoDiff trains the text-encoder LoRA of SD1.x's single CLIP-L. Turn "
                "train_text_encoder off to train the UNet alone."
            )
        prefix, layers = next(iter(found.items()))
        lora_keys = {
            f"{prefix}text_model.encoder.layers.{i}.self_attn.{proj}.weight"
            for i, _ in layers
            for proj in _TEXT_PROJ.values()
        }
        # identity wrappers: normal-tensor copies of the inference-tensor weights autograd saves (norms, MLPs, biases)
        for name, module in self.clip.cond_stage_model.named_modules():
            if not hasattr(module, "weight_function") or isinstance(module, nn.Embedding):
                continue
            for param in ("weight", "bias"):
                key = f"{name}.{param}"
                if isinstance(getattr(module, param, None), torch.Tensor) and key not in lora_keys:
                    self.clip.patcher.add_weight_wrapper(key, _identity)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed + 1)
            for index, _ in sorted(layers):
                base = f"{prefix}text_model.encoder.layers.{index}.self_attn"
                block = nn.ModuleDict()
                for lora_name, proj in _TEXT_PROJ.items():
                    w = sd[f"{base}.{proj}.weight"]
                    block[lora_name] = LoRALinear(w.shape[1], w.shape[0], config.rank)
                block.to(self.device)
                for lora_name, proj in _TEXT_PROJ.items():
                    self.clip.patcher.add_weight_wrapper(f"{base}.{proj}.weight", _TextLoRAWrapper(block[lora_name]))
                canonical = f"text_model.encoder.layers.{index}.self_attn"
                self.text_loras[canonical] = block
                for pname, p in block.named_parameters():
                    self._named.append((f"text_encoder.{canonical}.{pname}", p))

    # ---- TrainingBackbone -----------------------------------------------------------------------------------------
    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return list(self._named)

    def load(self) -> None:
        """Put the UNet (fully) on its device with the training layers patched in. ComfyUI may have moved it away
        to make room for the VAE or CLIP; the trainable layers must be where the optimizer state is."""
        mm.load_models_gpu([self.unet], force_full_load=True)
        for name, p in self._named:
            if name.startswith("unet.") and not same_device(p.device, self.device):
                raise TrainingSetupError(
                    f"ComfyUI placed the training layers on {p.device}, not {self.device} (low GPU memory?). Lower "
                    "batch_size or resolution, or start ComfyUI with more memory for this model."
                )

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        key = tuple(prompts)
        if not self.train_text_encoder and key in self._text_cache:
            return self._text_cache[key]
        outs = []
        for text in prompts:
            tokens = self.clip.tokenize(text)
            if self.train_text_encoder:
                with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_clone_saved, _unpack):
                    outs.append(self.clip.encode_from_tokens(tokens))
            else:
                with torch.no_grad():
                    outs.append(self.clip.encode_from_tokens(tokens).clone())
        length = math.lcm(*(o.shape[1] for o in outs))
        out = torch.cat([o if o.shape[1] == length else o.repeat(1, length // o.shape[1], 1) for o in outs])
        out = out.to(self.device)
        if not self.train_text_encoder:
            self._text_cache[key] = out
        return out

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        """Raw VAE latents (posterior mean, ComfyUI's VAE.encode) of images in [-1, 1], one row at a time (so a
        row's latent never depends on the batch it came in), cached per row content."""
        out = []
        for row in images:
            host = row.detach().to("cpu", torch.float32).contiguous()
            key = hashlib.sha1(host.numpy().tobytes()).digest() + bytes(str(tuple(host.shape)), "ascii")
            lat = self._latents.get(key)
            if lat is None:
                pixels = ((host + 1.0) / 2.0).clamp(0.0, 1.0).movedim(0, -1)[None]
                lat = self.vae.encode(pixels).detach().to("cpu", torch.float32).clone()
                self._latents[key] = lat
                if len(self._latents) > LATENT_CACHE_SIZE:
                    self._latents.popitem(last=False)
            else:
                self._latents.move_to_end(key)
            out.append(lat)
        return torch.cat(out).to(self.device)

    def encode_images(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.latent_in(self._encode(images)).float()

    def encode_backgrounds(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self._encode(images).float()  # unscaled, as the reference (and BackgroundCompensate) use them

    def _options(self, rows: int, timesteps: torch.Tensor, run: dict) -> dict:
        to = dict(self.unet.model_options.get("transformer_options", {}))
        opts = dict(to.get(backend.OPTIONS_KEY) or {})
        opts.update(lora=[1.0, 1.0], saim=1.0, bcm=1.0)
        to[backend.OPTIONS_KEY] = opts
        to[backend.RUN_KEY] = run
        to["cond_or_uncond"] = [0]
        abar = self.alphas_cumprod.to(timesteps.device)[timesteps.long()]
        to["sigmas"] = ((1 - abar) / abar).sqrt()
        return to

    def denoise(
        self,
        x_t: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        background: BackgroundPass | None = None,
    ) -> torch.Tensor:
        self.load()
        unet = self.unet.model.diffusion_model
        dt = self.dtype
        run = {"mode": MODE_DUAL, "cache": None}
        if background is not None:
            cache: dict[str, torch.Tensor] = {}
            record = self._options(
                background.latents.shape[0], background.timesteps, {"mode": MODE_RECORD, "cache": cache}
            )
            unet(
                background.latents.to(dt),
                background.timesteps.float(),
                context=background.context.to(dt),
                transformer_options=record,
            )
            run = {"mode": MODE_DUAL, "cache": cache}
        to = self._options(x_t.shape[0], timesteps, run)
        return unet(x_t.to(dt), timesteps.float(), context=context.to(dt), transformer_options=to).float()

    def to_weights(self, metadata: dict) -> DualAnoDiffWeights:
        tensors = {name: p.detach().to("cpu", torch.float32).clone() for name, p in self._named}
        meta = {
            "prompt_global": self.config.prompt_global,
            "prompt_anomaly": self.config.prompt_anomaly,
            "trained_with": "ComfyUI",
        }
        meta.update(metadata)
        return DualAnoDiffWeights(tensors, meta)

    # ---- cleanup ----------------------------------------------------------------------------------------------------
    def release(self) -> None:
        """Unload the training clones (restores the base model's modules and weights) and drop caches."""
        for patcher in (self.unet, self.clip.patcher):
            for i in reversed(range(len(mm.current_loaded_models))):
                loaded = mm.current_loaded_models[i]
                if loaded.model is patcher:
                    mm.current_loaded_models.pop(i).model_unload()
        # a full load leaves weight functions on the modules until the next load: drop ours now
        for root in (self.unet.model, self.clip.cond_stage_model):
            for module in root.modules():
                for attr in ("weight_function", "bias_function"):
                    fs = module.__dict__.get(attr)
                    if fs:
                        module.__dict__[attr] = [
                            f for f in fs if f is not _identity and not isinstance(f, _TextLoRAWrapper)
                        ]
        self._latents.clear()
        self._text_cache.clear()
