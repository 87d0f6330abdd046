"""Quality of a generated defect dataset, measured against real held-out defects (numpy/torch only).

Three questions, one function each, and :func:`benchmark` that runs them all on one (category, defect):

(a) **Mask alignment** -- does the generated image actually show a defect where the mask says? An independent
    detector (:class:`TextureDetector`: per-pixel deviation from the normal texture's statistics, fitted on normal
    images only) is run on each generated *global* image and compared with the mask extracted from the anomaly
    branch (IoU after thresholding the detector at a fixed false-positive rate on normal images and trimming to pixels
    whose own colour is unusual; pixel AUROC of the detector's score against the mask, threshold-free). The same
    detector on *real* held-out defects against their true masks gives the reference: a generated set is as well
    aligned as real data when its numbers match.
(b) **Diversity** -- mean pairwise distance inside a set: pixel L1 between images, the IC-LPIPS protocol with L1 in
    place of LPIPS (cluster around the few-shot training images), ``1 - IoU`` between masks (where and what shape),
    and the distance of each image to its nearest few-shot training image (a copy of a training image gives 0).
    The same numbers for the real held-out defects are the reference.
(c) **Usefulness** -- a small U-Net segmentation network (:class:`SegNet`) is trained on normal images plus defect
    pairs from one *source* and tested on held-out real defects plus real normal test images: pixel AUROC, pixel AP,
    pixel F1-max, image AUROC. Sources: ``generated`` (the DualAnoDiff dataset), ``real`` (the few real pairs
    alone, augmented), ``real+generated``, ``cutpaste`` and ``perlin`` (synthetic baselines on normal images,
    :mod:`dualanodiff_core.evaluation.synthetic`).
    Training follows the DualAnoDiff/AnomalyDiffusion evaluation (half normal
    images with empty masks, half defect pairs, focal loss) at a CPU-sized scale, with a fixed schedule: no model
    selection on the test set (the reference picks the best epoch on the test set).

The generated set is read from a folder written by ``dualanodiff generate`` (MVTec layout; the anomaly-branch images
from ``fg/``). Real data is an MVTec-layout category folder (e.g. MiniDefect); the few-shot training images are the
first third (rounded down) of ``test/<defect>`` -- the strict split -- and the rest are held out.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..dataset.masks import MaskOptions, dilate, extract_mask, gaussian_blur, label_components, remove_small
from . import metrics, synthetic

PNG = (".png", ".PNG")


# ---------------------------------------------------------------------------------------------------------------------
# reading data


@dataclasses.dataclass
class PairSet:
    images: np.ndarray  # uint8 [N, H, W, 3]
    masks: np.ndarray  # bool [N, H, W]
    names: list[str]

    def __len__(self) -> int:
        return len(self.names)

    def subset(self, idx) -> PairSet:
        idx = list(idx)
        return PairSet(self.images[idx], self.masks[idx], [self.names[i] for i in idx])


def _read(path: Path, mode: str, size: int | None, resample, what: str) -> np.ndarray:
    try:
        with Image.open(path) as im:
            im = im.convert(mode)
            if size is not None and im.size != (size, size):
                im = im.resize((size, size), resample)
            return np.asarray(im, dtype=np.uint8).copy()
    except OSError as e:
        raise ValueError(f"cannot read {what} {path}: {e}") from None


def read_rgb(path: Path, size: int | None = None) -> np.ndarray:
    return _read(path, "RGB", size, Image.BICUBIC, "image")


def read_mask_array(path: Path, size: int | None = None) -> np.ndarray:
    return _read(path, "L", size, Image.NEAREST, "mask") >= 128


def list_png(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} does not exist")
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in PNG and not p.name.startswith("."))


def load_images(folder: str | Path, size: int | None = None) -> np.ndarray:
    files = list_png(Path(folder))
    if not files:
        raise FileNotFoundError(f"{folder} holds no PNG images")
    return np.stack([read_rgb(p, size) for p in files])


def load_pairs(image_dir: str | Path, mask_dir: str | Path, size: int | None = None) -> PairSet:
    """Images ``image_dir/NAME.png`` with masks ``mask_dir/NAME_mask.png`` (MVTec naming), sorted by name."""
    image_dir, mask_dir = Path(image_dir), Path(mask_dir)
    files = list_png(image_dir)
    if not files:
        raise FileNotFoundError(f"{image_dir} holds no PNG images")
    imgs, masks = [], []
    for p in files:
        m = mask_dir / f"{p.stem}_mask.png"
        if not m.is_file():
            raise FileNotFoundError(f"no mask for {p}: expected {m}")
        img = read_rgb(p, size)
        mk = read_mask_array(m, img.shape[0] if size is None else size)
        if mk.shape != img.shape[:2]:
            raise ValueError(f"mask {m} is {mk.shape[1]}x{mk.shape[0]} but {p} is {img.shape[1]}x{img.shape[0]}")
        imgs.append(img)
        masks.append(mk)
    return PairSet(np.stack(imgs), np.stack(masks), [p.stem for p in files])


@dataclasses.dataclass
class RealData:
    """One (category, defect) of an MVTec-layout folder, split for the benchmark."""

    category: str
    defect: str
    normals_train: np.ndarray  # train/good
    normals_test: np.ndarray  # test/good
    few_shot: PairSet  # the first third of test/<defect> (what DualAnoDiff was trained on)
    held_out: PairSet  # the rest

    @property
    def size(self) -> int:
        return int(self.normals_train.shape[1])


def strict_train_count(n: int) -> int:
    """The strict few-shot split: the first third, rounded down, at least one."""
    return max(1, n // 3)


def load_real(
    root: str | Path, category: str, defect: str, train_count: int | None = None, size: int | None = None
) -> RealData:
    base = Path(root) / category
    if not base.is_dir():
        raise FileNotFoundError(f"{base} does not exist; give the dataset root (the folder holding {category}/)")
    pairs = load_pairs(base / "test" / defect, base / "ground_truth" / defect, size)
    k = strict_train_count(len(pairs)) if train_count is None else int(train_count)
    if not 1 <= k < len(pairs):
        raise ValueError(
            f"train_count={k}: {category}/{defect} has {len(pairs)} defect images; keep at least one "
            "for training and one held out"
        )
    size = size or pairs.images.shape[1]
    return RealData(
        category,
        defect,
        load_images(base / "train" / "good", size),
        load_images(base / "test" / "good", size),
        pairs.subset(range(k)),
        pairs.subset(range(k, len(pairs))),
    )


@dataclasses.dataclass
class GeneratedSet:
    pairs: PairSet  # accepted global images + their masks
    fg: np.ndarray | None  # anomaly-branch images of the same samples (None when fg/ is missing)
    rejected: int
    manifest: bool


def load_generated(root: str | Path, category: str, defect: str, size: int | None = None) -> GeneratedSet:
    """Accepted samples of a ``dualanodiff generate`` folder: ``<root>/<category>/test/<defect>/NAME.png``, masks
    ``ground_truth/<defect>/NAME_mask.png``, anomaly-branch images ``fg/<category>/<defect>/NAME.png``."""
    root = Path(root)
    img_dir = root / category / "test" / defect
    if not img_dir.is_dir():
        raise FileNotFoundError(
            f"{img_dir} does not exist: give the --out folder of `dualanodiff generate` and the "
            "category/defect it was generated for"
        )
    pairs = load_pairs(img_dir, root / category / "ground_truth" / defect, size)
    fg_dir = root / "fg" / category / defect
    fg = None
    if fg_dir.is_dir() and all((fg_dir / f"{n}.png").is_file() for n in pairs.names):
        fg = np.stack([read_rgb(fg_dir / f"{n}.png", size) for n in pairs.names])
    rejected, has_manifest = 0, False
    man = root / "manifest.jsonl"
    if man.is_file():
        has_manifest = True
        for line in man.read_text().splitlines():
            try:
                r = json.loads(line)
            except ValueError:
                continue
            if r.get("category") == category and r.get("defect") == defect and not r.get("accepted", True):
                rejected += 1
    return GeneratedSet(pairs, fg, rejected, has_manifest)


# ---------------------------------------------------------------------------------------------------------------------
# (a) an independent detector: deviation from the normal texture's statistics


def _features(img: np.ndarray) -> np.ndarray:
    """Per-pixel features ``[H, W, F]`` of a uint8 image, standardised per image (median / MAD), so a pixel scores
    by how unusual it is *for this image's texture*: colour at two scales, local contrast, gradient."""
    x = img.astype(np.float32) / 255.0
    l = x @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    b1 = gaussian_blur(x, 1.0)
    b3 = gaussian_blur(x, 2.5)
    l1 = b1 @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    m2 = gaussian_blur(l[..., None], 2.0)[..., 0]
    s2 = gaussian_blur((l * l)[..., None], 2.0)[..., 0]
    local_std = np.sqrt(np.maximum(s2 - m2 * m2, 0.0))
    gy, gx = np.gradient(l1)
    grad = np.hypot(gx, gy)
    f = np.concatenate([b1, b3, local_std[..., None], grad[..., None]], axis=-1)
    flat = f.reshape(-1, f.shape[-1])
    med = np.median(flat, axis=0)
    mad = np.median(np.abs(flat - med), axis=0) * 1.4826 + 1e-3
    return ((f - med) / mad).astype(np.float32)


