"""Binary defect masks from the anomaly-branch image (docs/method.md, "Mask extraction"), with numpy/torch only.

The anomaly branch draws the defect alone on a mid-gray background (0 in [-1, 1], i.e. 127.5/255). The mask is where
the image differs from that gray:

1. gray level: the per-channel median of the image (default), of its border ring, or a fixed value (0.5);
2. Gaussian smoothing of the image (``blur_sigma``), then the distance from the gray level, reduced over the
   channels (``max`` by default, so a defect that changes only one colour channel still counts);
3. emptiness is decided against an **absolute** contrast floor (``min_contrast``): an image whose strongest
   difference from gray is below it gives an empty mask and ``empty=True`` (never a min-max normalised ghost
   mask, never NaN);
4. threshold: Otsu on the distance map (never below the floor) or a fixed level; with ``hysteresis < 1`` the
   region grows into connected pixels above ``hysteresis * threshold`` (faint defect rims stay in the mask);
5. opening, closing, hole filling, removal of components under ``min_area`` pixels, optional dilation.

All distances are in image units: 0.1 means "differs from the gray level by 10 % of full scale (25.5/255)".
Radii and areas are in pixels of the image given (defaults suit 256-1024 px images).

Also here: :func:`change_mask` (where a generated image differs from a known normal image) and
:func:`refine_with_change` (drop mask components that the known normal image does not support).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

GRAY_LEVEL = 0.5  # the anomaly branch's background: 0 in [-1, 1]
REDUCTIONS = ("max", "mean", "l2")
GRAY_MODES = ("median", "border")


# ---- options and results -------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MaskOptions:
    """How an anomaly-branch image becomes a mask. Distances in [0, 1] image units, radii/areas in pixels."""

    #: "median" (per-channel median of the whole image), "border" (median of a border ring) or a fixed level in [0, 1]
    gray: str | float = "median"
    #: channel reduction of the per-channel distance: "max", "mean" or "l2" (Euclidean / sqrt(channels))
    reduce: str = "max"
    #: Gaussian smoothing of the image before the distance, in pixels (0 = off)
    blur_sigma: float = 1.0
    #: "otsu" or a fixed distance level in (0, 1)
    threshold: str | float = "otsu"
    #: absolute contrast floor: below it the image is "empty"; an Otsu threshold never goes below it
    min_contrast: float = 0.1
    #: grow the thresholded region into connected pixels above hysteresis * threshold (1 = off)
    hysteresis: float = 0.5
    #: opening radius (removes specks and thin spurs; 0 = off; a radius r removes lines thinner than about 2r+1 px)
    open_radius: int = 1
    #: closing radius (joins fragments, fills pinholes; 0 = off)
    close_radius: int = 2
    #: fill holes enclosed by the mask
    fill_holes: bool = True
    #: drop connected components smaller than this many pixels
    min_area: int = 20
    #: final dilation radius (0 = off)
    dilate: int = 0
    #: pixel connectivity of the components: 4 or 8
    connectivity: int = 8
    #: refinement with a known normal image: tolerance (px) between the mask and the change map
    refine_tolerance: int = 3
    #: refinement: a component is kept if at least this share of its (comparable) pixels lies on a change
    refine_min_overlap: float = 0.5
    #: refinement by the generated global image (0 = off): keep only the pixels, near the anomaly-branch mask, that
    #: the global image shows: they differ from a ring around them by more than this many of the ring's standard
    #: deviations (:func:`refine_visible`); the mask then marks what the image shows, not what the anomaly branch drew
    visible_min_deviation: float = 0.0
    #: refinement by the global image: how far (px) outside the anomaly-branch mask a visible pixel may lie
    visible_search: int = 2
    #: refinement by the global image: width (px) of the ring whose colour statistics are the local background
    visible_ring: int = 3
    #: refinement by the global image: a visible pixel also differs from the ring's mean by at least this much
    #: (image units), so that on a very flat surface sensor-level noise does not count as a defect
    visible_min_difference: float = 0.03

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        g = self.gray
        if isinstance(g, str):
            if g not in GRAY_MODES:
                try:
                    g = float(g)
                except ValueError:
                    raise ValueError(
                        f"mask option gray={g!r}: use 'median', 'border' or a level in [0, 1] "
                        "(0.5 is the anomaly branch's mid-gray)"
                    ) from None
                object.__setattr__(self, "gray", g)
        if not isinstance(self.gray, str) and not (0.0 <= float(self.gray) <= 1.0):
            raise ValueError(f"mask option gray={self.gray}: a fixed gray level must lie in [0, 1] (0.5 = mid-gray)")
        if self.reduce not in REDUCTIONS:
            raise ValueError(f"mask option reduce={self.reduce!r}: choose one of {', '.join(REDUCTIONS)}")
        t = self.threshold
        if isinstance(t, str) and t != "otsu":
            try:
                t = float(t)
            except ValueError:
                raise ValueError(f"mask option threshold={t!r}: use 'otsu' or a level in (0, 1)") from None
            object.__setattr__(self, "threshold", t)
        if not isinstance(self.threshold, str) and not (0.0 < float(self.threshold) < 1.0):
            raise ValueError(f"mask option threshold={self.threshold}: a fixed level must lie in (0, 1), e.g. 0.15")
        if not (0.0 < self.min_contrast < 1.0):
            raise ValueError(f"mask option min_contrast={self.min_contrast}: must lie in (0, 1), e.g. 0.1")
        if not (0.0 < self.hysteresis <= 1.0):
            raise ValueError(f"mask option hysteresis={self.hysteresis}: must lie in (0, 1]; 1 turns it off")
        if self.blur_sigma < 0 or not math.isfinite(self.blur_sigma):
            raise ValueError(f"mask option blur_sigma={self.blur_sigma}: must be >= 0 (0 = no smoothing)")
        if not (0.0 <= self.visible_min_deviation <= 100.0) or self.visible_min_deviation != self.visible_min_deviation:
            raise ValueError(
                f"mask option visible_min_deviation={self.visible_min_deviation}: must lie in [0, 100] (0 = off, "
                "e.g. 1.5 ring standard deviations)"
            )
        if not (0.0 <= self.visible_min_difference < 1.0):
            raise ValueError(
                f"mask option visible_min_difference={self.visible_min_difference}: must lie in [0, 1), e.g. 0.03"
            )
        if int(self.visible_ring) != self.visible_ring or self.visible_ring < 1:
            raise ValueError(f"mask option visible_ring={self.visible_ring}: a whole number of pixels >= 1")
        for name in ("open_radius", "close_radius", "min_area", "dilate", "refine_tolerance", "visible_search"):
            v = getattr(self, name)
            if int(v) != v or v < 0:
                raise ValueError(f"mask option {name}={v}: must be a whole number >= 0")
        if self.connectivity not in (4, 8):
            raise ValueError(f"mask option connectivity={self.connectivity}: must be 4 or 8")
        if not (0.0 <= self.refine_min_overlap <= 1.0):
            raise ValueError(f"mask option refine_min_overlap={self.refine_min_overlap}: must lie in [0, 1]")

    def replace(self, **changes) -> MaskOptions:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if not self.visible_min_deviation:
            # the refinement by the global image is off: its settings are left out, so that the settings recorded by
            # a dataset written before they existed still match (``dualanodiff generate`` resumes such a folder)
            for k in VISIBLE_FIELDS:
                del d[k]
        return d


VISIBLE_FIELDS = ("visible_min_deviation", "visible_search", "visible_ring", "visible_min_difference")


@dataclasses.dataclass(frozen=True)
class MaskResult:
    """A binary mask (``uint8`` ``[H, W]``, values exactly 0 and 255) and how it was obtained."""

    mask: np.ndarray
    empty: bool
    area_fraction: float
    #: distance level used (after the floor); the floor itself when the image is empty
    threshold: float
    #: lower hysteresis level actually used (== threshold when hysteresis is off)
    low_threshold: float
    #: the gray level per channel the distance was measured from
    gray_level: tuple[float, ...]
    #: per-channel median of the whole image (how far the background is from mid-gray; see quality.check_pair)
    image_median: tuple[float, ...]
    #: largest smoothed distance from the gray level
    max_contrast: float
    components: int
    #: why the mask is empty, or what the refinement removed; "" otherwise
    note: str = ""
    #: with the refinement by the global image: the share of the anomaly-branch mask's pixels that the global image
    #: shows (0 = none: the image does not show the defect); None when that refinement was off
    visible_share: float | None = None
    #: with the refinement by the global image: the mask as drawn by the anomaly branch, before the refinement (bool
    #: ``[H, W]``). The acceptance filter's alignment check runs on it: checked on the refined mask, which was chosen
    #: for differing from its surroundings, texture would pass it too. Not stored in records.
    drawn: np.ndarray | None = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def area(self) -> int:
        return int(np.count_nonzero(self.mask))

    def to_pil(self) -> Image.Image:
        return Image.fromarray(self.mask, mode="L")

    def bool_mask(self) -> np.ndarray:
        return self.mask > 0

    def to_record(self) -> dict[str, Any]:
        """JSON-safe summary (everything but the pixels)."""
        r = lambda x: round(float(x), 6)  # noqa: E731
        return {
            "empty": bool(self.empty),
            "area_fraction": r(self.area_fraction),
            "area_px": self.area,
            "threshold": r(self.threshold),
            "low_threshold": r(self.low_threshold),
            "gray_level": [r(v) for v in self.gray_level],
            "image_median": [r(v) for v in self.image_median],
            "max_contrast": r(self.max_contrast),
            "components": int(self.components),
            "note": self.note,
            "visible_share": None if self.visible_share is None else r(self.visible_share),
        }


# ---- input conversion ----------------------------------------------------------------------------------------------
def to_float_image(image, name: str = "image") -> np.ndarray:
    """PIL image, ``[H, W(, C)]`` numpy array (uint8 or float in [0, 1]) or ``[C, H, W]``/``[1, C, H, W]`` tensor in
    [0, 1] -> float32 ``[H, W, C]`` in [0, 1]. An alpha channel is dropped."""
    if isinstance(image, Image.Image):
        if image.mode not in ("L", "RGB"):
            image = image.convert("RGB")
        arr = np.asarray(image, dtype=np.float32) / 255.0
    elif isinstance(image, torch.Tensor):
        t = image.detach()
        if t.ndim == 4:
            if t.shape[0] != 1:
                raise ValueError(f"{name}: give one image, got a batch of {t.shape[0]}")
            t = t[0]
        if t.ndim != 3:
            raise ValueError(f"{name}: a tensor image must be [C, H, W], got shape {tuple(image.shape)}")
        arr = t.float().cpu().permute(1, 2, 0).numpy()
    elif isinstance(image, np.ndarray):
        arr = image
        if arr.dtype == np.uint8:
            arr = arr.astype(np.float32) / 255.0
        elif arr.dtype == np.bool_:
            arr = arr.astype(np.float32)
        else:
            arr = arr.astype(np.float32)
    else:
        raise TypeError(f"{name}: expected a PIL image, numpy array or torch tensor, got {type(image).__name__}")
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise ValueError(f"{name}: expected [H, W], [H, W, C] with C in 1/3/4, got shape {arr.shape}")
    if arr.shape[2] == 4:
        arr = arr[..., :3]
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"{name}: the image is empty ({arr.shape[1]}x{arr.shape[0]})")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name}: the image contains NaN or infinite values")
    if arr.min() < -1e-3 or arr.max() > 1 + 1e-3:
        raise ValueError(f"{name}: float pixel values must lie in [0, 1], got [{arr.min():.3g}, {arr.max():.3g}]")
    return np.ascontiguousarray(np.clip(arr, 0.0, 1.0), dtype=np.float32)


def to_bool_mask(mask, name: str = "mask", shape: tuple[int, int] | None = None) -> np.ndarray:
    """A mask (PIL, array or tensor; nonzero / >= 0.5 = inside) -> bool ``[H, W]``."""
    if isinstance(mask, Image.Image):
        arr = np.asarray(mask.convert("L")) >= 128
    elif isinstance(mask, torch.Tensor):
        arr = mask.detach().float().cpu().numpy().squeeze()
        arr = arr >= 0.5
    else:
        arr = np.asarray(mask)
        if arr.ndim == 3:
            arr = arr.max(axis=2)
        arr = arr >= 128 if arr.dtype == np.uint8 else arr >= 0.5 if arr.dtype != np.bool_ else arr
    if arr.ndim != 2:
        raise ValueError(f"{name}: expected a single-channel mask [H, W], got shape {arr.shape}")
    if shape is not None and arr.shape != tuple(shape):
        raise ValueError(f"{name}: mask is {arr.shape[1]}x{arr.shape[0]} but the image is {shape[1]}x{shape[0]}")
    return arr


# ---- smoothing, distance, threshold --------------------------------------------------------------------------------
def gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of ``[H, W, C]`` (reflect padding)."""
    if sigma <= 0:
        return img
    radius = max(1, int(math.ceil(3.0 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(x * x) / (2.0 * sigma * sigma))
    k = k / k.sum()
    h, w, c = img.shape
    t = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))[:, None]  # [C, 1, H, W]
    # reflect padding needs pad < size; fall back to replicate on tiny images
    mode = "reflect" if radius < min(h, w) else "replicate"
    t = F.pad(t, (radius, radius, 0, 0), mode=mode)
    t = F.conv2d(t, k.view(1, 1, 1, -1))
    t = F.pad(t, (0, 0, radius, radius), mode=mode)
    t = F.conv2d(t, k.view(1, 1, -1, 1))
    return t[:, 0].numpy().transpose(1, 2, 0)


