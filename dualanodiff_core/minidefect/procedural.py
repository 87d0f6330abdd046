"""MiniDefect: a small, procedurally generated defect dataset in the MVTec AD layout (no downloads).

Two texture products, three defect types each, exact masks::

    metal   brushed metal plate       scratch | hole | stain
    fabric  plain-weave woven fabric  hole | stain | thread

What varies between images (drawn from the seed):

* normal texture: base colour and brightness, brushing / weave angle, streak or thread spacing, per-thread colour,
  lighting gradient and sheen, fine grain noise;
* defects: position, size, orientation, curvature, contrast (some faint, some strong), polarity (bright or dark
  scratches), number of parts (one or two scratches), shape irregularity.

Masks are single-channel PNGs with values exactly 0 and 255. A defect changes the image only inside its mask (the
defect's opacity is zero outside and at least ``MIN_ALPHA`` inside), so the mask is the exact ground truth.

Layout (as MVTec AD; ``NNN`` = zero-padded index)::

    <out>/<product>/train/good/NNN.png
    <out>/<product>/test/good/NNN.png
    <out>/<product>/test/<defect>/NNN.png
    <out>/<product>/ground_truth/<defect>/NNN_mask.png
    <out>/minidefect.json          settings, per-image defect parameters and sha256 of every file

Determinism: every image is drawn from its own seed, a hash of (dataset seed, product, split, label, index), so the
same settings give identical bytes, and image ``i`` does not depend on how many images are made. (Identical bytes
are guaranteed on the same platform and numpy version; floating-point ``sin``/``exp`` may differ in the last bit
on other platforms, which can, rarely, move a pixel by one grey level.)

Images are 64 px by default (``size``); shapes are specified in units of the image size, so 96 or 128 px give the
same content at a finer scale.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..dataset.masks import MaskOptions
from ..fileio import save_image_atomic, sha256_file, write_json_atomic

FORMAT_VERSION = 1
PRODUCTS: dict[str, tuple[str, ...]] = {
    "metal": ("scratch", "hole", "stain"),
    "fabric": ("hole", "stain", "thread"),
}
#: what the base model is told a normal image shows (see :func:`normal_prompt`)
PRODUCT_PROMPTS = {"metal": "brushed metal", "fabric": "woven fabric"}
MIN_ALPHA = 0.3  # a defect's opacity inside its mask never falls below this
DEFAULT_SIZE = 64
DEFAULT_COUNTS = dict(train_good=60, test_good=20, test_defect=30)


# ---------------------------------------------------------------------------------------------------------------------
# seeds and small numeric helpers


def image_seed(seed: int, product: str, split: str, label: str, index: int) -> int:
    """The seed of one image: a hash, so images are independent of each other and of the counts."""
    h = hashlib.sha256(f"minidefect:{FORMAT_VERSION}:{int(seed)}:{product}:{split}:{label}:{int(index)}".encode())
    return int.from_bytes(h.digest()[:8], "little")


def _rng(*key) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(image_seed(*key)))


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in units of the image size: x, y in (0, 1)."""
    c = (np.arange(size, dtype=np.float64) + 0.5) / size
    return np.meshgrid(c, c, indexing="xy")


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Value noise in [-1, 1]: a ``cells x cells`` random lattice, bicubic-smooth (cosine) interpolation, tiled."""
    lat = rng.uniform(-1.0, 1.0, (cells + 1, cells + 1))
    x, y = _grid(size)
    gx, gy = x * cells, y * cells
    ix, iy = np.floor(gx).astype(int), np.floor(gy).astype(int)
    fx, fy = gx - ix, gy - iy
    sx, sy = fx * fx * (3 - 2 * fx), fy * fy * (3 - 2 * fy)
    a = lat[iy, ix] * (1 - sx) + lat[iy, ix + 1] * sx
    b = lat[iy + 1, ix] * (1 - sx) + lat[iy + 1, ix + 1] * sx
    return a * (1 - sy) + b * sy


def _fractal_noise(rng: np.random.Generator, size: int, base_cells: int = 3, octaves: int = 3) -> np.ndarray:
    out = np.zeros((size, size))
    amp, total = 1.0, 0.0
    for o in range(octaves):
        out += amp * _smooth_noise(rng, size, base_cells * 2**o)
        total += amp
        amp *= 0.5
    return out / total


def _noise_1d(rng: np.random.Generator, t: np.ndarray, period: float, n: int = 512) -> np.ndarray:
    """Smooth 1-D noise in about [-1, 1] evaluated at ``t`` (any real numbers), with correlation length ``period``."""
    vals = rng.uniform(-1.0, 1.0, n)
    g = t / period
    i = np.floor(g).astype(np.int64)
    f = g - i
    s = f * f * (3 - 2 * f)
    return vals[i % n] * (1 - s) + vals[(i + 1) % n] * s


def _rotate(x: np.ndarray, y: np.ndarray, angle: float, cx: float = 0.5, cy: float = 0.5):
    c, s = math.cos(angle), math.sin(angle)
    dx, dy = x - cx, y - cy
    return c * dx + s * dy, -s * dx + c * dy


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    i = int(h * 6.0) % 6
    f = h * 6.0 - math.floor(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    return np.array([(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i])


def to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------------------------
# normal textures


def render_metal(rng: np.random.Generator, size: int) -> tuple[np.ndarray, dict]:
    """Brushed metal: fine streaks along a brushing direction, slow waviness, a lighting gradient and a sheen band."""
    x, y = _grid(size)
    angle = math.radians(rng.uniform(-15, 15) + (90.0 if rng.random() < 0.25 else 0.0))
    u, v = _rotate(x, y, angle)
    level = rng.uniform(0.42, 0.72)
    tint = np.array([rng.uniform(-0.03, 0.0), rng.uniform(-0.015, 0.01), rng.uniform(0.0, 0.04)])
    streak_scale = rng.uniform(1.2, 2.4) / 64.0  # correlation length across the streaks, image units
    warp = 0.01 * _smooth_noise(rng, size, 2)
    streaks = 0.6 * _noise_1d(rng, v + warp, streak_scale) + 0.4 * _noise_1d(rng, v + warp, streak_scale * 4)
    along = _noise_1d(rng, u, rng.uniform(0.15, 0.4))  # streaks fade in and out along their length
    streak_amp = rng.uniform(0.035, 0.075)
    img = level + streak_amp * streaks * (0.75 + 0.25 * along)
    g_angle = rng.uniform(0, 2 * math.pi)
    img = img + rng.uniform(0.02, 0.08) * ((x - 0.5) * math.cos(g_angle) + (y - 0.5) * math.sin(g_angle))
    sheen_pos, sheen_w = rng.uniform(-0.4, 0.4), rng.uniform(0.12, 0.3)
    img = img + rng.uniform(0.0, 0.08) * np.exp(-(((u - sheen_pos) / sheen_w) ** 2))
    img = img + 0.03 * _fractal_noise(rng, size, 2, 2)
    rgb = img[..., None] + tint[None, None, :] + rng.normal(0.0, 0.008, (size, size, 3))
    params = dict(angle_deg=round(math.degrees(angle), 2), level=round(level, 4))
    return np.clip(rgb, 0, 1), params


FABRIC_HUES = (0.6, 0.08, 0.0, 0.33, 0.12, 0.75)  # denim blue, beige/tan, red, green, ochre, violet


def render_fabric(rng: np.random.Generator, size: int) -> tuple[np.ndarray, dict]:
    """Plain weave: warp and weft threads alternate over/under; per-thread colour and thickness jitter, fibre
    noise, slight rotation and waviness, soft lighting."""
    x, y = _grid(size)
    angle = math.radians(rng.uniform(-8, 8))
    u, v = _rotate(x, y, angle)
    u = u + 0.006 * _smooth_noise(rng, size, 3)
    v = v + 0.006 * _smooth_noise(rng, size, 3)
    period = rng.uniform(6.0, 8.5) / 64.0
    hue = float(rng.choice(FABRIC_HUES)) + rng.uniform(-0.03, 0.03)
    sat = rng.uniform(0.25, 0.65) if rng.random() < 0.85 else rng.uniform(0.0, 0.08)
    val = rng.uniform(0.45, 0.8)
    warp_col = _hsv_to_rgb(hue % 1.0, sat, val)
    weft_col = _hsv_to_rgb(
        (hue + rng.uniform(-0.04, 0.04)) % 1.0, sat * rng.uniform(0.7, 1.1), val * rng.uniform(0.8, 1.0)
    )
    gu, gv = u / period, v / period
    iu, iv = np.floor(gu).astype(np.int64), np.floor(gv).astype(np.int64)
    fu, fv = gu - iu, gv - iv
    n_threads = 4096
    jit_u = rng.normal(0.0, 0.06, n_threads)  # per-thread brightness
    jit_v = rng.normal(0.0, 0.06, n_threads)
    warp_on_top = ((iu + iv) % 2) == 0
    # thread cross-section: bright in the middle, dark at the gaps; the top thread also bulges along its length
    prof_u = np.sin(np.pi * np.clip(fu, 0, 1)) ** 0.6
    prof_v = np.sin(np.pi * np.clip(fv, 0, 1)) ** 0.6
    bulge_u = 0.75 + 0.25 * np.sin(np.pi * fv)
    bulge_v = 0.75 + 0.25 * np.sin(np.pi * fu)
    shade_warp = (0.55 + 0.45 * prof_u * bulge_u) * (1 + jit_u[iu % n_threads])
    shade_weft = (0.55 + 0.45 * prof_v * bulge_v) * (1 + jit_v[iv % n_threads])
    fibre = 0.05 * np.where(warp_on_top, _noise_1d(rng, v * 9.0 + 7 * iu, 0.35), _noise_1d(rng, u * 9.0 + 7 * iv, 0.35))
    shade = np.where(warp_on_top, shade_warp, shade_weft) + fibre
    col = np.where(warp_on_top[..., None], warp_col[None, None], weft_col[None, None])
    light = 1.0 + rng.uniform(0.03, 0.12) * _smooth_noise(rng, size, 2)
    rgb = col * (shade * light)[..., None] + rng.normal(0.0, 0.01, (size, size, 3))
    params = dict(
        angle_deg=round(math.degrees(angle), 2),
        period_px64=round(period * 64, 3),
        hue=round(hue % 1.0, 4),
        saturation=round(sat, 4),
    )
    return np.clip(rgb, 0, 1), params


RENDERERS: dict[str, Callable[[np.random.Generator, int], tuple[np.ndarray, dict]]] = {
    "metal": render_metal,
    "fabric": render_fabric,
}


# ---------------------------------------------------------------------------------------------------------------------
# defect shapes: a signed "inside-ness" field -> mask (> 0) and opacity (ramp inside, exactly 0 outside)


def _blob_field(
    rng: np.random.Generator,
    size: int,
    radius: float,
    irregular: float = 0.25,
    center: tuple[float, float] | None = None,
) -> tuple[np.ndarray, tuple[float, float]]:
    """Irregular blob: 1 - rho / r(phi), r(phi) = radius * (1 + sum of random harmonics), stretched and rotated.
    Positive inside. Units: image size."""
    x, y = _grid(size)
    if center is None:
        m = radius * 1.3
        center = (rng.uniform(m, 1 - m), rng.uniform(m, 1 - m))
    u, v = _rotate(x, y, rng.uniform(0, math.pi), *center)
    stretch = rng.uniform(0.65, 1.0)
    u, v = u / stretch, v * stretch
    rho = np.hypot(u, v)
    phi = np.arctan2(v, u)
    r = np.ones_like(phi)
    for k in range(2, 6):
        r += irregular / k * rng.uniform(0.3, 1.0) * np.cos(k * phi + rng.uniform(0, 2 * math.pi))
    r += 0.08 * _smooth_noise(rng, size, 8)
    return 1.0 - rho / (radius * np.maximum(r, 0.3)), center


def _curve_distance(size: int, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distance (pixels) from every pixel centre to a polyline sampled densely (``points`` [K, 2] in image units),
    and the curve parameter in [0, 1] of the nearest point."""
    x, y = _grid(size)
    px = np.stack([x.ravel(), y.ravel()], 1) * size
    pts = points * size
    best = np.full(px.shape[0], np.inf)
    arg = np.zeros(px.shape[0], dtype=np.int64)
    for start in range(0, len(pts), 256):
        chunk = pts[start : start + 256]
        d = ((px[:, None, :] - chunk[None, :, :]) ** 2).sum(-1)
        j = d.argmin(1)
        dj = d[np.arange(len(px)), j]
        better = dj < best
        best[better] = dj[better]
        arg[better] = j[better] + start
    return np.sqrt(best).reshape(size, size), (arg / max(len(pts) - 1, 1)).reshape(size, size)


