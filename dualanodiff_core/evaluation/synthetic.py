"""Synthetic-anomaly baselines (numpy only): CutPaste and DRAEM-style Perlin anomalies.

These are the standard "no generative model" ways to make defect training pairs from normal images;
the quality benchmark compares DualAnoDiff's generated pairs against them. Written from the papers'
descriptions (CutPaste, Li et al. CVPR 2021; DRAEM, Zavrtanik et al. ICCV 2021), not from their code.

* :func:`cutpaste` -- cut a rectangle from the image and paste it elsewhere, colour-jittered; the "scar" variant
  pastes a thin, long, rotated strip. Mask = the pasted region.
* :func:`perlin_anomaly` -- threshold rotated Perlin noise into a blobby mask and blend an *anomaly source* image
  into it: ``out = I (1 - M) + (1 - beta) A M + beta I M`` with ``beta`` in [0, 0.8]. DRAEM takes ``A`` from the
  DTD texture dataset; offline we use whatever images the caller gives (e.g. normal images of *other* products and
  random colour fields), strongly augmented.

All functions take a ``numpy.random.Generator`` and images as uint8 ``[H, W, 3]``; they return ``(image uint8,
mask uint8 with values exactly 0 and 255)``. Sizes are given relative to the image, so any resolution works.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def _as_float(img) -> np.ndarray:
    a = np.asarray(img)
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {a.shape}")
    return a.astype(np.float64) / 255.0


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)


def _mask_u8(m: np.ndarray) -> np.ndarray:
    return np.where(m, np.uint8(255), np.uint8(0)).astype(np.uint8)


def colour_jitter(img: np.ndarray, rng: np.random.Generator, strength: float = 0.1) -> np.ndarray:
    """Brightness, contrast and per-channel gain jitter of a float image in [0, 1]."""
    b = rng.uniform(-strength, strength)
    c = rng.uniform(1 - strength, 1 + strength)
    gain = rng.uniform(1 - strength, 1 + strength, 3)
    mean = img.mean(axis=(0, 1), keepdims=True)
    return np.clip((img - mean) * c + mean + b, 0, 1) * gain[None, None, :]


# ---------------------------------------------------------------------------------------------------------------------
# CutPaste


def _paste(
    img: np.ndarray, rng: np.random.Generator, half_w: float, half_h: float, angle: float, jitter: float
) -> tuple[np.ndarray, np.ndarray]:
    """Cut a (half_w x half_h) box around a random source centre and paste it, rotated by ``angle``, around a
    random target centre (both fully inside the image)."""
    h, w, _ = img.shape
    reach = math.hypot(half_w, half_h)
    lo_x, hi_x = min(reach, w / 2), max(w - reach, w / 2)
    lo_y, hi_y = min(reach, h / 2), max(h - reach, h / 2)
    for _ in range(20):
        cs = np.array([rng.uniform(half_w, max(half_w, w - half_w)), rng.uniform(half_h, max(half_h, h - half_h))])
        ct = np.array([rng.uniform(lo_x, hi_x), rng.uniform(lo_y, hi_y)])
        if np.hypot(*(cs - ct)) > 0.5 * min(half_w, half_h):
            break
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5
    c, s = math.cos(angle), math.sin(angle)
    lx = c * (xx - ct[0]) + s * (yy - ct[1])
    ly = -s * (xx - ct[0]) + c * (yy - ct[1])
    inside = (np.abs(lx) < half_w) & (np.abs(ly) < half_h)
    sx = np.clip(np.floor(cs[0] + lx), 0, w - 1).astype(int)
    sy = np.clip(np.floor(cs[1] + ly), 0, h - 1).astype(int)
    patch = colour_jitter(img, rng, jitter)[sy, sx]
    out = np.where(inside[..., None], patch, img)
    return out, inside


def cutpaste(
    image, rng: np.random.Generator, variant: str = "normal", jitter: float = 0.1
) -> tuple[np.ndarray, np.ndarray]:
    """CutPaste: ``variant`` "normal" (a rectangle of 2-15 % of the image area, aspect ratio 0.3-3.3) or "scar"
    (a strip 2-16 by 10-25 pixels at 256 px, scaled to the image, rotated by -45..45 degrees), or "mixed"
    (either, 50/50)."""
    img = _as_float(image)
    h, w, _ = img.shape
    if variant == "mixed":
        variant = "normal" if rng.random() < 0.5 else "scar"
    if variant == "normal":
        area = rng.uniform(0.02, 0.15) * h * w
        aspect = math.exp(rng.uniform(math.log(0.3), math.log(1 / 0.3)))
        bw = min(w * 0.9, math.sqrt(area * aspect))
        bh = min(h * 0.9, math.sqrt(area / aspect))
        out, m = _paste(img, rng, bw / 2, bh / 2, 0.0, jitter)
    elif variant == "scar":
        k = min(h, w) / 256.0
        sw, sl = rng.uniform(2, 16) * k, rng.uniform(10, 25) * k
        sw, sl = max(sw, 1.0), max(sl, 3.0)
        out, m = _paste(img, rng, sw / 2, sl / 2, math.radians(rng.uniform(-45, 45)), jitter)
    else:
        raise ValueError(f"variant must be 'normal', 'scar' or 'mixed', got {variant!r}")
    if not m.any():  # degenerate tiny strip: make at least the centre pixel
        return cutpaste(image, rng, variant, jitter)
    return _to_uint8(np.where(m[..., None], out, img)), _mask_u8(m)


# ---------------------------------------------------------------------------------------------------------------------
# Perlin noise and DRAEM-style anomalies


def perlin_noise(
    shape: tuple[int, int], periods: tuple[float, float], rng: np.random.Generator, angle: float = 0.0
) -> np.ndarray:
    """2-D gradient (Perlin) noise, about [-1, 1] (scaled by sqrt(2) as DRAEM's), with ``periods`` = (rows, columns)
    lattice cells across the image, evaluated on coordinates rotated by ``angle`` (radians). The lattice wraps, so
    any angle works."""
    h, w = shape
    py, px = max(1, int(math.ceil(periods[0]))), max(1, int(math.ceil(periods[1])))
    n = 2 * max(py, px) + 2  # lattice large enough for rotated coordinates (wraps around)
    theta = rng.uniform(0, 2 * math.pi, (n, n))
    gx, gy = np.cos(theta), np.sin(theta)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    y = (yy + 0.5) / h * periods[0]
    x = (xx + 0.5) / w * periods[1]
    cy, cx = periods[0] / 2, periods[1] / 2
    c, s = math.cos(angle), math.sin(angle)
    x, y = c * (x - cx) - s * (y - cy) + cx + n, s * (x - cx) + c * (y - cy) + cy + n
    x0, y0 = np.floor(x).astype(np.int64), np.floor(y).astype(np.int64)
    fx, fy = x - x0, y - y0

    def dot(iy, ix, dy, dx):
        return gx[iy % n, ix % n] * dx + gy[iy % n, ix % n] * dy

    fade = lambda t: t * t * t * (t * (t * 6 - 15) + 10)  # noqa: E731
    n00 = dot(y0, x0, fy, fx)
    n01 = dot(y0, x0 + 1, fy, fx - 1)
    n10 = dot(y0 + 1, x0, fy - 1, fx)
    n11 = dot(y0 + 1, x0 + 1, fy - 1, fx - 1)
    u, v = fade(fx), fade(fy)
    return math.sqrt(2.0) * ((n00 * (1 - u) + n01 * u) * (1 - v) + (n10 * (1 - u) + n11 * u) * v)


def perlin_mask(
    shape: tuple[int, int], rng: np.random.Generator, threshold: float = 0.5, min_fraction: float = 0.003
) -> np.ndarray:
    """DRAEM's anomaly mask: Perlin noise with 2^a x 2^b cells (a, b in 0..max, max = log2(size) - 2, i.e. 0..5 at
    256 px as DRAEM), rotated by -90..90 degrees, thresholded at ``threshold``. Retries until at least
    ``min_fraction`` of the image is covered."""
    h, w = shape
    top = max(1, int(math.log2(min(h, w))) - 2)
    for _ in range(50):
        periods = (2.0 ** int(rng.integers(0, top)), 2.0 ** int(rng.integers(0, top)))
        noise = perlin_noise(shape, periods, rng, math.radians(rng.uniform(-90, 90)))
        m = noise > threshold
        if m.mean() >= min_fraction:
            return m
    # very unlikely: fall back to a lower threshold
    return noise > np.quantile(noise, 1 - max(min_fraction, 0.01))


def augment_source(src: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """DRAEM-like strong augmentation of an anomaly-source image (float [0, 1]): three of gamma, brightness,
    channel shuffle, hue-like channel rotation, posterize, solarize, invert, rotation by a multiple of 90 degrees."""
    ops = rng.choice(8, size=3, replace=False)
    x = src
    for op in ops:
        if op == 0:
            x = np.clip(x, 0, 1) ** rng.uniform(0.5, 2.0)
        elif op == 1:
            x = x * rng.uniform(0.8, 1.2) + rng.uniform(-0.3, 0.3)
        elif op == 2:
            x = x[..., rng.permutation(3)]
        elif op == 3:
            t = rng.uniform(0, 1)
            x = x * (1 - t) + np.roll(x, 1, axis=-1) * t
        elif op == 4:
            levels = 2 ** int(rng.integers(2, 5))
            x = np.floor(np.clip(x, 0, 0.999) * levels) / (levels - 1)
        elif op == 5:
            thr = rng.uniform(0.4, 0.9)
            x = np.where(x > thr, 1 - x, x)
        elif op == 6:
            x = 1 - x
        else:
            x = np.rot90(x, int(rng.integers(1, 4)), axes=(0, 1))
    return np.clip(x, 0, 1)


def random_colour_field(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A random smooth colour texture (float [0, 1]): Perlin noise per channel, for anomaly sources."""
    h, w = shape
    per = (2.0 ** int(rng.integers(1, 4)), 2.0 ** int(rng.integers(1, 4)))
    ch = [perlin_noise(shape, per, rng, rng.uniform(0, math.pi)) for _ in range(3)]
    base = rng.uniform(0.1, 0.9, 3)
    return np.clip(np.stack(ch, -1) * rng.uniform(0.5, 1.5) + base[None, None, :], 0, 1)


