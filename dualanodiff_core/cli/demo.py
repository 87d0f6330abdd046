"""``dualanodiff demo``: the whole pipeline, offline, on the procedural MiniDefect data, in minutes on a CPU.

Stages (each prints its progress and time; a finished stage is reused when the same command runs again):

1. write the MiniDefect dataset (MVTec layout) to ``OUT/minidefect``;
2. train DualAnoDiff weights on the few-shot split (the first third, rounded down) of one defect type, starting from
   the shipped MiniDefect base model -> ``OUT/weights/<product>_<defect>.safetensors``;
3. generate image/mask pairs, extract and filter the masks, export an MVTec-layout dataset -> ``OUT/generated``;
4. measure them against the held-out real defects (mask alignment, diversity, usefulness to a small segmentation
   network) -> ``OUT/report.md`` and ``OUT/report.json``, and draw ``OUT/contact_sheet.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..method.recipes import DEFAULT_RECIPE

DESCRIPTION = __doc__.split("\n\n", 1)[1]

#: settings whose change makes earlier results in OUT invalid (compared with OUT/demo.json)
_STAGE_KEYS = {
    "dataset": ("seed", "size"),
    "train": ("seed", "size", "product", "defect", "train_steps", "rank", "lr", "batch_size", "train_seed", "recipe"),
    "generate": (
        "seed",
        "size",
        "product",
        "defect",
        "train_steps",
        "rank",
        "lr",
        "batch_size",
        "train_seed",
        "recipe",
        "samples",
        "sampling_steps",
        "cfg",
        "sampler",
        "gen_seed",
    ),
}


@dataclasses.dataclass
class DemoConfig:
    """Every demo setting. The defaults finish in under 10 minutes on 2 CPU cores (see README.md)."""

    out: str = "dualanodiff_demo"
    product: str = "fabric"
    defect: str = "hole"
    seed: int = 0  # MiniDefect dataset seed
    size: int = 64
    train_steps: int = 800
    rank: int = 8
    lr: float = 3e-4
    batch_size: int = 4
    train_seed: int = 0
    samples: int = 48
    sampling_steps: int = 25
    sampler: str = "ddim"
    #: None = the recipe's (ours 1.0: masks and images aligned better than with 2.5; reference 2.5)
    cfg: float | None = None
    gen_seed: int = 0
    #: training/sampling recipe (dualanodiff_core.method.recipes): the default recipe (shared-noise), "reference"
    #: (the paper's) or "ours"
    recipe: str = DEFAULT_RECIPE
    seg_steps: int = 150  # segmentation-network training steps per usefulness row; 0 = skip usefulness
    sources: tuple[str, ...] = ("generated", "real", "cutpaste", "perlin")
    threads: int = 0  # 0 = torch's default

    def validate(self) -> DemoConfig:
        from ..method.recipes import get_recipe
        from ..minidefect import procedural as md

        recipe = get_recipe(self.recipe)
        if self.cfg is None:
            self.cfg = recipe.minidefect_cfg
        if self.product not in md.PRODUCTS:
            raise ValueError(f"--product {self.product!r}: choose one of {', '.join(md.PRODUCTS)}")
        if self.defect not in md.PRODUCTS[self.product]:
            raise ValueError(f"--defect {self.defect!r}: {self.product} has {', '.join(md.PRODUCTS[self.product])}")
        for name in ("train_steps", "samples", "sampling_steps", "batch_size", "rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.seg_steps < 0:
            raise ValueError(f"--seg-steps must be >= 0 (0 skips the usefulness test), got {self.seg_steps}")
        if self.size % 8 or not 32 <= self.size <= 256:
            raise ValueError(
                f"--size {self.size}: use a multiple of 8 from 32 to 256 (the base model was trained at 64)"
            )
        if self.lr <= 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if self.threads < 0:
            raise ValueError(f"--threads must be >= 0 (0 = default), got {self.threads}")
        return self

    def stage_settings(self, stage: str) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in _STAGE_KEYS[stage]}
        if "recipe" in out:
            from ..method.recipes import get_recipe

            # what the recipe sets in training, so that weights trained before a recipe's default changed (e.g. its
            # anomaly contrast) are not reused under the same recipe name
            out["recipe_training"] = get_recipe(self.recipe).train_settings()
        return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..method.recipes import RECIPES

    d = DemoConfig()
    p.description = DESCRIPTION
    p.formatter_class = argparse.RawDescriptionHelpFormatter

    def opt(name, help_text, **kw):
        dest = name.lstrip("-").replace("-", "_")
        default = getattr(d, dest)
        kw.setdefault("type", type(default))
        p.add_argument(name, default=default, help=f"{help_text} (default: {default})", **kw)

    opt("--out", "output folder; a finished stage found there is reused, changed settings need --overwrite")
    opt("--product", "MiniDefect product: metal or fabric")
    opt("--defect", "defect type to learn (metal: scratch, hole, stain; fabric: hole, stain, thread)")
    opt("--train-steps", "training steps")
    opt("--samples", "image/mask pairs to generate")
    opt("--sampling-steps", "denoising steps per sample")
    p.add_argument(
        "--cfg",
        type=float,
        default=None,
        help="classifier-free guidance scale (default: the recipe's, ours 1.0, reference 2.5)",
    )
    p.add_argument(
        "--recipe",
        choices=RECIPES,
        default=d.recipe,
        help="ours: product prompts, offset noise on the anomaly rows, mask-weighted global loss, zero-mean anomaly "
        "starting noise, cfg 1.0 (docs/quality.md); reference: the paper's recipe; shared-noise: the reference "
        f"recipe, the anomaly branch started from its global branch's noise (default: {d.recipe})",
    )
    opt("--rank", "LoRA rank")
    opt("--lr", "learning rate")
    opt("--batch-size", "training images per step")
    opt("--seed", "MiniDefect dataset seed")
    opt("--train-seed", "training seed")
    opt("--gen-seed", "generation seed (sample i uses a seed derived from it and i)")
    opt("--seg-steps", "segmentation-network steps per usefulness row; 0 skips the usefulness test")
    opt("--threads", "torch CPU threads; 0 = torch's default")
    p.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run in about a minute: 30 training steps, 8 samples, 10 sampling steps, "
        "30 segmentation steps (the images are not yet useful)",
    )
    p.add_argument("--device", default="cpu", help="torch device for training and generation (default: cpu)")
    p.add_argument("--overwrite", action="store_true", help="discard earlier demo results in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars, one line per stage")


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    c = DemoConfig(
        out=args.out,
        product=args.product,
        defect=args.defect,
        seed=args.seed,
        train_steps=args.train_steps,
        rank=args.rank,
        lr=args.lr,
        batch_size=args.batch_size,
        train_seed=args.train_seed,
        samples=args.samples,
        sampling_steps=args.sampling_steps,
        cfg=args.cfg,
        recipe=args.recipe,
        gen_seed=args.gen_seed,
        seg_steps=args.seg_steps,
        threads=args.threads,
    )
    if args.quick:
        c = dataclasses.replace(
            c,
            train_steps=min(c.train_steps, 30),
            samples=min(c.samples, 8),
            sampling_steps=min(c.sampling_steps, 10),
            seg_steps=min(c.seg_steps, 30),
        )
    return c.validate()


# ---------------------------------------------------------------------------------------------------------------------


class _Stages:
    """Keeps OUT/demo.json: the settings each finished stage was made with, so a rerun reuses what still fits."""

    def __init__(self, out: Path, config: DemoConfig, overwrite: bool, log: Callable[[str], None]):
        from ..fileio import write_json_atomic

        self._write = write_json_atomic
        self.out, self.config, self.log = out, config, log
        self.path = out / "demo.json"
        self.state: dict[str, Any] = {}
        if self.path.is_file():
            try:
                self.state = json.loads(self.path.read_text())
            except (OSError, ValueError) as e:
                raise ValueError(f"{self.path}: unreadable ({e}); use --overwrite or another --out") from e
        elif out.is_dir() and any(out.iterdir()) and not overwrite:
            raise FileExistsError(
                f"--out {out}: the folder exists and is not a demo folder (no demo.json); choose another --out"
            )
        if overwrite:
            for name in (
                "minidefect",
                "weights",
                "generated",
                "report.md",
                "report.json",
                "contact_sheet.png",
                "demo.json",
            ):
                p = out / name
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
            self.state = {}
        out.mkdir(parents=True, exist_ok=True)
        stale = [
            s
            for s, rec in self.state.get("stages", {}).items()
            if s in _STAGE_KEYS and rec.get("settings") != config.stage_settings(s)
        ]
        if stale:
            raise FileExistsError(
                f"--out {out} holds demo results made with other settings (stage(s): {', '.join(stale)}); add "
                "--overwrite to discard them, or choose another --out"
            )

    def done(self, stage: str) -> bool:
        return stage in self.state.get("stages", {})

    def finish(self, stage: str, seconds: float, **extra) -> None:
        rec = {"seconds": round(seconds, 1), **extra}
        if stage in _STAGE_KEYS:
            rec["settings"] = self.config.stage_settings(stage)
        self.state.setdefault("stages", {})[stage] = rec
        self.state["config"] = dataclasses.asdict(self.config)
        self._write(self.path, self.state)


def _fmt_s(s: float) -> str:
    return f"{int(s) // 60}:{int(s) % 60:02d}"


def run_demo(
    config: DemoConfig,
    *,
    overwrite: bool = False,
    progress: bool = True,
    device: str = "cpu",
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the demo; returns the report dict (also written to ``OUT/report.json``).

    Four stages, each skipped when ``OUT/demo.json`` says it already ran with the same settings: write the MiniDefect
    data, train on the first third of one defect's images, generate pairs, evaluate them."""
    import torch

    from ..minidefect import procedural as md

    config.validate()
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if config.threads:
        torch.set_num_threads(config.threads)
    out = Path(config.out)
    stages = _Stages(out, config, overwrite, log)
    model = md.base_model_dir()
    if not (model / "unet" / "diffusion_pytorch_model.safetensors").is_file():
        raise FileNotFoundError(
            f"{model}: the MiniDefect base model is missing from this installation; reinstall the "
            "package or make it with scripts/pretrain_minidefect.py"
        )
    name = f"{config.product}_{config.defect}"
    run = _DemoRun(
        config=config,
        stages=stages,
        out=out,
        model=model,
        data=out / "minidefect",
        weights=out / "weights" / f"{name}.safetensors",
        generated=out / "generated",
        device=device,
        progress=progress,
        log=log,
    )
    t_all = time.time()
    _stage_dataset(run)
    _stage_train(run)
    summary_text = _stage_generate(run)
    report = _stage_evaluate(run, summary_text, t_all)
    log(
        f"demo finished in {_fmt_s(report['total_seconds_this_run'])}; report: {out / 'report.md'}; contact sheet: "
        f"{report['files']['contact_sheet']}"
    )
    return report


