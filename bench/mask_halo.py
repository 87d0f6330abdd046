"""Mask halo: generated vs real mask area, with the earlier and the current MiniDefect mask defaults, side by side.

    python bench/mask_halo.py --data quality_work/minidefect-seed0 \\
        --generated quality_work/ours-seed0/generated/fabric_hole --target fabric/hole

Re-extracts the mask of every generated sample (accepted or not) from its anomaly-branch image (``fg/``) with
each option set and prints, per set: the mean mask area of the generated samples divided by the mean true mask
area of the real defects of the same type (1.0 = the same size; a halo makes it larger), how many masks are empty,
and how many of the generated global images pass the alignment check with that mask. The area ratio is split into
its two factors: how many separate defects (8-connected components) a non-empty mask has, and the mean area of one,
each against the real masks' (a halo makes each defect larger; a generator that draws several defects per image
where the real ones have one makes the masks larger without any halo), and how many of those components the global
image shows on its own (the alignment check run on each component alone).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from dualanodiff_core.dataset.acceptance import FilterOptions, alignment_contrast  # noqa: E402
from dualanodiff_core.dataset.masks import extract_mask, label_components  # noqa: E402
from dualanodiff_core.evaluation import benchmark as ev  # noqa: E402
from dualanodiff_core.minidefect import procedural as md  # noqa: E402

OPTION_SETS = {
    "first (floor 0.05, hysteresis 0.5)": md.mask_options(min_contrast=0.05, hysteresis=0.5),
    "base model v1 (floor 0.08, no hyst.)": md.mask_options(min_contrast=0.08),
    "now (floor 0.05, no hysteresis)": md.mask_options(),
}


def shown_per_image(pairs, min_alignment: float) -> float:
    """Mean number of mask components per image that the global image shows on their own: the acceptance filter's
    alignment contrast of the component alone is at least ``min_alignment``. Tells extra defects the image shows
    from mask fragments over plain texture."""
    counts = []
    for image, mask in pairs:
        labels, n = label_components(np.asarray(mask, dtype=bool), 8)
        counts.append(sum(alignment_contrast(image, labels == k) >= min_alignment for k in range(1, n + 1)))
    return float(np.mean(counts)) if counts else 0.0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="MiniDefect root")
    p.add_argument("--generated", required=True, help="a `dualanodiff generate` folder (with fg/ and manifest)")
    p.add_argument("--target", required=True, metavar="CATEGORY/DEFECT")
    p.add_argument("--json", help="also write the numbers here")
    a = p.parse_args(argv)
    category, defect = a.target.split("/", 1)
    gen = Path(a.generated)
    real = ev.load_pairs(Path(a.data) / category / "test" / defect, Path(a.data) / category / "ground_truth" / defect)
    real_area = float(real.masks.mean())
    real_count, real_defect = ev.defect_counts([m > 0 for m in real.masks])
    recs = [json.loads(x) for x in (gen / "manifest.jsonl").read_text().splitlines() if x.strip()]
    recs = [r for r in recs if r.get("category") == category and r.get("defect") == defect]
    files = [r["files"] for r in recs]  # accepted: image/fg/mask; rejected (kept): rejected_image/...
    fgs = [ev.read_rgb(gen / (f.get("fg") or f["rejected_fg"])) for f in files]
    imgs = [ev.read_rgb(gen / (f.get("image") or f["rejected_image"])) for f in files]
    min_align = FilterOptions().min_alignment
    out = {
        "target": a.target,
        "samples": len(recs),
        "real_mask_area": real_area,
        "real_defects_per_image": real_count,
        "real_defect_area": real_defect,
        "sets": {},
    }
    print(
        f"{a.target}: {len(recs)} generated samples; real mean mask area {real_area:.4f}, "
        f"{real_count:.2f} defects per image of {real_defect:.4f} each"
    )
    print(
        f"  {'mask options':<38}{'area gen/real':>14}{'empty':>7}{'aligned':>9}{'defects/img':>13}{'shown/img':>11}"
        f"{'area/defect':>13}"
    )
    for name, opts in OPTION_SETS.items():
        masks = [extract_mask(f, opts).bool_mask() for f in fgs]
        area = float(np.mean([m.mean() for m in masks]))
        empty = sum(1 for m in masks if not m.any())
        aligned = sum(1 for im, m in zip(imgs, masks) if m.any() and alignment_contrast(im, m) >= min_align)
        count, defect = ev.defect_counts([m for m in masks if m.any()])
        shown = shown_per_image([(im, m) for im, m in zip(imgs, masks) if m.any()], min_align)
        out["sets"][name] = {
            "area_ratio": area / real_area,
            "empty": empty,
            "aligned": aligned,
            "defects_per_image": count,
            "shown_defects_per_image": shown,
            "defect_area_ratio": defect / real_defect if real_defect else None,
        }
        ratio = f"{defect / real_defect:.2f}x" if real_defect else "-"
        print(f"  {name:<38}{area / real_area:>14.2f}{empty:>7}{aligned:>9}{count:>13.2f}{shown:>11.2f}{ratio:>13}")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