def estimate_gray(img: np.ndarray, mode: str | float = "median") -> np.ndarray:
    """Per-channel gray level of the anomaly image's background."""
    c = img.shape[2]
    if not isinstance(mode, str):
        return np.full(c, float(mode), dtype=np.float32)
    if mode == "median":
        return np.median(img.reshape(-1, c), axis=0).astype(np.float32)
    if mode == "border":
        h, w = img.shape[:2]
        b = max(1, int(round(min(h, w) / 16)))
        if 2 * b >= min(h, w):
            return np.median(img.reshape(-1, c), axis=0).astype(np.float32)
        ring = np.concatenate(
            [
                img[:b].reshape(-1, c),
                img[-b:].reshape(-1, c),
                img[b:-b, :b].reshape(-1, c),
                img[b:-b, -b:].reshape(-1, c),
            ]
        )
        return np.median(ring, axis=0).astype(np.float32)
    raise ValueError(f"gray mode {mode!r}: use 'median', 'border' or a level in [0, 1]")


def reduce_channels(diff: np.ndarray, how: str = "max") -> np.ndarray:
    """``[H, W, C]`` absolute differences -> ``[H, W]`` in [0, 1]."""
    if how == "max":
        return diff.max(axis=2)
    if how == "mean":
        return diff.mean(axis=2)
    if how == "l2":
        return np.sqrt((diff * diff).sum(axis=2) / diff.shape[2])
    raise ValueError(f"channel reduction {how!r}: choose one of {', '.join(REDUCTIONS)}")


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's level for non-negative values: pixels ``> level`` are foreground. A constant input returns its value."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        return 0.0
    lo, hi = float(v.min()), float(v.max())
    if not hi > lo:
        return hi
    hist, edges = np.histogram(v, bins=bins, range=(lo, hi))
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist, dtype=np.float64)
    w1 = w0[-1] - w0
    m = np.cumsum(hist * centers)
    mu0 = np.divide(m, w0, out=np.zeros_like(m), where=w0 > 0)
    mu1 = np.divide(m[-1] - m, w1, out=np.zeros_like(m), where=w1 > 0)
    between = w0 * w1 * (mu0 - mu1) ** 2
    k = int(np.argmax(between[:-1]))
    return float(edges[k + 1])