def _colour_features(img: np.ndarray, sigma: float = 0.5) -> np.ndarray:
    """Per-pixel colour (lightly smoothed), standardised per image: what the pixel itself looks like."""
    x = gaussian_blur(img.astype(np.float32) / 255.0, sigma)
    flat = x.reshape(-1, 3)
    med = np.median(flat, axis=0)
    mad = np.median(np.abs(flat - med), axis=0) * 1.4826 + 1e-3
    return ((x - med) / mad).astype(np.float32)


class _Gaussian:
    """Mahalanobis distance to a Gaussian fitted on feature vectors."""

    def fit(self, feats: np.ndarray) -> _Gaussian:
        f = feats.astype(np.float64)
        self.mean = f.mean(0)
        self.precision = np.linalg.inv(np.cov(f, rowvar=False) + 1e-3 * np.eye(f.shape[1]))
        return self

    def __call__(self, f: np.ndarray) -> np.ndarray:
        d = f.astype(np.float64) - self.mean
        return np.sqrt(np.maximum(np.einsum("hwi,ij,hwj->hw", d, self.precision, d), 0.0))


class TextureDetector:
    """A training-free defect detector that knows only normal images.

    Score: the Mahalanobis distance of per-image-standardised local features (colour at two scales, local
    contrast, gradient; :func:`_features`) from a Gaussian fitted on normal images, lightly smoothed.
    Detection: pixels whose score exceeds the ``quantile`` of scores on held-back normal images (so about
    ``1 - quantile`` of a normal image's pixels are flagged) are *seeds*; because local features spread a strong
    defect's evidence a few pixels outward, the seeds (dilated by one pixel) are then trimmed to the pixels whose own
    colour is unusual (colour Mahalanobis distance above the ``pixel_quantile`` of normal pixels), and components
    under ``min_area`` pixels are dropped."""

    def __init__(self, quantile: float = 0.999, pixel_quantile: float = 0.95, min_area: int = 3, smooth: float = 1.0):
        if not 0.5 < quantile < 1 or not 0.5 < pixel_quantile < 1:
            raise ValueError(f"quantile={quantile}, pixel_quantile={pixel_quantile}: both must be in (0.5, 1)")
        self.quantile, self.pixel_quantile = float(quantile), float(pixel_quantile)
        self.min_area, self.smooth = int(min_area), float(smooth)
        self.threshold: float | None = None
        self.pixel_threshold: float | None = None

    def fit(self, normals: np.ndarray, seed: int = 0) -> TextureDetector:
        if len(normals) < 4:
            raise ValueError("the texture detector needs at least 4 normal images")
        half = len(normals) // 2
        rng = np.random.default_rng(seed)
        feats, cols = [], []
        for img in normals[:half]:
            f = _features(img).reshape(-1, 8)
            c = _colour_features(img).reshape(-1, 3)
            k = rng.choice(len(f), min(len(f), 2048), replace=False)
            feats.append(f[k])
            cols.append(c[k])
        self._local = _Gaussian().fit(np.concatenate(feats))
        self._colour = _Gaussian().fit(np.concatenate(cols))
        held = normals[half:]
        self.threshold = float(np.quantile(self.score(held), self.quantile))
        self.pixel_threshold = float(
            np.quantile(np.stack([self._colour(_colour_features(i)) for i in held]), self.pixel_quantile)
        )
        return self

    def score(self, images: np.ndarray) -> np.ndarray:
        if not hasattr(self, "_local"):
            raise RuntimeError("fit the detector first")
        out = [
            gaussian_blur(self._local(_features(img))[..., None].astype(np.float32), self.smooth)[..., 0]
            for img in images
        ]
        return np.stack(out)

    def detect(self, images: np.ndarray, scores: np.ndarray | None = None) -> np.ndarray:
        scores = self.score(images) if scores is None else scores
        out = []
        for img, s in zip(images, scores):
            seeds = s > self.threshold
            m = dilate(seeds, 1) & (self._colour(_colour_features(img)) > self.pixel_threshold)
            m, _ = remove_small(m, self.min_area)
            out.append(m)
        return np.stack(out)


