"""Quality benchmark on held-out MiniDefect defects: mask alignment, diversity, usefulness to a detector.

    OMP_NUM_THREADS=1 python bench/quality.py --data minidefect --target fabric/hole \
        --generated gen_fabric_hole --json quality.json

* ``--data``: a MiniDefect (or any MVTec-layout) root; if the folder does not exist, MiniDefect is written there
  (seed 0, 64 px) first.
* ``--generated``: the ``--out`` folder of ``dualanodiff generate`` for the same category/defect (weights trained on
  the few-shot split: the first third of ``<category>/test/<defect>``, rounded down). Without it, only the real and
  synthetic reference rows are measured.
* ``--target CATEGORY/DEFECT`` (repeatable); ``--all`` = every MiniDefect defect (reference rows only, unless the
  generated folder holds them all).

Prints one table per target and writes all results as JSON. See dualanodiff_core/evaluation.py for what each number
means. Timing: about 0.3 s per segmentation step on one CPU core at 64 px; the default (3 seeds x 5 sources x 600
steps) takes roughly 45 minutes per target, ``--quick`` (1 seed, 200 steps) about 5.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dualanodiff_core.evaluation import benchmark as ev  # noqa: E402
from dualanodiff_core.fileio import write_json_atomic  # noqa: E402
from dualanodiff_core.minidefect import procedural as md  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="MiniDefect / MVTec-layout root (written if missing)")
    p.add_argument(
        "--target", action="append", default=[], metavar="CATEGORY/DEFECT", help="what to evaluate (repeatable)"
    )
    p.add_argument("--all", action="store_true", help="every MiniDefect category/defect")
    p.add_argument("--generated", help="output folder of `dualanodiff generate` (MVTec layout + fg/ + manifest)")
    p.add_argument("--json", default="quality.json", help="where to write the results")
    p.add_argument(
        "--sources",
        nargs="+",
        default=list(ev.SOURCES),
        choices=list(ev.SOURCES),
        help="training sources for the usefulness test",
    )
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="segmentation training seeds")
    p.add_argument("--steps", type=int, default=ev.SegConfig.steps, help="segmentation training steps")
    p.add_argument("--width", type=int, default=ev.SegConfig.width, help="segmentation network width")
    p.add_argument("--n-synthetic", type=int, default=500, help="CutPaste / Perlin pairs per run")
    p.add_argument("--train-count", type=int, help="few-shot images (default: the first third, rounded down)")
    p.add_argument("--quick", action="store_true", help="1 seed, 200 steps (a first look)")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")), help="torch CPU threads")
    a = p.parse_args(argv)

    import torch

    torch.set_num_threads(max(1, a.threads))
    data = Path(a.data)
    if not data.exists():
        print(f"writing MiniDefect to {data} ...", file=sys.stderr)
        md.write_minidefect(data)
    targets = [t.split("/", 1) for t in a.target]
    if a.all:
        targets += [[c, d] for c, ds in md.PRODUCTS.items() for d in ds]
    if not targets or any(len(t) != 2 for t in targets):
        p.error("give --target CATEGORY/DEFECT (repeatable) or --all")
    seeds, steps = (a.seeds[:1], 200) if a.quick else (a.seeds, a.steps)
    cfg = ev.BenchConfig(
        sources=tuple(a.sources),
        seeds=tuple(seeds),
        seg=ev.SegConfig(steps=steps, width=a.width),
        n_synthetic=a.n_synthetic,
        train_count=a.train_count,
    )
    results = []
    t0 = time.time()
    for category, defect in targets:
        gen = a.generated
        if gen is not None and not (Path(gen) / category / "test" / defect).is_dir():
            print(f"note: {gen} holds no {category}/{defect}; reference rows only", file=sys.stderr)
            gen = None
        r = ev.benchmark(data, category, defect, gen, cfg)
        print(ev.format_report(r))
        print()
        results.append(r)
    write_json_atomic(
        a.json,
        {
            "command": " ".join([Path(sys.argv[0]).name] + (argv or sys.argv[1:])),
            "results": results,
            "seconds": round(time.time() - t0, 1),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
    )
    print(f"wrote {a.json} ({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