def _bezier(p0, p1, p2, n: int) -> np.ndarray:
    t = np.linspace(0.0, 1.0, n)[:, None]
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2


def _random_curve(
    rng: np.random.Generator, length: float, bend: float, wiggle: float = 0.0, size: int = 64
) -> np.ndarray:
    """A curved stroke of about ``length`` (image units), fully inside the image."""
    for _ in range(100):
        ang = rng.uniform(0, 2 * math.pi)
        d = np.array([math.cos(ang), math.sin(ang)]) * length / 2
        c = rng.uniform(0.12, 0.88, 2)
        p0, p2 = c - d, c + d
        normal = np.array([-d[1], d[0]]) / max(np.linalg.norm(d), 1e-9)
        p1 = c + normal * rng.uniform(-bend, bend) * length
        pts = _bezier(p0, p1, p2, max(64, int(length * size * 6)))
        if wiggle:
            t = np.linspace(0, 1, len(pts))
            pts = (
                pts
                + normal[None, :] * (wiggle * np.sin(2 * np.pi * (rng.uniform(1.5, 3.5) * t + rng.uniform())))[:, None]
            )
        if pts.min() > 0.04 and pts.max() < 0.96:
            return pts
    return pts


def _stroke(
    rng: np.random.Generator, size: int, length: float, width_px: float, bend: float, wiggle: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """A stroke of ``width_px`` (at 64 px; scaled with the image) that tapers at its ends: (field, opacity)."""
    scale = size / 64.0
    pts = _random_curve(rng, length, bend, wiggle, size)
    dist, t = _curve_distance(size, pts)
    taper = np.clip(np.sin(np.pi * t) * 1.6, 0.35, 1.0)
    half = (width_px * scale) / 2 * taper
    field = (half + 0.5 - dist) / (half + 0.5)  # > 0 inside: the pixel centre lies within half a pixel of the stroke
    return field, np.clip(field * 2.0, 0.0, 1.0)


def _alpha(field: np.ndarray, ramp: float = 0.35) -> tuple[np.ndarray, np.ndarray]:
    mask = field > 0
    alpha = np.where(mask, np.clip(field / ramp, MIN_ALPHA, 1.0), 0.0)
    return mask, alpha


def _luma(img: np.ndarray) -> np.ndarray:
    return img @ np.array([0.299, 0.587, 0.114])


# ---- metal defects --------------------------------------------------------------------------------------------------
def metal_scratch(rng, img, size):
    n = 1 if rng.random() < 0.75 else 2
    field = np.full((size, size), -1.0)
    for _ in range(n):
        f, _ = _stroke(rng, size, rng.uniform(0.22, 0.65), rng.uniform(0.9, 2.2), bend=rng.uniform(0.0, 0.25))
        field = np.maximum(field, f)
    mask, alpha = _alpha(field, 0.5)
    contrast = rng.uniform(0.07, 0.3)
    bright = rng.random() < 0.6
    target = np.clip(img + (contrast if bright else -contrast), 0, 1)
    # a scratch also loses the brushing: flatten toward its local mean
    out = img * (1 - alpha[..., None]) + target * alpha[..., None]
    return out, mask, dict(parts=n, contrast=round(contrast, 4), polarity="bright" if bright else "dark")


def metal_hole(rng, img, size):
    radius = rng.uniform(0.03, 0.085)
    field, center = _blob_field(rng, size, radius, irregular=0.1)
    mask, alpha = _alpha(field, 0.25)
    depth = rng.uniform(0.3, 0.75)
    x, y = _grid(size)
    light = math.radians(rng.uniform(0, 360))
    side = ((x - center[0]) * math.cos(light) + (y - center[1]) * math.sin(light)) / radius
    inner = np.clip(img * (1 - depth) * (0.7 + 0.3 * np.clip(side, -1, 1)[..., None]), 0, 1)
    rim = (field > 0) & (field < 0.3)
    rim_light = np.where(rim, 0.25 * np.clip(-side, 0, 1), 0.0)
    target = np.clip(inner + rim_light[..., None], 0, 1)
    out = img * (1 - alpha[..., None]) + target * alpha[..., None]
    return out, mask, dict(radius_px64=round(radius * 64, 3), depth=round(depth, 4))


def _stain_shape(rng, size, radii, irregular, noise, cells, strengths):
    """A stain's irregular blob: (radius, mask, alpha ramp, strength), drawn in this order from ``rng``."""
    radius = rng.uniform(*radii)
    field, _ = _blob_field(rng, size, radius, irregular=irregular)
    field = field + noise * _smooth_noise(rng, size, cells)
    mask = field > 0
    alpha = np.where(mask, np.clip(field / 0.4, 0.45, 1.0), 0.0)
    return radius, field, mask, alpha, rng.uniform(*strengths)


def metal_stain(rng, img, size):
    radius, field, mask, alpha, strength = _stain_shape(rng, size, (0.06, 0.18), 0.45, 0.15, 10, (0.4, 0.85))
    kind = rng.choice(["rust", "oil", "water"])
    if kind == "rust":
        colour = np.array([0.52, 0.27, 0.12])
        target = img * 0.3 + colour * 0.7 * (0.7 + 0.5 * _luma(img))[..., None]
    elif kind == "oil":
        target = img * 0.55 + 0.06 * np.stack([np.sin(8 * field + k) for k in (0, 2, 4)], -1)
    else:
        target = img * 0.8 + 0.2 - 0.15 * (field < 0.15)[..., None]
    mottle = 0.85 + 0.15 * _smooth_noise(rng, size, 12)
    a = np.where(mask, alpha * strength * mottle, 0.0)[..., None]
    out = img * (1 - a) + np.clip(target, 0, 1) * a
    return out, mask, dict(radius_px64=round(radius * 64, 3), strength=round(strength, 4), kind=str(kind))


# ---- fabric defects -------------------------------------------------------------------------------------------------
def fabric_hole(rng, img, size):
    radius = rng.uniform(0.035, 0.1)
    field, center = _blob_field(rng, size, radius, irregular=0.4)
    # frayed edge: thread ends reach into the hole
    x, y = _grid(size)
    phi = np.arctan2(y - center[1], x - center[0])
    fray = 0.35 * np.maximum(_noise_1d(rng, phi * 6.0 / (2 * math.pi) * 8, 1.0), 0)
    field = field - fray * (field > 0) * (field < 0.6)
    mask, alpha = _alpha(field, 0.25)
    backing = rng.uniform(0.02, 0.25)
    target = np.full_like(img, backing) + 0.03 * _smooth_noise(rng, size, 6)[..., None]
    out = img * (1 - alpha[..., None]) + np.clip(target, 0, 1) * alpha[..., None]
    return out, mask, dict(radius_px64=round(radius * 64, 3), backing=round(backing, 4))


def fabric_stain(rng, img, size):
    radius, field, mask, alpha, strength = _stain_shape(rng, size, (0.07, 0.2), 0.5, 0.2, 9, (0.45, 0.9))
    colour = rng.choice(np.array([[0.35, 0.22, 0.1], [0.45, 0.05, 0.1], [0.15, 0.15, 0.15], [0.6, 0.55, 0.2]]))
    target = img * colour[None, None, :] * 1.6  # the stain dyes the threads; the weave stays visible
    ring = np.where(mask & (field < 0.25), 0.25, 0.0)  # dried edge is darker
    a = (np.maximum(alpha, ring) * strength)[..., None]
    out = img * (1 - a) + np.clip(target, 0, 1) * a
    return out, mask, dict(radius_px64=round(radius * 64, 3), strength=round(strength, 4))


def fabric_thread(rng, img, size):
    field, alpha = _stroke(
        rng,
        size,
        rng.uniform(0.3, 0.75),
        rng.uniform(1.0, 1.8),
        bend=rng.uniform(0.05, 0.3),
        wiggle=rng.uniform(0.0, 0.02),
    )
    mask, a = _alpha(field, 0.5)
    hue = rng.uniform(0, 1)
    colour = _hsv_to_rgb(hue, rng.uniform(0.0, 0.8), rng.uniform(0.15, 0.95))
    x, y = _grid(size)
    twist = 0.85 + 0.15 * np.sin((x + y) * size * 1.7)
    target = colour[None, None, :] * twist[..., None]
    out = img * (1 - a[..., None]) + np.clip(target, 0, 1) * a[..., None]
    return out, mask, dict(hue=round(hue, 4))


DEFECTS: dict[str, dict[str, Callable]] = {
    "metal": {"scratch": metal_scratch, "hole": metal_hole, "stain": metal_stain},
    "fabric": {"hole": fabric_hole, "stain": fabric_stain, "thread": fabric_thread},
}


# ---------------------------------------------------------------------------------------------------------------------
# public API


def _check_product(product: str) -> None:
    if product not in PRODUCTS:
        raise ValueError(f"unknown MiniDefect product {product!r}; choose one of {', '.join(PRODUCTS)}")


def _check_size(size: int) -> None:
    if int(size) != size or not 32 <= size <= 512:
        raise ValueError(f"size={size}: MiniDefect images are 32..512 px (64 by default)")


def normal_image(
    product: str, seed: int = 0, split: str = "train", index: int = 0, size: int = DEFAULT_SIZE
) -> tuple[np.ndarray, dict]:
    """A normal (defect-free) image: uint8 ``[size, size, 3]`` and its texture parameters."""
    _check_product(product)
    _check_size(size)
    rng = _rng(seed, product, split, "good", index)
    img, params = RENDERERS[product](rng, int(size))
    return to_uint8(img), params


def defect_image(
    product: str, defect: str, seed: int = 0, split: str = "test", index: int = 0, size: int = DEFAULT_SIZE
) -> tuple[np.ndarray, np.ndarray, dict]:
    """A defect image, its mask (uint8, values exactly 0 and 255) and parameters (texture + defect)."""
    _check_product(product)
    _check_size(size)
    if defect not in DEFECTS[product]:
        raise ValueError(f"{product} has no defect {defect!r}; it has {', '.join(PRODUCTS[product])}")
    rng = _rng(seed, product, split, defect, index)
    img, tex = RENDERERS[product](rng, int(size))
    for _ in range(20):
        out, mask, params = DEFECTS[product][defect](rng, img, int(size))
        if mask.sum() >= 3:
            break
    out8 = to_uint8(out)
    # the mask covers exactly the pixels that the defect changed (after rounding), and nothing else
    changed = np.any(out8 != to_uint8(img), axis=-1)
    out8 = np.where(mask[..., None], out8, to_uint8(img))
    params = dict(params, area_px=int(mask.sum()), changed_px=int(changed.sum()))
    return out8, np.where(mask, np.uint8(255), np.uint8(0)), dict(texture=tex, defect=params)


def base_model_dir() -> Path:
    """The shipped MiniDefect base model: a diffusers SD1.x folder (package data), pre-trained on MiniDefect normal
    images by :mod:`dualanodiff_core.minidefect.pretrain`. Load it with ``DualAnoDiffPipeline.from_pretrained``."""
    return Path(__file__).resolve().parents[1] / "assets" / "minidefect-sd"


def mask_options(**changes):
    """Mask-extraction settings for 64 px MiniDefect images (the core defaults suit 256-1024 px): less smoothing,
    no opening (a 1-2 px scratch would vanish), a 3 px minimum area and a lower contrast floor (metal is gray, so a
    metal defect drawn on the anomaly branch's mid-gray differs from it only a little). On ideal anomaly-branch
    images (the real defect pasted on mid-gray) they recover the true masks with IoU 0.87-0.99 per defect type,
    the core defaults with 0.33-0.99. No hysteresis growth (was 0.5): it grew masks into the faint texture that
    generated anomaly-branch backgrounds carry around a defect. The contrast floor belongs to the base model: 0.05
    with the shipped model (v2), whose gray metal defects differ from mid-gray only a little (at 0.08 most metal
    scratch and stain masks came out empty); the first base model (v1) drew a tinted rim around its defects and
    needed 0.08 to leave it out (measured on all six types and two dataset seeds: docs/quality.md)."""

    return MaskOptions(
        blur_sigma=0.5, open_radius=0, close_radius=1, min_area=3, min_contrast=0.05, hysteresis=1.0
    ).replace(**changes)


def normal_prompt(product: str) -> str:
    """The text the MiniDefect base model was pre-trained with for normal images of ``product``."""
    _check_product(product)
    return PRODUCT_PROMPTS[product]


@dataclasses.dataclass(frozen=True)
class MiniDefectSpec:
    seed: int = 0
    size: int = DEFAULT_SIZE
    products: tuple[str, ...] = tuple(PRODUCTS)
    train_good: int = DEFAULT_COUNTS["train_good"]
    test_good: int = DEFAULT_COUNTS["test_good"]
    test_defect: int = DEFAULT_COUNTS["test_defect"]

    def __post_init__(self):
        _check_size(self.size)
        for p in self.products:
            _check_product(p)
        if not self.products:
            raise ValueError("give at least one product")
        for k in ("train_good", "test_good", "test_defect"):
            v = getattr(self, k)
            if int(v) != v or v < 0 or v > 100000:
                raise ValueError(f"{k}={v}: must be a whole number in [0, 100000]")
        if self.test_defect < 1:
            raise ValueError("test_defect must be at least 1")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["products"] = list(self.products)
        return d


def _name(i: int, n: int) -> str:
    return f"{i:0{max(3, len(str(max(n - 1, 0))))}d}"


def iter_files(spec: MiniDefectSpec) -> Iterator[tuple[str, Callable[[], dict[str, Any]]]]:
    """``(relative image path, render)`` for every image; ``render()`` returns ``{"image", "mask"?, "params"}``."""
    for product in spec.products:
        for split, label, n in (("train", "good", spec.train_good), ("test", "good", spec.test_good)):
            for i in range(n):
                yield (
                    f"{product}/{split}/{label}/{_name(i, n)}.png",
                    (
                        lambda p=product, s=split, i=i: dict(
                            zip(("image", "params"), normal_image(p, spec.seed, s, i, spec.size))
                        )
                    ),
                )
        for defect in PRODUCTS[product]:
            n = spec.test_defect
            for i in range(n):

                def render(p=product, d=defect, i=i):
                    img, mask, params = defect_image(p, d, spec.seed, "test", i, spec.size)
                    return dict(image=img, mask=mask, params=params)

                yield f"{product}/test/{defect}/{_name(i, n)}.png", render


def write_minidefect(
    out: str | os.PathLike,
    spec: MiniDefectSpec | None = None,
    *,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write the dataset to ``out`` (MVTec layout, see the module doc). Returns ``out``.

    ``out`` must not exist or be empty, unless it holds a MiniDefect dataset written with the same settings (then it
    is checked, completed and left otherwise untouched) or ``overwrite`` is set (then files are rewritten). Each file
    is written atomically; ``minidefect.json`` is written last, so a dataset without it is incomplete.
    """
    spec = spec or MiniDefectSpec()
    out = Path(out)
    meta_path = out / "minidefect.json"
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        old = None
        if meta_path.is_file():
            try:
                old = json.loads(meta_path.read_text())
            except (OSError, ValueError):
                old = None
        if old is None or old.get("spec") != spec.to_dict() or old.get("format_version") != FORMAT_VERSION:
            raise FileExistsError(
                f"{out} is not empty and does not hold a MiniDefect dataset with these settings; choose an empty "
                "folder, or pass overwrite=True (--overwrite) to rewrite it"
            )
    files = list(iter_files(spec))
    records: dict[str, Any] = {}
    hashes: dict[str, str] = {}
    for k, (rel, render) in enumerate(files):
        r = render()
        path = out / rel
        save_image_atomic(Image.fromarray(r["image"], mode="RGB"), path)
        hashes[rel] = sha256_file(path)
        rec = dict(r["params"])
        if "mask" in r:
            parts = Path(rel).parts  # product, test, defect, name
            mrel = f"{parts[0]}/ground_truth/{parts[2]}/{Path(rel).stem}_mask.png"
            save_image_atomic(Image.fromarray(r["mask"], mode="L"), out / mrel)
            hashes[mrel] = sha256_file(out / mrel)
            rec["mask"] = mrel
        records[rel] = rec
        if progress is not None:
            progress(k + 1, len(files))
    meta = {
        "format": "minidefect",
        "format_version": FORMAT_VERSION,
        "spec": spec.to_dict(),
        "products": {p: {"defects": list(PRODUCTS[p]), "prompt": PRODUCT_PROMPTS[p]} for p in spec.products},
        "images": records,
        "sha256": hashes,
    }
    write_json_atomic(meta_path, meta)
    return out


def verify_minidefect(root: str | os.PathLike) -> list[str]:
    """Check every file listed in ``minidefect.json`` against its sha256; returns the problems (empty = intact)."""
    root = Path(root)
    meta_path = root / "minidefect.json"
    if not meta_path.is_file():
        return [f"{meta_path} is missing (the dataset was not written completely)"]
    meta = json.loads(meta_path.read_text())
    problems = []
    for rel, digest in sorted(meta["sha256"].items()):
        p = root / rel
        if not p.is_file():
            problems.append(f"{rel}: missing")
        elif sha256_file(p) != digest:
            problems.append(f"{rel}: changed (sha256 differs)")
    return problems


def few_shot_split(n: int) -> int:
    """How many of ``n`` defect images the strict protocol trains on: the first third, rounded down (at least 1)."""
    return max(1, n // 3)


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m dualanodiff_core.minidefect", description=__doc__.split("\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv))


def add_arguments(p) -> None:
    p.add_argument("--out", required=True, help="folder to write the dataset to (must be empty or absent)")
    p.add_argument("--seed", type=int, default=0, help="dataset seed; the same seed gives identical files")
    p.add_argument("--size", type=int, default=DEFAULT_SIZE, help="image size in pixels (square)")
    p.add_argument("--products", nargs="+", default=list(PRODUCTS), choices=list(PRODUCTS), help="products to make")
    p.add_argument(
        "--train-good", type=int, default=DEFAULT_COUNTS["train_good"], help="normal training images per product"
    )
    p.add_argument("--test-good", type=int, default=DEFAULT_COUNTS["test_good"], help="normal test images per product")
    p.add_argument("--test-defect", type=int, default=DEFAULT_COUNTS["test_defect"], help="images per defect type")
    p.add_argument("--overwrite", action="store_true", help="rewrite a non-empty folder")


def run(args) -> int:
    spec = MiniDefectSpec(
        seed=args.seed,
        size=args.size,
        products=tuple(args.products),
        train_good=args.train_good,
        test_good=args.test_good,
        test_defect=args.test_defect,
    )
    try:
        from tqdm import tqdm

        bar = tqdm(total=None, unit="img", desc="MiniDefect", file=sys.stderr)
    except ImportError:  # pragma: no cover
        bar = None

    def progress(k, n):
        if bar is not None:
            bar.total = n
            bar.update(1)

    write_minidefect(args.out, spec, overwrite=args.overwrite, progress=progress)
    if bar is not None:
        bar.close()
    print(f"wrote MiniDefect ({', '.join(spec.products)}; {spec.size} px, seed {spec.seed}) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