def defect_counts(masks) -> tuple[float, float]:
    """(mean number of separate defects -- 8-connected components -- per mask, mean area of one defect as a share of
    the image) of boolean masks; (0, 0) when they hold no defect pixel. The mask-area ratio of two sets is the product
    of the two ratios, which tells a halo (larger defects) from more defects per image."""
    counts = [label_components(np.asarray(m, dtype=bool), 8)[1] for m in masks]
    total = sum(counts)
    if not total:
        return 0.0, 0.0
    pixels = sum(int(np.count_nonzero(m)) for m in masks)
    return float(np.mean(counts)), float(pixels / (total * np.asarray(masks[0]).size))


def alignment(detector: TextureDetector, images: np.ndarray, masks: np.ndarray) -> dict[str, float]:
    """How well the detector's view of ``images`` agrees with ``masks``: mean/median IoU of the thresholded
    detection, pixel AUROC of the raw score against the mask (pooled over all images), and the share of images whose
    detection overlaps the mask at all. Also how many separate defects (8-connected mask components) an image has and
    how large one is: a mask-area ratio far from 1 can mean larger defects or more of them, which are different
    faults (a halo, or a generator that draws several defects where the real images have one)."""
    scores = detector.score(images)
    det = detector.detect(images, scores)
    ious = [metrics.iou(d, m) for d, m in zip(det, masks)]
    hit = [bool((d & m).any()) for d, m in zip(det, masks)]
    per_image, defect_area = defect_counts(masks)
    return {
        "n": len(images),
        "iou_mean": float(np.mean(ious)),
        "iou_median": float(np.median(ious)),
        "pixel_auroc": metrics.roc_auc(scores, masks),
        "hit_rate": float(np.mean(hit)),
        "mask_area": float(masks.mean()),
        "detected_area": float(det.mean()),
        "defects_per_image": per_image,
        # mean area of one defect (component), as a share of the image
        "defect_area": defect_area,
    }