# ---- binary morphology (torch max-pooling; disk-like octagons) -----------------------------------------------------
def _grow(t: torch.Tensor, radius: int) -> torch.Tensor:
    """Dilate a float {0,1} ``[1,1,H,W]`` tensor by an octagon of the given radius; the outside counts as 0."""
    for i in range(radius):
        if i % 2 == 0:  # 4-neighbour cross
            t = torch.maximum(F.max_pool2d(t, (3, 1), 1, (1, 0)), F.max_pool2d(t, (1, 3), 1, (0, 1)))
        else:  # 3x3 square
            t = F.max_pool2d(t, 3, 1, 1)
    return t


def _crop(mask: np.ndarray, margin: int) -> tuple[slice, slice] | None:
    """Bounding box of the foreground grown by ``margin`` (clipped to the image); None when empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    h, w = mask.shape
    return (
        slice(max(0, rows[0] - margin), min(h, rows[-1] + 1 + margin)),
        slice(max(0, cols[0] - margin), min(w, cols[-1] + 1 + margin)),
    )


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Dilation by an octagon (cross and square steps alternating); works on the foreground's bounding box only."""
    mask = np.asarray(mask, dtype=bool)
    box = _crop(mask, radius) if radius > 0 else None
    if box is None:
        return mask.copy()
    t = torch.from_numpy(mask[box].astype(np.float32))[None, None]
    out = np.zeros_like(mask)
    out[box] = _grow(t, radius)[0, 0].numpy() > 0.5
    return out


