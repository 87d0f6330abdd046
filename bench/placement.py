"""Placement control on MiniDefect: how many mask pixels land inside a region, with and without guidance, and whether
generating onto a normal photo keeps its pixels exactly outside the feathered band.

    OMP_NUM_THREADS=1 python bench/placement.py --work bench_placement --train-steps 800 --json placement.json

For each product (metal/scratch, fabric/hole by default):

1. MiniDefect (seed 0, 64 px) is written to ``WORK/minidefect`` and DualAnoDiff weights are trained like the demo's
   (the shipped MiniDefect base model, the first third of the defect's images, rank 8, lr 3e-4, batch 4;
   ``--train-steps``, demo default 800) unless ``WORK/weights/<product>_<defect>.safetensors`` exists;
2. ``--n`` samples (DDIM, 25 steps, CFG 2.5, as the demo) are generated five ways into ``WORK/gen/<mode>``:
   ``free`` (no region), ``filter`` (region, acceptance filter only: ``--no-placement-guidance``), ``hold``
   (region + the anomaly branch held at gray outside it from the first step: ``--placement-steering hold``, what
   guidance did before steering), ``guided`` (region + guidance with steering, the default) and ``normal`` (onto
   the product's ``train/good`` photos, region + guidance with steering);
3. for each: the share of mask pixels inside the region, over the masks the filter passes on every other check
   (before the region check) and over the accepted ones (after it), the acceptance rate, the rejection reasons, and
   for ``normal`` the number of pixels outside the feathered band that differ from the photo (must be 0).

The acceptance filter runs with its defaults (the alignment check on: ``--min-alignment``, default 0.57).

The region (``--region``, default a 32 x 32 box = 25 % of the image) is written to ``WORK/region.png``.
``--sheet`` draws the contact sheet of docs/placement.md (photo, region, result, mask).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from dualanodiff_core.dataset.export import iter_records  # noqa: E402
from dualanodiff_core.fileio import write_json_atomic  # noqa: E402
from dualanodiff_core.minidefect import procedural as md  # noqa: E402

MODES = ("free", "filter", "hold", "guided", "normal")
SIZE = 64


def train(work: Path, data: Path, product: str, defect: str, steps: int, log) -> Path:
    from dualanodiff_core.sd15.training import train_from_folder
    from dualanodiff_core.training.data import find_defect_set
    from dualanodiff_core.training.trainer import TrainConfig

    weights = work / "weights" / f"{product}_{defect}.safetensors"
    if weights.is_file():
        log(f"reusing {weights}")
        return weights
    tc = TrainConfig(
        steps=steps,
        batch_size=4,
        learning_rate=3e-4,
        rank=8,
        seed=0,
        resolution=SIZE,
        split="strict",
        checkpoint_every=0,
        keep_checkpoints=1,
        checkpoint_weights=False,
    ).validate()
    t0 = time.time()
    log(f"training {product}/{defect}: {steps} steps ...")
    res = train_from_folder(
        find_defect_set(data / product, defect),
        md.base_model_dir(),
        weights,
        tc,
        work_dir=work / "weights" / f"{product}_{defect}_train",
        progress=lambda pr: pr.step % 50 == 0 and log(f"  step {pr.step}/{pr.total_steps} loss {pr.loss:.4f}"),
    )
    if not res.completed:
        raise RuntimeError("training did not finish")
    log(f"  {time.time() - t0:.0f} s")
    return weights


def generate(
    work: Path, data: Path, weights, product: str, defect: str, mode: str, n: int, region: Path, min_alignment, log
) -> Path:
    from dualanodiff_core.dataset.acceptance import FilterOptions
    from dualanodiff_core.dataset.generate import SamplingOptions, generate_dataset
    from dualanodiff_core.dataset.placement import PlacementSet
    from dualanodiff_core.sd15.pipeline import DualAnoDiffPipeline

    out = work / "gen" / mode
    placement = None
    if mode != "free":
        normal = data / product / "train" / "good" if mode == "normal" else None
        placement = PlacementSet.from_paths(normal, region, guide=mode != "filter", steering=mode != "hold")
    t0 = time.time()
    generate_dataset(
        lambda: DualAnoDiffPipeline.from_pretrained(md.base_model_dir(), weights),
        out,
        n,
        category=product,
        defect=defect,
        seed=0,
        batch_size=8,
        sampling=SamplingOptions(sampler="ddim", steps=25, cfg=2.5, height=SIZE, width=SIZE),
        mask_options=md.mask_options(),
        filter_options=FilterOptions(min_alignment=min_alignment),
        weights_path=weights,
        progress=False,
        log=log,
        placement=placement,
    )
    log(f"  {product}/{mode}: {time.time() - t0:.0f} s")
    return out


def measure(out: Path, product: str, defect: str, region: np.ndarray, feather: int) -> dict:
    import torch

    from dualanodiff_core.method.placement import feather_alpha

    band = feather_alpha(torch.from_numpy(region.astype(np.float32))[None, None], feather)[0, 0].numpy() > 0
    recs = [r for r in iter_records(out, product, defect)]
    before = [r for r in recs if r["reason"] in ("ok", "outside_region")]
    inside_b = inside_a = total_b = total_a = 0
    differing = checked = 0
    for r in before:
        key = "mask" if r["accepted"] else "rejected_mask"
        m = np.asarray(Image.open(out / r["files"][key])) > 0
        k, t = int((m & region).sum()), int(m.sum())
        inside_b, total_b = inside_b + k, total_b + t
        if r["accepted"]:
            inside_a, total_a = inside_a + k, total_a + t
    for r in recs:
        if r.get("normal"):
            key = "image" if r["accepted"] else "rejected_image"
            img = np.asarray(Image.open(out / r["files"][key]).convert("RGB"))
            photo = np.asarray(Image.open(r["normal"]).convert("RGB"))
            differing += int((img != photo).any(-1)[~band].sum())
            checked += 1
    reasons: dict[str, int] = {}
    for r in recs:
        reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
    return {
        "samples": len(recs),
        "reasons": dict(sorted(reasons.items())),
        "steered": sum(1 for r in recs if r.get("placement_steering")),
        "pass_other_checks": len(before),
        "accepted": sum(1 for r in recs if r["accepted"]),
        "inside_before_region_filter": inside_b / total_b if total_b else None,
        "inside_accepted": inside_a / total_a if total_a else None,
        "photos_checked": checked,
        "pixels_differing_outside_band": differing if checked else None,
    }


def contact_sheet(work: Path, products, region: np.ndarray, path: Path, per: int = 4, scale: int = 2) -> None:
    """Rows: the first samples of the ``normal`` runs (accepted ones first); columns: normal photo | region | result
    | mask (a rejected sample's mask tile names the reason)."""
    s = SIZE * scale
    rows = []
    for product, defect in products:
        out = work / product / "gen" / "normal"
        recs = sorted(iter_records(out, product, defect), key=lambda r: (not r["accepted"], r["index"]))
        for r in recs[:per]:
            photo = Image.open(r["normal"]).convert("RGB")
            reg = Image.fromarray((region * 255).astype(np.uint8)).convert("RGB")
            result = Image.open(out / r["files"]["image" if r["accepted"] else "rejected_image"]).convert("RGB")
            mask = Image.open(out / r["files"]["mask" if r["accepted"] else "rejected_mask"]).convert("RGB")
            tiles = [im.resize((s, s), Image.NEAREST) for im in (photo, reg, result, mask)]
            label = f"{product} ok" if r["accepted"] else f"{product} {r['reason']}"
            ImageDraw.Draw(tiles[3]).text((2, s - 12), label, fill=(255, 80, 80))
            rows.append(tiles)
    head = 16
    sheet = Image.new("RGB", (4 * s + 5 * 4, head + len(rows) * (s + 4) + 4), "white")
    draw = ImageDraw.Draw(sheet)
    for c, title in enumerate(("normal photo", "region", "result", "mask")):
        draw.text((4 + c * (s + 4), 2), title, fill="black")
    for i, row in enumerate(rows):
        for c, im in enumerate(row):
            sheet.paste(im, (4 + c * (s + 4), head + i * (s + 4)))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="bench_placement", help="working folder (data, weights, generated sets)")
    p.add_argument(
        "--target", action="append", default=[], metavar="PRODUCT/DEFECT", help="default: metal/scratch, fabric/hole"
    )
    p.add_argument("--n", type=int, default=32, help="samples per product and mode")
    p.add_argument("--train-steps", type=int, default=800, help="training steps when no weights are there (demo: 800)")
    p.add_argument("--region", type=int, nargs=4, default=(24, 56, 8, 40), metavar=("Y0", "Y1", "X0", "X1"))
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument(
        "--min-alignment",
        type=float,
        default=None,
        help="acceptance filter alignment minimum (default: the filter's, 0.57; 0 = off)",
    )
    p.add_argument("--json", default=None, help="write the figures here")
    p.add_argument("--sheet", default=None, help="write the contact sheet here (needs the normal mode)")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    a = p.parse_args(argv)

    import torch

    from dualanodiff_core.dataset.acceptance import DEFAULT_MIN_ALIGNMENT

    torch.set_num_threads(max(1, a.threads))
    min_alignment = DEFAULT_MIN_ALIGNMENT if a.min_alignment is None else a.min_alignment
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    targets = [tuple(t.split("/", 1)) for t in a.target] or [("metal", "scratch"), ("fabric", "hole")]
    root = Path(a.work)
    data = root / "minidefect"
    if not data.is_dir() or md.verify_minidefect(data):
        log(f"writing MiniDefect to {data} ...")
        md.write_minidefect(data, md.MiniDefectSpec(seed=0, size=SIZE), overwrite=True)
    y0, y1, x0, x1 = a.region
    region = np.zeros((SIZE, SIZE), bool)
    region[y0:y1, x0:x1] = True
    region_path = root / "region.png"
    Image.fromarray(region.astype(np.uint8) * 255).save(region_path)
    log(f"region: {region.mean():.1%} of the image")
    results = {}
    for product, defect in targets:
        work = root / product
        work.mkdir(parents=True, exist_ok=True)
        weights = train(work, data, product, defect, a.train_steps, log)
        for mode in a.modes:
            out = generate(work, data, weights, product, defect, mode, a.n, region_path, min_alignment, log)
            results[f"{product}/{mode}"] = measure(out, product, defect, region, 8)
    fmt = lambda v: "-" if v is None else (f"{v:.1%}" if isinstance(v, float) else str(v))  # noqa: E731
    cols = [c for c in next(iter(results.values())) if c != "reasons"]
    print(
        f"region {region.mean():.1%} of the image; n = {a.n} per product and mode; train steps {a.train_steps}; "
        f"min alignment {min_alignment}"
    )
    print(f"{'product/mode':<16}" + "".join(f"{c[:28]:>30}" for c in cols))
    for k, r in results.items():
        print(f"{k:<16}" + "".join(f"{fmt(r[c]):>30}" for c in cols) + "   " + str(r["reasons"]))
    if a.json:
        write_json_atomic(
            a.json,
            {
                "command": " ".join(sys.argv),
                "region_share": float(region.mean()),
                "region_box": list(a.region),
                "n": a.n,
                "train_steps": a.train_steps,
                "min_alignment": min_alignment,
                "threads": torch.get_num_threads(),
                "results": results,
            },
        )
    if a.sheet:
        contact_sheet(root, targets, region, Path(a.sheet))
        print(f"wrote {a.sheet}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
