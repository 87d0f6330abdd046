"""``dualanodiff train-all``: one training job (and optionally one generation job) per defect type of one or more
MVTec-layout categories, spread over the processes of a torchrun / accelerate launch run; resumable."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import traceback
from pathlib import Path

from ..fileio import write_json_atomic, write_text_atomic

DESCRIPTION = """\
Train DualAnoDiff weights for every defect type of one or more MVTec-layout category folders (CATEGORY/test/DEFECT +
CATEGORY/ground_truth/DEFECT), one job per defect type, and optionally generate a dataset with each.

One process runs the jobs one after another. Under torchrun or accelerate launch each process takes whole jobs
(job k goes to process k mod N) and runs them on its own device -- 73 MVTec defect types on 8 GPUs are about 9 jobs a
GPU. Running the same command again resumes: finished jobs are skipped, an interrupted training continues from its
last checkpoint, failed jobs are tried again. A summary table (OUT/summary.md, OUT/summary.json) lists what
finished, what failed and why.
"""

EPILOG = """\
example (8 GPUs, every MVTec category):
  torchrun --nproc-per-node 8 -m dualanodiff_core.cli train-all mvtec/ --model models/stable-diffusion-v1-5 \\
      --out runs/mvtec --generate 500

what lands in OUT, per job (CATEGORY/DEFECT):
  CATEGORY/DEFECT/weights.safetensors   the trained weights
  CATEGORY/DEFECT/train/                checkpoints, loss.csv, loss.png
  CATEGORY/DEFECT/generated/            with --generate: the dataset (MVTec layout + manifest.jsonl)
  CATEGORY/DEFECT/job.json              state of the job: done / failed (with the reason)
  summary.md, summary.json              all jobs
