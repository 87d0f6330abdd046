"""The DualAnoDiff training loop, independent of the model backend.

What one step does (the reference ``train_dreambooth_lora.py`` / ``train_dreambooth_lora_single_background.py``,
docs/method.md, "Training" and "BCM: background compensation"):

1. draw ``batch_size`` training images
   (:class:`~dualanodiff_core.training.data.PairSampler`: seeded epochs of permutations,
   random flips) -> images ``I`` and masks ``M``; the anomaly image is ``I * M`` in [-1, 1] (defect on mid-gray);
2. encode the interleaved rows ``[I_0, A_0, I_1, A_1, ...]`` to (scaled) latents ``z0`` -- a VAE *sample*;
3. one timestep per pair (both rows of a pair share it), independent Gaussian noise per row:
   ``z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps``; each pair's randomness (its VAE sample, timestep and noise) comes
   from its own generator seeded by (seed, step, position in the global batch);
4. prompts: the global prompt on even rows, the anomaly prompt on odd rows, encoded *with* gradient through the
   text-encoder LoRA;
5. with BCM: the background of each pair (the same training image with the object blacked out) is encoded to an
   *unscaled* VAE sample, noised at the pair's timestep with fresh noise, and run through the UNet in a record pass
   (global-branch LoRA, no SAIM, global prompt) before the main pass -- not under ``no_grad``, so gradients also
   flow through the record pass;
6. loss = MSE over both branches of (prediction, target) with target ``eps`` (or ``v`` for v-prediction models);
   AdamW, gradient clipping, constant learning rate after an optional linear warm-up.

Several processes (``torchrun`` / ``accelerate launch``, see :mod:`dualanodiff_core.distributed`): data parallel.
The global batch is ``batch_size`` x processes pairs, drawn by the same seeded sampler on every process; process
``r`` takes pairs ``r*batch_size .. (r+1)*batch_size-1`` of it, and the gradients are averaged over the processes
before clipping. Because every pair's randomness is seeded by its position in the global batch, a run on N processes
follows the same loss curve as one process with N times the batch (up to floating-point summation order). Only
process 0 writes checkpoints, the loss log and the weights; a checkpoint can be resumed with another process count
that keeps the global batch.

The loop only talks to a :class:`TrainingBackbone` (the model), so the same code trains with diffusers
(:mod:`dualanodiff_core.sd15.training`) or inside ComfyUI.

Checkpoints (``<work_dir>/checkpoints/checkpoint-<step>.pt``) hold everything a run needs to continue: trainable
tensors, optimizer, learning-rate schedule, loss scaler, the data sampler and every random generator, and the loss
history. They are written atomically (temp file + rename), the last K are kept, and each comes with a
``checkpoint-<step>.safetensors`` holding the weights at that step in our format (usable for generation). On CPU a
resumed run continues bit-identically. They are read back with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from .. import __version__, _testhook
from .. import distributed as dist
from ..errors import DualAnoDiffError, RunError
from ..fileio import atomic_path, save_image_atomic, sweep_temp_files, write_json_atomic, write_text_atomic
from ..method import layout
from ..method.weights import DEFAULT_PROMPT_ANOMALY, DEFAULT_PROMPT_GLOBAL, DualAnoDiffWeights
from .data import DefectDataset, Draw, PairSampler, anomaly_target
from .lossplot import draw_loss_curve

CHECKPOINT_FORMAT = "dualanodiff-train-checkpoint"
#: the largest ``TrainConfig.anomaly_contrast`` (a median defect pixel this far from mid-gray is plainly visible)
MAX_ANOMALY_CONTRAST = 0.5
CHECKPOINT_VERSION = 1
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)\.pt$")
PRECISIONS = ("fp32", "fp16", "bf16")
#: settings that may change when a run is resumed (everything else must match the checkpoint)
RESUMABLE_CHANGES = ("steps", "checkpoint_every", "keep_checkpoints", "checkpoint_weights")


class TrainingError(RunError, RuntimeError):
    """Training cannot go on (e.g. the loss became NaN); the message says which checkpoint is the last good one."""


class CheckpointError(DualAnoDiffError, ValueError):
    """A checkpoint cannot be used to resume this run (wrong file, different settings or data)."""


# ---------------------------------------------------------------------------------------------------------------------
# configuration


@dataclasses.dataclass
class TrainConfig:
    """Every training setting. Defaults are the reference's (docs/method.md, "Training") unless noted.

    Model settings (``rank`` .. ``gradient_checkpointing``) are applied by whoever builds the backbone; they are part
    of the config so that checkpoints and the final weights record them.
    """

    # optimisation
    steps: int = 5000
    batch_size: int = 4  # training images (= pairs) per step; the UNet sees 2x as many rows
    learning_rate: float = 2e-5
    weight_decay: float = 1e-2
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm; 0 = no clipping
    warmup_steps: int = 0  # linear learning-rate warm-up (the reference: 0, constant)
    seed: int = 32  # the reference dual script's seed
    # model
    rank: int = 32
    saim: bool = True
    bcm: bool = False
    saim_zero_init: bool = False  # not the reference: start SAIM as an exact no-op
    train_text_encoder: bool = True
    precision: str = "fp32"  # fp32 | fp16 | bf16 for the frozen base model; new layers always fp32
    gradient_checkpointing: bool = False
    prompt_global: str = DEFAULT_PROMPT_GLOBAL
    prompt_anomaly: str = DEFAULT_PROMPT_ANOMALY
    # not the reference (see dualanodiff_core.method.recipes; the defaults here are the reference's):
    anomaly_offset_noise: float = 0.0  # std of a per-channel constant added to the anomaly rows' noise
    mask_loss_weight: float = 1.0  # weight of the global branch's loss inside the defect mask
    # correlation of each anomaly row's training noise with its global row's (0 = independent; see SamplingOptions)
    anomaly_noise_share: float = 0.0
    # amplify the anomaly branch's target about mid-gray so that its median defect pixel differs from mid-gray by at
    # least this much (image units; gain at most MAX_ANOMALY_GAIN; 0 = off, the reference). See anomaly_gain().
    anomaly_contrast: float = 0.0
    # data
    resolution: int = 512
    split: str = "all"
    flips: str = "hv"
    crop: str = "center"
    # checkpoints
    checkpoint_every: int = 500  # steps; 0 = only at the end (and on a stop request)
    keep_checkpoints: int = 3  # the newest K are kept; 0 = keep all
    checkpoint_weights: bool = True  # also write checkpoint-<step>.safetensors (our weights format)

    def validate(self) -> TrainConfig:
        def need(cond, msg):
            if not cond:
                raise ValueError(msg)

        need(self.steps >= 1, f"steps must be at least 1, got {self.steps}")
        need(self.batch_size >= 1, f"batch size must be at least 1, got {self.batch_size}")
        need(
            self.learning_rate > 0 and math.isfinite(self.learning_rate),
            f"learning rate must be > 0, got {self.learning_rate}",
        )
        need(self.weight_decay >= 0, f"weight decay must be >= 0, got {self.weight_decay}")
        need(0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1, "Adam betas must be in [0, 1)")
        need(self.adam_epsilon > 0, "Adam epsilon must be > 0")
        need(self.grad_clip >= 0, f"gradient clipping must be >= 0 (0 = off), got {self.grad_clip}")
        need(self.warmup_steps >= 0, "warm-up steps must be >= 0")
        need(self.rank >= 1, f"rank must be at least 1, got {self.rank}")
        need(self.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        need(
            self.resolution >= 8 and self.resolution % 8 == 0,
            f"resolution must be a multiple of 8, got {self.resolution}",
        )
        need(self.checkpoint_every >= 0, "checkpoint interval must be >= 0 (0 = only at the end)")
        need(self.keep_checkpoints >= 0, "keep-checkpoints must be >= 0 (0 = keep all)")
        need(bool(self.prompt_global) and bool(self.prompt_anomaly), "prompts must not be empty")
        need(
            0.0 <= self.anomaly_offset_noise <= 1.0,
            f"anomaly offset noise must lie in [0, 1] (0 = off), got {self.anomaly_offset_noise}",
        )
        need(
            0.0 <= self.anomaly_noise_share <= 1.0,
            f"anomaly noise share must lie in [0, 1] (0 = independent noise), got {self.anomaly_noise_share}",
        )
        need(
            1.0 <= self.mask_loss_weight <= 1000.0 and math.isfinite(self.mask_loss_weight),
            f"mask loss weight must lie in [1, 1000] (1 = uniform), got {self.mask_loss_weight}",
        )
        need(
            0.0 <= self.anomaly_contrast <= MAX_ANOMALY_CONTRAST and math.isfinite(self.anomaly_contrast),
            f"anomaly contrast must lie in [0, {MAX_ANOMALY_CONTRAST:g}] (0 = off; e.g. 0.3), "
            f"got {self.anomaly_contrast}",
        )
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    #: bookkeeping that does not change what is learnt: left out of the weights' ``training`` metadata
    BOOKKEEPING = ("checkpoint_every", "keep_checkpoints", "checkpoint_weights")

    def training_settings(self) -> dict:
        """The settings that decide what is learnt (:meth:`to_dict` without checkpoint bookkeeping): what the
        weights record as their ``training`` metadata, and what two runs must share for one's weights to stand for
        the other's."""
        return {k: v for k, v in self.to_dict().items() if k not in self.BOOKKEEPING}

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown training settings: {', '.join(unknown)}")
        return cls(**d)


