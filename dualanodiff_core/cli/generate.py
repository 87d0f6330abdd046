"""``dualanodiff generate``: sample image/mask pairs with trained DualAnoDiff weights and write a defect dataset."""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
from pathlib import Path

from ..dataset.acceptance import DEFAULT_MIN_ALIGNMENT
from ..dataset.generate import (
    BCM_REFERENCE_CFG,
    BCM_REFERENCE_STEPS,
    DEFAULT_CFG,
    DEFAULT_SAMPLER,
    DEFAULT_STEPS,
    DEFAULT_SWITCH_EVERY,
    MAX_SIDE,
    REFERENCE_SAMPLER,
    REFERENCE_STEPS,
)
from ..method.recipes import DEFAULT_RECIPE, RECIPES

DESCRIPTION = """\
Generate N defect image + mask pairs with trained DualAnoDiff weights and write them as an MVTec-style dataset that
anomalib's MVTec and Folder loaders read unchanged. Every sample gets a manifest record (seed, sampler, steps, CFG,
weights sha256, base model, mask area, filter decision and reason, files).

Sample i always uses seed hash(--seed, i): rerunning the same command resumes (samples already on disk are kept,
a sample cut short by an interruption is made again), and a larger --count adds samples after the existing ones.

Several processes (one per GPU): torchrun --nproc-per-node 8 -m dualanodiff_core.cli generate ... (or accelerate
launch -m dualanodiff_core.cli generate ...). The samples are shared out by index, each process stages its own, and
process 0 merges them into OUT in index order: the same files and manifest records as one process with the same
seeds (plus each record's process rank). Use --count, not --n, under a launcher (it reads --n as its own option).
"""

EPILOG = """\
example:
  dualanodiff generate --weights bottle_broken_large.safetensors --base models/stable-diffusion-v1-5 \\
      --category bottle --defect broken_large --count 500 --out gen_bottle --device cuda

what lands in OUT (NAME = 000, 001, ...):
  CATEGORY/test/DEFECT/NAME.png               accepted images
  CATEGORY/ground_truth/DEFECT/NAME_mask.png  their masks (8-bit single channel, exactly 0/255)
  fg/CATEGORY/DEFECT/NAME.png                 anomaly-branch output the masks come from
  rejected/CATEGORY/DEFECT/NAME{,_fg,_mask}.png   rejected samples (unless --discard-rejected)
  research/CATEGORY/DEFECT/{image,mask,fg}/NAME.png  with --research-layout
  contact_sheets/CATEGORY/DEFECT/sheet_000.png   image | anomaly part | mask overlay
  manifest.jsonl                              one JSON record per sample, accepted or rejected

anomalib: Folder(normal_dir=<your train/good>, abnormal_dir=OUT/CATEGORY/test/DEFECT,
mask_dir=OUT/CATEGORY/ground_truth/DEFECT); or copy your normal images to OUT/CATEGORY/train/good and use
MVTecAD(root=OUT, category=CATEGORY) (MVTec in anomalib < 2).
"""


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows defaults, but not the empty ones (None, False, "") that say nothing."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == "":
            return action.help
        return super()._get_help_string(action)


def _size(text: str) -> tuple[int, int]:
    """'512' or 'WIDTHxHEIGHT' -> (width, height)."""
    try:
        if "x" in text.lower():
            w, h = text.lower().split("x", 1)
            return int(w), int(h)
        return int(text), int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size {text!r}: give 512 or WIDTHxHEIGHT, e.g. 512x384") from None


def _level(text: str):
    return text if text in ("otsu", "median", "border") else _finite(text)


