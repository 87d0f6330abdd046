"""Why the generated global images rarely show the defect that the anomaly branch draws: a diagnosis on MiniDefect
that separates a training/coupling defect from a capacity limit of the shipped base model.

    OMP_NUM_THREADS=1 python bench/diagnose.py --data quality_work/minidefect-seed0 \\
        --overfit fabric/hole metal/scratch --steps 1000 --json bench/results_diagnose.json

Sections (each prints measured figures; everything also goes to ``--json``):

(e) **capacity of the VAE** (all six defect types, every real defect image): encode (latent mean) and decode. Mean
    absolute error inside the defect mask, in a 3 px ring around it and elsewhere; the alignment contrast
    (:func:`dualanodiff_core.dataset.acceptance.alignment_contrast`, the acceptance filter's check) of the true mask
    on the original and on the reconstruction; the share of images in which the independent texture detector of
    the benchmark finds the defect under the mask, on originals and reconstructions; and the anomaly-branch target
    (the defect on mid-gray) through the VAE: does it stay gray outside the mask?
    ``--capacity-usefulness TYPE ...`` adds the **ceiling** of a generator working in that latent space: the
    benchmark's segmentation network (``--seg-seeds``, ``--seg-steps``: the quality tables' 3 seeds x 150 steps)
    trained on the ten real few-shot pairs, and on the same pairs with their images passed through the VAE (masks
    unchanged), both scored on the held-out defects and normal test images like bench/quality.py's rows.
(a) **overfitting one real defect image** per ``--overfit`` type with the reference recipe (the benchmark's demo
    settings: rank 8, lr 3e-4, batch 4, random h/v flips) for ``--steps`` steps. The image is the few-shot image
    whose four flips overlap least, so each flip puts the defect somewhere else. Every ``--eval-every`` steps,
    ``--samples`` pairs are generated (DDIM 25, the recipe's guidance) and measured: which flip the global image
    shows (the flip whose true mask has the highest alignment contrast on it, and whether that contrast passes
    the acceptance threshold), which flip the anomaly branch draws (the flip whose true mask has the highest IoU
    with the anomaly-branch mask), whether they agree (chance: 1 in 4), the alignment contrast of the
    anomaly-branch mask on the global image, and the IoU between the anomaly-branch mask and the texture
    detector's detection on the global image. At the end the same with SAIM switched off (``saim_strength=0``).
(b) **each branch's loss on its own target**, at the same points: MSE of the noise prediction on fixed inputs (the
    four flips, 8 timesteps, fixed noise), global rows and anomaly rows separately, each inside the (latent)
    defect mask and outside it. Step 0 is the untrained DualAnoDiff layers (the LoRAs start at zero; SAIM does not,
    as in the reference).
(c) **the anomaly branch's background**: mean distance from mid-gray (max over channels, [0, 1] units) outside the
    anomaly mask dilated by 3 px, and the largest per-channel offset of the image's median from gray (the
    acceptance filter's ``background_not_gray`` measure).
(d) **SAIM's contribution**, per attention layer at timesteps 900 / 500 / 100 on the training image: the norm of
    SAIM's output relative to the attention output it is added to, the weight a branch's token gives the other
    branch's token in SAIM's two-token softmax, and the norm of the part of SAIM's output that comes from the other
    branch (relative to the attention output). And the coupling at sampling: with the global branch's starting
    noise fixed, how much the global image changes when only the anomaly branch's starting noise changes (mean
    absolute pixel change), relative to the change when the global noise changes.

``--base-model DIR`` runs every section on another MiniDefect base model (a folder written by
``scripts/pretrain_minidefect.py``) instead of the shipped one.

``--weights CATEGORY/DEFECT=PATH`` (repeatable) measures (a)-(d) also for weights trained elsewhere, e.g. by
``bench/quality.py`` on the ten few-shot images (no training; their sampling alignment against the anomaly-branch
mask, their branch losses on the few-shot images, SAIM, coupling).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from dualanodiff_core.dataset import acceptance  # noqa: E402
from dualanodiff_core.dataset.masks import dilate, extract_mask  # noqa: E402
from dualanodiff_core.evaluation import benchmark as ev  # noqa: E402
from dualanodiff_core.evaluation import metrics  # noqa: E402
from dualanodiff_core.fileio import write_json_atomic  # noqa: E402
from dualanodiff_core.minidefect import procedural as md  # noqa: E402

FLIPS = ((False, False), (True, False), (False, True), (True, True))  # (hflip, vflip)
SAIM_TIMESTEPS = (900, 500, 100)


#: the base model every section loads (``--base-model``; None = the shipped one)
BASE_MODEL: Path | None = None
# --mask-min-contrast: the mask floor of the sample metrics (None: the MiniDefect default); a table measured with
# another base model's floor is reproduced with that floor
MASK_MIN_CONTRAST: float | None = None


def base_model() -> Path:
    return md.base_model_dir() if BASE_MODEL is None else BASE_MODEL


def mask_options():
    """The MiniDefect mask settings of the sample metrics, with the --mask-min-contrast floor when given."""
    return md.mask_options() if MASK_MIN_CONTRAST is None else md.mask_options(min_contrast=MASK_MIN_CONTRAST)


def log(s: str) -> None:
    print(s, flush=True)


def flip(a: np.ndarray, h: bool, v: bool) -> np.ndarray:
    if h:
        a = a[:, ::-1]
    if v:
        a = a[::-1]
    return np.ascontiguousarray(a)


def to_uint8(t: torch.Tensor) -> np.ndarray:
    """[N, 3, H, W] in [0, 1] -> uint8 [N, H, W, 3]."""
    return (t.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()


# ---------------------------------------------------------------------------------------------------------------------
# (e) capacity of the VAE


@torch.no_grad()
def vae_roundtrip(vae, images: np.ndarray, batch: int = 32) -> np.ndarray:
    """uint8 [N, H, W, 3] -> encoded (latent mean) and decoded, uint8."""
    out = []
    for i in range(0, len(images), batch):
        x = torch.from_numpy(images[i : i + batch]).permute(0, 3, 1, 2).float() / 127.5 - 1
        z = vae.encode(x).latent_dist.mean
        y = vae.decode(z).sample
        out.append(to_uint8(y / 2 + 0.5))
    return np.concatenate(out)


def capacity(data: Path, vae) -> dict:
    res = {}
    log("(e) capacity of the VAE: encode + decode every real defect image")
    log(
        f"    {'type':<15}{'MAE in':>8}{'ring':>8}{'out':>8}{'in/out':>8}{'align orig':>11}{'align rec':>10}"
        f"{'hit orig':>9}{'hit rec':>8}{'rec/rec':>8}{'gray off':>9}"
    )
    for product, defects in md.PRODUCTS.items():
        normals = ev.load_images(data / product / "train" / "good")
        det = ev.TextureDetector().fit(normals)
        # a detector that knows the VAE's version of normal texture: is the defect still unusual *for a decoded image*?
        det_rec = ev.TextureDetector().fit(vae_roundtrip(vae, normals))
        for defect in defects:
            pairs = ev.load_pairs(data / product / "test" / defect, data / product / "ground_truth" / defect)
            rec = vae_roundtrip(vae, pairs.images)
            err = np.abs(rec.astype(np.float32) - pairs.images.astype(np.float32)).max(-1) / 255.0
            ins, ring, out = [], [], []
            a_orig, a_rec = [], []
            for img, r, m, e in zip(pairs.images, rec, pairs.masks, err):
                around = dilate(m, 3) & ~m
                ins.append(e[m].mean())
                ring.append(e[around].mean())
                out.append(e[~dilate(m, 3)].mean())
                a_orig.append(acceptance.alignment_contrast(img, m))
                a_rec.append(acceptance.alignment_contrast(r, m))
            hit_o = float(np.mean([(d & m).any() for d, m in zip(det.detect(pairs.images), pairs.masks)]))
            hit_r = float(np.mean([(d & m).any() for d, m in zip(det.detect(rec), pairs.masks)]))
            hit_rr = float(np.mean([(d & m).any() for d, m in zip(det_rec.detect(rec), pairs.masks)]))
            # the anomaly-branch target: the defect on mid-gray (image * mask in [-1, 1])
            target = np.where(pairs.masks[..., None], pairs.images, np.uint8(128)).astype(np.uint8)
            trec = vae_roundtrip(vae, target)
            gray_off = float(
                np.mean(
                    [
                        (np.abs(t.astype(np.float32) / 255 - 0.5).max(-1))[~dilate(m, 3)].mean()
                        for t, m in zip(trec, pairs.masks)
                    ]
                )
            )
            a_trec = [acceptance.alignment_contrast(t, m) for t, m in zip(trec, pairs.masks)]
            a_tgt = [acceptance.alignment_contrast(t, m) for t, m in zip(target, pairs.masks)]
            r = {
                "n": len(pairs),
                "mae_inside": float(np.mean(ins)),
                "mae_ring": float(np.mean(ring)),
                "mae_outside": float(np.mean(out)),
                "alignment_original_median": float(np.median(a_orig)),
                "alignment_reconstruction_median": float(np.median(a_rec)),
                "alignment_kept_share": float(np.median(np.array(a_rec) / np.maximum(np.array(a_orig), 1e-6))),
                "detector_hit_original": hit_o,
                "detector_hit_reconstruction": hit_r,
                "detector_hit_reconstruction_decoded_normals": hit_rr,
                "anomaly_target_gray_offset_outside": gray_off,
                "anomaly_target_alignment_median": float(np.median(a_tgt)),
                "anomaly_target_reconstruction_alignment_median": float(np.median(a_trec)),
            }
            res[f"{product}/{defect}"] = r
            log(
                f"    {product + '/' + defect:<15}{r['mae_inside']:>8.3f}{r['mae_ring']:>8.3f}{r['mae_outside']:>8.3f}"
                f"{r['mae_inside'] / max(r['mae_outside'], 1e-6):>8.2f}{r['alignment_original_median']:>11.2f}"
                f"{r['alignment_reconstruction_median']:>10.2f}{hit_o:>9.2f}{hit_r:>8.2f}{hit_rr:>8.2f}{gray_off:>9.3f}"
            )
    log(
        "    (MAE: max over channels, [0, 1] units; align: median alignment contrast of the true mask; hit: texture "
        "detector (fitted on real normal images) finds the defect under the mask; rec/rec: the detector fitted on "
        "VAE-decoded normal images, on the reconstructions; gray off: mean distance from gray outside the mask of the "
        "anomaly target after the VAE)"
    )
    return res


def capacity_usefulness(data: Path, vae, targets: list[str], seeds: list[int], steps: int) -> dict:
    """Segmentation pixel AP from the real few-shot pairs, as they are and after a VAE round trip: the most that
    any generator decoding through this VAE can hand a detector (it cannot draw what the decoder cannot)."""
    res = {}
    seg = ev.SegConfig(steps=steps)
    log(f"(e) usefulness ceiling: segmentation on the few-shot pairs, original vs through the VAE ({steps} steps)")
    for target in targets:
        product, defect = target.split("/")
        real = ev.load_real(data, product, defect)
        decoded = ev.PairSet(vae_roundtrip(vae, real.few_shot.images), real.few_shot.masks, real.few_shot.names)
        imgs, masks, labels = ev.held_out_test_set(real)
        r = {}
        for name, pairs in (("real", real.few_shot), ("real_through_vae", decoded)):
            aps = []
            for seed in seeds:
                net = ev.train_segnet(real.normals_train, pairs, seg, seed)
                aps.append(ev.segmentation_scores(ev.predict(net, imgs), masks, labels)["pixel_ap"])
            r[name] = {"per_seed": aps, "pixel_ap": list(metrics.mean_std(aps))}
        res[target] = r
        log(
            f"    {target:<15} real {r['real']['pixel_ap'][0]:.3f} +- {r['real']['pixel_ap'][1]:.3f}   "
            f"through the VAE {r['real_through_vae']['pixel_ap'][0]:.3f} +- {r['real_through_vae']['pixel_ap'][1]:.3f}"
        )
    return res


# ---------------------------------------------------------------------------------------------------------------------
# training set-up


def pick_image(masks: list[np.ndarray]) -> int:
    """The image whose four flipped masks overlap least (largest IoU between two different flips is smallest)."""
    best, best_v = 0, 2.0
    for i, m in enumerate(masks):
        fl = [flip(m, h, v) for h, v in FLIPS]
        worst = max(metrics.iou(fl[a], fl[b]) for a in range(4) for b in range(a + 1, 4))
        if worst < best_v:
            best, best_v = i, worst
    return best


def build_trainer(
    data: Path,
    product: str,
    defect: str,
    indices: list[int] | None,
    steps: int,
    work: Path,
    lr: float | None = None,
    saim_zero_init: bool = False,
):
    from dualanodiff_core.minidefect.bench import RunSettings, train_config
    from dualanodiff_core.sd15.training import DiffusersTrainingBackbone, load_base_components
    from dualanodiff_core.training.data import DefectDataset, find_defect_set
    from dualanodiff_core.training.trainer import Trainer

    ds = find_defect_set(data / product, defect).select("strict")
    if indices is not None:
        ds = dataclasses.replace(ds, samples=[ds.samples[i] for i in indices])
    run = RunSettings(recipe="reference", train_steps=steps)
    tc = dataclasses.replace(
        train_config(run, product, 64), checkpoint_every=0, learning_rate=lr or run.lr, saim_zero_init=saim_zero_init
    )
    dataset = DefectDataset(ds, tc.resolution, flips=tc.flips, crop=tc.crop)
    bb = DiffusersTrainingBackbone.build(load_base_components(base_model()), tc)
    return Trainer(bb, dataset, tc, work), tc


def eval_batch(dataset, indices):
    """Every training image in all four flips (what the global branch may draw)."""
    from dualanodiff_core.training.data import Draw

    return dataset.batch([Draw(i, h, v, 0.5) for i in indices for h, v in FLIPS])


# ---------------------------------------------------------------------------------------------------------------------
# (b) per-branch losses


@torch.no_grad()
def branch_losses(bb, tc, batch, n_timesteps: int = 8, seed: int = 0, plain: bool = False) -> dict:
    """``plain``: the base model alone (LoRAs and SAIM off): what the DualAnoDiff layers start from."""
    from dualanodiff_core.method import layout
    from dualanodiff_core.training.trainer import add_noise

    gen = torch.Generator().manual_seed(seed)
    rows = layout.interleave(batch.images, batch.anomaly)
    x0 = bb.encode_images(rows, gen).float()
    n = batch.images.shape[0]
    m = F.adaptive_max_pool2d(batch.masks, x0.shape[-2:]).clamp(0, 1)  # the latent pixels a defect touches
    emb = bb.encode_prompts([tc.prompt_global, tc.prompt_anomaly])
    ctx = emb.repeat(n, 1, 1)
    T = len(bb.alphas_cumprod)
    keys = ("global_in", "global_out", "anomaly_in", "anomaly_out")
    acc = {k: [0.0, 0.0] for k in keys + tuple(f"{k}_high_t" for k in keys)}
    for k in range(n_timesteps):
        t_ = min(T - 1, int((k + 0.5) * T / n_timesteps))
        t = torch.full((2 * n,), t_, dtype=torch.long)
        noise = torch.randn(x0.shape, generator=gen)
        x_t = add_noise(x0, noise, t, bb.alphas_cumprod)
        if plain:
            with bb.pipe.dual.control.using(mode="off"):
                pred = bb.pipe.dual(x_t, t, ctx).float()
        else:
            pred = bb.denoise(x_t, t, ctx).float()
        err = ((pred - noise) ** 2).mean(1, keepdim=True)  # [2n, 1, h, w]
        g, a = err[0::2], err[1::2]
        # the high-noise half (t >= T/2) separately: there the layout (and where the defect goes) is decided
        for suffix in ("", "_high_t") if t_ >= T // 2 else ("",):
            for name, e in (("global", g), ("anomaly", a)):
                acc[f"{name}_in{suffix}"][0] += float((e * m).sum())
                acc[f"{name}_in{suffix}"][1] += float(m.sum())
                acc[f"{name}_out{suffix}"][0] += float((e * (1 - m)).sum())
                acc[f"{name}_out{suffix}"][1] += float((1 - m).sum())
    out = {k: v[0] / max(v[1], 1e-9) for k, v in acc.items()}
    for name in ("global", "anomaly"):
        ws = acc[f"{name}_in"][1] + acc[f"{name}_out"][1]
        out[name] = (acc[f"{name}_in"][0] + acc[f"{name}_out"][0]) / ws
    return out


# ---------------------------------------------------------------------------------------------------------------------
# (a) + (c) sampling


@torch.no_grad()
def sample(pipe, n: int, seed: int = 0, cfg: float = 2.5, saim_strength: float = 1.0, latents=None, shared=False):
    """``n`` pairs from the per-sample seeds of ``dualanodiff generate``; ``shared``: the anomaly row starts from the
    same noise as the global row of its pair."""
    from dualanodiff_core.dataset.generate import sample_seed

    if latents is None:
        latents = torch.cat(
            [
                torch.randn((2, 4, 16, 16), generator=torch.Generator().manual_seed(sample_seed(seed, i)))
                for i in range(n)
            ]
        )
        if shared:
            latents[1::2] = latents[0::2]
    out_g, out_a = [], []
    for s in range(0, n, 8):
        r = pipe.generate(
            min(8, n - s),
            steps=25,
            sampler="ddim",
            cfg=cfg,
            height=64,
            width=64,
            latents=latents[2 * s : 2 * min(n, s + 8)],
            generator=torch.Generator().manual_seed(0),
            saim_strength=saim_strength,
        )
        out_g.append(to_uint8(r.global_images))
        out_a.append(to_uint8(r.anomaly_images))
    return np.concatenate(out_g), np.concatenate(out_a), latents


def sample_metrics(globals_, anomalies, detector, true_masks: list[np.ndarray] | None, train_images=None) -> dict:
    """``true_masks``: the training masks (one per training image, unflipped) for the flip analysis, or None;
    ``train_images`` (uint8, the same order): also how close each global image is to the nearest flip of one."""
    opts = mask_options()
    thr = acceptance.DEFAULT_MIN_ALIGNMENT
    det = detector.detect(globals_)
    rec = {k: [] for k in ("align", "iou_det", "hit_anywhere", "hit_mask", "empty", "gray_out", "gray_median")}
    flips_g, flips_a, g_shows, a_iou = [], [], [], []
    for img, fg, d in zip(globals_, anomalies, det):
        mr = extract_mask(fg, opts)
        m = mr.bool_mask()
        rec["empty"].append(mr.empty)
        rec["gray_out"].append(float((np.abs(fg.astype(np.float32) / 255 - 0.5).max(-1))[~dilate(m, 3)].mean()))
        rec["gray_median"].append(max(abs(v - 0.5) for v in mr.image_median))
        rec["hit_anywhere"].append(bool(d.any()))
        if not mr.empty:
            rec["align"].append(acceptance.alignment_contrast(img, m))
            rec["iou_det"].append(metrics.iou(d, m))
            rec["hit_mask"].append(bool((d & m).any()))
        if true_masks is not None:
            cands = [(j, h, v, flip(tm, h, v)) for j, tm in enumerate(true_masks) for h, v in FLIPS]
            contrasts = [acceptance.alignment_contrast(img, c[3]) for c in cands]
            kg = int(np.argmax(contrasts))
            flips_g.append(kg)
            g_shows.append(contrasts[kg] >= thr)
            if not mr.empty:
                ious = [metrics.iou(m, c[3]) for c in cands]
                ka = int(np.argmax(ious))
                flips_a.append(ka)
                a_iou.append(ious[ka])
            else:
                flips_a.append(-1)
                a_iou.append(0.0)
    n = len(globals_)
    out = {
        "n": n,
        "anomaly_mask_empty": int(np.sum(rec["empty"])),
        "alignment_median": float(np.median(rec["align"])) if rec["align"] else None,
        "aligned_share": float(np.mean(np.array(rec["align"]) >= thr)) if rec["align"] else 0.0,
        "iou_detector_vs_anomaly_mask": float(np.mean(rec["iou_det"])) if rec["iou_det"] else None,
        "detector_hit_anywhere": float(np.mean(rec["hit_anywhere"])),
        "detector_hit_under_anomaly_mask": float(np.mean(rec["hit_mask"])) if rec["hit_mask"] else 0.0,
        "anomaly_gray_distance_outside": float(np.mean(rec["gray_out"])),
        "anomaly_median_offset": float(np.mean(rec["gray_median"])),
    }
    if train_images is not None:
        flipped = np.stack([flip(t, h, v) for t in train_images for h, v in FLIPS]).astype(np.float32)
        near = [float(np.abs(flipped - g.astype(np.float32)).mean(axis=(1, 2, 3)).min() / 255) for g in globals_]
        out["global_mae_to_training_image"] = float(np.median(near))
    if true_masks is not None:
        agree = [g == a for g, a in zip(flips_g, flips_a)]
        out.update(
            global_shows_training_defect=float(np.mean(g_shows)),
            anomaly_iou_best_flip=float(np.mean(a_iou)),
            flip_agreement=float(np.mean(agree)),
            flip_agreement_when_both_drawn=(
                float(np.mean([a for a, s, fa in zip(agree, g_shows, flips_a) if s and fa >= 0]))
                if any(s and fa >= 0 for s, fa in zip(g_shows, flips_a))
                else None
            ),
        )
    return out


def fmt_sample(s: dict) -> str:
    parts = [
        f"aligned {s['aligned_share']:.2f}",
        f"align med {s['alignment_median']:.2f}" if s["alignment_median"] is not None else "align med -",
        (
            f"IoU det/anom {s['iou_detector_vs_anomaly_mask']:.2f}"
            if s["iou_detector_vs_anomaly_mask"] is not None
            else ""
        ),
        f"det hit any {s['detector_hit_anywhere']:.2f} under mask {s['detector_hit_under_anomaly_mask']:.2f}",
        f"empty {s['anomaly_mask_empty']}/{s['n']}",
        f"gray dist {s['anomaly_gray_distance_outside']:.3f} median off {s['anomaly_median_offset']:.3f}",
    ]
    if "global_mae_to_training_image" in s:
        parts.append(f"global MAE to training image {s['global_mae_to_training_image']:.3f}")
    if "flip_agreement" in s:
        parts += [
            f"global shows defect {s['global_shows_training_defect']:.2f}",
            f"anomaly IoU {s['anomaly_iou_best_flip']:.2f}",
            f"flip agree {s['flip_agreement']:.2f}",
        ]
    return "; ".join(p for p in parts if p)


#: sampling variants measured after training: (name, cfg, saim_strength, shared starting noise)
VARIANTS = (
    ("reference (cfg 2.5)", 2.5, 1.0, False),
    ("cfg 1.0", 1.0, 1.0, False),
    ("no SAIM (cfg 2.5)", 2.5, 0.0, False),
    ("shared noise (cfg 2.5)", 2.5, 1.0, True),
    ("shared noise, cfg 1.0", 1.0, 1.0, True),
)


def sampling_variants(pipe, n, detector, true_masks, train_images=None) -> dict:
    out = {}
    for name, cfg, saim, shared in VARIANTS:
        g, a, _ = sample(pipe, n, cfg=cfg, saim_strength=saim, shared=shared)
        out[name] = sample_metrics(g, a, detector, true_masks, train_images)
        log(f"    {name:<24}{fmt_sample(out[name])}")
    return out


# ---------------------------------------------------------------------------------------------------------------------
# (d) SAIM


@contextlib.contextmanager
def saim_probe(pipe):
    """Record, per layer and branch, ||SAIM output||, ||attention output||, the other-token weight and the norm of
    the other branch's share of SAIM's output, while the UNet runs."""
    from dualanodiff_core.method import fused

    names = {id(p): n for n, p in pipe.dual.processors.items()}
    stats: dict[str, list] = {}
    orig = fused.saim

    def probe(layers, ob):
        y = orig(layers, ob)
        x = layers.temporal_i(layers.temporal_n(ob.float()))
        q, k, v = layers.temporal_q(x), layers.temporal_k(x), layers.temporal_v(x)
        s = (q * (k[0] - k[1])).sum(-1, keepdim=True) / math.sqrt(x.shape[-1])
        w0 = torch.sigmoid(s)  # weight each token (global, anomaly) gives the global token
        w_other = torch.stack([1 - w0[0], w0[1]])  # global attends to anomaly, anomaly attends to global
        v_other = torch.stack([v[1], v[0]])
        cross = F.linear(w_other * v_other, layers.temporal_o.weight)  # the other branch's share, without bias
        rec = []
        for b in range(2):
            on = float(ob[b].float().norm())
            rec.append((float(y[b].float().norm()) / on, float(w_other[b].mean()), float(cross[b].norm()) / on))
        stats.setdefault(names.get(id(layers), "?"), []).append(rec)
        return y

    fused.saim = probe
    try:
        yield stats
    finally:
        fused.saim = orig


@torch.no_grad()
def saim_stats(bb, tc, batch, seed: int = 0) -> dict:
    from dualanodiff_core.method import layout
    from dualanodiff_core.training.trainer import add_noise

    gen = torch.Generator().manual_seed(seed)
    rows = layout.interleave(batch.images, batch.anomaly)
    x0 = bb.encode_images(rows, gen).float()
    n = batch.images.shape[0]
    ctx = bb.encode_prompts([tc.prompt_global, tc.prompt_anomaly]).repeat(n, 1, 1)
    out = {}
    for t_ in SAIM_TIMESTEPS:
        t = torch.full((2 * n,), t_, dtype=torch.long)
        x_t = add_noise(x0, torch.randn(x0.shape, generator=gen), t, bb.alphas_cumprod)
        with saim_probe(bb.pipe) as st:
            bb.denoise(x_t, t, ctx)
        out[t_] = {
            layer: {
                "ratio_global": v[0][0][0],
                "ratio_anomaly": v[0][1][0],
                "other_weight_global": v[0][0][1],
                "other_weight_anomaly": v[0][1][1],
                "cross_ratio_global": v[0][0][2],
                "cross_ratio_anomaly": v[0][1][2],
            }
            for layer, v in st.items()
        }
    return out


def saim_summary(st: dict) -> dict:
    """Per timestep: median over layers of each quantity, and the layer range of the ratio."""
    out = {}
    for t_, layers in st.items():
        vals = list(layers.values())
        out[t_] = {
            k: float(np.median([v[k] for v in vals]))
            for k in (
                "ratio_global",
                "ratio_anomaly",
                "other_weight_global",
                "other_weight_anomaly",
                "cross_ratio_global",
                "cross_ratio_anomaly",
            )
        }
        out[t_]["ratio_min"] = float(min(min(v["ratio_global"], v["ratio_anomaly"]) for v in vals))
        out[t_]["ratio_max"] = float(max(max(v["ratio_global"], v["ratio_anomaly"]) for v in vals))
    return out


def print_saim(st: dict, prefix: str = "    ") -> None:
    summ = saim_summary(st)
    log(
        f"{prefix}{'t':>5}{'|SAIM|/|attn| g':>17}{'a':>7}{'(min-max)':>15}{'w_other g':>11}{'a':>7}"
        f"{'|cross|/|attn| g':>18}{'a':>7}"
    )
    for t_, s in summ.items():
        log(
            f"{prefix}{t_:>5}{s['ratio_global']:>17.3f}{s['ratio_anomaly']:>7.3f}"
            f"{'(' + format(s['ratio_min'], '.3f') + '-' + format(s['ratio_max'], '.3f') + ')':>15}"
            f"{s['other_weight_global']:>11.3f}{s['other_weight_anomaly']:>7.3f}"
            f"{s['cross_ratio_global']:>18.3f}{s['cross_ratio_anomaly']:>7.3f}"
        )
    log(f"{prefix}(medians over the {len(next(iter(st.values())))} attention layers)")


@torch.no_grad()
def coupling(pipe, n: int = 8, seed: int = 0, cfg: float = 2.5) -> dict:
    """Mean absolute pixel change of each branch's image when only the *other* branch's starting noise changes,
    relative to the change when its own starting noise changes (0 = the branches ignore each other)."""
    g0, a0, lat = sample(pipe, n, seed, cfg)
    other = sample(pipe, n, seed + 1, cfg)[2]
    lat_a = lat.clone()
    lat_a[1::2] = other[1::2]  # new anomaly noise, same global noise
    g1, a1, _ = sample(pipe, n, cfg=cfg, latents=lat_a)
    lat_g = lat.clone()
    lat_g[0::2] = other[0::2]  # new global noise, same anomaly noise
    g2, a2, _ = sample(pipe, n, cfg=cfg, latents=lat_g)

    def d(x, y):
        return float(np.abs(x.astype(np.float32) - y.astype(np.float32)).mean() / 255)

    return {
        "global_change_from_anomaly_noise": d(g0, g1),
        "global_change_from_own_noise": d(g0, g2),
        "anomaly_change_from_global_noise": d(a0, a2),
        "anomaly_change_from_own_noise": d(a0, a1),
    }


def print_coupling(c: dict) -> None:
    log(
        f"    coupling: global image change from the anomaly noise {c['global_change_from_anomaly_noise']:.4f} vs from "
        f"its own noise {c['global_change_from_own_noise']:.4f}; anomaly image change from the global noise "
        f"{c['anomaly_change_from_global_noise']:.4f} vs own {c['anomaly_change_from_own_noise']:.4f}"
    )


# ---------------------------------------------------------------------------------------------------------------------
# (a)-(d) for one type


def overfit(
    data: Path,
    target: str,
    steps: int,
    eval_every: int,
    n_samples: int,
    work: Path,
    lr: float | None = None,
    saim_zero_init: bool = False,
) -> dict:
    product, defect = target.split("/", 1)
    from dualanodiff_core.training.data import find_defect_set

    few = find_defect_set(data / product, defect).select("strict")
    masks = [ev.read_mask_array(s.mask) for s in few.samples]
    idx = pick_image(masks)
    tag = f"overfit_{product}_{defect}" + ("" if lr is None else f"_lr{lr:g}") + ("_saim0" if saim_zero_init else "")
    trainer, tc = build_trainer(data, product, defect, [idx], steps, work / tag, lr, saim_zero_init)
    bb, pipe = trainer.backbone, trainer.backbone.pipe
    detector = ev.TextureDetector().fit(ev.load_images(data / product / "train" / "good"))
    batch = eval_batch(trainer.dataset, [0])
    true = [masks[idx]]
    train_img = [ev.read_rgb(few.samples[idx].image)]
    res = {"image": few.samples[idx].image.name, "steps": steps, "config": tc.to_dict(), "points": []}
    log(
        f"\n(a)-(d) overfitting {target} image {res['image']} (reference recipe, lr {tc.learning_rate:g}, {steps} "
        f"steps, flips h/v{', SAIM starts at zero' if saim_zero_init else ''})"
    )
    cfg = 2.5
    t0 = time.time()

    def evaluate(step):
        bl = branch_losses(bb, tc, batch)
        g, a, _ = sample(pipe, n_samples, cfg=cfg)
        sm = sample_metrics(g, a, detector, true, train_img)
        res["points"].append({"step": step, "losses": bl, "samples": sm, "seconds": round(time.time() - t0, 1)})
        log(
            f"  step {step:>5}: loss global {bl['global']:.4f} (in {bl['global_in']:.4f} out {bl['global_out']:.4f}) "
            f"anomaly {bl['anomaly']:.4f} (in {bl['anomaly_in']:.4f} out {bl['anomaly_out']:.4f}); t >= 500: "
            f"global in {bl['global_in_high_t']:.4f} out {bl['global_out_high_t']:.4f}, anomaly in "
            f"{bl['anomaly_in_high_t']:.4f} out {bl['anomaly_out_high_t']:.4f}"
        )
        log(f"              {fmt_sample(sm)}")

    res["losses_base_model"] = bl0 = branch_losses(bb, tc, batch, plain=True)
    log(
        f"  base model alone (DualAnoDiff layers off): loss global {bl0['global']:.4f} (in {bl0['global_in']:.4f} out "
        f"{bl0['global_out']:.4f}) anomaly {bl0['anomaly']:.4f} (in {bl0['anomaly_in']:.4f} out "
        f"{bl0['anomaly_out']:.4f}); t >= 500: global in {bl0['global_in_high_t']:.4f} out "
        f"{bl0['global_out_high_t']:.4f}, anomaly in {bl0['anomaly_in_high_t']:.4f} out {bl0['anomaly_out_high_t']:.4f}"
    )
    evaluate(0)
    res["saim_step0"] = saim_stats(bb, tc, batch)
    while trainer.step < steps:
        trainer.train_step()
        trainer.step += 1
        if trainer.step % eval_every == 0 or trainer.step == steps:
            evaluate(trainer.step)
    wpath = work / f"{tag}.safetensors"
    bb.to_weights({"prompt_global": tc.prompt_global, "prompt_anomaly": tc.prompt_anomaly}).save(wpath)
    res["weights"] = str(wpath)
    log(f"  sampling variants after {steps} steps (weights: {wpath}):")
    res["variants"] = sampling_variants(pipe, n_samples, detector, true, train_img)
    res["saim"] = saim_stats(bb, tc, batch)
    log("  (d) SAIM at step 0:")
    print_saim(res["saim_step0"])
    log(f"  (d) SAIM after {steps} steps:")
    print_saim(res["saim"])
    res["coupling"] = coupling(pipe, n_samples, cfg=cfg)
    print_coupling(res["coupling"])
    res["seconds"] = round(time.time() - t0, 1)
    return res


def trained(data: Path, target: str, weights: Path, n_samples: int, image: str | None = None) -> dict:
    """(a)-(d) for weights trained elsewhere: on the few-shot split, or (``image``, a file name of the few-shot split)
    on that one image, which enables the flip analysis."""
    from dualanodiff_core.method.weights import DualAnoDiffWeights
    from dualanodiff_core.minidefect.bench import RunSettings, train_config
    from dualanodiff_core.sd15.training import DiffusersTrainingBackbone, load_base_components
    from dualanodiff_core.training.data import DefectDataset, find_defect_set

    product, defect = target.split("/", 1)
    w = DualAnoDiffWeights.load(weights)
    meta = w.metadata
    tc = dataclasses.replace(
        train_config(RunSettings(recipe="reference"), product, 64),
        prompt_global=meta.get("prompt_global", "a vfx with sks"),
        prompt_anomaly=meta.get("prompt_anomaly", "sks"),
        rank=w.rank,
    )
    bb = DiffusersTrainingBackbone.build(load_base_components(base_model()), tc)
    bb.pipe.dual.load_weights(w)
    if bb.pipe.text_lora is not None and w.has_text:
        bb.pipe.text_lora.load_weights(w)
    ds = find_defect_set(data / product, defect).select("strict")
    true = train_img = None
    if image is not None:
        ds = dataclasses.replace(ds, samples=[s for s in ds.samples if s.image.name == image])
        if not ds.samples:
            raise SystemExit(f"{image}: not in the few-shot split of {target}")
        true = [ev.read_mask_array(ds.samples[0].mask)]
        train_img = [ev.read_rgb(ds.samples[0].image)]
    dataset = DefectDataset(ds, 64, flips=tc.flips, crop=tc.crop)
    batch = eval_batch(dataset, range(len(dataset)))
    detector = ev.TextureDetector().fit(ev.load_images(data / product / "train" / "good"))
    cfg = float(meta.get("cfg", 2.5)) if "cfg" in meta else 2.5
    log(f"\n(a)-(d) weights {weights} ({target}, prompts {tc.prompt_global!r}/{tc.prompt_anomaly!r}, cfg {cfg})")
    bl = branch_losses(bb, tc, batch)
    log(
        f"  loss global {bl['global']:.4f} (in {bl['global_in']:.4f} out {bl['global_out']:.4f}) anomaly "
        f"{bl['anomaly']:.4f} (in {bl['anomaly_in']:.4f} out {bl['anomaly_out']:.4f})"
    )
    var = sampling_variants(bb.pipe, n_samples, detector, true, train_img)
    st = saim_stats(bb, tc, batch)
    print_saim(st)
    cp = coupling(bb.pipe, n_samples, cfg=cfg)
    print_coupling(cp)
    return {"weights": str(weights), "losses": bl, "variants": var, "saim": st, "coupling": cp}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="quality_work/minidefect-seed0", help="MiniDefect root (written if missing)")
    p.add_argument("--dataset-seed", type=int, default=0, help="MiniDefect seed when --data is written")
    p.add_argument("--overfit", nargs="*", default=["fabric/hole", "metal/scratch"], metavar="CATEGORY/DEFECT")
    p.add_argument("--steps", type=int, default=1000, help="overfitting steps per type")
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--lr", type=float, help="overfitting learning rate (default: the benchmark's, 3e-4)")
    p.add_argument(
        "--saim-zero-init", action="store_true", help="overfit with SAIM started as a no-op (not the reference)"
    )
    p.add_argument("--samples", type=int, default=16, help="pairs sampled at each evaluation")
    p.add_argument(
        "--weights",
        action="append",
        default=[],
        metavar="CATEGORY/DEFECT[:IMAGE]=PATH",
        help="also measure these weights (IMAGE: the one few-shot image they were overfitted on)",
    )
    p.add_argument("--skip-capacity", action="store_true")
    p.add_argument(
        "--capacity-usefulness",
        nargs="*",
        default=[],
        metavar="CATEGORY/DEFECT",
        help="also the usefulness ceiling of the VAE for these types (segmentation on the few-shot pairs, original "
        "vs through the VAE)",
    )
    p.add_argument("--seg-seeds", type=int, nargs="+", default=[0, 1, 2], help="segmentation seeds (ceiling)")
    p.add_argument("--seg-steps", type=int, default=150, help="segmentation steps (ceiling; the quality tables' 150)")
    p.add_argument("--base-model", help="a MiniDefect base model folder instead of the shipped one")
    p.add_argument(
        "--mask-min-contrast",
        type=float,
        help="mask floor of the sample metrics (default: the MiniDefect default; 0.08 for tables measured on v1)",
    )
    p.add_argument("--work", default="quality_work/diagnose", help="scratch folder for the overfitting runs")
    p.add_argument("--json", default="diagnose.json")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    a = p.parse_args(argv)
    known = {f"{c}/{d}" for c, ds in md.PRODUCTS.items() for d in ds}
    for t in a.capacity_usefulness:
        if t not in known:
            p.error(f"--capacity-usefulness {t}: choose from {', '.join(sorted(known))}")
    if a.mask_min_contrast is not None:
        try:  # MaskOptions owns the valid range
            md.mask_options(min_contrast=a.mask_min_contrast)
        except ValueError as e:
            p.error(f"--mask-min-contrast {a.mask_min_contrast}: {e}")
        global MASK_MIN_CONTRAST
        MASK_MIN_CONTRAST = a.mask_min_contrast
    if a.base_model is not None:
        from dualanodiff_core.errors import DualAnoDiffError
        from dualanodiff_core.sd15.loading import check_base_model

        try:
            check_base_model(Path(a.base_model))
        except DualAnoDiffError as e:
            p.error(f"--base-model: {e}")
        global BASE_MODEL
        BASE_MODEL = Path(a.base_model)
    torch.set_num_threads(max(1, a.threads))
    data = Path(a.data)
    if not data.exists():
        md.write_minidefect(data, md.MiniDefectSpec(seed=a.dataset_seed))
    t0 = time.time()
    args = argv if argv is not None else sys.argv[1:]
    out = {"command": " ".join(["diagnose.py", *args]), "torch": torch.__version__, "base_model": str(base_model())}

    def save():
        out["seconds"] = round(time.time() - t0, 1)
        out["threads"] = torch.get_num_threads()
        write_json_atomic(a.json, out)

    if not a.skip_capacity:
        from dualanodiff_core.sd15.loading import load_diffusers_components

        vae = load_diffusers_components(base_model())["vae"]
        out["capacity"] = capacity(data, vae)
        save()
    if a.capacity_usefulness:
        from dualanodiff_core.sd15.loading import load_diffusers_components

        vae = load_diffusers_components(base_model())["vae"]
        out["capacity_usefulness"] = capacity_usefulness(data, vae, a.capacity_usefulness, a.seg_seeds, a.seg_steps)
        save()
    out["overfit"] = {}
    for target in a.overfit:
        out["overfit"][target] = overfit(
            data, target, a.steps, a.eval_every, a.samples, Path(a.work), a.lr, a.saim_zero_init
        )
        save()
    out["trained"] = {}
    for spec in a.weights:
        target, path = spec.split("=", 1)
        target, _, image = target.partition(":")
        out["trained"][spec] = trained(data, target, Path(path), a.samples, image or None)
        save()
    save()
    log(f"wrote {a.json} ({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
