"""Training with diffusers: the :class:`~dualanodiff_core.training.trainer.TrainingBackbone`
for :class:`DualAnoDiffPipeline`,
and :func:`train_from_folder`, the one-call headless trainer behind ``dualanodiff train``."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.utils.checkpoint
from torch import nn

from ..method.attention import MODE_DUAL, DualControl
from ..method.weights import DualAnoDiffWeights
from ..training.data import DefectDataset, DefectSet
from ..training.trainer import BackgroundPass, TrainConfig, Trainer, TrainProgress, TrainResult, latest_checkpoint
from .loading import load_diffusers_components
from .pipeline import DualAnoDiffPipeline
from .single_file import is_single_file, load_single_file_components

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_CONTROL_FIELDS = ("mode", "lora_strength", "saim_strength", "bcm_strength", "bcm_cache")


def _checkpointing_fn(control: DualControl):
    """diffusers' gradient-checkpointing hook, made safe for DualAnoDiff: the recomputation during backward runs
    with the attention settings of the original forward (record pass vs. main pass, the BCM cache), which are
    per-call state on ``control`` and have changed by the time backward runs."""

    def fn(module, *args):
        snapshot = {k: getattr(control, k) for k in _CONTROL_FIELDS}

        def run(*a):
            with control.using(**snapshot):
                return module(*a)

        return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False)

    return fn


def _to(module: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Move/cast only when needed (diffusers warns about every dtype cast, even a no-op one)."""
    ref = next(module.parameters())
    if ref.dtype != dtype:
        module = module.to(dtype=dtype)
    if ref.device != device:
        module = module.to(device=device)
    return module