N_STAGES = 4


@dataclasses.dataclass
class _DemoRun:
    """What every stage of one demo run needs."""

    config: DemoConfig
    stages: _Stages
    out: Path
    model: Path
    data: Path
    weights: Path
    generated: Path
    device: str
    progress: bool
    log: Callable[[str], None]


def _stage_dataset(run: _DemoRun) -> None:
    """1. the procedural MiniDefect data."""
    from ..minidefect import procedural as md

    config, log, data = run.config, run.log, run.data
    t0 = time.time()
    if run.stages.done("dataset") and not md.verify_minidefect(data):
        log(f"[1/{N_STAGES}] dataset: reusing {data}")
        return
    log(f"[1/{N_STAGES}] dataset: writing MiniDefect to {data}")
    bar = _bar(run.progress, "dataset", "img")

    def tick(k, n):
        if bar is not None:
            bar.total = n
            bar.update(1)

    md.write_minidefect(data, md.MiniDefectSpec(seed=config.seed, size=config.size), overwrite=True, progress=tick)
    if bar is not None:
        bar.close()
    run.stages.finish("dataset", time.time() - t0)
    log(f"      done in {_fmt_s(time.time() - t0)}")


def _stage_train(run: _DemoRun) -> None:
    """2. DualAnoDiff weights from the first third of one defect's images (the strict split)."""
    from ..minidefect.bench import train_config
    from ..sd15.training import train_from_folder
    from ..training.data import find_defect_set

    config, log, weights = run.config, run.log, run.weights
    t0 = time.time()
    defect_set = find_defect_set(run.data / config.product, config.defect)
    if run.stages.done("train") and weights.is_file():
        log(f"[2/{N_STAGES}] train: reusing {weights}")
        return
    tc = train_config(_run_settings(config), config.product, config.size)
    n_train = len(defect_set.select("strict").samples)
    log(
        f"[2/{N_STAGES}] train: {config.product}/{config.defect}, {n_train} of {len(defect_set.samples)} defect "
        f"images (the first third; the rest are held out), {config.train_steps} steps, rank {config.rank}"
    )
    bar = _bar(run.progress, "train", "step", total=config.train_steps)

    def on_step(p):
        if bar is not None:
            bar.set_postfix(loss=f"{p.loss:.4f}", refresh=False)
            bar.update(p.step - bar.n)
        elif p.step == p.total_steps or p.step % 100 == 0:
            log(f"      step {p.step}/{p.total_steps}  loss {p.loss:.4f}  eta {_fmt_s(p.eta_seconds)}")

    work = weights.parent / f"{weights.stem}_train"
    if work.is_dir():
        shutil.rmtree(work)
    try:
        res = train_from_folder(defect_set, run.model, weights, tc, work_dir=work, device=run.device, progress=on_step)
    finally:
        if bar is not None:
            bar.close()
    if not res.completed:
        raise RuntimeError(f"training stopped at step {res.step}; rerun the same command")
    run.stages.finish("train", time.time() - t0, final_loss=res.history[-1].get("loss") if res.history else None)
    log(f"      done in {_fmt_s(time.time() - t0)}: {weights}")


