"""Cost at equal quality: usefulness and alignment of the generated pairs against sampler and steps, side by side.

For each sampler setting (``SAMPLER:STEPS``), on the same trained weights, data and segmentation settings, runs
``bench/quality.py`` end to end (generation timed in this process, one setting after the other) and prints one table:
seconds to generate the pairs, generated pixel AP (mean ± std over the segmentation seeds), real+generated pixel AP,
detector hit gen/real, mask area gen/real and accepted pairs, per target::

    OMP_NUM_THREADS=1 python bench/sampler_cost.py --dataset-seed 0 --target fabric/hole --target metal/scratch \
        --settings pndm:100 ddim:50 ddim:25 dpmpp:30 dpmpp:20 --work <work> --json bench/results_cost/seed0.json

The weights are trained once (the first setting trains them, the others reuse them from ``--work``; the recipe's
training does not depend on the sampler). Each setting's full ``bench/quality.py`` JSON is kept next to
``--json`` (``<stem>_<sampler>-<steps>.json``). Generation seconds are wall-clock on whatever machine runs this:
compare them within one run, not across machines.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dualanodiff_core.fileio import write_json_atomic, write_text_atomic  # noqa: E402

HERE = Path(__file__).resolve().parent


def parse_setting(text: str) -> tuple[str, int]:
    name, _, steps = text.partition(":")
    if name not in ("pndm", "ddim", "dpmpp") or not steps.isdigit() or int(steps) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give SAMPLER:STEPS with SAMPLER pndm, ddim or dpmpp, e.g. ddim:50")
    return name, int(steps)


def rows_of(setting: tuple[str, int], quality: dict) -> list[dict]:
    """One row per target of one setting's ``bench/quality.py`` JSON (its ``summary`` rows and run info)."""
    out = []
    for result, summary in zip(quality["results"], quality["summary"]):
        run = result.get("run") or {}
        ap, std = summary["pixel_ap"], summary["pixel_ap_std"]
        out.append(
            {
                "sampler": setting[0],
                "steps": setting[1],
                "target": summary["type"],
                "generate_seconds": run.get("generate_seconds"),
                "generated": ap.get("generated"),
                "generated_std": std.get("generated"),
                "real+generated": ap.get("real+generated"),
                "real+generated_std": std.get("real+generated"),
                "detector_hit_ratio": summary.get("hit_ratio"),
                "mask_area_ratio": summary.get("mask_area_ratio"),
                "accepted": summary.get("accepted"),
                "samples": summary.get("accepted", 0) + summary.get("rejected", 0),
            }
        )
    return out


def format_table(rows: list[dict]) -> str:
    def num(v, d=3):
        return "–" if v is None else f"{v:.{d}f}"

    lines = [
        "| target | sampler, steps | generate s | generated | real+generated | detector hit gen/real "
        "| mask area gen/real | accepted |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: r["target"]):
        acc = "–" if r["accepted"] is None else f"{r['accepted']}/{r['samples']}"
        lines.append(
            f"| {r['target']} | {r['sampler']} {r['steps']} | {num(r['generate_seconds'], 0)} "
            f"| {num(r['generated'])} ± {num(r['generated_std'])} "
            f"| {num(r['real+generated'])} ± {num(r['real+generated_std'])} "
            f"| {num(r['detector_hit_ratio'], 2)} | {num(r['mask_area_ratio'], 2)} | {acc} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import json

    import quality  # bench/quality.py

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", action="append", required=True, help="CATEGORY/DEFECT (repeatable)")
    p.add_argument(
        "--settings",
        nargs="+",
        type=parse_setting,
        default=[("pndm", 100), ("ddim", 50), ("ddim", 25), ("dpmpp", 30), ("dpmpp", 20)],
        help="SAMPLER:STEPS settings to compare (default pndm:100 ddim:50 ddim:25 dpmpp:30 dpmpp:20)",
    )
    p.add_argument("--dataset-seed", type=int, default=0, help="MiniDefect dataset seed (as bench/quality.py)")
    p.add_argument("--work", default="quality_work", help="bench/quality.py's work folder (weights, sets, cache)")
    p.add_argument("--data", help="bench/quality.py --data (default: MiniDefect of --dataset-seed in --work)")
    p.add_argument("--recipe", help="bench/quality.py --recipe (default: its default)")
    p.add_argument("--train-steps", help="bench/quality.py --train-steps (default: its default, the demo's)")
    p.add_argument("--samples", help="bench/quality.py --samples: generated pairs per setting (default: its default)")
    p.add_argument("--seeds", nargs="+", default=["0", "1", "2"], help="segmentation training seeds")
    p.add_argument("--steps", default="150", help="segmentation training steps")
    p.add_argument(
        "--sources",
        nargs="+",
        default=["generated", "real+generated"],
        help="bench/quality.py --sources (the reference rows do not depend on the sampler)",
    )
    p.add_argument("--base-model", help="bench/quality.py --base-model (default: the shipped MiniDefect model)")
    p.add_argument("--mask-min-contrast", help="bench/quality.py --mask-min-contrast (default: its default)")
    p.add_argument("--threads", default=os.environ.get("OMP_NUM_THREADS", "1"), help="torch CPU threads")
    p.add_argument("--json", default="sampler_cost.json", help="where to write the combined results")
    p.add_argument("--markdown", help="also write the table (Markdown) here")
    a = p.parse_args(argv)

    out = Path(a.json)
    rows, parts = [], {}
    for sampler, steps in a.settings:
        part = out.with_name(f"{out.stem}_{sampler}-{steps}.json")
        args = ["--dataset-seed", str(a.dataset_seed), "--work", a.work, "--json", str(part)]
        args += ["--sampler", sampler, "--sampling-steps", str(steps), "--threads", str(a.threads)]
        args += ["--seeds", *a.seeds, "--steps", str(a.steps), "--sources", *a.sources]
        args += [x for t in a.target for x in ("--target", t)]
        for opt in ("data", "recipe", "train_steps", "samples", "base_model", "mask_min_contrast"):
            if getattr(a, opt) is not None:
                args += ["--" + opt.replace("_", "-"), str(getattr(a, opt))]
        quality.main(args)
        q = json.loads(part.read_text(encoding="utf-8"))
        parts[f"{sampler}:{steps}"] = part.name
        rows += rows_of((sampler, steps), q)
        table = format_table(rows)
        write_json_atomic(
            out,
            {
                "command": " ".join(["sampler_cost.py"] + (argv if argv is not None else sys.argv[1:])),
                "dataset_seed": a.dataset_seed,
                "rows": rows,
                "parts": parts,
            },
        )
    print(table)
    if a.markdown:
        write_text_atomic(a.markdown, table + "\n")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    sys.exit(main())