def fg_mask_agreement(fg: np.ndarray, masks: np.ndarray, options: MaskOptions | None = None) -> float:
    """Mean IoU between the stored masks and masks re-extracted from the anomaly-branch images (a consistency
    check of the stored data; 1.0 when the dataset was written with the same mask options)."""
    vals = [metrics.iou(extract_mask(f, options).mask, m) for f, m in zip(fg, masks)]
    return float(np.mean(vals))


# ---------------------------------------------------------------------------------------------------------------------
# (b) diversity


def diversity(
    images: np.ndarray, masks: np.ndarray, train_images: np.ndarray, max_items: int = 200, seed: int = 0
) -> dict[str, float]:
    """Diversity of one set (uint8 images, bool masks) and its distance from the few-shot training images."""
    idx = np.arange(len(images))
    if len(idx) > max_items:
        idx = np.sort(np.random.default_rng(seed).choice(len(idx), max_items, replace=False))
    x = images[idx].astype(np.float32) / 255.0
    m = masks[idx]
    t = train_images.astype(np.float32) / 255.0
    near = metrics.pairwise_distances(x, t).min(1)
    return {
        "n": int(len(idx)),
        "pixel_l1": metrics.mean_pairwise_distance(x),
        "ic_l1": metrics.clustered_pairwise_distance(x, t, rng=np.random.default_rng(seed)),
        "mask_1_minus_iou": metrics.mean_pairwise_iou_distance(m),
        "nearest_train_l1": float(near.mean()),
        "nearest_train_l1_min": float(near.min()),
    }


# ---------------------------------------------------------------------------------------------------------------------
# (c) usefulness: a small segmentation network


