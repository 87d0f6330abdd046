"""Quality benchmark on held-out MiniDefect defects: mask alignment, diversity, usefulness to a detector.

End to end, every defect type, one command (train on the few-shot third, generate, evaluate; 3 seeds):

    OMP_NUM_THREADS=1 python bench/quality.py --all --recipe ours --dataset-seed 0 --work quality_work \
        --json bench/results_quality_all.json --markdown quality_table.md

* ``--data``: a MiniDefect (or any MVTec-layout) root; default ``<work>/minidefect-seed<N>`` with N =
  ``--dataset-seed``; if the folder does not exist, MiniDefect is written there (that seed, 64 px) first.
* For each target, unless ``--generated`` or ``--reference-only`` is given: DualAnoDiff weights are trained on the
  few-shot split (the first third of ``<category>/test/<defect>``, rounded down) from the shipped MiniDefect base
  model with the demo's settings under ``--recipe`` (:mod:`dualanodiff_core.method.recipes`), pairs are generated, and
  everything is measured. Weights and generated sets stay in ``<work>/<recipe>-seed<N>/`` and are reused by a rerun;
  settings other than the defaults (``--train-steps``, ``--lr``, ``--mask-visible``, ``--mask-min-contrast``, ...)
  get their own weights file and/or generated folder there, named after them.
* ``--generated``: instead, the ``--out`` folder of ``dualanodiff generate`` for the same category/defect.
  ``--reference-only``: only the real and synthetic reference rows.
* ``--base-model DIR``: train and generate from another MiniDefect-sized base model (a diffusers folder, e.g. one
  written by ``scripts/pretrain_minidefect.py`` with other architecture options) instead of the shipped one; its
  weights and generated sets go to ``<work>/<recipe>-seed<N>-base-<folder name>-<hash of its path>/``, so they never
  mix with the shipped model's, and the JSON records the folder and its ``pretrain.json`` file hashes.
* ``--target CATEGORY/DEFECT`` (repeatable); ``--all`` = the six MiniDefect defect types.
* The real / CutPaste / Perlin rows do not depend on the generated data: their scores are cached per (data,
  source, segmentation seed, settings) in ``--cache-dir`` (default ``<work>/cache``), so a second recipe on the same
  data costs only the generated rows.

Prints one report per target, a summary table (``--markdown`` writes it to a file), and writes all results as JSON
(after every target, so a partial run keeps what it measured). See dualanodiff_core/evaluation/benchmark.py for
what each number means.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dualanodiff_core.evaluation import benchmark as ev  # noqa: E402
from dualanodiff_core.fileio import write_json_atomic, write_text_atomic  # noqa: E402
from dualanodiff_core.minidefect import procedural as md  # noqa: E402


def base_suffix(base: Path | None) -> str:
    """The run folder's suffix for a base model other than the shipped one (``""`` for the shipped one)."""
    if base is None:
        return ""
    h = hashlib.sha256(str(base.resolve()).encode()).hexdigest()[:8]
    return f"-base-{re.sub(r'[^A-Za-z0-9_.-]', '_', base.resolve().name)}-{h}"


def base_record(base: Path | None) -> dict:
    """What the JSON says of the base model: its folder and, when it has one, its ``pretrain.json`` file hashes."""
    folder = base if base is not None else md.base_model_dir()
    info = {"folder": str(Path(folder).resolve()), "shipped": base is None}
    pre = Path(folder) / "pretrain.json"
    if pre.is_file():
        rec = json.loads(pre.read_text(encoding="utf-8"))
        info.update(sha256=rec.get("sha256"), config=rec.get("config"))
    return info