def _finite(text: str) -> float:
    """A float option that must be a real number (not nan/inf)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"{text!r}: give a finite number") from None
    return v


def _prompt(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("the prompt is empty; give the prompt the weights were trained with")
    return text


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = DESCRIPTION
    p.epilog = EPILOG
    p.formatter_class = _Formatter

    g = p.add_argument_group("what to generate")
    g.add_argument(
        "--weights",
        required=True,
        metavar="W",
        help="DualAnoDiff weights: our .safetensors or an official reference checkpoint (.bin)",
    )
    g.add_argument(
        "--base",
        required=True,
        metavar="B",
        help="local diffusers Stable Diffusion 1.5 folder (unet/, vae/, text_encoder/, tokenizer/, "
        "scheduler/); nothing is downloaded",
    )
    g.add_argument("--out", required=True, metavar="D", help="output folder (created; resumed if it exists)")
    g.add_argument(
        "--count",
        "--n",
        dest="n",
        type=int,
        default=500,
        metavar="N",
        help="number of samples (indices 0..N-1); rejected ones count too (--n is the old name)",
    )
    g.add_argument("--category", default="object", help="MVTec category folder name, e.g. bottle")
    g.add_argument("--defect", default="defect", help="defect type folder name, e.g. broken_large (not 'good')")
    g.add_argument("--seed", type=int, default=0, help="base seed; sample i uses a seed derived from it and i")
    g.add_argument("--batch-size", type=int, default=1, help="pairs sampled together (speed/memory only)")
    g.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, mps, ...")
    g.add_argument(
        "--dtype",
        default="fp32",
        choices=("fp32", "fp16", "bf16"),
        help="UNet/VAE/text-encoder precision (the reference uses fp32; fp16/bf16 on GPU are faster)",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bar")

    s = p.add_argument_group("sampling (reference: PNDM, 100 steps, CFG 2.5)")
    s.add_argument(
        "--sampler",
        default=None,
        choices=("pndm", "ddim", "dpmpp"),
        help=f"scheduler (default: the recipe's; {DEFAULT_SAMPLER} with {DEFAULT_RECIPE}, {REFERENCE_SAMPLER} with "
        "reference and ours)",
    )
    s.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"denoising steps (default: the recipe's; {DEFAULT_STEPS} with {DEFAULT_RECIPE}, {REFERENCE_STEPS} "
        f"with reference and ours; the BCM reference uses {BCM_REFERENCE_STEPS})",
    )
    s.add_argument(
        "--cfg",
        type=_finite,
        default=DEFAULT_CFG,
        help=f"classifier-free guidance scale (the BCM reference uses {BCM_REFERENCE_CFG}, 1.2 for screw; "
        "<= 1 turns guidance off)",
    )
    s.add_argument(
        "--size", type=_size, default="512", metavar="S", help="image size: 512 or WIDTHxHEIGHT, multiples of 8"
    )
    s.add_argument(
        "--max-size",
        type=int,
        default=MAX_SIDE,
        metavar="PX",
        help="refuse a --size with a side above this (memory grows with the square of the side); raise it if "
        "your device has the memory",
    )
    s.add_argument(
        "--prompt-global",
        type=_prompt,
        default=None,
        help="global-branch prompt (default: from the weights, else 'a vfx with sks')",
    )
    s.add_argument(
        "--prompt-anomaly",
        type=_prompt,
        default=None,
        help="anomaly-branch prompt (default: from the weights, else 'sks')",
    )
    s.add_argument("--negative-prompt", default="", help="negative prompt for both branches")
    s.add_argument(
        "--recipe",
        choices=RECIPES,
        default=DEFAULT_RECIPE,
        help="ours: zero-mean starting noise on the anomaly branch (a gray, untinted background; docs/quality.md); "
        "reference: the paper's sampling exactly; shared-noise: the anomaly branch starts from its global branch's "
        "noise (--anomaly-noise-share 1), so both place the defect at the same spot",
    )
    s.add_argument(
        "--zero-mean-anomaly-noise",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="remove the mean of the anomaly branch's starting noise (default: on with --recipe ours, off with "
        "reference)",
    )
    s.add_argument(
        "--anomaly-noise-share",
        type=_finite,
        default=None,
        metavar="RHO",
        help="start the anomaly branch from noise correlated RHO with its global branch's (1 = the same noise, "
        "0 = independent; default: the recipe's, 1 with shared-noise, 0 with reference and ours); the branches then "
        "place the defect alike (docs/quality.md)",
    )
    s.add_argument(
        "--lora-strength",
        type=_finite,
        nargs=2,
        default=(1.0, 1.0),
        metavar=("GLOBAL", "ANOMALY"),
        help="per-branch LoRA strength",
    )
    s.add_argument("--saim-strength", type=_finite, default=1.0, help="cross-branch attention (SAIM) strength")
    s.add_argument("--text-strength", type=_finite, default=1.0, help="text-encoder LoRA strength")

    b = p.add_argument_group("background compensation (BCM weights only)")
    b.add_argument(
        "--backgrounds",
        metavar="DIR",
        default=None,
        help="folder of normal images (e.g. <mvtec>/<category>/train/good), used in sorted order",
    )
    b.add_argument(
        "--object-masks",
        metavar="DIR",
        default=None,
        help="object masks for those images (same stem, or STEM_mask; white = object), blacked out "
        "in the background as the reference does; without them the whole image is the background",
    )
    b.add_argument(
        "--switch-every",
        type=int,
        default=DEFAULT_SWITCH_EVERY,
        metavar="K",
        help="use the next background every K samples (reference: 50, screw: 10)",
    )
    b.add_argument("--bcm-strength", type=_finite, default=1.0, help="background fusion strength")
    b.add_argument(
        "--filter-against-background",
        action="store_true",
        help="reject pairs whose mask disagrees with where the image differs from the normal image "
        "(outside the object when --object-masks are given); assumes BCM kept the background",
    )
    b.add_argument(
        "--refine-mask",
        action="store_true",
        help="drop mask components the normal image does not support (same assumption)",
    )

    m = p.add_argument_group("mask from the anomaly branch (distances in [0,1] image units, sizes in pixels)")
    m.add_argument(
        "--mask-gray",
        type=_level,
        default="median",
        metavar="G",
        help="gray level of the anomaly branch background: median, border, or a value like 0.5",
    )
    m.add_argument("--mask-reduce", default="max", choices=("max", "mean", "l2"), help="channel reduction")
    m.add_argument(
        "--mask-blur", type=_finite, default=1.0, metavar="SIGMA", help="Gaussian smoothing before thresholding"
    )
    m.add_argument(
        "--mask-threshold",
        type=_level,
        default="otsu",
        metavar="T",
        help="otsu, or a fixed distance from gray, e.g. 0.15",
    )
    m.add_argument(
        "--mask-min-contrast",
        type=_finite,
        default=0.1,
        metavar="C",
        help="absolute floor: an anomaly image with no pixel this far from gray gives an empty mask",
    )
    m.add_argument(
        "--mask-hysteresis",
        type=_finite,
        default=0.5,
        metavar="H",
        help="grow the mask into connected pixels above H x threshold (1 = off)",
    )
    m.add_argument("--mask-open", type=int, default=1, metavar="R", help="opening radius (0 keeps hairline defects)")
    m.add_argument("--mask-close", type=int, default=2, metavar="R", help="closing radius")
    m.add_argument("--mask-min-area", type=int, default=20, metavar="PX", help="drop components smaller than this")
    m.add_argument("--mask-dilate", type=int, default=0, metavar="R", help="dilate the final mask")
    m.add_argument("--mask-keep-holes", action="store_true", help="do not fill holes inside the mask")
    m.add_argument(
        "--mask-visible",
        type=_finite,
        default=0.0,
        metavar="STD",
        help="cut the mask down to what the generated image shows: pixels within 2 px of it that differ from a 3 px "
        "ring around it by more than STD of the ring's standard deviations (e.g. 2; 0 = off: the mask as the anomaly "
        "branch drew it). Pairs with nothing left are rejected as misaligned",
    )

    f = p.add_argument_group("quality filter (rejected samples stay out of the MVTec tree, recorded in the manifest)")
    f.add_argument("--max-area", type=_finite, default=0.5, help="reject masks covering more than this share")
    f.add_argument("--min-area", type=_finite, default=0.0, help="reject masks covering less than this share")
    f.add_argument(
        "--max-gray-offset",
        type=_finite,
        default=0.2,
        help="reject when the anomaly image's median is further than this from mid-gray (1 = off)",
    )
    f.add_argument(
        "--min-alignment",
        type=float,
        default=DEFAULT_MIN_ALIGNMENT,
        help="reject when the generated image does not differ inside the mask from a 3 px ring around it: "
        "alignment contrast below this (the defect the mask marks is not in the image); 0 = off",
    )
    f.add_argument(
        "--min-agreement",
        type=_finite,
        default=0.5,
        help="with --filter-against-background: minimum mask/change agreement",
    )

    e = p.add_argument_group("export")
    e.add_argument(
        "--research-layout",
        action="store_true",
        help="also write research/CATEGORY/DEFECT/{image,mask,fg}/NAME.png (DualAnoDiff/AnomalyDiffusion eval)",
    )
    e.add_argument(
        "--discard-rejected",
        action="store_true",
        help="do not keep rejected samples' files under rejected/ (they stay in the manifest)",
    )
    e.add_argument("--no-contact-sheet", action="store_true", help="skip the contact sheets")

    pl = p.add_argument_group("placement: where defects may appear, onto your own normal photos (docs/placement.md)")
    pl.add_argument(
        "--placement",
        metavar="MASK_OR_DIR",
        default=None,
        help="region mask (white = a defect may appear there), or a folder with one mask per --normal photo (same "
        "stem or STEM_mask); the anomaly branch is held at gray outside it and pairs whose mask leaves it are "
        "rejected (outside_region)",
    )
    pl.add_argument(
        "--normal",
        metavar="IMAGE_OR_DIR",
        default=None,
        help="normal photo(s), exactly --size, RGB or grayscale: sample i goes onto photo i %% count (sorted); the "
        "image keeps the photo's pixels exactly outside a --feather band around the region (with BCM weights the "
        "photo is also the BCM background)",
    )
    pl.add_argument(
        "--feather",
        type=int,
        default=8,
        metavar="PX",
        help="with --normal: width of the band outside the region where the result fades into the photo",
    )
    pl.add_argument(
        "--max-outside-region",
        type=float,
        default=0.05,
        metavar="SHARE",
        help="with --placement: reject pairs with more than this share of the mask outside the region (1 = off)",
    )
    pl.add_argument(
        "--no-placement-guidance",
        action="store_true",
        help="with --placement: do not hold the anomaly branch at gray outside the region (filter only)",
    )
    pl.add_argument(
        "--placement-steering",
        choices=("shift", "hold"),
        default="shift",
        help="with --placement: 'shift' probes the first sampling steps to see where each defect forms and shifts "
        "the starting noise so that it forms inside the region, then holds the anomaly branch at gray outside it "
        "(ramped in); 'hold' only holds it there from the first step (the earlier behaviour; it erases more defects "
        "than it moves into the region)",
    )


def _device(name: str):
    import torch

    from ..distributed import device_for_process

    name = device_for_process(name)
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        from ..errors import DualAnoDiffError

        raise DualAnoDiffError(f"--device {name}: CUDA is not available in this PyTorch; use --device cpu")
    return name


def recipe_schedule(args: argparse.Namespace) -> tuple[str, int]:
    """(sampler, steps): each option's value when given, else the recipe's."""
    from ..method.recipes import get_recipe

    return get_recipe(args.recipe).schedule(args.sampler, args.steps)


def recipe_noise(args: argparse.Namespace) -> tuple[bool, float]:
    """(zero-mean anomaly starting noise, anomaly noise share): each option's value when given, else the recipe's."""
    from ..method.recipes import get_recipe

    return get_recipe(args.recipe).sampling_noise(args.zero_mean_anomaly_noise, args.anomaly_noise_share)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..dataset.acceptance import FilterOptions
    from ..dataset.generate import BackgroundSet, SamplingOptions, check_size, generate_dataset
    from ..dataset.masks import MaskOptions
    from ..errors import DualAnoDiffError, MissingInputError, RunError
    from ..fileio import check_output_dir, os_error_message
    from ..method.weights import DualAnoDiffWeights
    from ..sd15.loading import check_base_model, check_weights_fit

    # every input is checked before anything is created or loaded
    weights = Path(args.weights)
    if not weights.is_file():
        raise MissingInputError(
            f"--weights {weights}: no such file; give the .safetensors file `dualanodiff train` wrote"
        )
    base = Path(args.base)
    if not base.is_dir():
        raise MissingInputError(f"--base {base}: not a folder; give a local diffusers Stable Diffusion 1.5 folder")
    if args.object_masks and not args.backgrounds:
        raise DualAnoDiffError("--object-masks needs --backgrounds")
    if args.max_size < 8:
        raise DualAnoDiffError(f"--max-size {args.max_size}: give a size in pixels, e.g. {MAX_SIDE}")
    width, height = args.size
    check_size(width, height, args.max_size)
    zero_mean, share = recipe_noise(args)
    sampler, steps = recipe_schedule(args)
    sampling = SamplingOptions(
        zero_mean_anomaly_noise=zero_mean,
        anomaly_noise_share=share,
        sampler=sampler,
        steps=steps,
        cfg=args.cfg,
        height=height,
        width=width,
        prompt_global=args.prompt_global,
        prompt_anomaly=args.prompt_anomaly,
        negative_prompt=args.negative_prompt,
        lora_strength=tuple(args.lora_strength),
        saim_strength=args.saim_strength,
        bcm_strength=args.bcm_strength,
        text_strength=args.text_strength,
    )
    mask_options = MaskOptions(
        gray=args.mask_gray,
        reduce=args.mask_reduce,
        blur_sigma=args.mask_blur,
        threshold=args.mask_threshold,
        min_contrast=args.mask_min_contrast,
        hysteresis=args.mask_hysteresis,
        open_radius=args.mask_open,
        close_radius=args.mask_close,
        fill_holes=not args.mask_keep_holes,
        min_area=args.mask_min_area,
        dilate=args.mask_dilate,
        visible_min_deviation=args.mask_visible,
    )
    filter_options = FilterOptions(
        max_area=args.max_area,
        min_area=args.min_area,
        max_gray_offset=args.max_gray_offset,
        min_agreement=args.min_agreement,
        min_alignment=args.min_alignment,
    )
    backgrounds = None
    if args.backgrounds:
        backgrounds = BackgroundSet.from_folder(args.backgrounds, args.object_masks, args.switch_every)
    placement = None
    if args.placement or args.normal:
        from ..dataset.placement import PlacementSet

        placement = PlacementSet.from_paths(
            args.normal,
            args.placement,
            args.feather,
            args.max_outside_region,
            not args.no_placement_guidance,
            steering=args.placement_steering == "shift",
        )
    device = _device(args.device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    configs = check_base_model(base)
    loaded_weights = DualAnoDiffWeights.load(weights)
    check_weights_fit(loaded_weights, configs["unet"], configs["text_encoder"], weights, base)
    if backgrounds is not None and not loaded_weights.has_bcm:
        raise DualAnoDiffError(
            f"--backgrounds was given, but {weights} has no BCM layers (trained without background compensation): "
            "drop --backgrounds, or use weights trained with --bcm"
        )
    out = Path(args.out)
    created = not out.exists()
    check_output_dir(out, "--out")

    def load():
        from ..distributed import is_distributed, rank
        from ..sd15.pipeline import DualAnoDiffPipeline

        who = f"process {rank()}: " if is_distributed() else ""
        print(f"{who}loading {base} + {weights} on {device} ({args.dtype}) ...", file=sys.stderr)
        return DualAnoDiffPipeline.from_pretrained(base, loaded_weights, dtype=dtype, device=device)

    resume = "finished samples are kept; fix this and run the same command again to resume"
    try:
        summary = generate_dataset(
            load,
            out,
            args.n,
            category=args.category,
            defect=args.defect,
            seed=args.seed,
            batch_size=args.batch_size,
            sampling=sampling,
            backgrounds=backgrounds,
            filter_against_background=args.filter_against_background,
            refine_mask=args.refine_mask,
            mask_options=mask_options,
            filter_options=filter_options,
            research_layout=args.research_layout,
            keep_rejected=not args.discard_rejected,
            contact_sheets=not args.no_contact_sheet,
            weights_path=weights,
            base_model=str(base),
            dtype=args.dtype,
            progress=not args.no_progress,
            placement=placement,
            max_side=args.max_size,
        )
    except KeyboardInterrupt:
        print("interrupted: finished samples are kept; run the same command again to resume", file=sys.stderr)
        return 130
    except OSError as e:
        raise RunError(f"{os_error_message(e)} ({resume})") from e
    except MemoryError:
        raise RunError(
            f"out of memory at --size {width}x{height}, --batch-size {args.batch_size}; use smaller ones ({resume})"
        ) from None
    except RuntimeError as e:
        if "out of memory" not in str(e).lower():
            raise
        raise RunError(
            f"out of memory on {device} at --size {width}x{height}, --batch-size {args.batch_size}; use smaller "
            f"ones or --dtype fp16 ({resume})"
        ) from None
    finally:
        if created:  # a run that failed before writing anything leaves no empty --out behind
            with contextlib.suppress(OSError):
                out.rmdir()
    from .. import distributed

    if not distributed.is_main():  # process 0 reports for all
        return 0
    print(summary.text())
    if summary.accepted == 0 and summary.rejected:
        top = max(summary.reasons.items(), key=lambda kv: kv[1])[0]
        print(
            f"warning: no sample was accepted (mostly {top}): {HINTS.get(top, '')} The rejected/ folder, the contact "
            "sheets and the reasons in manifest.jsonl show what happened.",
            file=sys.stderr,
        )
    return 0


HINTS = {
    "background_not_gray": "the anomaly branch did not draw the defect on gray; check the weights and "
    "--prompt-anomaly (or raise --max-gray-offset).",
    "empty_mask": "nothing stood out from gray; for faint defects lower --mask-min-contrast.",
    "mask_too_large": "masks covered too much of the image; if your defects are that large, raise --max-area.",
    "mask_too_small": "masks were smaller than --min-area.",
    "misaligned": "the generated images did not show the defect that the masks mark (train longer, or try "
    "--recipe ours); lower --min-alignment (0 = off) to keep them anyway.",
    "disagrees_with_normal": "the images changed elsewhere than the masks; BCM may not keep the background "
    "(drop --filter-against-background or lower --min-agreement).",
}
HINTS["outside_region"] = (
    "the masks left the --placement region; check that the region covers where this defect can be (or raise "
    "--max-outside-region)."
)