def _stage_generate(run: _DemoRun) -> str:
    """3. generated pairs through the quality filter; returns the generation summary."""
    from ..dataset.generate import generate_dataset
    from ..minidefect import procedural as md
    from ..minidefect.bench import sampling_options
    from ..sd15.pipeline import DualAnoDiffPipeline

    config, log, generated = run.config, run.log, run.generated
    t0 = time.time()
    if run.stages.done("generate"):
        log(f"[3/{N_STAGES}] generate: reusing {generated}")
        return run.stages.state["stages"]["generate"].get("summary", "")
    sampling = sampling_options(_run_settings(config), config.size)
    log(
        f"[3/{N_STAGES}] generate: {config.samples} pairs, {config.sampler} {config.sampling_steps} steps, "
        f"cfg {config.cfg}, recipe {config.recipe} (anomaly noise share {sampling.anomaly_noise_share:g})"
    )

    def load():
        return DualAnoDiffPipeline.from_pretrained(run.model, run.weights, device=run.device)

    summary = generate_dataset(
        load,
        generated,
        config.samples,
        category=config.product,
        defect=config.defect,
        seed=config.gen_seed,
        batch_size=8,
        sampling=sampling,
        mask_options=md.mask_options(),
        weights_path=run.weights,
        base_model=str(run.model),
        progress=run.progress,
        log=log,
    )
    summary_text = summary.text()
    run.stages.finish(
        "generate", time.time() - t0, summary=summary_text, accepted=summary.accepted, rejected=summary.rejected
    )
    log(f"      done in {_fmt_s(time.time() - t0)}: {summary.accepted} accepted, {summary.rejected} rejected")
    return summary_text


