"""The acceptance filter's alignment check on real MiniDefect defects: does its threshold keep real defects and
reject masks that the image does not show?

    python bench/alignment_check.py --data quality_work/minidefect-seed0

For every defect type: the alignment contrast (dualanodiff_core.quality.alignment_contrast) of each real defect
image with its true mask ("real"), and of two kinds of misaligned pairs: the same masks on normal test images
("on normal") and moved by 20 px on their own image ("moved"). Prints side by side the lowest / 10th percentile
of the real scores, the 90th percentile / highest of the misaligned ones, how many of each the default threshold
keeps, and the AUROC of the score separating real from misaligned.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from dualanodiff_core.dataset.acceptance import FilterOptions, alignment_contrast  # noqa: E402
from dualanodiff_core.evaluation import benchmark as ev  # noqa: E402
from dualanodiff_core.evaluation import metrics  # noqa: E402
from dualanodiff_core.minidefect import procedural as md  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="MiniDefect root (written with --seed if missing)")
    p.add_argument("--seed", type=int, default=0, help="MiniDefect seed when --data is written")
    p.add_argument("--threshold", type=float, default=FilterOptions().min_alignment)
    p.add_argument("--json", help="also write the numbers here")
    a = p.parse_args(argv)
    data = Path(a.data)
    if not data.exists():
        md.write_minidefect(data, md.MiniDefectSpec(seed=a.seed))
    th = a.threshold
    print(f"alignment contrast, threshold {th}")
    print(
        f"  {'type':<16}{'real min':>9}{'real p10':>9}{'mis p90':>9}{'mis max':>9}{'real kept':>11}"
        f"{'mis kept':>10}{'AUROC':>7}"
    )
    out = {"threshold": th, "types": {}}
    for cat, defects in md.PRODUCTS.items():
        normals = ev.load_images(data / cat / "test" / "good")
        for d in defects:
            pairs = ev.load_pairs(data / cat / "test" / d, data / cat / "ground_truth" / d)
            real = np.array([alignment_contrast(i, m) for i, m in zip(pairs.images, pairs.masks)])
            mis = [alignment_contrast(normals[k % len(normals)], m) for k, m in enumerate(pairs.masks)]
            mis += [alignment_contrast(i, np.roll(m, (20, 20), (0, 1))) for i, m in zip(pairs.images, pairs.masks)]
            mis = np.array(mis)
            auc = metrics.roc_auc(np.r_[real, mis], np.r_[np.ones(len(real), bool), np.zeros(len(mis), bool)])
            row = {
                "real_min": float(real.min()),
                "real_p10": float(np.quantile(real, 0.1)),
                "mis_p90": float(np.quantile(mis, 0.9)),
                "mis_max": float(mis.max()),
                "real_kept": f"{int((real >= th).sum())}/{len(real)}",
                "mis_kept": f"{int((mis >= th).sum())}/{len(mis)}",
                "auroc": float(auc),
            }
            out["types"][f"{cat}/{d}"] = row
            print(
                f"  {cat + '/' + d:<16}{row['real_min']:>9.2f}{row['real_p10']:>9.2f}{row['mis_p90']:>9.2f}"
                f"{row['mis_max']:>9.2f}{row['real_kept']:>11}{row['mis_kept']:>10}{auc:>7.3f}"
            )
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
