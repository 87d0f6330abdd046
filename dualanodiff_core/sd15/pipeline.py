"""The headless backbone: DualAnoDiff on a diffusers ``UNet2DConditionModel`` + transformers ``CLIPTextModel``.

* :class:`DualUNet` installs one :class:`DualAnoDiffProcessor` on every attention layer of the UNet (32 for SD1.5);
  the processors hold the reference's parameters, so ``unet.state_dict()`` shows them as
  ``<layer>.processor.to_q_lora.0.down.weight`` exactly like the official code.
* :class:`TextEncoderLoRA` adds the shared text-encoder LoRA (q/k/v/out of every CLIP self-attention) with forward
  hooks, leaving the encoder's own modules and keys untouched.
* :class:`DualAnoDiffPipeline` samples pairs: the CFG batch ``[(uncond_g, uncond_a) x N, (cond_g, cond_a) x N]``,
  PNDM by default (DDIM and DPM-Solver++ as options), optional BCM (background record pass + inject pass per UNet
  call), and returns both branches' images.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..fileio import tensor_to_pil
from ..method import layout
from ..method.attention import (
    MODE_DUAL,
    DualBranchLayers,
    DualControl,
    attention_dims,
    dual_branch_attention,
    run_with_background,
)
from ..method.fused import clear_fast_cache
from ..method.placement import (
    DEFAULT_FEATHER,
    HOLD_ONLY,
    PlacementError,
    Steering,
    as_region,
    as_steering,
    composite,
    feather_alpha,
    keep_mask,
    plan_steering,
    ramp_anomaly_rows,
    ramp_weight,
    roll_pairs,
)
from ..method.placement import latent_region as _latent_region
from ..method.weights import (
    DEFAULT_PROMPT_ANOMALY,
    DEFAULT_PROMPT_GLOBAL,
    UNET,
    DualAnoDiffWeights,
    WeightsError,
)
from .loading import load_diffusers_components
from .scheduler import SAMPLERS, SD15_SCHEDULER_CONFIG, make_scheduler  # noqa: F401  (SAMPLERS: also served here)
from .text import TextEncoderLoRA, check_tokenizer, encode_prompts


class DualAnoDiffProcessor(DualBranchLayers):
    """A diffusers attention processor that *is* the layer's :class:`DualBranchLayers`."""

    def __init__(self, attn: nn.Module, layer_name: str, control: DualControl, **layer_kwargs):
        super().__init__(**attention_dims(attn), **layer_kwargs)
        self.layer_name = layer_name
        self.is_self_attention = layer_name.endswith("attn1")
        self.control = control

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **_):
        if hidden_states.ndim != 3:
            raise ValueError(f"{self.layer_name}: DualAnoDiff expects [batch, tokens, channels] attention input")
        residual = hidden_states
        if getattr(attn, "spatial_norm", None) is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        if getattr(attn, "group_norm", None) is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        context = encoder_hidden_states
        if context is not None and getattr(attn, "norm_cross", None):
            context = attn.norm_encoder_hidden_states(context)
        mask = None
        if attention_mask is not None:
            src_len = (context if context is not None else hidden_states).shape[1]
            mask = attn.prepare_attention_mask(attention_mask, src_len, hidden_states.shape[0])
            mask = mask.view(hidden_states.shape[0], attn.heads, -1, mask.shape[-1])
        out = dual_branch_attention(
            attn,
            self,
            hidden_states,
            context,
            self.control,
            layer_name=self.layer_name,
            is_self_attention=self.is_self_attention,
            mask=mask,
        )
        if getattr(attn, "residual_connection", False):
            out = out + residual
        return out / getattr(attn, "rescale_output_factor", 1.0)