def _stage_evaluate(run: _DemoRun, summary_text: str, t_all: float) -> dict[str, Any]:
    """4. the quality benchmark, the contact sheet and the reports (report.json, report.md)."""
    import torch

    from ..dataset.export import iter_records
    from ..evaluation import benchmark as ev
    from ..fileio import write_json_atomic, write_text_atomic

    config, log, out, generated = run.config, run.log, run.out, run.generated
    t0 = time.time()
    sources = tuple(config.sources) if config.seg_steps > 0 else ()
    log(
        f"[4/{N_STAGES}] evaluate: mask alignment, diversity"
        + (f", usefulness ({', '.join(sources)}; {config.seg_steps} steps each)" if sources else "")
    )
    bench_cfg = ev.BenchConfig(
        sources=sources, seeds=(0,), seg=ev.SegConfig(steps=max(1, config.seg_steps)), n_synthetic=200
    )
    accepted = sum(1 for r in iter_records(generated, config.product, config.defect) if r.get("accepted"))
    if not accepted:
        log(
            "      every generated pair was rejected by the quality filter: only the reference rows are measured "
            "(train longer: --train-steps)"
        )
    result = ev.benchmark(
        run.data,
        config.product,
        config.defect,
        generated if accepted else None,
        bench_cfg,
        log=lambda s: log("      " + s),
    )
    sheet = out / "contact_sheet.png"
    demo_contact_sheet(run.data, config.product, config.defect, generated, sheet)
    total = time.time() - t_all
    report = {
        "config": dataclasses.asdict(config),
        "quality": result,
        "generate": summary_text,
        "stage_seconds": {k: v["seconds"] for k, v in run.stages.state.get("stages", {}).items()},
        "evaluate_seconds": round(time.time() - t0, 1),
        "total_seconds_this_run": round(total, 1),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "files": {
            "dataset": str(run.data),
            "weights": str(run.weights),
            "generated": str(generated),
            "contact_sheet": str(sheet),
        },
    }
    write_json_atomic(out / "report.json", report)
    report["summary"] = ev.summary_row(result)
    text = _report_markdown(report, ev.format_report(result))
    write_text_atomic(out / "report.md", text)
    run.stages.finish("evaluate", time.time() - t0)
    log(f"      done in {_fmt_s(time.time() - t0)}")
    print(ev.format_report(result))
    return report


