"""DualAnoDiff Trainer: train DualAnoDiff weights for one defect type inside ComfyUI (the core's training loop on
the :class:`~.comfy_train.ComfyTrainingBackbone`)."""

from __future__ import annotations

import logging
import os
import time
import warnings
from pathlib import Path

import comfy.model_management as mm
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import io, ui

from ..dualanodiff_core.errors import DualAnoDiffError
from ..dualanodiff_core.fileio import SAFE_NAME_RE
from ..dualanodiff_core.method.recipes import SHARED_NOISE_ANOMALY_CONTRAST
from ..dualanodiff_core.training.data import SPLITS, DefectDataset, find_defect_set
from ..dualanodiff_core.training.lossplot import draw_loss_curve
from ..dualanodiff_core.training.trainer import (
    MAX_ANOMALY_CONTRAST,
    TrainConfig,
    Trainer,
    TrainProgress,
    describe_anomaly_contrast,
    latest_checkpoint,
)
from . import comfy_backend as backend
from .comfy_train import ComfyTrainingBackbone, plan_precision
from .images import from_pil
from .loaders import FOLDER, register_model_folder, source_of  # noqa: F401 - source_of: kept importable here

log = logging.getLogger("DualAnoDiff")

PREVIEW_EVERY_S = 2.0

#: the ``anomaly_contrast`` widget's default on a new node: the default recipe's (``dualanodiff train`` trains with it)
DEFAULT_ANOMALY_CONTRAST = SHARED_NOISE_ANOMALY_CONTRAST
#: ``anomaly_contrast`` when a prompt does not give it: prompts saved before the input existed trained with the
#: reference's targets, so they keep doing so (the widget's default is only for new nodes)
ANOMALY_CONTRAST_WHEN_MISSING = 0.0


class TrainInputError(DualAnoDiffError, ValueError):
    """A trainer input that cannot be used (the message says what to do)."""


def check_anomaly_contrast(value) -> float:
    """``anomaly_contrast`` as a float in [0, MAX_ANOMALY_CONTRAST], or one clear error naming the input."""
    contrast = backend.float_in_range(value, 0.0, MAX_ANOMALY_CONTRAST)
    if contrast is None:
        raise TrainInputError(
            f"anomaly_contrast {value!r}: must lie in [0, {MAX_ANOMALY_CONTRAST:g}] (0 = the reference's training; "
            f"{DEFAULT_ANOMALY_CONTRAST:g} = the default recipe's, as dualanodiff train)."
        )
    return contrast


def output_stem(name: str) -> str:
    """The weights file stem for ``output_name`` (a trailing ``.safetensors`` is dropped)."""
    stem = str(name).strip()
    if stem.lower().endswith(".safetensors"):
        stem = stem[: -len(".safetensors")]
    if not SAFE_NAME_RE.match(stem) or stem in (".", ".."):
        raise TrainInputError(
            f"output_name {name!r}: use letters, digits and . _ + - only (e.g. 'bottle_broken'); "
            "it becomes the file name of the weights."
        )
    return stem


def defect_folder(folder: str) -> Path:
    """``folder`` (a sub-folder of ComfyUI's input directory) as a path inside it."""
    root = Path(folder_paths.get_input_directory()).resolve()
    text = str(folder or "").strip().replace("\\", "/")
    path = (root / text).resolve() if text else root
    if not text or os.path.commonpath([root, path]) != str(root) or path == root:
        raise TrainInputError(
            f"folder {folder!r}: choose a sub-folder of ComfyUI's input folder ({root}) that holds "
            "the defect images and masks."
        )
    if not path.is_dir():
        raise TrainInputError(
            f"folder {folder!r}: {path} does not exist. Put the defect images and masks in "
            f"{root}/<name>/ and refresh the page (R) to list it."
        )
    return path


def model_dir() -> Path:
    register_model_folder()
    return Path(folder_paths.get_folder_paths(FOLDER)[0])