"""

DONE, FAILED, INTERRUPTED = "done", "failed", "interrupted"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .train import add_arguments as add_train_arguments

    g = p.add_argument_group("which defect types")
    g.add_argument(
        "data",
        nargs="+",
        metavar="DATA",
        help="MVTec-layout category folders (with test/ and ground_truth/), or folders holding such categories "
        "(e.g. the MVTec AD root)",
    )
    g.add_argument(
        "--categories", metavar="A,B", help="only these categories (comma-separated folder names; default: all found)"
    )
    g.add_argument("--defects", metavar="A,B", help="only these defect types (comma-separated; default: all found)")
    g.add_argument("--out", required=True, metavar="DIR", help="output folder (created; resumed if it exists)")
    add_train_arguments(p, one_defect=False)
    for a in p._actions:  # in this command each job is one process's own run
        if a.dest == "batch_size":
            a.help = "defect images per step (each job runs in one process)"
    g = p.add_argument_group("generation after training (optional)")
    g.add_argument(
        "--generate",
        type=int,
        default=0,
        metavar="N",
        help="generate N image/mask pairs with each job's weights into CATEGORY/DEFECT/generated (0 = train only)",
    )
    g.add_argument(
        "--generate-steps",
        type=int,
        default=100,
        metavar="S",
        help="denoising steps (PNDM, as the reference; `dualanodiff generate` offers the other samplers)",
    )
    g.add_argument("--generate-size", type=int, default=None, metavar="PX", help="image size (default: --resolution)")
    g.add_argument("--generate-batch-size", type=int, default=1, metavar="B", help="pairs sampled together")
    p.description = DESCRIPTION
    p.epilog = EPILOG


def find_jobs(data: list[str], categories: str | None, defects: str | None) -> list[tuple[str, str, Path]]:
    """(category, defect, category folder) for every defect type found, sorted."""
    from ..training.data import mvtec_defects

    want_c = {c.strip() for c in categories.split(",") if c.strip()} if categories else None
    want_d = {d.strip() for d in defects.split(",") if d.strip()} if defects else None
    folders: list[Path] = []
    for d in data:
        root = Path(d)
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: no such folder")
        if (root / "test").is_dir() and (root / "ground_truth").is_dir():
            folders.append(root)
            continue
        found = sorted(c for c in root.iterdir() if (c / "test").is_dir() and (c / "ground_truth").is_dir())
        if not found:
            raise ValueError(
                f"{root}: neither an MVTec-layout category (test/ and ground_truth/ inside) nor a folder of such "
                "categories"
            )
        folders += found
    jobs = []
    seen = set()
    for folder in folders:
        cat = folder.name
        if want_c is not None and cat not in want_c:
            continue
        if cat in seen:
            raise ValueError(f"two category folders are named {cat!r} ({folder}); give only one of them")
        seen.add(cat)
        for defect in mvtec_defects(folder):
            if want_d is None or defect in want_d:
                jobs.append((cat, defect, folder))
    if not jobs:
        raise ValueError("no defect types to train (check DATA, --categories and --defects)")
    return sorted(jobs)


def _job_state(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _settings(args) -> dict:
    from .train import config_from_args

    return {
        "config": config_from_args(args).to_dict(),
        "model": str(args.model),
        "generate": args.generate,
        "generate_steps": args.generate_steps,
        "generate_size": args.generate_size or args.resolution,
    }


def run_job(args, category: str, defect: str, folder: Path, out: Path, device: str, echo) -> dict:
    """Train (and generate) one defect type; returns its state (also written to job.json)."""
    from ..training.data import find_defect_set
    from ..training.trainer import latest_checkpoint
    from .train import config_from_args

    job_dir = out / category / defect
    job_dir.mkdir(parents=True, exist_ok=True)
    weights = job_dir / "weights.safetensors"
    work = job_dir / "train"
    state = {"category": category, "defect": defect, "data": str(folder), "settings": _settings(args)}
    config = config_from_args(args)
    from ..sd15.training import train_from_folder

    if not weights.is_file():
        resume = True if latest_checkpoint(work) is not None else None
        echo(f"{category}/{defect}: training on {device}" + (" (resuming)" if resume else ""))
        result = train_from_folder(
            find_defect_set(folder, defect),
            args.model,
            weights,
            config,
            work_dir=work,
            resume=resume,
            device=device,
            model_config=args.model_config,
            data_parallel=False,  # a whole job per process
        )
        if not result.completed:
            return dict(state, status=INTERRUPTED, reason=f"stopped at step {result.step}; rerun to continue")
        state["steps"] = result.step
        state["final_loss"] = result.history[-1]["loss"] if result.history else None
    state["weights"] = str(weights)
    if args.generate:
        from ..dataset.generate import REFERENCE_SAMPLER, SamplingOptions, generate_dataset
        from ..sd15.pipeline import DualAnoDiffPipeline

        size = args.generate_size or args.resolution
        echo(f"{category}/{defect}: generating {args.generate} pairs")
        summary = generate_dataset(
            lambda: DualAnoDiffPipeline.from_pretrained(args.model, weights, device=device),
            job_dir / "generated",
            args.generate,
            category=category,
            defect=defect,
            seed=args.seed,
            batch_size=args.generate_batch_size,
            # PNDM as before the default sampler changed: a rerun must resume jobs with the settings they began with
            sampling=SamplingOptions(sampler=REFERENCE_SAMPLER, steps=args.generate_steps, height=size, width=size),
            weights_path=weights,
            base_model=str(args.model),
            progress=False,
            log=echo,
            shard=False,  # a whole job per process
        )
        state.update(generated=str(job_dir / "generated"), accepted=summary.accepted, rejected=summary.rejected)
    return dict(state, status=DONE, reason="")


def _table(states: list[dict]) -> str:
    lines = [
        "| category | defect | status | steps | final loss | accepted/rejected | reason |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in states:
        loss = s.get("final_loss")
        gen = f"{s['accepted']}/{s['rejected']}" if "accepted" in s else ""
        reason = str(s.get("reason", "")).replace("|", "/").replace("\n", " ")
        lines.append(
            f"| {s['category']} | {s['defect']} | {s.get('status', 'not run')} | {s.get('steps', '')} | "
            f"{'' if loss is None else f'{loss:.4f}'} | {gen} | {reason} |"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from .. import distributed
    from .train import config_from_args, pick_device

    config_from_args(args)  # bad settings: one message before any job starts
    if args.generate < 0:
        raise ValueError("--generate: give a number of pairs >= 0")
    jobs = find_jobs(args.data, args.categories, args.defects)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rank, world = distributed.rank(), distributed.world_size()
    device = pick_device(args.device)
    main = distributed.is_main()

    def echo(msg: str) -> None:
        prefix = f"[process {rank}] " if world > 1 else ""
        print(prefix + msg, file=sys.stderr, flush=True)

    if main:
        echo(f"{len(jobs)} defect type(s) over {world} process(es): " + ", ".join(f"{c}/{d}" for c, d, _ in jobs))
    settings = _settings(args)
    interrupted = False
    for k, (category, defect, folder) in enumerate(jobs):
        if k % world != rank:
            continue
        job_file = out / category / defect / "job.json"
        old = _job_state(job_file)
        if old.get("status") == DONE and old.get("settings") == settings and Path(old.get("weights", "")).is_file():
            echo(f"{category}/{defect}: done earlier, skipped")
            continue
        if old.get("settings") not in (None, settings):
            state = {
                "category": category,
                "defect": defect,
                "settings": old.get("settings"),
                "status": FAILED,
                "reason": f"{job_file.parent} was made with other settings; use another --out or delete that folder",
            }
            echo(f"{category}/{defect}: failed: {state['reason']}")
            continue  # the job file keeps the earlier run's settings
        try:
            state = run_job(args, category, defect, folder, out, device, echo)
        except KeyboardInterrupt:
            state = {"category": category, "defect": defect, "settings": settings, "status": INTERRUPTED}
            state["reason"] = "interrupted; rerun to continue"
            interrupted = True
        except Exception as e:  # noqa: BLE001 - a failed job is reported, the others go on
            reason = str(e).strip() or type(e).__name__
            if not isinstance(e, (ValueError, OSError, RuntimeError)):
                reason = f"{type(e).__name__}: {reason}"
            state = {"category": category, "defect": defect, "settings": settings, "status": FAILED, "reason": reason}
            with contextlib.suppress(OSError):
                write_text_atomic(out / category / defect / "error.txt", traceback.format_exc())
        write_json_atomic(job_file, state)
        echo(f"{category}/{defect}: {state['status']}" + (f": {state['reason']}" if state.get("reason") else ""))
        if interrupted:
            break
    if distributed.is_distributed():
        distributed.barrier()
    if not main:
        return 130 if interrupted else 0
    states = []
    for category, defect, _ in jobs:
        s = _job_state(out / category / defect / "job.json")
        states.append(dict(s, category=category, defect=defect) if s else {"category": category, "defect": defect})
    table = _table(states)
    write_text_atomic(out / "summary.md", "# dualanodiff train-all\n\n" + table + "\n")
    write_json_atomic(out / "summary.json", [{k: v for k, v in s.items() if k != "settings"} for s in states])
    print(table)
    counts = {st: sum(1 for s in states if s.get("status") == st) for st in (DONE, FAILED, INTERRUPTED)}
    left = len(states) - sum(counts.values())
    echo(
        f"{counts[DONE]} done, {counts[FAILED]} failed, {counts[INTERRUPTED]} interrupted, {left} not run "
        f"(of {len(states)}); summary: {out / 'summary.md'}"
        + ("; run the same command again to finish" if counts[DONE] < len(states) else "")
    )
    if interrupted:
        return 130
    return 0 if counts[DONE] == len(states) else 1