def _run_settings(config: DemoConfig):
    from ..minidefect.bench import RunSettings

    return RunSettings(
        recipe=config.recipe,
        train_steps=config.train_steps,
        rank=config.rank,
        lr=config.lr,
        batch_size=config.batch_size,
        train_seed=config.train_seed,
        samples=config.samples,
        sampler=config.sampler,
        sampling_steps=config.sampling_steps,
        cfg=config.cfg,
        gen_seed=config.gen_seed,
    )


def _bar(progress: bool, desc: str, unit: str, total: int | None = None):
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=f"      {desc}", unit=unit, dynamic_ncols=True, file=sys.stderr)


def _report_markdown(report: dict[str, Any], table: str) -> str:
    c = report["config"]
    files = report["files"]
    secs = ", ".join(f"{k} {_fmt_s(v)}" for k, v in report["stage_seconds"].items())
    return "\n".join(
        [
            f"# DualAnoDiff demo: MiniDefect {c['product']}/{c['defect']}",
            "",
            f"- dataset: `{files['dataset']}` (seed {c['seed']}, {c['size']} px)",
            f"- weights: `{files['weights']}` ({c['train_steps']} steps, rank {c['rank']}, lr {c['lr']}, "
            f"batch {c['batch_size']}, recipe {c.get('recipe', 'reference')})",
            f"- generated dataset: `{files['generated']}` ({c['samples']} samples, "
            f"{c['sampler']} {c['sampling_steps']} "
            f"steps, cfg {c['cfg']}, recipe {c.get('recipe', 'reference')})",
            f"- contact sheet: `{files['contact_sheet']}`",
            f"- time per stage (m:ss): {secs}; {report['threads']} torch thread(s)",
            "",
            "```",
            report["generate"].strip(),
            "```",
            "",
            "```",
            table,
            "```",
            "",
            "The same row as the table of `bench/quality.py --all` (docs/quality.md; pixel AP of a segmentation "
            "network trained on each source and tested on the held-out real defects):",
            "",
            ev_summary_table(report),
            "",
            "How to read it: (a) the mask from the anomaly branch should agree with an independent detector on the "
            "generated image about as well as the true masks of real defects do; (b) generated sets should vary about "
            "as much as real defects and not copy the few-shot images (`to train` > 0); (c) a segmentation network "
            "trained on generated pairs should find held-out real defects better than one trained on the few real "
            "pairs alone. The demo uses one seed and a short schedule; `bench/quality.py` runs the full protocol.",
            "",
        ]
    )