def erode(mask: np.ndarray, radius: int) -> np.ndarray:
    """Erosion; pixels outside the image count as foreground, so objects touching the border are not eaten."""
    mask = np.asarray(mask, dtype=bool)
    box = _crop(mask, radius) if radius > 0 else None
    if box is None:
        return mask.copy()
    sub = mask[box]
    t = torch.from_numpy((~sub).astype(np.float32))[None, None]
    out = np.zeros_like(mask)
    # inside the grown box every neighbour within the radius is in the crop or outside the image
    out[box] = ~(_grow(t, radius)[0, 0].numpy() > 0.5)
    return out


def binary_open(mask: np.ndarray, radius: int) -> np.ndarray:
    return dilate(erode(mask, radius), radius) if radius > 0 else mask.copy()


def binary_close(mask: np.ndarray, radius: int) -> np.ndarray:
    return erode(dilate(mask, radius), radius) if radius > 0 else mask.copy()


# ---- connected components (run-length union-find, vectorised) ------------------------------------------------------
def label_components(mask: np.ndarray, connectivity: int = 8) -> tuple[np.ndarray, int]:
    """Label the connected components of a bool ``[H, W]`` mask.

    Returns ``(labels, n)``: int32 labels, 0 for background and 1..n numbered by first pixel in raster order.
    Works on horizontal runs (vectorised overlap search + union-find with path halving), so it is fast for the
    blob-like masks met here.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"label_components: expected a [H, W] mask, got shape {mask.shape}")
    if connectivity not in (4, 8):
        raise ValueError("connectivity must be 4 or 8")
    h, w = mask.shape
    labels = np.zeros((h, w), dtype=np.int32)
    if not mask.any():
        return labels, 0
    padded = np.zeros((h, w + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    d = np.diff(padded, axis=1)
    rows, starts = np.nonzero(d == 1)
    _, ends = np.nonzero(d == -1)  # exclusive; same row order as the starts
    nruns = rows.size
    stride = w + 2
    key_s = rows.astype(np.int64) * stride + starts
    key_e = rows.astype(np.int64) * stride + ends
    base = (rows.astype(np.int64) + 1) * stride
    extra = 1 if connectivity == 8 else 0
    # runs b of the next row touching run a: s_b <= e_a - 1 + extra and e_b >= s_a + 1 - extra
    lo = np.searchsorted(key_e, base + starts + (1 - extra), side="left")
    hi = np.searchsorted(key_s, base + ends + extra - 1, side="right")
    counts = np.maximum(hi - lo, 0)
    parent = np.arange(nruns, dtype=np.int64)
    total = int(counts.sum())
    if total:
        a = np.repeat(np.arange(nruns, dtype=np.int64), counts)
        offsets = np.repeat(np.cumsum(counts) - counts, counts)
        b = np.repeat(lo, counts) + (np.arange(total) - offsets)
        while True:
            ra, rb = parent[a], parent[b]
            diff = ra != rb
            if not diff.any():
                break
            ra, rb = ra[diff], rb[diff]
            np.minimum.at(parent, np.maximum(ra, rb), np.minimum(ra, rb))
            while True:  # full path compression: every run points at its root
                pp = parent[parent]
                if np.array_equal(pp, parent):
                    break
                parent = pp
            a, b = a[diff], b[diff]
    roots, comp = np.unique(parent, return_inverse=True)
    lengths = ends - starts
    flat_start = rows.astype(np.int64) * w + starts
    n_px = int(lengths.sum())
    idx = np.repeat(flat_start - (np.cumsum(lengths) - lengths), lengths) + np.arange(n_px)
    labels.reshape(-1)[idx] = np.repeat(comp.astype(np.int32) + 1, lengths)
    return labels, int(roots.size)


def remove_small(mask: np.ndarray, min_area: int, connectivity: int = 8) -> tuple[np.ndarray, int]:
    """Drop components under ``min_area`` pixels; returns the mask and the number of components kept."""
    labels, n = label_components(mask, connectivity)
    if n == 0:
        return mask.copy(), 0
    area = np.bincount(labels.ravel(), minlength=n + 1)
    keep = area >= max(1, int(min_area))
    keep[0] = False
    return keep[labels], int(keep.sum())


def fill_holes(mask: np.ndarray, connectivity: int = 8) -> np.ndarray:
    """Fill background regions that do not touch the image border."""
    if not mask.any():
        return mask.copy()
    bg_conn = 4 if connectivity == 8 else 8
    labels, n = label_components(~mask, bg_conn)
    if n == 0:
        return mask.copy()
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    hole = np.ones(n + 1, dtype=bool)
    hole[border] = False
    hole[0] = False
    return mask | hole[labels]


def count_components(mask: np.ndarray, connectivity: int = 8) -> int:
    return label_components(mask, connectivity)[1]


# ---- the extraction ------------------------------------------------------------------------------------------------
def _binarize(dist: np.ndarray, raw: np.ndarray | None, options: MaskOptions) -> tuple[np.ndarray, float, float, str]:
    """Distance maps (smoothed, and per-pixel ``raw``) -> cleaned bool mask, threshold, low threshold, note.

    A pixel belongs to the mask only if its *own* (raw) distance exceeds the low level and it is connected to a seed:
    a pixel whose smoothed distance exceeds the threshold. Smoothing decides *whether* there is a defect (noise
    averages out); the raw distance decides *where its edges are* (smoothing spreads a strong edge outwards by about a
    pixel and averages touching dark/bright parts to gray). Without hysteresis the low level equals the threshold.
    """
    floor = float(options.min_contrast)
    if options.threshold == "otsu":
        high = max(otsu_threshold(dist), floor)
    else:
        high = float(options.threshold)
    # the grow level never goes under the floor (unless a fixed threshold is itself set under it)
    low = high if options.hysteresis >= 1.0 else max(min(floor, high), options.hysteresis * high)
    # the pixel itself differs from the reference, and its neighbourhood does too (keeps isolated noise out)
    own = (dist > 0.5 * low) if raw is None else (raw > low) & (dist > 0.5 * low)
    seeds = (dist > high) & own
    if seeds.any():
        labels, n = label_components(own, options.connectivity)
        has_seed = np.zeros(n + 1, dtype=bool)
        has_seed[labels[seeds]] = True
        has_seed[0] = False
        mask = has_seed[labels]
    else:
        mask = seeds
    if not mask.any():
        return mask, high, low, f"no pixel above the threshold {high:.3f}"
    mask = binary_open(mask, options.open_radius)
    mask = binary_close(mask, options.close_radius)
    if options.fill_holes:
        mask = fill_holes(mask, options.connectivity)
    mask, kept = remove_small(mask, options.min_area, options.connectivity)
    if kept == 0:
        return (
            mask,
            high,
            low,
            (
                f"nothing left after opening (radius {options.open_radius}) and removing components "
                f"under {options.min_area} px"
            ),
        )
    mask = dilate(mask, options.dilate)
    return mask, high, low, ""


def distance_from_gray(image, options: MaskOptions | None = None):
    """``(smoothed distance [H, W], raw distance [H, W], gray level per channel, image median per channel)`` for an
    anomaly-branch image. The smoothed map blurs the image first (noise averages out), the raw one does not."""
    options = options or MaskOptions()
    img = to_float_image(image, "anomaly image")
    c = img.shape[2]
    median = np.median(img.reshape(-1, c), axis=0).astype(np.float32)
    gray = median if options.gray == "median" else estimate_gray(img, options.gray)
    smooth = gaussian_blur(img, options.blur_sigma)
    dist = reduce_channels(np.abs(smooth - gray[None, None, :]), options.reduce)
    raw = reduce_channels(np.abs(img - gray[None, None, :]), options.reduce)
    return dist.astype(np.float32), raw.astype(np.float32), gray, median


def extract_mask(
    anomaly_image,
    options: MaskOptions | None = None,
    *,
    global_image=None,
    normal_image=None,
    known_region=None,
    **overrides,
) -> MaskResult:
    """Binary mask (uint8 {0, 255}, same size) of the defect drawn on the anomaly branch's mid-gray background.

    ``options`` (or keyword overrides of :class:`MaskOptions`) set the steps. With ``global_image`` *and*
    ``normal_image`` (a normal image aligned with the generated one) the mask is refined: components whose
    pixels in ``known_region`` (bool/PIL mask, default everywhere; e.g. "outside the object") do not coincide with
    a change between the global and the normal image are dropped (:func:`refine_with_change`). With
    ``global_image`` and ``options.visible_min_deviation > 0`` the mask is then cut down to what the global image
    shows (:func:`refine_visible`); ``visible_share`` in the result says how much of it did.
    """
    options = (options or MaskOptions()).replace(**overrides) if overrides else (options or MaskOptions())
    dist, raw, gray, median = distance_from_gray(anomaly_image, options)
    h, w = dist.shape
    peak = float(dist.max())
    floor = float(options.min_contrast)

    visible = options.visible_min_deviation > 0 and global_image is not None

    def result(mask, thr, low, note, n, share=None, drawn=None) -> MaskResult:
        area = float(np.count_nonzero(mask)) / float(h * w)
        return MaskResult(
            mask=np.where(mask, np.uint8(255), np.uint8(0)).astype(np.uint8),
            empty=n == 0,
            area_fraction=area,
            threshold=thr,
            low_threshold=low,
            gray_level=tuple(float(v) for v in gray),
            image_median=tuple(float(v) for v in median),
            max_contrast=peak,
            components=n,
            note=note,
            visible_share=share,
            drawn=drawn,
        )

    if peak < floor:
        empty = np.zeros((h, w), dtype=bool)
        return result(
            empty,
            floor,
            floor,
            f"flat anomaly image: strongest difference from gray {peak:.3f} is under min_contrast {floor:.3f}",
            0,
        )
    # with the refinement by the global image, the final dilation comes after it (it would be cut away)
    mask, thr, low, note = _binarize(dist, raw, options.replace(dilate=0) if visible else options)
    if normal_image is not None and global_image is None:
        raise ValueError("mask refinement with normal_image needs global_image as well")
    if global_image is not None and normal_image is not None and mask.any():
        change = change_mask(global_image, normal_image, options, known_region=known_region)
        region = None if known_region is None else to_bool_mask(known_region, "known_region", (h, w))
        mask, dropped = refine_with_change(
            mask, change, region, options.refine_tolerance, options.refine_min_overlap, options.connectivity
        )
        if dropped:
            note = f"refinement dropped {dropped} component(s) the normal image does not support"
    elif global_image is not None and not visible:
        raise ValueError(
            "mask refinement needs both global_image and normal_image, or global_image with visible_min_deviation > 0"
        )
    share = drawn = None
    if visible and mask.any():
        drawn = mask
        mask = refine_visible(global_image, drawn, options)
        share = float(np.count_nonzero(mask & drawn)) / float(np.count_nonzero(drawn))
        if not mask.any():
            note = (
                "the generated image does not show the defect: nothing near the anomaly-branch mask differs from its "
                f"surroundings by {options.visible_min_deviation:g} standard deviations"
            )
        mask = dilate(mask, options.dilate)
    n = count_components(mask, options.connectivity) if mask.any() else 0
    if n == 0 and not note:
        note = "no component left after refinement"
    return result(mask, thr, low, note, n, share, drawn)


def change_mask(global_image, normal_image, options: MaskOptions | None = None, known_region=None) -> np.ndarray:
    """Bool ``[H, W]``: where the generated image differs from the normal image (same smoothing, floor, Otsu and
    cleaning as the mask), restricted to ``known_region`` when given."""
    options = options or MaskOptions()
    g = to_float_image(global_image, "global image")
    nrm = to_float_image(normal_image, "normal image")
    if g.shape[:2] != nrm.shape[:2]:
        raise ValueError(
            f"normal image is {nrm.shape[1]}x{nrm.shape[0]} but the generated image is "
            f"{g.shape[1]}x{g.shape[0]}; resize it to the generation size"
        )
    if g.shape[2] != nrm.shape[2]:
        g, nrm = g.mean(axis=2, keepdims=True), nrm.mean(axis=2, keepdims=True)
    diff = np.abs(gaussian_blur(g, options.blur_sigma) - gaussian_blur(nrm, options.blur_sigma))
    dist = reduce_channels(diff, options.reduce)
    raw = reduce_channels(np.abs(g - nrm), options.reduce)
    region = None if known_region is None else to_bool_mask(known_region, "known_region", dist.shape)
    if region is not None:
        dist = np.where(region, dist, 0.0).astype(np.float32)
        raw = np.where(region, raw, 0.0).astype(np.float32)
    if float(dist.max()) < options.min_contrast:
        return np.zeros(dist.shape, dtype=bool)
    mask, *_ = _binarize(dist, raw, options.replace(dilate=0))
    return mask if region is None else mask & region


def refine_with_change(
    mask: np.ndarray,
    change: np.ndarray,
    known_region: np.ndarray | None = None,
    tolerance: int = 3,
    min_overlap: float = 0.5,
    connectivity: int = 8,
) -> tuple[np.ndarray, int]:
    """Drop mask components whose pixels inside ``known_region`` lie on a change (dilated by ``tolerance``) less
    than ``min_overlap`` of the time. Components entirely outside the known region are kept. Returns the refined
    mask and how many components were dropped."""
    mask = np.asarray(mask) > 0
    labels, n = label_components(mask, connectivity)
    if n == 0:
        return mask, 0
    region = np.ones_like(mask) if known_region is None else np.asarray(known_region, dtype=bool)
    support = dilate(np.asarray(change, dtype=bool), tolerance)
    flat = labels.ravel()
    known = np.bincount(flat, weights=region.ravel().astype(np.float64), minlength=n + 1)
    supported = np.bincount(flat, weights=(region & support).ravel().astype(np.float64), minlength=n + 1)
    frac = np.divide(supported, known, out=np.ones_like(known), where=known > 0)
    keep = frac >= min_overlap
    keep[0] = False
    return keep[labels], int(n - keep[1:].sum())


def visible_deviation(global_image, mask, options: MaskOptions | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(deviation [H, W], search region [H, W])``: how far each pixel of the (smoothed) global image near ``mask``
    lies from its local background, in units of that background's spread.

    The search region is ``mask`` dilated by ``visible_search`` pixels; each of its connected parts gets its own
    background: a ring of ``visible_ring`` pixels around it (other parts excluded). The deviation of a pixel is
    ``|colour - ring mean| / (rms of the ring's per-channel std * sqrt(C))`` (the per-pixel form of
    :func:`dualanodiff_core.dataset.acceptance.alignment_contrast`), the smaller of the values for the smoothed
    (``blur_sigma``) and the unsmoothed colour, or 0 where the absolute difference ``|colour - ring mean| /
    sqrt(C)`` is under ``visible_min_difference``. 0 outside the search region."""
    options = options or MaskOptions()
    img = to_float_image(global_image, "global image")
    h, w, c = img.shape
    m = to_bool_mask(mask, "mask", (h, w))
    region = dilate(m, options.visible_search)
    dev = np.zeros((h, w), dtype=np.float32)
    if not m.any():
        return dev, region
    smooth = gaussian_blur(img, options.blur_sigma)
    labels, n = label_components(region, options.connectivity)
    for k in range(1, n + 1):
        part = labels == k
        ring = dilate(part, options.visible_ring) & ~region
        if int(ring.sum()) < 4:  # the part covers (almost) the whole image: no surroundings to compare with
            continue
        bg = smooth[ring]
        mean = bg.mean(0)
        spread = float(np.sqrt(bg.var(0).mean())) + 1e-3
        diff = np.linalg.norm(smooth[part] - mean, axis=1) / math.sqrt(c)
        # the smoothed image decides whether a pixel stands out (noise averages out); its own colour must stand out
        # too, or smoothing would spread a strong edge a pixel outwards (as in the extraction, see _binarize)
        own = np.linalg.norm(img[part] - mean, axis=1) / math.sqrt(c)
        diff = np.minimum(diff, own)
        dev[part] = np.where(diff >= options.visible_min_difference, diff / spread, 0.0)
    return dev, region


