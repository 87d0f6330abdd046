"""Masks refined by what the generated image shows (``MaskOptions.visible_min_deviation``), checked on real
MiniDefect defects where the answer is known, and optionally on a generated set.

    python bench/visible_mask.py --data quality_work/minidefect-seed0 [--generated DIR --target CATEGORY/DEFECT]

On real data, per defect type and threshold (ring standard deviations), the refinement is given:

* **true**: the true mask on its own image: how much of it survives (IoU of the refined mask with the true one);
* **halo**: the true mask dilated by 3 px (what a halo-drawing anomaly branch gives): does the refinement cut it
  back to the defect (IoU with the true mask; the halo itself has a lower IoU, printed as ``halo IoU``)?
* **on normal**: the true masks on normal test images (a defect the image does not show): how many pass the
  acceptance filter's alignment check, which runs on the mask as drawn (before the refinement), and keep a
  non-empty refined mask (should be near 0). ``(refined)``: the same if the check ran on the refined mask instead
  (it was chosen for differing from its surroundings, so texture passes: why the filter checks the drawn mask).

With ``--generated`` (a ``dualanodiff generate`` folder, accepted and rejected samples with their ``fg/`` images):
the anomaly-branch masks re-extracted with the MiniDefect mask options, then refined by each threshold: mean mask
area relative to the real masks (empty masks count as 0), how many are empty after refinement, and how many the
acceptance filter keeps (alignment check on the drawn mask passed, refined mask not empty).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from dualanodiff_core.dataset.acceptance import DEFAULT_MIN_ALIGNMENT, alignment_contrast  # noqa: E402
from dualanodiff_core.dataset.masks import dilate, extract_mask, refine_visible  # noqa: E402
from dualanodiff_core.evaluation import benchmark as ev  # noqa: E402
from dualanodiff_core.evaluation import metrics  # noqa: E402
from dualanodiff_core.fileio import write_json_atomic  # noqa: E402
from dualanodiff_core.minidefect import procedural as md  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="MiniDefect root (written with --seed if missing)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--thresholds", type=float, nargs="+", default=[1.0, 1.5, 2.0])
    p.add_argument("--generated", help="a `dualanodiff generate` folder")
    p.add_argument("--target", metavar="CATEGORY/DEFECT", help="with --generated: its defect type")
    p.add_argument("--json", help="also write the numbers here")
    a = p.parse_args(argv)
    data = Path(a.data)
    if not data.exists():
        md.write_minidefect(data, md.MiniDefectSpec(seed=a.seed))
    out: dict = {"thresholds": a.thresholds, "real": {}, "generated": None}
    print("real MiniDefect defects: IoU of the refined mask with the true mask (mean), and masks on normal images")
    print(f"  {'type':<15}{'thr':>5}{'true IoU':>10}{'halo IoU':>10}{'refined':>9}{'on normal':>11}{'(refined)':>11}")
    for product, defects in md.PRODUCTS.items():
        normals = ev.load_images(data / product / "test" / "good")
        for defect in defects:
            pairs = ev.load_pairs(data / product / "test" / defect, data / product / "ground_truth" / defect)
            halos = [dilate(m, 3) for m in pairs.masks]
            halo_iou = float(np.mean([metrics.iou(h, m) for h, m in zip(halos, pairs.masks)]))
            rows = {}
            for thr in a.thresholds:
                opts = md.mask_options(visible_min_deviation=thr)
                t_iou = [metrics.iou(refine_visible(i, m, opts), m) for i, m in zip(pairs.images, pairs.masks)]
                h_iou = [
                    metrics.iou(refine_visible(i, h, opts), m) for i, h, m in zip(pairs.images, halos, pairs.masks)
                ]
                kept = kept_refined = 0
                for k, m in enumerate(pairs.masks):
                    img = normals[k % len(normals)]
                    r = refine_visible(img, m, opts)
                    kept += bool(r.any() and alignment_contrast(img, m) >= DEFAULT_MIN_ALIGNMENT)
                    kept_refined += bool(r.any() and alignment_contrast(img, r) >= DEFAULT_MIN_ALIGNMENT)
                n = len(pairs.masks)
                rows[thr] = {
                    "true_iou": float(np.mean(t_iou)),
                    "halo_refined_iou": float(np.mean(h_iou)),
                    "halo_iou": halo_iou,
                    "on_normal_kept": kept / n,
                    "on_normal_kept_if_checked_on_refined": kept_refined / n,
                }
                print(
                    f"  {product + '/' + defect:<15}{thr:>5.1f}{rows[thr]['true_iou']:>10.2f}{halo_iou:>10.2f}"
                    f"{rows[thr]['halo_refined_iou']:>9.2f}{f'{kept}/{n}':>11}{f'{kept_refined}/{n}':>11}"
                )
            out["real"][f"{product}/{defect}"] = rows
    print("  (true IoU: the true mask refined, IoU with itself; halo IoU: the true mask dilated by 3 px, unrefined;")
    print("   refined: that halo refined; on normal: true masks on normal images that pass the alignment check on the")
    print("   drawn mask and keep a non-empty refined mask; (refined): with the check on the refined mask)")
    if a.generated:
        if not a.target:
            p.error("--generated needs --target")
        category, defect = a.target.split("/", 1)
        gen = Path(a.generated)
        real = ev.load_pairs(data / category / "test" / defect, data / category / "ground_truth" / defect)
        real_area = float(real.masks.mean())
        recs = [json.loads(x) for x in (gen / "manifest.jsonl").read_text().splitlines() if x.strip()]
        recs = [r for r in recs if r.get("category") == category and r.get("defect") == defect]
        files = [r["files"] for r in recs]
        fgs = [ev.read_rgb(gen / (f.get("fg") or f["rejected_fg"])) for f in files]
        imgs = [ev.read_rgb(gen / (f.get("image") or f["rejected_image"])) for f in files]
        drawn = [extract_mask(f, md.mask_options()).bool_mask() for f in fgs]
        res = {"samples": len(recs), "real_mask_area": real_area, "rows": {}}
        print(f"\n{a.target}: {len(recs)} generated samples ({gen}); real mean mask area {real_area:.4f}")
        print(f"  {'refinement':<16}{'area gen/real':>14}{'empty':>7}{'kept':>9}")
        for name, thr in [("off", 0.0)] + [(f"{t:g} std", t) for t in a.thresholds]:
            if thr == 0:
                masks = drawn
            else:
                opts = md.mask_options(visible_min_deviation=thr)
                masks = [refine_visible(i, m, opts) if m.any() else m for i, m in zip(imgs, drawn)]
            area = float(np.mean([m.mean() for m in masks]))
            empty = sum(1 for m in masks if not m.any())
            # the acceptance filter: alignment on the drawn mask, and a non-empty (refined) mask
            aligned = sum(
                1
                for i, d, m in zip(imgs, drawn, masks)
                if m.any() and alignment_contrast(i, d) >= DEFAULT_MIN_ALIGNMENT
            )
            res["rows"][name] = {"area_ratio": area / real_area, "empty": empty, "aligned": aligned}
            print(f"  {name:<16}{area / real_area:>14.2f}{empty:>7}{aligned:>9}")
        out["generated"] = res
    if a.json:
        write_json_atomic(a.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