def run_paths(stem: str) -> tuple[Path, Path]:
    """(weights file, work folder) of a run: ``models/dualanodiff/<stem>.safetensors`` and ``<stem>_train/``."""
    root = model_dir()
    return root / f"{stem}.safetensors", root / f"{stem}_train"


def input_subfolders() -> list[str]:
    try:
        return folder_paths.get_input_subfolders()
    except Exception:  # noqa: BLE001 - never break /object_info over a listing problem
        return []


class DualAnoDiffTrainer(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DualAnoDiffTrainer",
            display_name="DualAnoDiff Trainer",
            category="DualAnoDiff/training",
            description=(
                "Trains DualAnoDiff weights for ONE defect type from a few photos with masks in a sub-folder of "
                "ComfyUI's input folder (an MVTec category folder plus a defect name, or a flat folder of x.png + "
                "x_mask.png). Trains both branch LoRAs, the cross-branch attention (SAIM), the text-encoder LoRA "
                "and optionally background compensation (BCM), with the same loop as `dualanodiff train`. Writes "
                "models/dualanodiff/<output_name>.safetensors (loadable in the DualAnoDiff LoRA Loader) and, in "
                "<output_name>_train/ beside it, checkpoints (every checkpoint_every steps; the .safetensors "
                "there are usable weights), loss.csv and loss.png. Progress and a live loss curve show on the node. "
                "Cancel stops after the current step and writes a checkpoint; queue again with resume on to "
                "continue. Trains on the MODEL's device (a GPU; the CPU only for tiny test models)."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The SD1.5 model to train on (from Load Checkpoint)."),
                io.Clip.Input("clip", tooltip="Its CLIP; receives the trained text-encoder LoRA."),
                io.Vae.Input(
                    "vae", tooltip="Its VAE; encodes the training images (ComfyUI's VAE gives the posterior mean)."
                ),
                io.Combo.Input(
                    "folder",
                    options=input_subfolders(),
                    tooltip="Sub-folder of ComfyUI's input folder with the training data: an MVTec "
                    "category folder (test/<defect>/ + ground_truth/<defect>/), or a flat folder "
                    "(images/ + masks/, or x.png beside x_mask.png). Masks: white = defect.",
                ),
                io.String.Input(
                    "defect",
                    default="",
                    tooltip="MVTec layout: the defect name (a folder under test/). Leave empty for a flat folder.",
                ),
                io.String.Input(
                    "output_name",
                    default="my_defect",
                    tooltip="Name of the weights file: models/dualanodiff/<output_name>.safetensors "
                    "(letters, digits, . _ + -).",
                ),
                io.Int.Input(
                    "steps",
                    default=5000,
                    min=1,
                    max=1_000_000,
                    tooltip="Training steps (the reference trains 5000 at batch 4). With resume on, raise "
                    "it to train a finished run further.",
                ),
                io.Float.Input(
                    "learning_rate",
                    default=2e-5,
                    min=1e-7,
                    max=1e-2,
                    step=1e-6,  # the frontend shows as many decimals as the step has: 0.000020, not 0.0000200
                    tooltip="AdamW learning rate (the reference: 2e-5 = 0.000020).",
                ),
                io.Int.Input("rank", default=32, min=1, max=256, tooltip="LoRA rank (the reference: 32)."),
                io.Int.Input(
                    "batch_size",
                    default=4,
                    min=1,
                    max=64,
                    tooltip="Training images per step; the UNet sees twice as many rows (both branches). "
                    "Lower it if the GPU runs out of memory.",
                ),
                io.Int.Input(
                    "resolution",
                    default=512,
                    min=64,
                    max=2048,
                    step=8,
                    tooltip="Training resolution (images are resized and center-cropped to a square).",
                ),
                io.Int.Input(
                    "seed",
                    default=32,
                    min=0,
                    max=0xFFFFFFFFFFFF,
                    control_after_generate=False,
                    tooltip="Seed of the layer initialisation, data order and noise (the reference: 32). "
                    "Keep it fixed to resume a run.",
                ),
                io.Boolean.Input(
                    "resume",
                    default=True,
                    tooltip="On: continue from the newest checkpoint in <output_name>_train/ (starts "
                    "fresh if there is none). Off: start a new run; refused if the name is "
                    "taken.",
                ),
                io.Boolean.Input(
                    "train_text_encoder",
                    default=True,
                    tooltip="Train the shared text-encoder LoRA (the reference does). Off: UNet layers only, faster.",
                ),
                io.Boolean.Input(
                    "bcm",
                    default=False,
                    tooltip="Also train background compensation (needs an object mask per image: "
                    "object_masks/ in a flat folder).",
                ),
                io.Combo.Input(
                    "split",
                    options=list(SPLITS),
                    default="all",
                    tooltip="Which of the sorted images to train on: 'all', or the first third ('strict' "
                    "= the AnomalyDiffusion protocol; 'ceil' / 'reference' as the reference "
                    "scripts count).",
                ),
                io.Int.Input(
                    "checkpoint_every",
                    default=500,
                    min=0,
                    max=1_000_000,
                    tooltip="Write a resumable checkpoint every N steps (0 = only at the end or when "
                    "cancelled). The newest 3 are kept.",
                ),
                # added after the others (widget order is an API); optional so that prompts saved before it
                # existed still validate, and they train as they did (ANOMALY_CONTRAST_WHEN_MISSING)
                io.Float.Input(
                    "anomaly_contrast",
                    default=DEFAULT_ANOMALY_CONTRAST,
                    min=0.0,
                    max=MAX_ANOMALY_CONTRAST,
                    step=0.05,
                    optional=True,
                    tooltip="Amplify faint defects on the anomaly branch while training: its target (the defect "
                    "on mid-gray) is scaled about mid-gray until its median defect pixel differs from gray by "
                    "this much (at most 4x). The whole-image branch, sampling and masks are unchanged. 0 = the "
                    "reference's training; a defect type that already reaches the contrast trains as with 0. "
                    "As dualanodiff train --anomaly-contrast (its default recipe uses 0.4). Workflows saved "
                    "without this input train with 0. A run resumes only with the value it started with.",
                ),
            ],
            outputs=[
                io.Model.Output(
                    display_name="MODEL",
                    tooltip="The model with the trained DualAnoDiff layers (as the LoRA Loader at strength 1).",
                ),
                io.Clip.Output(display_name="CLIP", tooltip="The CLIP with the trained text-encoder LoRA."),
                io.String.Output(
                    display_name="weights", tooltip="The weights file name, as the DualAnoDiff LoRA Loader lists it."
                ),
                io.Image.Output(display_name="loss", tooltip="The training loss curve."),
            ],
            hidden=[io.Hidden.unique_id, io.Hidden.prompt],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, folder=None):
        # ComfyUI reports a validation error on every input this method takes: it takes only `folder` (the list
        # goes stale when folders are moved), so one problem turns one widget red; output_name and split are
        # checked first thing in execute, before anything is read
        try:
            if isinstance(folder, str):
                defect_folder(folder)
        except DualAnoDiffError as e:
            return str(e)
        return True

    @classmethod
    def execute(
        cls,
        model,
        clip,
        vae,
        folder,
        defect,
        output_name,
        steps,
        learning_rate,
        rank,
        batch_size,
        resolution,
        seed,
        resume,
        train_text_encoder,
        bcm,
        split,
        checkpoint_every,
        anomaly_contrast=ANOMALY_CONTRAST_WHEN_MISSING,
    ) -> io.NodeOutput:
        stem = output_stem(output_name)
        if split not in SPLITS:
            raise TrainInputError(f"split must be one of {', '.join(SPLITS)}, got {split!r}.")
        contrast = check_anomaly_contrast(anomaly_contrast)
        data_dir = defect_folder(folder)
        weights_path, work_dir = run_paths(stem)
        backend.attention_sites(model)  # a clear error for a non-SD MODEL before any data is read
        config = make_config(
            model,
            steps=steps,
            batch_size=batch_size,
            learning_rate=learning_rate,
            seed=seed,
            rank=rank,
            bcm=bcm,
            train_text_encoder=train_text_encoder,
            resolution=resolution,
            split=split,
            checkpoint_every=checkpoint_every,
            anomaly_contrast=contrast,
        )
        selected, dataset = load_training_data(data_dir, defect, config)
        log.info("DualAnoDiff: training %s on %s", stem, selected.describe())
        log.info(
            "DualAnoDiff: %s",
            describe_anomaly_contrast(dataset.defect_contrast(), config.anomaly_contrast, "anomaly_contrast"),
        )
        resume_from = resume_point(stem, weights_path, work_dir, bool(resume))

        hidden = cls.hidden
        node_id = getattr(hidden, "unique_id", None)
        base_model = (
            source_of(getattr(hidden, "prompt", None), node_id, "model") or f"ComfyUI {type(model.model).__name__}"
        )
        progress = ProgressReporter(stem, comfy.utils.ProgressBar(config.steps, node_id=node_id), config.steps)
        result = run_training(
            model,
            clip,
            vae,
            config,
            base_model=base_model,
            dataset=dataset,
            work_dir=work_dir,
            weights_path=weights_path,
            progress=progress,
            metadata={"comfyui_node": "DualAnoDiffTrainer", "data_folder": folder},
            data_fingerprint=selected.fingerprint(),
            resume_from=resume_from,
            stem=stem,
        )
        stop_if_unfinished(result, stem)
        log.info("DualAnoDiff: trained %s (%d steps) -> %s", stem, result.step, weights_path)

        loss_img = from_pil(
            [draw_loss_curve(*loss_points(result.history), f"DualAnoDiff training loss: {stem} ({result.step} steps)")]
        )
        m = backend.install(model, result.weights, 1.0, 1.0, source=weights_path.name)
        c = backend.patch_clip(clip, result.weights, 1.0, source=weights_path.name)
        return io.NodeOutput(m, c, weights_path.name, loss_img, ui=ui.PreviewImage(loss_img, cls=cls))