def main(argv=None) -> int:
    from dualanodiff_core.method.recipes import DEFAULT_RECIPE, RECIPES
    from dualanodiff_core.minidefect.bench import RunSettings, train_and_generate
    from dualanodiff_core.training.trainer import TrainConfig

    d = RunSettings()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--data", help="MiniDefect / MVTec-layout root (written if missing; default <work>/minidefect-seed<N>)"
    )
    p.add_argument(
        "--dataset-seed", type=int, default=0, help="MiniDefect seed used when --data is written (default 0)"
    )
    p.add_argument(
        "--target", action="append", default=[], metavar="CATEGORY/DEFECT", help="what to evaluate (repeatable)"
    )
    p.add_argument("--all", action="store_true", help="every MiniDefect category/defect")
    p.add_argument("--generated", help="output folder of `dualanodiff generate` (MVTec layout + fg/ + manifest)")
    p.add_argument("--reference-only", action="store_true", help="no generated data: real and synthetic rows only")
    p.add_argument(
        "--work", default="quality_work", help="weights, generated sets and the cache (default quality_work)"
    )
    p.add_argument("--recipe", choices=RECIPES, default=DEFAULT_RECIPE, help="training/sampling recipe")
    p.add_argument("--train-steps", type=int, default=d.train_steps, help="DualAnoDiff training steps per type")
    p.add_argument("--samples", type=int, default=d.samples, help="generated pairs per type")
    p.add_argument("--sampling-steps", type=int, default=d.sampling_steps, help="denoising steps per sample")
    p.add_argument("--cfg", type=float, help="guidance scale (default: the recipe's; ours 1.0, reference 2.5)")
    p.add_argument("--lr", type=float, default=d.lr, help="DualAnoDiff learning rate")
    p.add_argument("--sampler", default=d.sampler, choices=("pndm", "ddim", "dpmpp"), help="sampler of the pairs")
    p.add_argument(
        "--mask-visible",
        type=float,
        default=d.mask_visible,
        metavar="STD",
        help="cut each mask down to what the global image shows: pixels near it that differ from a ring around it "
        "by more than STD ring standard deviations (0 = off, the anomaly branch's mask as drawn)",
    )
    p.add_argument(
        "--mask-min-contrast",
        type=float,
        default=d.mask_min_contrast,
        metavar="D",
        help="the masks' contrast floor: the least distance from mid-gray (0-1) an anomaly-branch pixel needs to be "
        "marked (default: the MiniDefect mask default)",
    )
    p.add_argument(
        "--noise-share",
        type=float,
        default=d.noise_share,
        metavar="RHO",
        help="correlation of the anomaly branch's starting noise with the global branch's (0 = independent; "
        "default: the recipe's)",
    )
    p.add_argument(
        "--train-noise-share",
        type=float,
        default=d.train_noise_share,
        metavar="RHO",
        help="the same in training: the anomaly rows' noise correlated RHO with the global rows' (0 = independent)",
    )
    p.add_argument(
        "--anomaly-contrast",
        type=float,
        default=d.anomaly_contrast,
        metavar="C",
        help="training: amplify the anomaly branch's target about mid-gray until its median defect pixel differs from "
        "mid-gray by C (0-0.5; 0 = off, the reference; default: the recipe's, 0.4 for shared-noise)",
    )
    p.add_argument(
        "--zero-mean-noise",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="zero-mean anomaly starting noise (default: the recipe's)",
    )
    p.add_argument(
        "--accept-target",
        type=int,
        default=d.accept_target,
        metavar="N",
        help="generate more pairs (up to 4 x --samples) until N are accepted (0 = exactly --samples)",
    )
    p.add_argument("--json", default="quality.json", help="where to write the results")
    p.add_argument("--markdown", help="also write the summary table (Markdown) here")
    p.add_argument(
        "--sources",
        nargs="+",
        default=list(ev.SOURCES),
        choices=list(ev.SOURCES),
        help="training sources for the usefulness test",
    )
    p.add_argument(
        "--base-model",
        metavar="DIR",
        help="base model folder to train and generate from (default: the shipped MiniDefect model)",
    )
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="segmentation training seeds")
    p.add_argument("--steps", type=int, default=ev.SegConfig.steps, help="segmentation training steps")
    p.add_argument("--width", type=int, default=ev.SegConfig.width, help="segmentation network width")
    p.add_argument("--n-synthetic", type=int, default=500, help="CutPaste / Perlin pairs per run")
    p.add_argument("--train-count", type=int, help="few-shot images (default: the first third, rounded down)")
    p.add_argument(
        "--cache-dir",
        help="keep the real/CutPaste/Perlin rows' scores here and reuse them (default <work>/cache; 'none' = off)",
    )
    p.add_argument("--quick", action="store_true", help="1 seed, 200 steps (a first look)")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")), help="torch CPU threads")
    a = p.parse_args(argv)
    base = None
    if a.base_model:
        from dualanodiff_core.errors import DualAnoDiffError
        from dualanodiff_core.sd15.loading import check_base_model

        base = Path(a.base_model)
        try:
            check_base_model(base)
        except DualAnoDiffError as e:
            p.error(f"--base-model: {e}")
        if a.generated or a.reference_only:
            p.error("--base-model is for end-to-end runs (it trains and generates); drop --generated/--reference-only")

    if a.mask_min_contrast is not None:
        try:  # MaskOptions owns the valid range
            md.mask_options(min_contrast=a.mask_min_contrast)
        except ValueError as e:
            p.error(f"--mask-min-contrast {a.mask_min_contrast}: {e}")
    if a.anomaly_contrast is not None:
        try:  # TrainConfig owns the valid range
            TrainConfig(anomaly_contrast=a.anomaly_contrast).validate()
        except ValueError as e:
            p.error(f"--anomaly-contrast {a.anomaly_contrast}: {e}")

    import torch

    torch.set_num_threads(max(1, a.threads))
    work = Path(a.work)
    data = Path(a.data) if a.data else work / f"minidefect-seed{a.dataset_seed}"
    # every check before anything is written
    known = [f"{c}/{d}" for c, ds in md.PRODUCTS.items() for d in ds]  # MiniDefect's defect types
    targets = [t.split("/", 1) for t in a.target + (known if a.all else [])]
    if not targets or any(len(t) != 2 for t in targets):
        p.error("give --target CATEGORY/DEFECT (repeatable) or --all")
    if a.data is None:  # MiniDefect: its defect types are known
        unknown = [f"{c}/{d}" for c, d in targets if f"{c}/{d}" not in known]
        if unknown:
            p.error(f"--target {', '.join(unknown)}: MiniDefect has {', '.join(known)}")
    if a.generated and a.reference_only:
        p.error("--generated and --reference-only exclude each other")
    if not data.exists():
        print(f"writing MiniDefect (seed {a.dataset_seed}) to {data} ...", file=sys.stderr)
        md.write_minidefect(data, md.MiniDefectSpec(seed=a.dataset_seed))
    seeds, steps = (a.seeds[:1], 200) if a.quick else (a.seeds, a.steps)
    cache = None if a.cache_dir == "none" else (a.cache_dir or str(work / "cache"))
    cfg = ev.BenchConfig(
        sources=tuple(a.sources),
        seeds=tuple(seeds),
        seg=ev.SegConfig(steps=steps, width=a.width),
        n_synthetic=a.n_synthetic,
        train_count=a.train_count,
        cache_dir=cache,
    )
    run = RunSettings(
        recipe=a.recipe,
        train_steps=a.train_steps,
        lr=a.lr,
        samples=a.samples,
        sampler=a.sampler,
        sampling_steps=a.sampling_steps,
        cfg=a.cfg,
        mask_visible=a.mask_visible,
        mask_min_contrast=a.mask_min_contrast,
        accept_target=a.accept_target,
        noise_share=a.noise_share,
        train_noise_share=a.train_noise_share,
        anomaly_contrast=a.anomaly_contrast,
        zero_mean_noise=a.zero_mean_noise,
    )
    end_to_end = not a.generated and not a.reference_only
    run_dir = work / f"{a.recipe}-seed{a.dataset_seed}{base_suffix(base)}"
    results, rows = [], []
    t0 = time.time()
    for category, defect in targets:
        gen = a.generated
        info = None
        if end_to_end:
            info = train_and_generate(data, category, defect, run_dir, run, model=base)
            gen = info["generated"]
        elif gen is not None and not (Path(gen) / category / "test" / defect).is_dir():
            print(f"note: {gen} holds no {category}/{defect}; reference rows only", file=sys.stderr)
            gen = None
        if gen is not None and end_to_end and not info.get("accepted"):
            print(f"note: every generated {category}/{defect} pair was rejected; reference rows only", file=sys.stderr)
            gen = None
        r = ev.benchmark(data, category, defect, gen, cfg)
        if info is not None:
            r["run"] = info
        print(ev.format_report(r))
        print()
        results.append(r)
        rows.append(ev.summary_row(r))
        write_json_atomic(
            a.json,
            {
                "command": " ".join([Path(sys.argv[0]).name] + (argv or sys.argv[1:])),
                "dataset_seed": a.dataset_seed if not a.data else None,
                "recipe": a.recipe if end_to_end else None,
                "base_model": base_record(base) if end_to_end else None,
                "run_settings": run.to_dict() if end_to_end else None,
                "summary": rows,
                "results": results,
                "seconds": round(time.time() - t0, 1),
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
            },
        )
    table = ev.format_summary(rows)
    print(table)
    if a.markdown:
        write_text_atomic(a.markdown, table + "\n")
    print(f"wrote {a.json} ({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