class DualUNet:
    """Installs DualAnoDiff on every attention layer of a diffusers UNet; ``uninstall()`` restores it."""

    def __init__(
        self,
        unet: nn.Module,
        rank: int = 32,
        alpha: float | None = None,
        saim: bool = True,
        bcm: bool = False,
        saim_zero_init: bool = False,
        bcm_alpha_init: float = 0.0,
        control: DualControl | None = None,
    ):
        self.unet = unet
        self.control = control or DualControl()
        self.config = dict(rank=rank, alpha=alpha, saim=saim, bcm=bcm)
        self._original = dict(unet.attn_processors)
        modules = dict(unet.named_modules())
        procs = {}
        for proc_name in self._original:
            layer = proc_name[: -len(".processor")]
            attn = modules[layer]
            p = DualAnoDiffProcessor(
                attn,
                layer,
                self.control,
                rank=rank,
                alpha=alpha,
                saim=saim,
                bcm=bcm,
                saim_zero_init=saim_zero_init,
                bcm_alpha_init=bcm_alpha_init,
            )
            ref = next(attn.parameters())
            procs[proc_name] = p.to(device=ref.device)
        self.processors: dict[str, DualAnoDiffProcessor] = {k[: -len(".processor")]: v for k, v in procs.items()}
        unet.set_attn_processor(procs)

    @classmethod
    def from_weights(cls, unet: nn.Module, weights: DualAnoDiffWeights, **kwargs) -> DualUNet:
        d = cls(unet, rank=weights.rank, alpha=weights.alpha, saim=weights.has_saim, bcm=weights.has_bcm, **kwargs)
        d.load_weights(weights)
        return d

    def uninstall(self) -> None:
        clear_fast_cache(self.unet)
        self.unet.set_attn_processor(dict(self._original))

    @property
    def layer_names(self) -> list[str]:
        return list(self.processors)

    def parameters(self) -> list[nn.Parameter]:
        return [p for m in self.processors.values() for p in m.parameters()]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Canonical keys ``unet.<layer>.<param>``."""
        return {f"{UNET}{layer}.{k}": v for layer, m in self.processors.items() for k, v in m.state_dict().items()}

    def load_weights(self, weights: DualAnoDiffWeights | dict[str, torch.Tensor], strict: bool = True) -> None:
        sd = weights.tensors if isinstance(weights, DualAnoDiffWeights) else weights
        sd = {k: v for k, v in sd.items() if k.startswith(UNET)}
        expected = self.state_dict()
        if strict:
            DualAnoDiffWeights(sd).check_keys(
                expected,
                "UNet weights",
                hint=f"The model was installed with {self.config}; weights and model must agree on layers, SAIM and "
                "BCM (build it with DualUNet.from_weights to match the file).",
            )
        clear_fast_cache(self.unet)
        with torch.no_grad():
            for k, v in sd.items():
                if k not in expected:
                    continue
                if expected[k].shape != v.shape:
                    raise WeightsError(
                        f"{k}: shape {tuple(v.shape)} in the weights, {tuple(expected[k].shape)} in the model"
                    )
                expected[k].copy_(v.to(expected[k].dtype))

    def __call__(self, sample, timestep, context, **kwargs) -> torch.Tensor:
        return self.unet(sample, timestep, encoder_hidden_states=context, return_dict=False, **kwargs)[0]

    def forward_with_background(self, sample, timestep, context, bg_sample, bg_timestep, bg_context):
        """BCM: a record pass of the UNet over the noised background rows (one per pair, global-branch LoRA, no
        SAIM) then the main pass with those features fused into every global-branch self-attention."""
        return run_with_background(
            self.control,
            lambda: self(bg_sample, bg_timestep, bg_context),
            lambda: self(sample, timestep, context),
        )


@dataclasses.dataclass
class DualResult:
    """Images in [0, 1], ``[N, 3, H, W]`` (N pairs), and the final latents (scaled as the UNet sees them).
    ``steering``: with a steered placement region, what was done per pair (:meth:`DualAnoDiffPipeline.generate`)."""

    global_images: torch.Tensor
    anomaly_images: torch.Tensor
    global_latents: torch.Tensor
    anomaly_latents: torch.Tensor
    steering: list[dict] | None = None

    def to_pil(self):
        return tensor_to_pil(self.global_images), tensor_to_pil(self.anomaly_images)


def _noise_fn(source, shape, device, dtype, seed_fallback: int | None):
    """BCM background noise per UNet call: a generator (fresh draws, reproducible), a tensor (reused every call),
    or a callable ``(call_index, shape) -> tensor``."""
    if callable(source) and not isinstance(source, (torch.Generator, torch.Tensor)):
        return lambda i: source(i, shape).to(device=device, dtype=dtype)
    if isinstance(source, torch.Tensor):
        if tuple(source.shape) != tuple(shape):
            raise ValueError(f"bcm_noise has shape {tuple(source.shape)}, expected {tuple(shape)}")
        return lambda i: source.to(device=device, dtype=dtype)
    gen = source
    if gen is None:
        gen = torch.Generator(device="cpu")
        if seed_fallback is not None:
            gen.manual_seed(seed_fallback)
        else:
            gen.seed()
    return lambda i: torch.randn(shape, generator=gen, device=gen.device, dtype=torch.float32).to(
        device=device, dtype=dtype
    )


def _predicted_x0(scheduler, model_output: torch.Tensor, t, latents: torch.Tensor) -> torch.Tensor:
    """The clean latents the model predicts at timestep ``t`` (epsilon or v prediction)."""
    a = scheduler.alphas_cumprod.to(latents.device)[int(t)].to(latents.dtype)
    kind = scheduler.config.get("prediction_type", "epsilon")
    if kind == "epsilon":
        return (latents - (1 - a).sqrt() * model_output) / a.sqrt()
    if kind == "v_prediction":
        return a.sqrt() * latents - (1 - a).sqrt() * model_output
    return model_output  # "sample"


@dataclasses.dataclass
class _Hold:
    """Where the sampler pins the latents to known ones (docs/placement.md, "How it works"): ``keep_g`` (global rows:
    the photo outside the region) and ``keep_a`` (anomaly rows: the gray background outside the region), both
    ``[2N, 1, h, w]`` over the interleaved rows, to ``known``, noised with the samples' own starting noise;
    ``alpha`` is the pixel composite weight."""

    keep_g: torch.Tensor
    keep_a: torch.Tensor
    known: torch.Tensor
    gray: torch.Tensor
    region_latent: torch.Tensor
    alpha: torch.Tensor | None
    scale: int
    noise: torch.Tensor | None = None

    def roll(self, shifts) -> None:
        """Steering moved the pairs' latents: the noise the known latents are noised with moves with them."""
        self.noise = roll_pairs(self.noise, shifts)

    def after_step(self, noise: torch.Tensor, scheduler, ramp: float, ramp_start: int = 0):
        """``after_step(i, latents)``: the latents pinned to ``known`` noised with ``noise`` to the level they have
        after step ``i`` (-1 = the start); the anomaly rows' hold is weighted by :func:`ramp_weight`."""
        timesteps = scheduler.timesteps
        n = len(timesteps)
        self.noise = noise.to(self.known.device, self.known.dtype)

        def after_step(i: int, latents: torch.Tensor) -> torch.Tensor:
            if i + 1 < n:
                t = timesteps[i + 1].reshape(1).expand(self.known.shape[0])
                target = scheduler.add_noise(self.known, self.noise, t)
            else:
                target = self.known
            keep = self.keep_g + ramp_anomaly_rows(self.keep_a, ramp_weight(i, n, ramp, ramp_start))
            return latents * (1 - keep) + target.to(latents.dtype) * keep

        return after_step