def perlin_anomaly(
    image, rng: np.random.Generator, sources: Sequence[np.ndarray] | None = None, beta_max: float = 0.8
) -> tuple[np.ndarray, np.ndarray]:
    """A DRAEM-style anomaly: a Perlin mask filled with an augmented anomaly source, blended with opacity
    ``1 - beta`` (``beta`` uniform in [0, beta_max]). ``sources``: uint8 images to draw the source from (resized by
    nearest neighbour when their size differs); without them, random colour fields are used."""
    img = _as_float(image)
    h, w, _ = img.shape
    m = perlin_mask((h, w), rng)
    if sources is not None and len(sources) and rng.random() < 0.8:
        src = _as_float(sources[int(rng.integers(0, len(sources)))])
        if src.shape[:2] != (h, w):
            yi = (np.arange(h) * src.shape[0] // h).clip(0, src.shape[0] - 1)
            xi = (np.arange(w) * src.shape[1] // w).clip(0, src.shape[1] - 1)
            src = src[yi][:, xi]
    else:
        src = random_colour_field((h, w), rng)
    src = augment_source(src, rng)
    if src.shape[:2] != (h, w):  # rot90 of a non-square source
        src = np.resize(src, (h, w, 3))
    beta = rng.uniform(0, beta_max)
    mm = m[..., None]
    out = img * (1 - mm) + (1 - beta) * src * mm + beta * img * mm
    return _to_uint8(out), _mask_u8(m)
