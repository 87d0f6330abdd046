"""``dualanodiff train``: learn one defect type from a few defect photos with masks; write our ``.safetensors``."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import warnings
from pathlib import Path

DESCRIPTION = """\
Fine-tune DualAnoDiff on a few photos of ONE defect type (each with a mask, white = defect) and write the trained
weights (both branch LoRAs, SAIM, text-encoder LoRA, BCM) as one .safetensors file.

Data layouts:
  MVTec category:  DATA/test/<defect>/000.png, DATA/ground_truth/<defect>/000_mask.png  (needs --defect)
  flat, folders:   DATA/images/x.png + DATA/masks/x.png (or x_mask.png)
  flat, beside:    DATA/x.png beside DATA/x_mask.png
Optional: DATA/object_masks/ (or --object-masks) with object masks (white = the object) for --bcm;
DATA/normals/ or DATA/good/ with normal images.

Checkpoints, loss.csv and loss.png go to the work folder (default: OUTPUT without .safetensors + "_train").
Ctrl-C stops after the current step and leaves a checkpoint; continue with the same command plus --resume.
Defaults are the reference's (rank 32, AdamW 2e-5, weight decay 1e-2, clip 1.0, batch 4, 5000 steps, 512 px).

Several GPUs (data parallel): torchrun --nproc-per-node 8 -m dualanodiff_core.cli train ... (or accelerate launch
-m dualanodiff_core.cli train ...). Each process takes --batch-size images of one global batch of
--batch-size x processes images, the gradients are averaged, and process 0 writes checkpoints, loss log and weights.
N processes with --batch-size B follow the same loss curve as one process with --batch-size N*B. --resume works with
another process count when the global batch stays the same.
"""


def add_arguments(p: argparse.ArgumentParser, one_defect: bool = True) -> None:
    """``one_defect=False``: only the options that say *how* to train (for ``dualanodiff train-all``), not which data,
    nor where one run's output goes."""
    from ..method.recipes import DEFAULT_RECIPE, RECIPES
    from ..method.weights import DEFAULT_PROMPT_ANOMALY, DEFAULT_PROMPT_GLOBAL
    from ..training.data import CROPS, FLIPS, SPLIT_HELP, SPLITS
    from ..training.trainer import PRECISIONS, TrainConfig

    d = TrainConfig()
    p.formatter_class = _Formatter
    g = p.add_argument_group("data")
    if one_defect:
        p.description = DESCRIPTION
        g.add_argument(
            "data",
            metavar="DATA",
            help="the defect images: an MVTec category folder (with --defect) or a flat folder (see above)",
        )
        g.add_argument(
            "--defect", metavar="NAME", help="defect type to train, for an MVTec category folder (e.g. scratch)"
        )
        g.add_argument(
            "--object-masks",
            metavar="DIR",
            help="folder of object masks (<image name>.png, white = object), one per training image; needed "
            "by --bcm unless DATA/object_masks/ exists",
        )
    g.add_argument(
        "--split",
        choices=SPLITS,
        default=d.split,
        help="which sorted images to train on: "
        + "; ".join(f"{k} = {v}" for k, v in SPLIT_HELP.items()).replace("%", "%%"),
    )
    g.add_argument(
        "--flips",
        choices=FLIPS,
        default=d.flips,
        help="random flips: hv = horizontal and vertical (the reference), h, v, or none (for defects or "
        "objects with a direction, e.g. cable, text)",
    )
    g.add_argument("--no-flip", dest="flips", action="store_const", const="none", help="same as --flips none")
    g.add_argument(
        "--crop",
        choices=CROPS,
        default=d.crop,
        help="non-square photos: center = center square; random = random square that keeps part of the "
        "defect (the reference's RandomCrop); stretch = resize to a square ignoring the aspect ratio",
    )
    g.add_argument(
        "--resolution",
        type=int,
        default=d.resolution,
        metavar="PX",
        help="training resolution (square, multiple of 8); SD1.5 is trained at 512",
    )
    g.add_argument(
        "--max-size",
        type=int,
        default=2048,
        metavar="PX",
        help="refuse a --resolution above this (memory grows with its square); raise it if your device has the memory",
    )

    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        required=True,
        metavar="PATH",
        help="base model: a local diffusers Stable Diffusion 1.5 folder (unet/, vae/, text_encoder/, "
        "tokenizer/, scheduler/), or a single-file .safetensors/.ckpt checkpoint (then see "
        "--model-config). Nothing is downloaded.",
    )
    g.add_argument(
        "--model-config",
        metavar="DIR",
        help="for a single-file --model: a local diffusers SD1.5 folder whose configs and tokenizer are "
        "used (the weights come from the file)",
    )
    g.add_argument("--rank", type=int, default=d.rank, help="LoRA rank of both branch LoRAs and the text-encoder LoRA")
    g.add_argument(
        "--bcm",
        action="store_true",
        help="also train the background compensation module (needs object masks); generation then takes "
        "a background image",
    )
    g.add_argument(
        "--no-saim",
        dest="saim",
        action="store_false",
        help="leave out SAIM, the cross-branch attention (an ablation; the reference always has it)",
    )
    g.add_argument(
        "--saim-zero-init",
        action="store_true",
        help="start SAIM's output projection at zero so training starts from the plain model "
        "(not the reference, which initialises it randomly)",
    )
    g.add_argument(
        "--no-text-encoder",
        dest="train_text_encoder",
        action="store_false",
        help="do not train the text-encoder LoRA (the reference trains it)",
    )
    g.add_argument("--prompt-global", default=DEFAULT_PROMPT_GLOBAL, help="prompt of the global (whole image) branch")
    g.add_argument(
        "--prompt-anomaly", default=DEFAULT_PROMPT_ANOMALY, help="prompt of the anomaly (defect only) branch"
    )

    g.add_argument(
        "--recipe",
        choices=RECIPES,
        default=DEFAULT_RECIPE,
        help="ours: offset noise on the anomaly rows and a mask-weighted global-branch loss (docs/quality.md); "
        "reference: the paper's code exactly; shared-noise: trains like reference but with --anomaly-contrast 0.4 "
        "(and samples differently in generate). The options below override it",
    )
    g.add_argument(
        "--anomaly-offset-noise",
        type=float,
        metavar="STD",
        help="std of a per-channel constant added to the anomaly rows' training noise; 0 = off "
        "(default: 0.1 with --recipe ours, 0 with reference)",
    )
    g.add_argument(
        "--anomaly-noise-share",
        type=float,
        default=0.0,
        metavar="RHO",
        help="correlate the anomaly rows' training noise RHO with their global rows' (1 = the same noise; default 0: "
        "independent, the reference); pair it with the same --anomaly-noise-share in generate (docs/quality.md)",
    )
    g.add_argument(
        "--anomaly-contrast",
        type=float,
        metavar="C",
        help="amplify the anomaly branch's training target about mid-gray until its median defect pixel differs "
        "from mid-gray by C (0-0.5; at most 4x; defects already that visible are left as they are); 0 = off, the "
        "reference (default: 0.4 with --recipe shared-noise, 0 with reference and ours)",
    )
    g.add_argument(
        "--mask-loss-weight",
        type=float,
        metavar="W",
        help="weight of the global branch's loss inside the defect mask; 1 = uniform "
        "(default: 20 with --recipe ours, 1 with reference)",
    )

    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=d.steps, help="training steps in total (when resuming: the new total)")
    g.add_argument(
        "--batch-size",
        type=int,
        default=d.batch_size,
        help="defect images per step and process (the UNet sees twice as many rows: one per branch); under "
        "torchrun / accelerate launch the global batch is --batch-size x processes",
    )
    g.add_argument("--lr", type=float, default=d.learning_rate, help="AdamW learning rate (constant after warm-up)")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay")
    g.add_argument("--grad-clip", type=float, default=d.grad_clip, help="max gradient norm; 0 = no clipping")
    g.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="linear learning-rate warm-up steps")
    g.add_argument(
        "--seed", type=int, default=d.seed, help="seed of the new layers' init, the data order, the flips and the noise"
    )
    g.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=d.precision,
        help="dtype of the frozen base model (fp16/bf16 save memory on a GPU); new layers stay fp32",
    )
    g.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute activations in backward: much less GPU memory, 1.5-2.1x the time per step "
        "(measured on an H200, docs/training.md)",
    )
    g.add_argument("--device", default="auto", help="auto (CUDA if available, else CPU), cpu, cuda, cuda:1, mps ...")

    g = p.add_argument_group("output")
    if one_defect:
        g.add_argument("-o", "--output", required=True, metavar="OUT.safetensors", help="where the trained weights go")
        g.add_argument(
            "--work-dir",
            metavar="DIR",
            help="where checkpoints/, loss.csv, loss.png and train_config.json go (default: OUTPUT minus "
            ".safetensors, plus _train)",
        )
    g.add_argument(
        "--checkpoint-every",
        type=int,
        default=d.checkpoint_every,
        metavar="N",
        help="write a checkpoint every N steps (0 = only at the end or on Ctrl-C)",
    )
    g.add_argument(
        "--keep-checkpoints",
        type=int,
        default=d.keep_checkpoints,
        metavar="K",
        help="keep the newest K checkpoints (0 = keep all)",
    )
    g.add_argument(
        "--no-checkpoint-weights",
        dest="checkpoint_weights",
        action="store_false",
        help="do not write checkpoint-<step>.safetensors weights beside each resumable checkpoint",
    )
    if not one_defect:
        g.add_argument("--no-progress", action="store_true", help="no progress bar (one line per checkpoint instead)")
        return
    g.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="CHECKPOINT",
        help="continue a stopped or finished run: the newest checkpoint of the work folder, or the given "
        "checkpoint-<step>.pt; all settings except --steps and checkpoint options must match",
    )
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="start over even if OUTPUT or checkpoints of an earlier run exist (deletes those checkpoints)",
    )
    g.add_argument("--dry-run", action="store_true", help="check the data and print the plan; load no model")
    g.add_argument("--no-progress", action="store_true", help="no progress bar (one line per checkpoint instead)")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Shows "(default: X)" only where X says something (not for on/off flags or unset options)."""

    def _get_help_string(self, action):
        text = action.help or ""
        d = action.default
        if (
            "%(default)" in text
            or d is None
            or d is argparse.SUPPRESS
            or isinstance(d, bool)
            or action.option_strings == []
            or isinstance(action, argparse._StoreConstAction)
        ):
            return text
        return text + " (default: %(default)s)"


def config_from_args(args: argparse.Namespace):
    from ..method.recipes import get_recipe
    from ..training.trainer import TrainConfig

    recipe = get_recipe(getattr(args, "recipe", "reference")).train_settings()
    for k in recipe:
        if getattr(args, k, None) is not None:
            recipe[k] = getattr(args, k)
    return TrainConfig(
        **recipe,
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        weight_decay=args.weight_decay,
        grad_clip=args.grad_clip,
        warmup_steps=args.warmup_steps,
        seed=args.seed,
        rank=args.rank,
        saim=args.saim,
        bcm=args.bcm,
        saim_zero_init=args.saim_zero_init,
        train_text_encoder=args.train_text_encoder,
        precision=args.precision,
        gradient_checkpointing=args.gradient_checkpointing,
        prompt_global=args.prompt_global,
        prompt_anomaly=args.prompt_anomaly,
        anomaly_noise_share=getattr(args, "anomaly_noise_share", 0.0),
        resolution=args.resolution,
        split=args.split,
        flips=args.flips,
        crop=args.crop,
        checkpoint_every=args.checkpoint_every,
        keep_checkpoints=args.keep_checkpoints,
        checkpoint_weights=args.checkpoint_weights,
    ).validate()


def pick_device(name: str) -> str:
    import torch

    from ..distributed import device_for_process

    name = device_for_process(name)
    if name != "auto":
        if name.startswith("cuda") and not torch.cuda.is_available():
            from ..errors import InputError

            raise InputError(f"--device {name}: CUDA is not available here; use --device cpu.")
        return name
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


@contextlib.contextmanager
def _graceful_interrupt(flag: dict, echo):
    """First Ctrl-C: finish the current step, write a checkpoint, stop. Second Ctrl-C: abort at once."""
    if not _in_main_thread():
        yield
        return
    old = signal.getsignal(signal.SIGINT)

    def handler(signum, frame):
        if flag.get("stop"):
            signal.signal(signal.SIGINT, old if callable(old) else signal.default_int_handler)
            raise KeyboardInterrupt
        flag["stop"] = True
        echo("stopping after this step (a checkpoint is written); press Ctrl-C again to abort at once")

    signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _fmt_time(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def _clear_previous_run(work_dir: Path) -> None:
    """--overwrite: remove only what an earlier run wrote (checkpoints, loss log)."""
    from ..training.trainer import CHECKPOINT_RE

    ck = work_dir / "checkpoints"
    if ck.is_dir():
        for q in ck.iterdir():
            if CHECKPOINT_RE.match(q.name) or (q.name.startswith("checkpoint-") and q.suffix == ".safetensors"):
                q.unlink()
    for name in ("loss.csv", "loss.png", "train_config.json"):
        with contextlib.suppress(FileNotFoundError):
            (work_dir / name).unlink()


def _contrast_line(ds, config) -> str:
    """What ``--anomaly-contrast`` does with these images (the gain is recorded in the weights' metadata)."""
    from ..training.trainer import describe_anomaly_contrast

    return describe_anomaly_contrast(ds.defect_contrast(), config.anomaly_contrast)


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from ..training.data import DataWarning, DefectDataset, find_defect_set
    from ..training.trainer import TrainingError, list_checkpoints

    config = config_from_args(args)
    if config.resolution > args.max_size:
        from ..errors import DualAnoDiffError

        raise DualAnoDiffError(
            f"--resolution {config.resolution}: above the maximum of {args.max_size} px (SD1.5 is trained at 512; "
            "memory grows with the square of the size); use a smaller one, or raise --max-size if your device has "
            "the memory."
        )
    output = Path(args.output)
    if output.suffix != ".safetensors":
        raise ValueError(
            f"--output {output}: the weights are written as .safetensors; use a name ending in .safetensors"
        )
    work_dir = Path(args.work_dir) if args.work_dir else output.with_name(output.stem + "_train")

    from .. import distributed

    main_process = distributed.is_main()

    def echo(msg: str) -> None:
        if main_process:  # one voice: process 0 reports for all
            print(msg, file=sys.stderr, flush=True)

    def show_warning(message, category, filename, lineno, file=None, line=None):
        echo(f"warning: {message}")

    with warnings.catch_warnings():
        warnings.simplefilter("always", DataWarning)
        warnings.showwarning = show_warning
        defect_set = find_defect_set(args.data, args.defect, args.object_masks)
        selected = defect_set.select(config.split)
        echo(f"data: {selected.describe()}")
        if args.dry_run:
            ds = DefectDataset(
                selected, config.resolution, flips=config.flips, crop=config.crop, backgrounds=config.bcm
            )
            echo(f"checked {len(ds)} image(s): {', '.join(ds.names)}")
            echo(_contrast_line(ds, config))
            echo(
                f"plan: {config.steps} steps x {config.batch_size} images at {config.resolution} px, rank "
                f"{config.rank}, BCM {'on' if config.bcm else 'off'}; weights -> {output}; work folder {work_dir}"
            )
            return 0

        if args.resume is None:
            previous = list_checkpoints(work_dir)
            if previous and not args.overwrite:
                raise FileExistsError(
                    f"{work_dir} holds checkpoints of an earlier run (up to step {previous[-1][0]}). Add --resume to "
                    "continue it, or --overwrite to start over (deletes them), or choose another --work-dir."
                )
            if output.exists() and not args.overwrite:
                raise FileExistsError(f"{output} exists; add --overwrite to replace it or choose another --output.")
            if args.overwrite:
                if main_process:
                    _clear_previous_run(work_dir)
                distributed.barrier()

        device = pick_device(args.device)
        # cheap checks of the base model and the output locations before the heavy load
        from ..fileio import check_output_dir, check_output_file
        from ..sd15.loading import check_base_model

        if Path(args.model).is_dir():
            check_base_model(args.model)
        created = [d for d in (output.parent, work_dir) if not d.exists()]
        check_output_file(output, "--output")
        check_output_dir(work_dir, "--work-dir")
        if not main_process:
            args.no_progress = True
        echo(f"model: {args.model} on {device} ({config.precision})")
        flag: dict = {}
        bar = None

        def on_ready(ds):
            echo(f"checked {len(ds)} training image(s); loading the model ...")
            echo(_contrast_line(ds, config))

        def progress(p):
            nonlocal bar
            if bar is None and not args.no_progress:
                from tqdm import tqdm

                bar = tqdm(
                    total=p.total_steps,
                    initial=p.step - 1,
                    unit="step",
                    dynamic_ncols=True,
                    desc="train",
                    file=sys.stderr,
                )
            if bar is not None:
                bar.set_postfix(loss=f"{p.loss:.4f}", lr=f"{p.lr:.2e}", refresh=False)
                bar.update(p.step - bar.n)
                if p.checkpoint is not None:
                    bar.write(f"checkpoint: {p.checkpoint}", file=sys.stderr)
            elif p.checkpoint is not None or p.step == p.total_steps:
                echo(
                    f"step {p.step}/{p.total_steps}  loss {p.loss:.4f}  {p.rate:.2f} step/s  "
                    f"eta {_fmt_time(p.eta_seconds)}" + (f"  checkpoint: {p.checkpoint}" if p.checkpoint else "")
                )

        def say(msg):
            (bar.write(msg, file=sys.stderr) if bar is not None else echo(msg))

        from ..sd15.training import train_from_folder

        try:
            with _graceful_interrupt(flag, say):
                result = train_from_folder(
                    defect_set,
                    args.model,
                    output,
                    config,
                    work_dir=work_dir,
                    resume=args.resume,
                    device=device,
                    model_config=args.model_config,
                    progress=progress,
                    should_stop=lambda: bool(flag.get("stop")),
                    on_ready=on_ready,
                )
        except TrainingError as e:
            echo(f"dualanodiff train: error: {e}")
            return 1
        except OSError as e:
            from ..errors import RunError
            from ..fileio import os_error_message

            raise RunError(
                f"{os_error_message(e)} (checkpoints written so far are kept; continue with the same command plus "
                "--resume)"
            ) from e
        finally:
            if bar is not None:
                bar.close()
            for d in reversed(created):  # a run that failed before writing anything leaves no empty folder
                with contextlib.suppress(OSError):
                    d.rmdir()

    echo(f"loss log: {work_dir / 'loss.csv'}, curve: {work_dir / 'loss.png'}")
    if result.completed:
        echo(f"done: {result.step} steps; weights: {result.output}")
        echo(f"last checkpoint: {result.checkpoint} (add --resume and a larger --steps to train further)")
        return 0
    echo(f"stopped at step {result.step}/{result.total_steps}; checkpoint: {result.checkpoint}")
    echo("continue with the same command plus --resume")
    return 130