class DiffusersTrainingBackbone:
    """DualAnoDiff on a diffusers SD1.x model, ready to train. Build it with :meth:`build`."""

    def __init__(
        self, pipe, *, train_text_encoder: bool = True, gradient_checkpointing: bool = False, base_model: str = ""
    ):
        from diffusers import DDPMScheduler

        self.pipe = pipe
        self.base_model = base_model
        self.train_text_encoder = bool(train_text_encoder and pipe.text_lora is not None)
        cfg = {k: v for k, v in pipe.scheduler_config.items() if not k.startswith("_")}
        ddpm = DDPMScheduler.from_config(cfg)
        self.alphas_cumprod = ddpm.alphas_cumprod.float().clone()
        self.prediction_type = ddpm.config.prediction_type
        if gradient_checkpointing:
            pipe.unet.enable_gradient_checkpointing(_checkpointing_fn(pipe.dual.control))
        self._named = []
        for layer, proc in pipe.dual.processors.items():
            for n, p in proc.named_parameters():
                self._named.append((f"unet.{layer}.{n}", p))
        if self.train_text_encoder:
            for name, block in zip(pipe.text_lora.names, pipe.text_lora.blocks):
                for n, p in block.named_parameters():
                    self._named.append((f"text_encoder.{name}.{n}", p))
        for _, p in self._named:
            p.requires_grad_(True)

    # ---- construction ---------------------------------------------------------------------------------------------
    @classmethod
    def build(
        cls, components: dict, config: TrainConfig, *, device: str | torch.device = "cpu", base_model: str = ""
    ) -> DiffusersTrainingBackbone:
        """Install fresh DualAnoDiff layers on ``components`` (``unet``, ``vae``, ``text_encoder``, ``tokenizer``,
        ``scheduler_config``, as :func:`dualanodiff_core.sd15.loading.load_diffusers_components` returns them).

        The new layers are initialised from ``config.seed`` (the global torch RNG is seeded here). The frozen UNet
        and text encoder are cast to ``config.precision``; the VAE and every new layer stay fp32.
        """

        config.validate()
        dtype = DTYPES[config.precision]
        device = torch.device(device)
        unet = _to(components["unet"], device, dtype)
        te = _to(components["text_encoder"], device, dtype)
        vae = _to(components["vae"], device, torch.float32)
        for m in (unet, te, vae):
            m.requires_grad_(False)
        torch.manual_seed(config.seed)
        pipe = DualAnoDiffPipeline(
            unet,
            vae,
            te,
            components["tokenizer"],
            components.get("scheduler_config"),
            rank=config.rank,
            saim=config.saim,
            bcm=config.bcm,
            text_lora=config.train_text_encoder,
        )
        if config.saim_zero_init and config.saim:
            with torch.no_grad():
                for proc in pipe.dual.processors.values():
                    proc.temporal_o.weight.zero_()
                    proc.temporal_o.bias.zero_()
        pipe.metadata = {"prompt_global": config.prompt_global, "prompt_anomaly": config.prompt_anomaly}
        pipe.base_model = base_model
        return cls(
            pipe,
            train_text_encoder=config.train_text_encoder,
            gradient_checkpointing=config.gradient_checkpointing,
            base_model=base_model,
        )

    # ---- TrainingBackbone ------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.pipe.device

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return list(self._named)

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        if self.pipe.text_lora is not None:
            self.pipe.text_lora.strength = 1.0
        if self.train_text_encoder:
            return self.pipe.encode_prompts(prompts)
        with torch.no_grad():
            return self.pipe.encode_prompts(prompts)

    def encode_images(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.pipe.encode_images(images, generator)

    def encode_backgrounds(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.pipe.encode_background(images, generator)

    def denoise(
        self,
        x_t: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        background: BackgroundPass | None = None,
    ) -> torch.Tensor:
        dual, dtype = self.pipe.dual, self.pipe.dtype
        x, ctx = x_t.to(dtype), context.to(dtype)
        with dual.control.using(
            mode=MODE_DUAL, lora_strength=(1.0, 1.0), saim_strength=1.0, bcm_strength=1.0, bcm_cache=None
        ):
            if background is None:
                return dual(x, timesteps, ctx)
            return dual.forward_with_background(
                x, timesteps, ctx, background.latents.to(dtype), background.timesteps, background.context.to(dtype)
            )

    def to_weights(self, metadata: dict) -> DualAnoDiffWeights:
        return self.pipe.to_weights(metadata)


def load_base_components(
    model: str | os.PathLike, *, model_config: str | os.PathLike | None = None, device: str | torch.device = "cpu"
) -> dict:
    """A local diffusers SD1.x folder, or a single-file checkpoint (see :mod:`dualanodiff_core.sd15.single_file`)."""

    path = Path(model)
    if is_single_file(path):
        return load_single_file_components(path, config_dir=model_config, device=device)
    if model_config is not None:
        raise ValueError("--model-config is only for single-file checkpoints; a diffusers folder has its own configs.")
    return load_diffusers_components(path, dtype=torch.float32, device=device)


def train_from_folder(
    defect_set: DefectSet,
    model: str | os.PathLike | dict,
    output: str | os.PathLike,
    config: TrainConfig,
    *,
    work_dir: str | os.PathLike | None = None,
    resume: str | os.PathLike | bool | None = None,
    device: str | torch.device = "cpu",
    model_config: str | os.PathLike | None = None,
    progress: Callable[[TrainProgress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_ready: Callable[[DefectDataset], None] | None = None,
    data_parallel: bool | None = None,
) -> TrainResult:
    """Train DualAnoDiff weights for one defect type and write them to ``output`` (our ``.safetensors``).

    ``defect_set``: from :func:`dualanodiff_core.training.data.find_defect_set` (the split is applied here from
    ``config.split``). ``model``: a diffusers folder, a single-file checkpoint, or a components dict (tests).
    ``work_dir``: checkpoints and logs (default: ``<output without suffix>_train``). ``resume``: a checkpoint file,
    or True for the newest checkpoint in ``work_dir``. The data are checked before the model is loaded.
    ``data_parallel``: see :class:`Trainer` (None: data parallel when started as several processes).
    """
    config.validate()
    output = Path(output)
    work_dir = Path(work_dir) if work_dir is not None else output.with_name(output.stem + "_train")
    resume_from = None
    if resume is True:
        resume_from = latest_checkpoint(work_dir)
        if resume_from is None:
            raise FileNotFoundError(f"{work_dir / 'checkpoints'}: no checkpoint to resume from.")
    elif resume:
        resume_from = Path(resume)
    selected = defect_set.select(config.split)
    dataset = DefectDataset(selected, config.resolution, flips=config.flips, crop=config.crop, backgrounds=config.bcm)
    if on_ready is not None:
        on_ready(dataset)
    if isinstance(model, dict):
        components, base_model = model, str(model.get("name", "in-memory model"))
    else:
        components, base_model = load_base_components(model, model_config=model_config, device=device), str(model)
    backbone = DiffusersTrainingBackbone.build(components, config, device=device, base_model=base_model)
    trainer = Trainer(
        backbone,
        dataset,
        config,
        work_dir,
        output=output,
        progress=progress,
        should_stop=should_stop,
        data_fingerprint=selected.fingerprint(),
        data_parallel=data_parallel,
    )
    return trainer.run(resume=resume_from)