def _roll_scheduler_state(scheduler, shifts, shape) -> None:
    """Steering rolls the latents mid-sampling: the scheduler's own memory of earlier steps (PNDM's ``ets`` and
    ``cur_sample``, DPM-Solver's ``model_outputs``: every tensor of the latents' shape, alone or in a list) must move
    with them, or the next multistep update would mix the old position into the new one."""
    shape = tuple(shape)
    for name, v in list(vars(scheduler).items()):
        if isinstance(v, torch.Tensor) and tuple(v.shape) == shape:
            setattr(scheduler, name, roll_pairs(v, shifts))
        elif isinstance(v, list) and any(isinstance(e, torch.Tensor) and tuple(e.shape) == shape for e in v):
            v[:] = [roll_pairs(e, shifts) if isinstance(e, torch.Tensor) and tuple(e.shape) == shape else e for e in v]


class DualAnoDiffPipeline:
    """Generate (whole image, anomaly part) pairs with a diffusers SD1.x model and DualAnoDiff weights."""

    def __init__(
        self,
        unet,
        vae,
        text_encoder,
        tokenizer,
        scheduler_config: dict | None = None,
        weights: DualAnoDiffWeights | None = None,
        rank: int = 32,
        saim: bool = True,
        bcm: bool = False,
        text_lora: bool = True,
    ):
        check_tokenizer(tokenizer)
        self.vae, self.text_encoder, self.tokenizer = vae, text_encoder, tokenizer
        self.scheduler_config = dict(scheduler_config or SD15_SCHEDULER_CONFIG)
        self.metadata: dict[str, str] = {}
        if weights is not None:
            self.dual = DualUNet.from_weights(unet, weights)
            self.text_lora = None
            if weights.has_text:
                self.text_lora = TextEncoderLoRA(text_encoder, weights.text_rank, weights.alpha)
                self.text_lora.load_weights(weights)
            self.metadata = dict(weights.metadata)
        else:
            self.dual = DualUNet(unet, rank=rank, saim=saim, bcm=bcm)
            self.text_lora = TextEncoderLoRA(text_encoder, rank) if text_lora else None

    @property
    def unet(self):
        return self.dual.unet

    @property
    def device(self):
        return next(self.unet.parameters()).device

    @property
    def dtype(self):
        return next(self.unet.parameters()).dtype

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | os.PathLike,
        weights: str | os.PathLike | DualAnoDiffWeights | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        **kwargs,
    ):
        """Load a local diffusers SD1.x folder (``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``,
        ``scheduler/``). Nothing is downloaded."""
        from .loading import check_base_model, check_weights_fit

        # cheap checks first (configs, weights file, their fit), then the heavy load
        configs = check_base_model(model_dir)
        weights_path = weights if weights is not None and not isinstance(weights, DualAnoDiffWeights) else None
        if weights_path is not None:
            weights = DualAnoDiffWeights.load(weights_path)
        if weights is not None:
            check_weights_fit(
                weights, configs["unet"], configs["text_encoder"], weights_path or "(in memory)", model_dir
            )
        comps = load_diffusers_components(model_dir, dtype=dtype, device=device)
        pipe = cls(
            comps["unet"],
            comps["vae"],
            comps["text_encoder"],
            comps["tokenizer"],
            comps["scheduler_config"],
            weights=weights,
            **kwargs,
        )
        pipe.base_model = str(model_dir)
        return pipe

    # ---- weights --------------------------------------------------------------------------------------------------
    def to_weights(self, metadata: dict | None = None) -> DualAnoDiffWeights:
        tensors = dict(self.dual.state_dict())
        if self.text_lora is not None:
            tensors.update(self.text_lora.canonical_state_dict())
        meta = dict(self.metadata)
        meta.update(metadata or {})
        alpha = self.dual.config.get("alpha")
        if alpha is not None:
            meta.setdefault("alpha", alpha)
        return DualAnoDiffWeights({k: v.detach().clone() for k, v in tensors.items()}, meta)

    # ---- encoders -------------------------------------------------------------------------------------------------
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        return encode_prompts(self.tokenizer, self.text_encoder, prompts)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def scaling_factor(self) -> float:
        return float(getattr(self.vae.config, "scaling_factor", 0.18215))

    def encode_images(self, images: torch.Tensor, generator=None) -> torch.Tensor:
        """Images in [-1, 1] -> latents *scaled* by the VAE scaling factor (what the UNet denoises)."""
        return (
            self.vae.encode(images.to(self.device, self.vae.dtype)).latent_dist.sample(generator) * self.scaling_factor
        )

    def encode_background(self, images: torch.Tensor, generator=None) -> torch.Tensor:
        """BCM background latents: a VAE *sample*, **not** multiplied by the scaling factor (as the reference)."""
        return self.vae.encode(images.to(self.device, self.vae.dtype)).latent_dist.sample(generator)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        img = self.vae.decode(latents.to(self.vae.dtype) / self.scaling_factor).sample
        return (img.float() / 2 + 0.5).clamp(0, 1)

    # ---- sampling -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        n_pairs: int = 1,
        *,
        prompt_global: str | None = None,
        prompt_anomaly: str | None = None,
        negative_prompt: str = "",
        steps: int = 100,
        cfg: float = 2.5,
        sampler: str = "pndm",
        seed: int | None = None,
        generator: torch.Generator | None = None,
        height: int = 512,
        width: int = 512,
        latents: torch.Tensor | None = None,
        background: torch.Tensor | None = None,
        background_latents: torch.Tensor | None = None,
        bcm_noise=None,
        lora_strength: tuple[float, float] = (1.0, 1.0),
        saim_strength: float = 1.0,
        bcm_strength: float = 1.0,
        text_strength: float = 1.0,
        decode: bool = True,
        callback: Callable[[int, int, torch.Tensor], None] | None = None,
        placement: torch.Tensor | None = None,
        normal: torch.Tensor | None = None,
        guide_placement: bool = True,
        feather: int = DEFAULT_FEATHER,
        steering: Steering | bool = True,
        placement_seeds: Sequence[int] | None = None,
        anomaly_noise_share: float = 0.0,
    ) -> DualResult:
        """Sample ``n_pairs`` pairs.

        ``background``: images ``[1 or N, 3, H, W]`` in [-1, 1] (normal product images with the object blacked out,
        docs/method.md, "BCM: background compensation") turn on BCM; the unconditional half uses a mid-gray
        background. ``bcm_noise``: a generator,
        a tensor reused every call, or ``callable(call_index, shape)``; defaults to a generator seeded from ``seed``.

        Placement (docs/placement.md): ``placement`` ``[1 or N, 1, H, W]`` (or ``[.., H, W]``) in [0, 1], white =
        a defect may appear there: the anomaly branch is held at the gray background outside it at every step
        (``guide_placement=False`` turns that off). ``normal`` ``[1 or N, 3, H, W]`` in [-1, 1]: the global branch
        is held at the normal photo (noised to the current step) outside the region, and the decoded image keeps the
        photo's pixels exactly outside a ``feather``-pixel band around it; with BCM weights and no ``background``
        the photo is also the BCM background.

        ``steering`` (with a guided ``placement``): ``True`` = :class:`Steering` defaults: the anomaly branch runs
        free for the first steps, then the predicted clean latent shows where each pair's defect forms, both rows'
        latents (and the scheduler's memory of them) are rolled so that it lies inside the region, and the hold
        outside the region ramps in; ``False`` = the hold at full strength from the first step (no shift); or a
        :class:`Steering`. Among equally good shifts, pair ``j``'s is picked by
        ``placement_seeds[j]`` (default: ``seed`` or the generator's initial seed, plus ``j``). What was done is in
        ``DualResult.steering``.

        ``anomaly_noise_share``: when the starting ``latents`` are drawn here, each pair's anomaly row starts from
        ``share * g + sqrt(1 - share**2) * a`` (``g`` its global row's noise): 0 = independent noise, the reference;
        1 = the same noise, so both branches place the defect at the same spot (docs/quality.md, recipe
        ``shared-noise``). Given ``latents`` are used as they are.
        """
        if n_pairs < 1:
            raise ValueError("n_pairs must be at least 1")
        if not 0.0 <= float(anomaly_noise_share) <= 1.0:
            raise ValueError(f"anomaly_noise_share={anomaly_noise_share}: must lie in [0, 1] (0 = independent noise)")
        f = self.vae_scale_factor
        if height % f or width % f:
            raise ValueError(f"height and width must be multiples of {f}, got {height}x{width}")
        device, dtype = self.device, self.dtype
        use_cfg = cfg > 1.0
        if generator is None:
            generator = torch.Generator(device="cpu")
            generator.manual_seed(seed) if seed is not None else generator.seed()
        context = self._prompt_context(n_pairs, prompt_global, prompt_anomaly, negative_prompt, text_strength, use_cfg)

        shape = (2 * n_pairs, self.unet.config.in_channels, height // f, width // f)
        if latents is None:
            latents = torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)
            if anomaly_noise_share:
                latents = layout.share_anomaly_noise(latents, anomaly_noise_share)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape} (interleaved pairs), got {tuple(latents.shape)}")
        latents = latents.to(device=device, dtype=dtype)

        scheduler = make_scheduler(sampler, self.scheduler_config)
        scheduler.set_timesteps(steps, device=device)
        hold = None
        steer = as_steering(steering)
        if placement_seeds is not None and len(placement_seeds) != n_pairs:
            raise PlacementError(f"placement_seeds: {len(placement_seeds)} seeds for {n_pairs} pair(s); give one each")
        if placement is None or not guide_placement:
            steer = HOLD_ONLY
        if placement is not None or normal is not None:
            hold = self._placement_guide(n_pairs, placement, normal, guide_placement, height, width, feather)
            if self.dual.config["bcm"] and background is None and background_latents is None and normal is not None:
                background = normal

        noised_background = None
        if background is not None or background_latents is not None:
            noised_background = self._noised_background(
                n_pairs, background, background_latents, bcm_noise, seed, generator, height, width, use_cfg
            )
        steered: list[dict] | None = None
        k = steer.probe_steps(len(scheduler.timesteps))
        steer_hook = None
        if k > 0:
            if placement_seeds is None:
                base = int(seed) if seed is not None else int(generator.initial_seed())
                placement_seeds = [base + j for j in range(n_pairs)]
            seeds, steered = list(placement_seeds), []

            def steer_hook(x, x0):
                shifts, records = plan_steering(x0[1::2], hold.gray, hold.region_latent, seeds, steer, k, hold.scale)
                _roll_scheduler_state(scheduler, shifts, x.shape)
                hold.roll(shifts)
                steered.extend(records)
                return roll_pairs(x, shifts)

        guide = None if hold is None else hold.after_step(latents, scheduler, steer.ramp, k)
        latents = latents * scheduler.init_noise_sigma
        if guide is not None:
            latents = guide(-1, latents)
        with self.dual.control.using(
            mode=MODE_DUAL, lora_strength=tuple(lora_strength), saim_strength=saim_strength, bcm_strength=bcm_strength
        ):
            latents = self._denoise(
                latents,
                context,
                scheduler,
                cfg if use_cfg else None,
                noised_background,
                callback,
                after_step=guide,
                steer=None if steer_hook is None else (k, steer_hook),
            )

        g_lat, a_lat = layout.split(latents)
        if decode:
            images = self.decode(latents)
            g_img, a_img = layout.split(images)
            if normal is not None:
                g_img = composite(g_img, (normal.float().to(g_img.device) + 1) / 2, hold.alpha)
        else:
            g_img = a_img = torch.empty(0)
        return DualResult(g_img, a_img, g_lat, a_lat, steered)

    def _prompt_context(self, n_pairs, prompt_global, prompt_anomaly, negative_prompt, text_strength, use_cfg):
        """The UNet's text context: ``[g, a, g, a, ...]`` (prompts default to the weights' own), with the negative
        prompt's rows in front when CFG is on."""
        pg, pa = self.metadata.get("prompt_global"), self.metadata.get("prompt_anomaly")
        prompt_global = prompt_global if prompt_global is not None else (pg or DEFAULT_PROMPT_GLOBAL)
        prompt_anomaly = prompt_anomaly if prompt_anomaly is not None else (pa or DEFAULT_PROMPT_ANOMALY)
        if self.text_lora is not None:
            self.text_lora.strength = text_strength
        emb = self.encode_prompts([prompt_global, prompt_anomaly]).to(self.dtype)  # [2, T, D]
        cond = emb.repeat(n_pairs, 1, 1)  # [g, a, g, a, ...]
        if not use_cfg:
            return cond
        neg = self.encode_prompts([negative_prompt]).to(self.dtype)
        return torch.cat([neg.expand_as(cond), cond])

    def _noised_background(
        self, n_pairs, background, background_latents, bcm_noise, seed, generator, height, width, use_cfg
    ):
        """BCM: the background latents (a mid-gray background for the unconditional half when CFG is on) and a
        function ``(call, t) -> background latents noised to t`` for the record pass of each UNet call."""
        device, dtype = self.device, self.dtype
        if not self.dual.config["bcm"]:
            raise ValueError("a background was given, but these weights have no BCM layers (train with BCM)")
        if background_latents is None:
            background = background.to(device)
            if background.shape[0] not in (1, n_pairs):
                raise ValueError(f"background must hold 1 or {n_pairs} images, got {background.shape[0]}")
            background_latents = self.encode_background(background, generator)
            gray = self.encode_background(torch.zeros_like(background[:1]), generator)
        else:
            gray = None
        bg_cond = (
            background_latents.to(device, dtype).expand(n_pairs, -1, -1, -1)
            if background_latents.shape[0] == 1
            else background_latents.to(device, dtype)
        )
        if use_cfg:
            if gray is None:
                gray = self.encode_background(
                    torch.zeros((1, 3, height, width), device=device, dtype=self.vae.dtype), generator
                )
            bg = torch.cat([gray.to(dtype).expand(n_pairs, -1, -1, -1), bg_cond])
        else:
            bg = bg_cond
        from diffusers import DDPMScheduler  # lazy: see sd15/__init__

        ddpm = DDPMScheduler.from_config({k: v for k, v in self.scheduler_config.items() if not k.startswith("_")})
        noise_fn = _noise_fn(bcm_noise, tuple(bg.shape), device, dtype, None if seed is None else seed + 1)

        def noised(call: int, t: torch.Tensor) -> torch.Tensor:
            return ddpm.add_noise(bg, noise_fn(call), t.reshape(-1).to(device).expand(bg.shape[0]))

        return noised

    def _placement_guide(self, n_pairs, placement, normal, guide_anomaly, height, width, feather) -> _Hold:
        """Placement / normal photo: checks the inputs and builds the :class:`_Hold` (what the latents are pinned to,
        and where)."""
        device, dtype = self.device, self.dtype
        f = self.vae_scale_factor
        if normal is not None:
            if not isinstance(normal, torch.Tensor) or normal.ndim != 4 or normal.shape[1] != 3:
                shape = tuple(normal.shape) if isinstance(normal, torch.Tensor) else type(normal).__name__
                raise PlacementError(f"normal: expected images [1 or N, 3, H, W] in [-1, 1], got {shape}")
            if normal.shape[0] not in (1, n_pairs) or tuple(normal.shape[2:]) != (height, width):
                raise PlacementError(
                    f"normal: {tuple(normal.shape)} does not fit {n_pairs} pair(s) of {width}x{height} "
                    f"(give 1 or {n_pairs} images of exactly {width}x{height})"
                )
        if placement is None:
            region = torch.ones((1, 1, height, width), device=device)
        else:
            region = as_region(placement.to(device))
            if tuple(region.shape[2:]) != (height, width) or region.shape[0] not in (1, n_pairs):
                raise PlacementError(
                    f"placement: {tuple(placement.shape)} does not fit {n_pairs} pair(s) of {width}x{height} "
                    f"(give 1 or {n_pairs} masks of exactly {width}x{height})"
                )
        region_lat = _latent_region(region, (height // f, width // f))
        keep_g = keep_mask(region_lat, n_pairs, normal is not None, False).to(device, dtype)
        keep_a = keep_mask(region_lat, n_pairs, False, guide_anomaly).to(device, dtype)
        alpha = feather_alpha(region, feather=feather) if normal is not None else None

        def encode_mean(images):
            dist = self.vae.encode(images.to(device, self.vae.dtype)).latent_dist
            return dist.mean.to(dtype) * self.scaling_factor

        gray = encode_mean(torch.zeros((1, 3, height, width)))
        known_g = encode_mean(normal.float()) if normal is not None else gray
        known_g = known_g.expand(n_pairs, -1, -1, -1)
        known = torch.stack([known_g, gray.expand(n_pairs, -1, -1, -1)], 1).reshape(2 * n_pairs, *gray.shape[1:])
        return _Hold(keep_g, keep_a, known, gray, region_lat.expand(n_pairs, -1, -1, -1), alpha, f)

    def _denoise(self, latents, context, scheduler, cfg, noised_background, callback, after_step=None, steer=None):
        """The sampling loop: one UNet call per step (two, record + main, with BCM), then CFG (``cfg`` None: off).
        ``steer=(k, fn)``: after the ``k``-th step the latents become ``fn(latents, x0)``, ``x0`` the clean latents
        predicted at that step (placement steering)."""
        bg_context = context[0::2]
        for i, t in enumerate(scheduler.timesteps):
            x = torch.cat([latents, latents]) if cfg is not None else latents
            x = scheduler.scale_model_input(x, t)
            if noised_background is None:
                eps = self.dual(x, t, context)
            else:
                eps = self.dual.forward_with_background(x, t, context, noised_background(i, t), t, bg_context)
            if cfg is not None:
                eps_u, eps_c = eps.chunk(2)
                eps = eps_u + cfg * (eps_c - eps_u)
            x0 = _predicted_x0(scheduler, eps, t, latents) if steer is not None and i + 1 == steer[0] else None
            latents = scheduler.step(eps, t, latents, return_dict=False)[0]
            if x0 is not None:
                latents = steer[1](latents, x0)
            if after_step is not None:
                latents = after_step(i, latents)
            if callback is not None:
                callback(i, len(scheduler.timesteps), latents)
        return latents