def ev_summary_table(report: dict[str, Any]) -> str:
    from ..evaluation.benchmark import format_summary

    return format_summary([report["summary"]]) if "summary" in report else ""


def demo_contact_sheet(
    data: Path, product: str, defect: str, generated: Path, path: Path, columns: int = 8, thumb: int = 96
) -> Path:
    """One PNG: a row of few-shot training images (with true masks outlined), then rows of accepted generated
    images, each above its anomaly-branch image and its mask overlaid. Written atomically."""
    from PIL import Image, ImageDraw

    from ..dataset.export import _font, iter_records, mask_overlay
    from ..fileio import save_image_atomic
    from ..minidefect.procedural import few_shot_split

    font = _font()
    label_h = 14
    rows: list[tuple[str, list[Image.Image]]] = []
    test_dir = data / product / "test" / defect
    gt_dir = data / product / "ground_truth" / defect
    files = sorted(test_dir.glob("*.png"))
    train = files[: few_shot_split(len(files))][:columns]
    rows.append(
        (
            "few-shot training images (true masks in red)",
            [mask_overlay(Image.open(f).convert("RGB"), Image.open(gt_dir / f"{f.stem}_mask.png")) for f in train],
        )
    )
    recs = [r for r in iter_records(generated, product, defect) if r.get("accepted")][: 2 * columns]
    for start in range(0, len(recs), columns):
        chunk = recs[start : start + columns]
        imgs = [Image.open(generated / r["files"]["image"]).convert("RGB") for r in chunk]
        fgs = [Image.open(generated / r["files"]["fg"]).convert("RGB") for r in chunk]
        masks = [mask_overlay(im, Image.open(generated / r["files"]["mask"])) for r, im in zip(chunk, imgs)]
        rows += [("generated images (global branch)", imgs), ("anomaly branch", fgs), ("extracted masks", masks)]
    if len(rows) == 1:
        rows.append(("no accepted generated samples", []))
    w = columns * (thumb + 4) + 4
    h = sum(label_h + thumb + 4 for _ in rows) + 4
    sheet = Image.new("RGB", (w, h), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    y = 4
    for label, imgs in rows:
        draw.text((4, y), label, fill=(0, 0, 0), font=font)
        y += label_h
        for i, im in enumerate(imgs):
            sheet.paste(im.resize((thumb, thumb), Image.NEAREST), (4 + i * (thumb + 4), y))
        y += thumb + 4
    save_image_atomic(sheet, path)
    return path


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    run_demo(config, overwrite=args.overwrite, progress=not args.no_progress, device=args.device)
    return 0