# ---------------------------------------------------------------------------------------------------------------------
# the backbone protocol


@dataclasses.dataclass
class BackgroundPass:
    """BCM input of one UNet call: one noised background latent per pair.

    ``latents``: ``[B, C, h, w]``, the *unscaled* VAE sample of each background, already noised;
    ``timesteps``: ``[B]`` integer DDPM timesteps (the pair's); ``context``: ``[B, tokens, dim]``, the global prompt.
    """

    latents: torch.Tensor
    timesteps: torch.Tensor
    context: torch.Tensor


@runtime_checkable
class TrainingBackbone(Protocol):
    """What the loop needs from a model. Implemented for diffusers by
    :class:`dualanodiff_core.sd15.training.DiffusersTrainingBackbone`; a ComfyUI implementation wraps a
    ``ModelPatcher`` + CLIP + VAE the same way.

    Conventions: rows are interleaved pairs ``[g0, a0, g1, a1, ...]`` (even = global branch, odd = anomaly branch);
    timesteps are integer DDPM indices in ``[0, len(alphas_cumprod))``; ``x_t`` is in DDPM form
    ``sqrt(abar) x0 + sqrt(1 - abar) eps`` with ``x0`` the latent *times* the VAE scaling factor.

    Implementing it on ComfyUI (SD1.5, ``model_sampling`` EPS): ``alphas_cumprod = 1 / (sigmas**2 + 1)``; the
    simplest ``denoise`` calls the raw UNet, ``patcher.model.diffusion_model(x_t, timesteps.float(), context=ctx,
    transformer_options=...)``, which takes DDPM-form ``x_t`` and integer-valued timesteps and returns eps (going
    through ``apply_model`` instead needs ``x = x_t / sqrt(abar)``, ``sigma = sqrt((1 - abar) / abar)`` and
    ``eps = (x - denoised) / sigma``). Build the trainable layers and run the loop inside
    ``torch.inference_mode(False)`` with identity weight wrappers on the base layers (docs/comfyui.md);
    :meth:`Trainer.run` turns autograd on itself but cannot fix parameters created as inference tensors.

    Attributes:
        device: where the model computes; the loop puts its inputs there.
        alphas_cumprod: ``[T]`` float tensor of the training noise schedule (SD1.5: scaled-linear betas
            0.00085..0.012, T = 1000). ComfyUI: ``1 / (model_sampling.sigmas ** 2 + 1)``.
        prediction_type: ``"epsilon"`` (SD1.5) or ``"v_prediction"``: what :meth:`denoise` returns.
        base_model: a short description of the base model (recorded in the weights' metadata).
    """

    device: torch.device
    alphas_cumprod: torch.Tensor
    prediction_type: str
    base_model: str

    def trainable_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """Every trainable tensor, named by its canonical weights key (``unet.<layer>.to_q_lora.0.down.weight``,
        ``text_encoder.<clip attention>.to_q_lora.down.weight``, ...), in a fixed order, ``requires_grad=True``,
        kept in fp32. Both branch LoRAs, SAIM, (BCM MLP + alpha), and the text-encoder LoRA when it is trained.
        Called once; the order must be the same every time the backbone is built (optimizer state follows it)."""
        ...

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """``[len(prompts), tokens, dim]`` text embeddings, computed with autograd enabled so gradients reach the
        text-encoder LoRA (plain ``no_grad`` output when the text encoder is not trained)."""
        ...

    def encode_images(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Images ``[N, 3, H, W]`` in [-1, 1] -> latents ``[N, C, H/f, W/f]`` *multiplied* by the VAE scaling factor.
        The reference draws a sample of the latent distribution; use ``generator`` (a CPU generator) for it so the
        run is reproducible. Called under ``torch.no_grad()``."""
        ...

    def encode_backgrounds(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """BCM backgrounds ``[B, 3, H, W]`` in [-1, 1] -> a VAE sample **not** multiplied by the scaling factor
        (the reference's quirk, which trained weights depend on). Called under ``torch.no_grad()``."""
        ...

    def denoise(
        self,
        x_t: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        background: BackgroundPass | None = None,
    ) -> torch.Tensor:
        """The model prediction for interleaved rows ``x_t`` ``[2B, C, h, w]`` at integer ``timesteps`` ``[2B]``
        with per-row text ``context`` ``[2B, tokens, dim]``, with both branch LoRAs, SAIM and (given a
        ``background``) BCM active at full strength. With a background: first a record pass of the UNet over
        ``background.latents`` (global LoRA on every row, no SAIM, ``background.context``), then the main pass
        with the recorded features injected -- both with autograd. Returns the raw prediction (eps or v) in the
        DDPM parameterization, any float dtype."""
        ...

    def to_weights(self, metadata: dict) -> DualAnoDiffWeights:
        """The current trainable tensors as :class:`DualAnoDiffWeights` (copies, on any device) with ``metadata``
        merged into the file metadata."""
        ...


BACKBONE_MEMBERS = (
    "device",
    "alphas_cumprod",
    "prediction_type",
    "trainable_parameters",
    "encode_prompts",
    "encode_images",
    "encode_backgrounds",
    "denoise",
    "to_weights",
)


def check_backbone(backbone) -> None:
    """Raise ``TypeError`` naming what a backbone lacks (``base_model`` is optional)."""
    missing = [m for m in BACKBONE_MEMBERS if not hasattr(backbone, m)]
    if missing:
        raise TypeError(
            f"{type(backbone).__name__} is not a TrainingBackbone: it lacks {', '.join(missing)} "
            "(see dualanodiff_core.training.trainer.TrainingBackbone)"
        )


def add_noise(
    x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor
) -> torch.Tensor:
    """DDPM forward process ``sqrt(abar_t) x0 + sqrt(1 - abar_t) noise`` (diffusers ``DDPMScheduler.add_noise``)."""
    abar = alphas_cumprod.to(device=x0.device, dtype=torch.float32)[timesteps.to(x0.device)]
    shape = (-1,) + (1,) * (x0.ndim - 1)
    return abar.sqrt().view(shape) * x0 + (1 - abar).sqrt().view(shape) * noise


def velocity(
    x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor
) -> torch.Tensor:
    abar = alphas_cumprod.to(device=x0.device, dtype=torch.float32)[timesteps.to(x0.device)]
    shape = (-1,) + (1,) * (x0.ndim - 1)
    return abar.sqrt().view(shape) * noise - (1 - abar).sqrt().view(shape) * x0


def mask_loss_weights(masks: torch.Tensor, latent_size, weight: float) -> torch.Tensor:
    """Per-pixel loss weights ``[2B, 1, h, w]`` for interleaved rows: ``weight`` on the global rows where the defect
    mask (``[B, 1, H, W]`` in [0, 1], downsampled to the latent grid by max-pooling, so a thin defect still marks its
    latent pixels) is set, 1 elsewhere and on every anomaly row. The loss is normalised by the weights' sum, so its
    scale stays that of a plain MSE."""
    h, w = int(latent_size[0]), int(latent_size[1])
    m = F.adaptive_max_pool2d(masks.float(), (h, w)).clamp(0, 1)
    g = 1.0 + (float(weight) - 1.0) * m
    return layout.interleave(g, torch.ones_like(g))


# ---------------------------------------------------------------------------------------------------------------------
# progress and results


@dataclasses.dataclass
class TrainProgress:
    """Sent to the progress callback after every step."""

    step: int
    total_steps: int
    loss: float
    lr: float
    rate: float  # steps per second (recent average)
    eta_seconds: float
    elapsed_seconds: float  # training time of the whole run, across resumes
    checkpoint: Path | None = None  # set when this step wrote a checkpoint


@dataclasses.dataclass
class TrainResult:
    step: int
    total_steps: int
    completed: bool  # all steps done
    stopped: bool  # ended early by a stop request
    checkpoint: Path | None  # the newest checkpoint written
    weights: DualAnoDiffWeights | None  # final weights (completed runs)
    output: Path | None  # where the final weights were written
    history: list[dict]
    work_dir: Path


# ---------------------------------------------------------------------------------------------------------------------
# the loop


MAX_ANOMALY_GAIN = 4.0


def anomaly_gain(defect_contrast: float, target: float) -> float:
    """How much the anomaly branch's target is amplified about mid-gray (``TrainConfig.anomaly_contrast``).

    Why: the anomaly branch draws the defect on mid-gray, and the mask is where its image differs from mid-gray. A
    defect whose own colours lie near mid-gray (a gray stain or scratch on gray metal) is learnt as a faint drawing;
    after sampling, much of it falls under the mask's contrast floor, so its mask is empty or too small. Amplifying
    the target until its median defect pixel (``defect_contrast``, :func:`~.data.defect_contrast`) differs from
    mid-gray by ``target`` makes such defects as visible to the mask as the rest; defects that already reach
    ``target`` are left as they are (gain 1). The global branch is not changed. ``target`` 0 turns it off (the
    reference). The gain is at most ``MAX_ANOMALY_GAIN``, so a training set with hardly any visible defect is not
    turned into noise."""
    if target <= 0.0 or defect_contrast >= target:
        return 1.0
    if defect_contrast <= 0.0:
        return MAX_ANOMALY_GAIN
    return float(min(MAX_ANOMALY_GAIN, target / defect_contrast))


def describe_anomaly_contrast(defect_contrast: float, target: float, option: str = "--anomaly-contrast") -> str:
    """One line for the user: how far the training defects lie from mid-gray and what ``target`` (the anomaly
    contrast, set through ``option``) does with them. ``dualanodiff train`` prints it and the ComfyUI Trainer logs it,
    so that a user sees whether a defect type is amplified before the training runs."""
    head = f"anomaly branch: defects differ from mid-gray by {defect_contrast:.3f} (median);"
    if target <= 0:
        return f"{head} not amplified ({option} 0)"
    g = anomaly_gain(defect_contrast, target)
    what = "not amplified" if g == 1.0 else f"amplified {g:.2f}x on the anomaly branch's target"
    return f"{head} {what} ({option} {target:g})"


def list_checkpoints(work_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, path)`` of the resumable checkpoints in ``<work_dir>/checkpoints``, oldest first."""
    folder = Path(work_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    out = []
    for p in folder.iterdir():
        m = CHECKPOINT_RE.match(p.name)
        if m:
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(work_dir: str | os.PathLike) -> Path | None:
    cps = list_checkpoints(work_dir)
    return cps[-1][1] if cps else None


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a training checkpoint safely (``weights_only=True``)."""
    path = Path(path)
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise CheckpointError(f"{path}: no checkpoint-<step>.pt in {path / 'checkpoints'}; nothing to resume.")
        path = found
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling problem means "not our checkpoint"
        raise CheckpointError(f"{path}: not a readable training checkpoint ({e}).") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path}: not a DualAnoDiff training checkpoint (a weights .safetensors cannot be "
            "resumed; give the checkpoint-<step>.pt beside it)."
        )
    if int(state.get("version", 0)) > CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: written by a newer DualAnoDiff (checkpoint version {state['version']}).")
    state["path"] = str(path)
    return state


class Trainer:
    """Runs the DualAnoDiff training loop on any :class:`TrainingBackbone`.

    ``work_dir`` receives ``checkpoints/``, ``loss.csv``, ``loss.png`` and ``train_config.json``; ``output`` (if
    given) the final weights. ``progress(TrainProgress)`` is called after every step; ``should_stop()`` is polled
    between steps, and when it returns True the loop writes a checkpoint and returns (resume it later).
    ``data_fingerprint`` (see :meth:`DefectSet.fingerprint`) is stored in checkpoints and compared on resume.
    """

    def __init__(
        self,
        backbone: TrainingBackbone,
        dataset: DefectDataset,
        config: TrainConfig,
        work_dir: str | os.PathLike,
        *,
        output: str | os.PathLike | None = None,
        progress: Callable[[TrainProgress], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        metadata: dict | None = None,
        data_fingerprint: list | None = None,
        data_parallel: bool | None = None,
    ):
        check_backbone(backbone)
        #: data parallel over the processes of a torchrun / accelerate launch run (None: when the process group is
        #: up); each process takes its ``batch_size`` share of one global batch, gradients are averaged
        if data_parallel is None:
            data_parallel = dist.is_distributed()
        self.data_parallel = bool(data_parallel) and dist.init()
        self.world = dist.world_size() if self.data_parallel else 1
        self.rank = dist.rank() if self.data_parallel else 0
        self.is_main = self.rank == 0
        self.backbone = backbone
        self.dataset = dataset
        self.config = config.validate()
        self.work_dir = Path(work_dir)
        self.output = Path(output) if output is not None else None
        if self.output is not None and self.output.suffix != ".safetensors":
            raise ValueError(f"{self.output}: the weights are written as .safetensors; change the file name.")
        self.progress = progress
        self.should_stop = should_stop or (lambda: False)
        self.metadata = dict(metadata or {})
        self.data_fingerprint = data_fingerprint if data_fingerprint is not None else dataset.defect_set.fingerprint()
        if config.bcm and not dataset.backgrounds:
            raise ValueError("BCM training needs a dataset built with backgrounds=True (object masks).")
        if dataset.resolution != config.resolution:
            raise ValueError(
                f"the dataset was built at {dataset.resolution} px but the config says {config.resolution}"
            )
        #: the anomaly target's gain (:func:`anomaly_gain`; 1.0 = the reference), applied in :meth:`_loss`
        self.anomaly_gain = (
            anomaly_gain(dataset.defect_contrast(), config.anomaly_contrast) if config.anomaly_contrast > 0 else 1.0
        )
        pt = getattr(backbone, "prediction_type", "epsilon")
        if pt not in ("epsilon", "v_prediction"):
            raise ValueError(f"unsupported prediction type {pt!r} (epsilon or v_prediction)")

        named = list(backbone.trainable_parameters())
        if not named:
            raise ValueError("the backbone has no trainable parameters")
        self.param_names = [n for n, _ in named]
        if len(set(self.param_names)) != len(self.param_names):
            raise ValueError("the backbone's trainable parameter names are not unique")
        self.params = [p for _, p in named]
        for n, p in named:
            if not p.requires_grad:
                raise ValueError(f"trainable parameter {n} has requires_grad=False")
        c = self.config
        self.optimizer = torch.optim.AdamW(
            self.params,
            lr=c.learning_rate,
            betas=(c.adam_beta1, c.adam_beta2),
            eps=c.adam_epsilon,
            weight_decay=c.weight_decay,
        )
        warm = c.warmup_steps
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warm) if warm > 0 else 1.0
        )
        dev_type = torch.device(backbone.device).type
        self.scaler = torch.amp.GradScaler(dev_type, enabled=(c.precision == "fp16"))
        self.sampler = PairSampler(len(dataset), self.global_batch, c.seed)
        self.noise_generator = torch.Generator(device="cpu")
        self.noise_generator.manual_seed(c.seed + 1_000_003)
        self.step = 0
        self.history: list[dict] = []
        self.elapsed = 0.0
        self.last_checkpoint: Path | None = None
        self._last_checkpoint_step = -1

    @property
    def global_batch(self) -> int:
        """Pairs per optimisation step over all processes: ``batch_size`` x processes."""
        return self.config.batch_size * self.world

    # ---- one step -------------------------------------------------------------------------------------------------
    def pair_generators(self, step: int, positions: Sequence[int]) -> list[torch.Generator]:
        """The random source of each pair of a step: seeded by (seed, step, position in the global batch), so the
        noise of a pair does not depend on how the global batch is split over processes, nor on a resume."""
        gens = []
        for pos in positions:
            h = hashlib.sha256(f"dualanodiff-train:{self.config.seed}:{step}:{pos}".encode()).digest()
            gens.append(torch.Generator(device="cpu").manual_seed(int.from_bytes(h[:8], "little") & ((1 << 63) - 1)))
        return gens

    def compute_loss(self) -> torch.Tensor:
        """Draw the next batch (this process's share of the global batch) and return its loss (with a graph to the
        trainable tensors)."""
        draws = self.sampler.next_batch()  # the global batch, the same on every process
        b = self.config.batch_size
        mine = range(self.rank * b, (self.rank + 1) * b)
        batch = self.dataset.batch([draws[i] for i in mine])
        return self._loss(batch, self.pair_generators(self.step, mine))

    def _loss(
        self, batch, gen: torch.Generator | list[torch.Generator], t_pair: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``gen``: one generator for everything, or one per pair (each pair's latents, timestep and noise)."""
        c, bb = self.config, self.backbone
        n_pairs = batch.images.shape[0]
        dev = torch.device(bb.device)
        rows = layout.interleave(batch.images, anomaly_target(batch.images, batch.masks, self.anomaly_gain)).to(dev)
        ac = bb.alphas_cumprod
        per_pair = isinstance(gen, list)
        if per_pair and len(gen) != n_pairs:
            raise ValueError(f"{len(gen)} generators for {n_pairs} pairs")
        with torch.no_grad():
            if per_pair:
                br = layout.BRANCHES
                x0 = torch.cat([bb.encode_images(rows[br * j : br * (j + 1)], g) for j, g in enumerate(gen)]).float()
                bgs = batch.backgrounds.to(dev) if c.bcm else None
                bg0 = (
                    torch.cat([bb.encode_backgrounds(bgs[j : j + 1], g) for j, g in enumerate(gen)]).float()
                    if c.bcm
                    else None
                )
            else:
                x0 = bb.encode_images(rows, gen).float()
                bg0 = bb.encode_backgrounds(batch.backgrounds.to(dev), gen).float() if c.bcm else None
        if per_pair:
            if t_pair is None:
                t_pair = torch.cat([torch.randint(0, len(ac), (1,), generator=g) for g in gen])
            noise = torch.cat([torch.randn((br, *x0.shape[1:]), generator=g, dtype=torch.float32) for g in gen]).to(dev)
            bg_noise = (
                torch.cat([torch.randn((1, *bg0.shape[1:]), generator=g, dtype=torch.float32) for g in gen]).to(dev)
                if c.bcm
                else None
            )
        else:
            if t_pair is None:
                t_pair = torch.randint(0, len(ac), (n_pairs,), generator=gen)
            noise = torch.randn(x0.shape, generator=gen, dtype=torch.float32).to(dev)
            bg_noise = torch.randn(bg0.shape, generator=gen, dtype=torch.float32).to(dev) if c.bcm else None
        t = t_pair.repeat_interleave(layout.BRANCHES)  # the same timestep for both rows of a pair
        if c.anomaly_offset_noise > 0:  # drawn only when on
            if per_pair:
                offset = torch.cat(
                    [torch.randn((1, x0.shape[1], 1, 1), generator=g, dtype=torch.float32) for g in gen]
                ).to(dev)
            else:
                offset = torch.randn((n_pairs, x0.shape[1], 1, 1), generator=gen, dtype=torch.float32).to(dev)
            noise = noise.clone()
            noise[1 :: layout.BRANCHES] += c.anomaly_offset_noise * offset
        if c.anomaly_noise_share > 0:  # the anomaly rows' noise correlated with their global rows' (no new draws)
            s_ = float(c.anomaly_noise_share)
            noise = noise.clone()
            noise[1 :: layout.BRANCHES] = (
                s_ * noise[0 :: layout.BRANCHES] + math.sqrt(max(0.0, 1.0 - s_ * s_)) * noise[1 :: layout.BRANCHES]
            )
        t, t_pair = t.to(dev), t_pair.to(dev)
        x_t = add_noise(x0, noise, t, ac)
        emb = bb.encode_prompts([c.prompt_global, c.prompt_anomaly])  # [2, tokens, dim]
        context = emb.repeat(n_pairs, 1, 1)  # [g, a, g, a, ...]
        background = None
        if c.bcm:
            background = BackgroundPass(add_noise(bg0, bg_noise, t_pair, ac), t_pair, emb[0:1].expand(n_pairs, -1, -1))
        pred = bb.denoise(x_t, t, context, background)
        if pred.shape != x0.shape:
            raise TrainingError(
                f"the backbone returned a prediction of shape {tuple(pred.shape)} for input {tuple(x0.shape)}"
            )
        target = noise if getattr(bb, "prediction_type", "epsilon") == "epsilon" else velocity(x0, noise, t, ac)
        if c.mask_loss_weight == 1.0:
            return F.mse_loss(pred.float(), target.float(), reduction="mean")
        weight = mask_loss_weights(batch.masks, x0.shape[-2:], c.mask_loss_weight).to(dev)
        err = (pred.float() - target.float()) ** 2
        return (err * weight).sum() / (weight.sum() * x0.shape[1])

    @torch.no_grad()
    def evaluation_loss(self, n_timesteps: int = 8, seed: int = 0) -> float:
        """The loss on fixed inputs: every training image (no flip; the middle crop window), at ``n_timesteps``
        evenly spaced timesteps, with fixed noise. Unlike the training loss, which jumps with the random timesteps,
        it changes only when the weights do. Uses its own generator: the training run is not disturbed."""
        gen = torch.Generator(device="cpu")
        gen.manual_seed(seed)
        T = len(self.backbone.alphas_cumprod)
        n, bs = len(self.dataset), self.config.batch_size
        total, count = 0.0, 0
        for k in range(n_timesteps):
            tk = min(T - 1, int((k + 0.5) * T / n_timesteps))
            for start in range(0, n, bs):
                idx = list(range(start, min(n, start + bs)))
                batch = self.dataset.batch([Draw(i, False, False, 0.5) for i in idx])
                loss = self._loss(batch, gen, torch.full((len(idx),), tk, dtype=torch.long))
                total += float(loss) * len(idx)
                count += len(idx)
        return total / count

    def train_step(self) -> tuple[float, float]:
        """One optimisation step; returns (loss, gradient norm before clipping)."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.compute_loss()
        value = float(loss.detach())
        if self.data_parallel:  # the loss of the global batch: equal shares, so the mean of the processes' losses
            value = dist.mean(value)
        if not math.isfinite(value) and not self.scaler.is_enabled():
            last = self.last_checkpoint or "none yet"
            raise TrainingError(
                f"the loss became {value} at step {self.step + 1}; the weights were not updated. Last checkpoint: "
                f"{last}. Lower the learning rate, or train in fp32/bf16 instead of fp16."
            )
        self.scaler.scale(loss).backward()
        if self.data_parallel:  # gradient of the global batch's mean loss
            dist.average_gradients(self.params)
        self.scaler.unscale_(self.optimizer)
        if self.config.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.config.grad_clip)
        else:
            norm = torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(p.grad.float()) for p in self.params if p.grad is not None])
            )
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.lr_scheduler.step()
        return value, float(norm)

    # ---- checkpoints ----------------------------------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path:
        return self.work_dir / "checkpoints"

    def weights_metadata(self) -> dict:

        c = self.config
        ds = self.dataset.defect_set
        meta = {
            "prompt_global": c.prompt_global,
            "prompt_anomaly": c.prompt_anomaly,
            "rank": c.rank,
            "alpha": c.rank,
            "base_model": getattr(self.backbone, "base_model", "") or "",
            "training": c.training_settings(),
            "trained_steps": self.step,
            "train_images": len(self.dataset),
            "train_image_names": self.dataset.names,
            "data_layout": ds.layout,
            "created_by": f"dualanodiff {__version__}",
            "created": datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat(),
        }
        if ds.defect:
            meta["defect"] = ds.defect
        if c.anomaly_contrast > 0:
            meta["anomaly_gain"] = round(self.anomaly_gain, 6)
        meta.update(self.metadata)
        return meta

    def state_dict(self) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "step": self.step,
            "config": json.dumps(self.config.to_dict(), sort_keys=True),
            "data": json.dumps(self.data_fingerprint),
            "param_names": list(self.param_names),
            "params": {n: p.detach().to("cpu").clone() for n, p in zip(self.param_names, self.params)},
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "grad_scaler": self.scaler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "noise_generator": self.noise_generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "processes": self.world,
            "history": json.dumps(self.history),
            "elapsed": float(self.elapsed),
        }

    def save_checkpoint(self) -> Path:
        """Write ``checkpoint-<step>.pt`` (and ``.safetensors`` weights) atomically; prune old ones. With several
        processes only process 0 writes (the others note where it goes)."""
        if not self.is_main:
            self.last_checkpoint = self.checkpoint_dir / f"checkpoint-{self.step:06d}.pt"
            self._last_checkpoint_step = self.step
            return self.last_checkpoint
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        stem = f"checkpoint-{self.step:06d}"
        if self.config.checkpoint_weights:
            self.backbone.to_weights(self.weights_metadata()).save(self.checkpoint_dir / f"{stem}.safetensors")
        path = self.checkpoint_dir / f"{stem}.pt"
        with atomic_path(path) as tmp:
            torch.save(self.state_dict(), tmp)
            _testhook.pause("checkpoint_write")
        self.last_checkpoint = path
        self._last_checkpoint_step = self.step
        self._prune()
        self.write_history()
        return path

    def _prune(self) -> None:
        k = self.config.keep_checkpoints
        if k <= 0:
            return
        cps = list_checkpoints(self.work_dir)
        for _step, p in cps[:-k]:
            for q in (p, p.with_suffix(".safetensors")):
                with contextlib.suppress(FileNotFoundError):
                    q.unlink()
        # weights files whose .pt is gone (e.g. a crash between the two writes)
        keep = {s for s, _ in cps[-k:]}
        for q in self.checkpoint_dir.glob("checkpoint-*.safetensors"):
            m = re.match(r"^checkpoint-(\d+)\.safetensors$", q.name)
            if m and int(m.group(1)) not in keep and int(m.group(1)) < (cps[-1][0] if cps else 0):
                with contextlib.suppress(FileNotFoundError):
                    q.unlink()

    def load_state_dict(self, state: dict) -> None:
        """Restore a checkpoint; refuses one made with other settings, data or parameters."""
        where = state.get("path", "checkpoint")
        saved = json.loads(state["config"])
        mine = self.config.to_dict()
        for f in dataclasses.fields(TrainConfig):  # settings added after the checkpoint was written: their default
            saved.setdefault(f.name, f.default)
        # the process count may change when the global batch (per-process batch x processes) stays the same
        saved_procs = int(state.get("processes", 1))
        saved_global = int(saved.get("batch_size", 0)) * saved_procs
        if saved_global != self.global_batch:
            raise CheckpointError(
                f"{where}: the run used a global batch of {saved_global} pairs ({saved.get('batch_size')} per process "
                f"x {saved_procs} process(es)); now it would be {self.global_batch} ({self.config.batch_size} x "
                f"{self.world}). Keep the global batch: with {self.world} process(es) use --batch-size "
                f"{saved_global // self.world if saved_global % self.world == 0 else '(impossible: not divisible)'}."
            )
        diff = [
            k
            for k in sorted(set(saved) | set(mine))
            if k not in RESUMABLE_CHANGES + ("batch_size",) and saved.get(k) != mine.get(k)
        ]
        if diff:
            details = "; ".join(f"{k}: checkpoint {saved.get(k)!r}, now {mine.get(k)!r}" for k in diff[:6])
            raise CheckpointError(
                f"{where}: the run was made with other settings ({details}). Resume with the same "
                "settings (only steps and checkpoint options may change), or start a new run."
            )
        data = json.loads(state["data"])
        if data != self.data_fingerprint:
            old = {tuple(x[:2]): x[2] for x in data}
            new = {tuple(x[:2]): x[2] for x in self.data_fingerprint}
            changed = sorted(set(old) ^ set(new)) + sorted(k for k in set(old) & set(new) if old[k] != new[k])
            shown = ", ".join(f"{r} {p}" for r, p in changed[:4]) or "the order of the files"
            raise CheckpointError(
                f"{where}: the training data changed since this checkpoint ({shown}). Resume with "
                "the same files, or start a new run."
            )
        if list(state["param_names"]) != self.param_names:
            raise CheckpointError(
                f"{where}: the model's trainable tensors differ from the checkpoint's (another base "
                "model or model settings); start a new run."
            )
        if int(state["step"]) > self.config.steps:
            raise CheckpointError(
                f"{where}: the checkpoint is at step {state['step']}, but only {self.config.steps} "
                "step(s) were asked for; ask for more steps to train further."
            )
        with torch.no_grad():
            for n, p in zip(self.param_names, self.params):
                v = state["params"][n]
                if v.shape != p.shape:
                    raise CheckpointError(f"{where}: {n} has shape {tuple(v.shape)} there, {tuple(p.shape)} here.")
                p.copy_(v.to(device=p.device, dtype=p.dtype))
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        if state["grad_scaler"]:
            self.scaler.load_state_dict(state["grad_scaler"])
        self.sampler.load_state_dict(state["sampler"])
        self.sampler.batch_size = self.global_batch
        self.noise_generator.set_state(state["noise_generator"])
        torch.set_rng_state(state["torch_rng"])
        self.history = json.loads(state["history"])
        self.elapsed = float(state["elapsed"])
        self.step = int(state["step"])
        self.last_checkpoint = Path(where) if where != "checkpoint" else None
        self._last_checkpoint_step = self.step

    # ---- history --------------------------------------------------------------------------------------------------
    def write_history(self) -> None:

        lines = ["step,loss,lr,grad_norm,seconds"]
        for h in self.history:
            lines.append(f"{h['step']},{h['loss']:.8g},{h['lr']:.8g},{h['grad_norm']:.6g},{h['seconds']:.3f}")
        write_text_atomic(self.work_dir / "loss.csv", "\n".join(lines) + "\n")
        title = f"DualAnoDiff training loss ({self.step}/{self.config.steps} steps)"
        img = draw_loss_curve([h["step"] for h in self.history], [h["loss"] for h in self.history], title)
        save_image_atomic(img, self.work_dir / "loss.png")

    # ---- the run --------------------------------------------------------------------------------------------------
    def run(self, resume: str | os.PathLike | dict | None = None) -> TrainResult:
        """Train until ``config.steps`` (or a stop request). ``resume``: a checkpoint file, a work dir (its newest
        checkpoint) or a loaded checkpoint dict. Runs with autograd on even when called under ``torch.no_grad()``
        or ``torch.inference_mode()`` (as ComfyUI runs its nodes)."""
        with torch.inference_mode(False), torch.enable_grad():
            return self._run(resume)

    def _run(self, resume) -> TrainResult:
        if resume is not None:
            self.load_state_dict(resume if isinstance(resume, dict) else load_checkpoint(resume))
        if self.is_main:
            self.work_dir.mkdir(parents=True, exist_ok=True)
            # temp files left by a run that was killed (kill -9, power cut) in these folders
            for d in (self.work_dir, self.checkpoint_dir) + ((Path(self.output).parent,) if self.output else ()):
                sweep_temp_files(d)
            write_json_atomic(
                self.work_dir / "train_config.json",
                {
                    "config": self.config.to_dict(),
                    "processes": self.world,
                    "global_batch": self.global_batch,
                    "data": self.data_fingerprint,
                    "base_model": getattr(self.backbone, "base_model", ""),
                    "output": str(self.output or ""),
                },
            )
        c = self.config
        stopped = False
        recent: list[float] = []
        while self.step < c.steps:
            stop = self.should_stop()
            if self.data_parallel:  # a stop request on any process stops all of them at the same step
                stop = dist.any_true(stop)
            if stop:
                stopped = True
                break
            t0 = time.perf_counter()
            loss, norm = self.train_step()
            self.step += 1
            dt = time.perf_counter() - t0
            self.elapsed += dt
            lr = float(self.optimizer.param_groups[0]["lr"])
            self.history.append(
                {"step": self.step, "loss": loss, "lr": lr, "grad_norm": norm, "seconds": round(self.elapsed, 3)}
            )
            if not math.isfinite(loss):  # fp16: the scaler skipped the step; give up if it keeps happening
                bad = sum(1 for h in self.history[-20:] if not math.isfinite(h["loss"]))
                if bad >= 20:
                    raise TrainingError(
                        f"the loss has been non-finite for 20 steps (step {self.step}); train in "
                        f"fp32/bf16 or lower the learning rate. Last checkpoint: {self.last_checkpoint}"
                    )
            ckpt = None
            if (c.checkpoint_every and self.step % c.checkpoint_every == 0) or self.step == c.steps:
                ckpt = self.save_checkpoint()
            recent = (recent + [dt])[-20:]
            rate = len(recent) / max(sum(recent), 1e-9)
            if self.progress is not None and self.is_main:
                self.progress(
                    TrainProgress(self.step, c.steps, loss, lr, rate, (c.steps - self.step) / rate, self.elapsed, ckpt)
                )
        if self._last_checkpoint_step != self.step:
            self.save_checkpoint()
        elif self.is_main:
            self.write_history()
        completed = self.step >= c.steps
        weights = None
        if completed:
            weights = self.backbone.to_weights(self.weights_metadata())
            if self.output is not None and self.is_main:
                weights.save(self.output)
        if self.data_parallel:  # process 0 has written everything before any process returns
            dist.barrier()
        return TrainResult(
            self.step,
            c.steps,
            completed,
            stopped,
            self.last_checkpoint,
            weights,
            self.output if completed else None,
            list(self.history),
            self.work_dir,
        )