def refine_visible(global_image, mask, options: MaskOptions | None = None) -> np.ndarray:
    """Bool ``[H, W]``: the part of an anomaly-branch ``mask`` that the generated global image shows.

    Keeps the pixels within ``visible_search`` px of ``mask`` whose :func:`visible_deviation` exceeds
    ``visible_min_deviation``, and of those only the connected groups that touch ``mask`` (texture beside the
    defect is not picked up); then closing (``close_radius``), hole filling and removal of groups under
    ``min_area`` px, as in the extraction. The criterion is local (each pixel against a ring around the mask in the
    same image), not a model of normal texture. An empty result means the image does not show the defect."""
    options = options or MaskOptions()
    m = to_bool_mask(mask, "mask")
    dev, _region = visible_deviation(global_image, m, options)
    keep = dev > float(options.visible_min_deviation)
    if not keep.any():
        return keep
    labels, n = label_components(keep, options.connectivity)
    touching = np.zeros(n + 1, dtype=bool)
    touching[np.unique(labels[keep & m])] = True
    touching[0] = False
    keep = touching[labels]
    keep = binary_close(keep, options.close_radius) & dilate(m, options.visible_search)
    if options.fill_holes:
        keep = fill_holes(keep, options.connectivity)
    keep, _ = remove_small(keep, options.min_area, options.connectivity)
    return keep


def mask_to_pil(mask: np.ndarray) -> Image.Image:
    """bool or {0,255} ``[H, W]`` -> single-channel ("L") PIL image with values exactly 0 and 255."""
    m = np.asarray(mask)
    return Image.fromarray(np.where(m > 0, np.uint8(255), np.uint8(0)).astype(np.uint8), mode="L")