class SegNet(nn.Module):
    """A small U-Net (3 levels, ``width`` channels at full resolution) that outputs one defect logit per pixel."""

    def __init__(self, width: int = 16):
        super().__init__()

        def block(i, o):
            return nn.Sequential(
                nn.Conv2d(i, o, 3, padding=1),
                nn.BatchNorm2d(o),
                nn.ReLU(inplace=True),
                nn.Conv2d(o, o, 3, padding=1),
                nn.BatchNorm2d(o),
                nn.ReLU(inplace=True),
            )

        w = width
        self.e1, self.e2, self.e3 = block(3, w), block(w, 2 * w), block(2 * w, 4 * w)
        self.d2, self.d1 = block(4 * w + 2 * w, 2 * w), block(2 * w + w, w)
        self.out = nn.Conv2d(w, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if h % 4 or w % 4:
            raise ValueError(f"SegNet needs image sides divisible by 4, got {w}x{h}")
        e1 = self.e1(x)
        e2 = self.e2(F.max_pool2d(e1, 2))
        e3 = self.e3(F.max_pool2d(e2, 2))
        d2 = self.d2(torch.cat([F.interpolate(e3, scale_factor=2.0, mode="nearest"), e2], 1))
        d1 = self.d1(torch.cat([F.interpolate(d2, scale_factor=2.0, mode="nearest"), e1], 1))
        return self.out(d1)


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Binary focal loss (Lin et al.), mean over pixels."""
    logp = F.logsigmoid(logits)
    lognp = F.logsigmoid(-logits)
    logpt = torch.where(target > 0.5, logp, lognp)
    pt = logpt.exp()
    return (-((1 - pt) ** gamma) * logpt).mean()


def _to_input(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _augment(img: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random horizontal/vertical flips (the reference's augmentation)."""
    if rng.random() < 0.5:
        img, mask = img[:, ::-1], mask[:, ::-1]
    if rng.random() < 0.5:
        img, mask = img[::-1], mask[::-1]
    return img, mask


@dataclasses.dataclass(frozen=True)
class SegConfig:
    steps: int = 600
    batch: int = 16
    lr: float = 1e-3
    width: int = 12
    normal_fraction: float = 0.5  # share of each batch that is normal images with empty masks

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def train_segnet(
    normals: np.ndarray,
    pairs: PairSet | Callable[[np.random.Generator], tuple[np.ndarray, np.ndarray]],
    config: SegConfig = SegConfig(),
    seed: int = 0,
    progress: Callable[[int, int, float], None] | None = None,
) -> SegNet:
    """Train a :class:`SegNet`: each batch is ``normal_fraction`` normal images (empty masks) and defect pairs drawn
    from ``pairs`` (a :class:`PairSet`, sampled uniformly, or a function ``rng -> (image, mask)``), all flipped at
    random. Adam, lr ``config.lr`` decayed x0.2 at 80 % and 90 % of the steps (the reference's MultiStepLR)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    # channels_last: the same numbers up to float rounding, about a third faster on CPU
    net = SegNet(config.width).to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(net.parameters(), lr=config.lr)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [int(config.steps * 0.8), int(config.steps * 0.9)], gamma=0.2)
    h, w = normals.shape[1:3]
    empty = np.zeros((h, w), dtype=bool)
    net.train()
    for step in range(config.steps):
        imgs, msks = [], []
        for _ in range(config.batch):
            if rng.random() < config.normal_fraction:
                img, m = normals[int(rng.integers(0, len(normals)))], empty
            elif isinstance(pairs, PairSet):
                k = int(rng.integers(0, len(pairs)))
                img, m = pairs.images[k], pairs.masks[k]
            else:
                img, m = pairs(rng)
            img, m = _augment(img, m, rng)
            imgs.append(np.ascontiguousarray(img))
            msks.append(np.ascontiguousarray(m))
        x = _to_input(np.stack(imgs)).contiguous(memory_format=torch.channels_last)
        y = torch.from_numpy(np.stack(msks)).float()[:, None]
        loss = focal_loss(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if progress is not None:
            progress(step + 1, config.steps, float(loss.detach()))
    net.eval()
    return net


@torch.no_grad()
def predict(net: SegNet, images: np.ndarray, batch: int = 64) -> np.ndarray:
    out = []
    for i in range(0, len(images), batch):
        x = _to_input(images[i : i + batch]).contiguous(memory_format=torch.channels_last)
        out.append(torch.sigmoid(net(x))[:, 0].contiguous().numpy())
    return np.concatenate(out)


def segmentation_scores(prob: np.ndarray, masks: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Pixel AUROC/AP/F1-max over all test pixels; image AUROC/AP with the image score = the maximum of the
    average-pooled map (window = size/12, the reference's 21 px at 256)."""
    k = max(1, int(round(prob.shape[-1] / 12))) | 1
    pooled = F.avg_pool2d(torch.from_numpy(prob)[:, None], k, stride=1, padding=k // 2, count_include_pad=False)
    img_score = pooled.amax(dim=(1, 2, 3)).numpy()
    return {
        "pixel_auroc": metrics.roc_auc(prob, masks),
        "pixel_ap": metrics.average_precision(prob, masks),
        "pixel_f1max": metrics.f1_max(prob, masks),
        "image_auroc": metrics.roc_auc(img_score, labels),
        "image_ap": metrics.average_precision(img_score, labels),
    }


def held_out_test_set(real: RealData) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Held-out defects + normal test images: images, masks, image labels."""
    imgs = np.concatenate([real.held_out.images, real.normals_test])
    masks = np.concatenate(
        [real.held_out.masks, np.zeros((len(real.normals_test),) + real.held_out.masks.shape[1:], bool)]
    )
    labels = np.r_[np.ones(len(real.held_out), bool), np.zeros(len(real.normals_test), bool)]
    return imgs, masks, labels


def synthetic_pool(
    kind: str, real: RealData, n: int, seed: int = 0, other_normals: np.ndarray | None = None
) -> PairSet:
    """``n`` CutPaste ("cutpaste", normal and scar variants 50/50) or Perlin ("perlin") pairs made from the normal
    training images. Perlin anomaly sources: ``other_normals`` (e.g. other products) and random colour fields."""
    rng = np.random.default_rng([seed, {"cutpaste": 1, "perlin": 2}.get(kind, 0)])
    imgs, masks = [], []
    for _ in range(n):
        base = real.normals_train[int(rng.integers(0, len(real.normals_train)))]
        if kind == "cutpaste":
            img, m = synthetic.cutpaste(base, rng, "mixed")
        elif kind == "perlin":
            img, m = synthetic.perlin_anomaly(base, rng, other_normals)
        else:
            raise ValueError(f"unknown synthetic source {kind!r}: use 'cutpaste' or 'perlin'")
        imgs.append(img)
        masks.append(m > 0)
    return PairSet(np.stack(imgs), np.stack(masks), [f"{kind}_{i:04d}" for i in range(n)])


SOURCES = ("generated", "real", "real+generated", "cutpaste", "perlin")
#: rows whose scores depend only on the real data and the settings, not on the generated set
REFERENCE_SOURCES = ("real", "cutpaste", "perlin")
CACHE_VERSION = 1


def _data_digest(*arrays: np.ndarray | None) -> str:
    """sha256 over arrays (shapes and bytes; None counts as a marker)."""
    h = hashlib.sha256()
    for a in arrays:
        if a is None:
            h.update(b"none")
            continue
        h.update(str(a.shape).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _cache_file(config: BenchConfig, digest: str, source: str, seed: int) -> Path | None:
    if config.cache_dir is None:
        return None
    key = {
        "version": CACHE_VERSION,
        "data": digest,
        "source": source,
        "seed": int(seed),
        "seg": config.seg.to_dict(),
        "n_synthetic": config.n_synthetic if source in ("cutpaste", "perlin") else None,
    }
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return Path(config.cache_dir) / f"{source}-{seed}-{name}.json"


@dataclasses.dataclass
class BenchConfig:
    sources: tuple[str, ...] = SOURCES
    seeds: tuple[int, ...] = (0, 1, 2)
    seg: SegConfig = SegConfig()
    n_synthetic: int = 500
    train_count: int | None = None  # None = the strict first third
    detector_quantile: float = 0.999
    max_diversity_items: int = 200
    #: folder for the usefulness scores, one file per (real data, generated pairs for the rows that use them,
    #: source, segmentation seed, settings), reused when all of them match; None = no cache
    cache_dir: str | None = None

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["sources"], d["seeds"] = list(self.sources), list(self.seeds)
        return d


def _other_normals(root: Path, category: str, size: int, limit: int = 60) -> np.ndarray | None:
    """Normal training images of the other categories in the same dataset root (Perlin anomaly sources)."""
    out = []
    for d in sorted(root.iterdir()) if root.is_dir() else []:
        good = d / "train" / "good"
        if d.name != category and good.is_dir():
            files = list_png(good)[:limit]
            out.extend(read_rgb(p, size) for p in files)
    return np.stack(out) if out else None


def benchmark(
    data_root: str | Path,
    category: str,
    defect: str,
    generated: str | Path | None = None,
    config: BenchConfig | None = None,
    generated_category: str | None = None,
    generated_defect: str | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run (a), (b), (c) for one (category, defect). Without ``generated`` only the real and synthetic references
    are measured (the rows that need generated data are skipped and say so)."""
    config = config or BenchConfig()
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    t0 = time.time()
    real = load_real(data_root, category, defect, config.train_count)
    size = real.size
    gen = None
    if generated is not None:
        gen = load_generated(generated, generated_category or category, generated_defect or defect, size)
        if len(gen.pairs) == 0:
            raise ValueError(f"{generated}: no accepted samples for {category}/{defect}")
    result: dict[str, Any] = {
        "category": category,
        "defect": defect,
        "data_root": str(data_root),
        "generated": None if generated is None else str(generated),
        "config": config.to_dict(),
        "counts": {
            "normal_train": len(real.normals_train),
            "normal_test": len(real.normals_test),
            "few_shot": len(real.few_shot),
            "held_out": len(real.held_out),
            "generated": 0 if gen is None else len(gen.pairs),
            "generated_rejected": 0 if gen is None else gen.rejected,
        },
    }
    # (a) alignment
    det = TextureDetector(config.detector_quantile).fit(real.normals_train)
    align = {"real_held_out": alignment(det, real.held_out.images, real.held_out.masks)}
    normal_fp = det.detect(real.normals_test)
    align["normal_test_false_positive_area"] = float(normal_fp.mean())
    if gen is not None:
        align["generated"] = alignment(det, gen.pairs.images, gen.pairs.masks)
        if gen.fg is not None:
            align["generated"]["stored_vs_reextracted_mask_iou"] = fg_mask_agreement(gen.fg, gen.pairs.masks)
    result["alignment"] = align
    log("alignment done")
    # (b) diversity
    div = {
        "real_held_out": diversity(
            real.held_out.images, real.held_out.masks, real.few_shot.images, config.max_diversity_items
        )
    }
    if gen is not None:
        div["generated"] = diversity(
            gen.pairs.images, gen.pairs.masks, real.few_shot.images, config.max_diversity_items
        )
    result["diversity"] = div
    log("diversity done")
    # (c) usefulness
    test_imgs, test_masks, test_labels = held_out_test_set(real)
    det_scores = det.score(test_imgs)
    use: dict[str, Any] = {
        "texture_detector (no training)": {
            "scores": segmentation_scores(det_scores / (det_scores.max() + 1e-9), test_masks, test_labels)
        }
    }
    pools: dict[str, PairSet] = {}
    others = None
    for src in config.sources:
        if src in ("generated", "real+generated") and gen is None:
            use[src] = {"skipped": "no generated folder given"}
            continue
        if src == "generated":
            pools[src] = gen.pairs
        elif src == "real":
            pools[src] = real.few_shot
        elif src == "real+generated":
            # the few real pairs are as likely to be drawn as the whole generated set
            reps = max(1, len(gen.pairs) // max(1, len(real.few_shot)))
            fs = real.few_shot
            pools[src] = PairSet(
                np.concatenate([gen.pairs.images] + [fs.images] * reps),
                np.concatenate([gen.pairs.masks] + [fs.masks] * reps),
                gen.pairs.names + fs.names * reps,
            )
        elif src in ("cutpaste", "perlin"):
            if src == "perlin" and others is None:
                others = _other_normals(Path(data_root), category, size)
            pools[src] = synthetic_pool(src, real, config.n_synthetic, 0, others)
        else:
            raise ValueError(f"unknown source {src!r}; choose from {', '.join(SOURCES)}")
    digest = ""
    if config.cache_dir is not None:
        r = real
        digest = _data_digest(
            r.normals_train, r.normals_test, r.few_shot.images, r.few_shot.masks, r.held_out.images, r.held_out.masks
        )
    cached_runs = 0
    for src, pool in pools.items():
        runs = []
        for seed in config.seeds:
            t1 = time.time()
            d = digest
            if digest and src == "perlin":
                d = _data_digest(others) + digest
            elif digest and src in ("generated", "real+generated"):
                d = _data_digest(gen.pairs.images, gen.pairs.masks) + digest
            cache = _cache_file(config, d, src, seed)
            if cache is not None and cache.is_file():
                sc = json.loads(cache.read_text())["scores"]
                cached_runs += 1
                log(f"usefulness {src} seed {seed}: pixel AP {sc['pixel_ap']:.3f} (cached: {cache.name})")
                runs.append(sc)
                continue
            net = train_segnet(real.normals_train, pool, config.seg, seed)
            sc = segmentation_scores(predict(net, test_imgs), test_masks, test_labels)
            runs.append(sc)
            if cache is not None:
                from ..fileio import write_json_atomic

                cache.parent.mkdir(parents=True, exist_ok=True)
                write_json_atomic(cache, {"source": src, "seed": seed, "scores": sc})
            log(
                f"usefulness {src} seed {seed}: pixel AP {sc['pixel_ap']:.3f} AUROC {sc['pixel_auroc']:.3f} "
                f"({time.time() - t1:.0f} s)"
            )
        agg = {k: metrics.mean_std(r[k] for r in runs) for k in runs[0]}
        use[src] = {
            "scores": {k: v[0] for k, v in agg.items()},
            "std": {k: v[1] for k, v in agg.items()},
            "per_seed": runs,
            "train_pairs": len(pool),
        }
    result["usefulness"] = use
    result["cached_runs"] = cached_runs
    result["seconds"] = round(time.time() - t0, 1)
    return result


# ---------------------------------------------------------------------------------------------------------------------
# report


def _f(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{digits}f}"


def format_report(r: dict[str, Any]) -> str:
    c = r["counts"]
    lines = [
        f"MiniDefect quality: {r['category']}/{r['defect']}  (few-shot {c['few_shot']}, held-out {c['held_out']}, "
        f"normal test {c['normal_test']}, generated {c['generated']} accepted / {c['generated_rejected']} rejected)",
        "",
        "(a) mask alignment: independent texture detector vs mask",
        f"    {'set':<16}{'IoU mean':>10}{'IoU med':>10}{'pix AUROC':>11}{'hit rate':>10}{'mask area':>11}"
        f"{'defects/img':>13}{'area/defect':>13}",
    ]
    for name in ("real_held_out", "generated"):
        a = r["alignment"].get(name)
        if a:
            lines.append(
                f"    {name:<16}{_f(a['iou_mean']):>10}{_f(a['iou_median']):>10}{_f(a['pixel_auroc']):>11}"
                f"{_f(a['hit_rate']):>10}{_f(a['mask_area'], 4):>11}"
                f"{_f(a.get('defects_per_image'), 2):>13}{_f(a.get('defect_area'), 4):>13}"
            )
    lines.append(
        f"    detector false-positive area on normal test images: "
        f"{_f(r['alignment']['normal_test_false_positive_area'], 4)}"
    )
    lines += [
        "",
        "(b) diversity (pixel L1 in [0,1]; IC-L1 = IC-LPIPS protocol with L1)",
        f"    {'set':<16}{'pairwise':>10}{'IC-L1':>10}{'mask 1-IoU':>12}{'to train':>10}{'min':>8}",
    ]
    for name in ("real_held_out", "generated"):
        d = r["diversity"].get(name)
        if d:
            lines.append(
                f"    {name:<16}{_f(d['pixel_l1']):>10}{_f(d['ic_l1']):>10}{_f(d['mask_1_minus_iou']):>12}"
                f"{_f(d['nearest_train_l1']):>10}{_f(d['nearest_train_l1_min']):>8}"
            )
    lines += [
        "",
        "(c) usefulness: segmentation net trained on <source>, tested on held-out real defects + normals",
        f"    {'source':<31}{'pix AP':>14}{'pix AUROC':>14}{'pix F1max':>11}{'img AUROC':>11}",
    ]
    for name, u in r["usefulness"].items():
        if "skipped" in u:
            lines.append(f"    {name:<31}  skipped: {u['skipped']}")
            continue
        s, sd = u["scores"], u.get("std", {})
        several = len(u.get("per_seed", [])) > 1
        pm = lambda k: _f(s[k]) + (f"±{_f(sd[k])}" if several and k in sd else "")  # noqa: E731, B023 (used at once)
        lines.append(
            f"    {name:<31}{pm('pixel_ap'):>14}{pm('pixel_auroc'):>14}{_f(s['pixel_f1max']):>11}"
            f"{_f(s['image_auroc']):>11}"
        )
    n_seeds = len(r["config"]["seeds"])
    lines.append(
        f"    ({n_seeds} seed(s), {r['config']['seg']['steps']} steps each" + ("; mean ± std)" if n_seeds > 1 else ")")
    )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# one summary row per (category, defect): what the acceptance criteria of the quality benchmark look at


def summary_row(r: dict[str, Any]) -> dict[str, Any]:
    """Pixel AP (mean ± std over seeds) per source, the detector hit-rate ratio and the mask-area ratio of
    generated vs real held-out pairs, and how many generated pairs the filter accepted: one row of the table in
    docs/quality.md (and of the demo report)."""
    use = r.get("usefulness", {})

    def ap(src):
        u = use.get(src) or {}
        if "scores" not in u:
            return None, None
        return u["scores"]["pixel_ap"], u.get("std", {}).get("pixel_ap")

    a = r.get("alignment", {})
    real, gen = a.get("real_held_out") or {}, a.get("generated") or {}
    hit = area = count = defect_area = None
    if gen and real:
        hit = gen["hit_rate"] / real["hit_rate"] if real.get("hit_rate") else None
        area = gen["mask_area"] / real["mask_area"] if real.get("mask_area") else None
        if real.get("defects_per_image") and "defects_per_image" in gen:  # absent from results written before
            count = gen["defects_per_image"] / real["defects_per_image"]
            defect_area = gen["defect_area"] / real["defect_area"] if real.get("defect_area") else None
    c = dict(r.get("counts", {}))
    if "run" in r:  # end to end: the filter's counts even when every pair was rejected
        c["generated"], c["generated_rejected"] = r["run"].get("accepted", 0), r["run"].get("rejected", 0)
    return {
        "type": f"{r['category']}/{r['defect']}",
        "pixel_ap": {s: ap(s)[0] for s in SOURCES},
        "pixel_ap_std": {s: ap(s)[1] for s in SOURCES},
        "hit_rate_generated": gen.get("hit_rate"),
        "hit_rate_real": real.get("hit_rate"),
        "hit_ratio": hit,
        "mask_area_ratio": area,
        #: the mask-area ratio split into (defects per image) x (area of one defect), generated / real
        "defects_per_image_ratio": count,
        "defect_area_ratio": defect_area,
        "accepted": c.get("generated", 0),
        "rejected": c.get("generated_rejected", 0),
    }


def format_summary(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of :func:`summary_row` rows, with the mean pixel AP per source as the last row."""
    head = [
        "| defect type | generated | real (few-shot) | real+generated | CutPaste | Perlin | detector hit gen/real "
        "| mask area gen/real | accepted/generated |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def ap(row, s):
        v, sd = row["pixel_ap"].get(s), row["pixel_ap_std"].get(s)
        if v is None:
            return "-"
        return _f(v) + (f" ± {_f(sd)}" if sd else "")

    lines = []
    for row in rows:
        n = row["accepted"] + row["rejected"]
        lines.append(
            f"| {row['type']} | "
            + " | ".join(ap(row, s) for s in SOURCES)
            + f" | {_f(row['hit_ratio'], 2)} | {_f(row['mask_area_ratio'], 2)} | {row['accepted']}/{n} |"
        )
    if len(rows) > 1:
        means = []
        for s in SOURCES:
            vals = [row["pixel_ap"][s] for row in rows if row["pixel_ap"].get(s) is not None]
            means.append(_f(float(np.mean(vals))) if len(vals) == len(rows) else "-")
        lines.append("| **mean** | " + " | ".join(means) + " | | | |")
    return "\n".join(head + lines)