def make_config(
    model,
    *,
    steps,
    batch_size,
    learning_rate,
    seed,
    rank,
    bcm,
    train_text_encoder,
    resolution,
    split,
    checkpoint_every,
    anomaly_contrast=ANOMALY_CONTRAST_WHEN_MISSING,
) -> TrainConfig:
    """The node's widgets as a validated TrainConfig (precision from the MODEL's dtype; the newest 3 checkpoints
    kept)."""
    _dtype, precision = plan_precision(model)
    return TrainConfig(
        steps=int(steps),
        batch_size=int(batch_size),
        learning_rate=float(learning_rate),
        seed=int(seed),
        rank=int(rank),
        bcm=bool(bcm),
        train_text_encoder=bool(train_text_encoder),
        precision=precision,
        resolution=int(resolution),
        split=split,
        checkpoint_every=int(checkpoint_every),
        keep_checkpoints=3,
        anomaly_contrast=float(anomaly_contrast),
    ).validate()


def loss_points(history) -> tuple[list, list]:
    return [h["step"] for h in history], [h["loss"] for h in history]


def load_training_data(data_dir: Path, defect: str, config: TrainConfig):
    """(the selected defect set, its dataset): every file is opened and checked before a model is touched; the
    data warnings go to the log."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        defect_set = find_defect_set(data_dir, str(defect or "").strip() or None)
        selected = defect_set.select(config.split)
        dataset = DefectDataset(
            selected, config.resolution, flips=config.flips, crop=config.crop, backgrounds=config.bcm
        )
    for w in caught:
        log.warning("DualAnoDiff training data: %s", w.message)
    return selected, dataset


def resume_point(stem: str, weights_path: Path, work_dir: Path, resume: bool):
    """The checkpoint to continue from (None: a new run); with resume off a taken name is refused."""
    resume_from = latest_checkpoint(work_dir)
    if not resume:
        if resume_from is not None or weights_path.exists():
            raise TrainInputError(
                f"output_name {stem!r} is taken: {weights_path if weights_path.exists() else work_dir} exists. "
                "Turn resume on to continue that run, choose another output_name, or delete "
                f"{weights_path.name} and {work_dir.name}/ from {weights_path.parent} to start over."
            )
        return None
    if resume_from is None:
        log.info("DualAnoDiff: no checkpoint in %s; starting a new run.", work_dir)
    return resume_from


class ProgressReporter:
    """The trainer's progress callback: ComfyUI's progress bar with a live loss-curve preview (at most every
    PREVIEW_EVERY_S seconds), a log line every 5 % of the steps, and Cancel turned into a clean stop. The loss
    history comes from the trainer, attached with :meth:`attach` once it exists."""

    def __init__(self, stem: str, pbar, total_steps: int):
        self.stem, self.pbar = stem, pbar
        self.trainer = None
        self.last_preview = 0.0
        self.log_every = max(1, total_steps // 20)

    def attach(self, trainer) -> None:
        self.trainer = trainer

    def start(self, total_steps: int) -> None:
        self.pbar.update_absolute(0, total_steps)

    def __call__(self, p: TrainProgress) -> None:
        preview = None
        now = time.monotonic()
        due = now - self.last_preview >= PREVIEW_EVERY_S or p.step == p.total_steps or p.checkpoint is not None
        if due and self.trainer is not None:
            self.last_preview = now
            img = draw_loss_curve(*loss_points(self.trainer.history), f"{self.stem}: step {p.step}/{p.total_steps}")
            preview = ("JPEG", img, 800)
        if p.step % self.log_every == 0 or p.step == p.total_steps:
            eta = f"{p.eta_seconds / 60:.1f} min" if p.eta_seconds >= 60 else f"{p.eta_seconds:.0f} s"
            log.info(
                "DualAnoDiff training %s: step %d/%d, loss %.4f, %.2f steps/s, ETA %s",
                self.stem,
                p.step,
                p.total_steps,
                p.loss,
                p.rate,
                eta,
            )
        try:
            self.pbar.update_absolute(p.step, p.total_steps, preview)
        except mm.InterruptProcessingException:
            # ComfyUI's progress hook raises on Cancel; let the loop write its checkpoint first
            mm.interrupt_current_processing(True)


def run_training(
    model,
    clip,
    vae,
    config: TrainConfig,
    *,
    base_model: str,
    dataset,
    work_dir: Path,
    weights_path: Path,
    progress: ProgressReporter,
    metadata: dict,
    data_fingerprint,
    resume_from,
    stem: str,
):
    """The core's training loop on the MODEL/CLIP/VAE (outside inference mode); the backbone's memory is released
    however it ends."""
    backbone = None
    try:
        with torch.inference_mode(False):
            backbone = ComfyTrainingBackbone(model, clip, vae, config, base_model=base_model)
            backbone.load()
            trainer = Trainer(
                backbone,
                dataset,
                config,
                work_dir,
                output=weights_path,
                progress=progress,
                should_stop=mm.processing_interrupted,
                metadata=metadata,
                data_fingerprint=data_fingerprint,
            )
            progress.attach(trainer)
            if resume_from is not None:
                log.info("DualAnoDiff: resuming %s from %s", stem, resume_from)
            progress.start(config.steps)
            return trainer.run(resume=resume_from)
    finally:
        if backbone is not None:
            backbone.release()


def stop_if_unfinished(result, stem: str) -> None:
    """A run stopped by Cancel ends the prompt as interrupted (its checkpoint is written)."""
    if result.stopped or not result.completed:
        log.info(
            "DualAnoDiff: training %s stopped at step %d/%d; checkpoint %s. Queue again with resume on to continue.",
            stem,
            result.step,
            result.total_steps,
            result.checkpoint,
        )
        mm.throw_exception_if_processing_interrupted()
        raise mm.InterruptProcessingException()


NODES = [DualAnoDiffTrainer]
