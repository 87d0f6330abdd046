"""A loss curve drawn with PIL only (no matplotlib): raw loss in light gray, a smoothed curve on top."""

from __future__ import annotations

import math
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont


def smooth(values: Sequence[float], window: int | None = None) -> list[float]:
    """Exponential moving average with a bias correction (like TensorBoard's smoothing)."""
    n = len(values)
    if n == 0:
        return []
    window = window or max(3, min(200, n // 10))
    beta = 1.0 - 1.0 / window
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta**i) if beta > 0 else v)
    return out


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1000 or abs(v) < 1e-3:
        return f"{v:.2e}"
    return f"{v:.4g}"


def draw_loss_curve(
    steps: Sequence[int], losses: Sequence[float], title: str = "training loss", size: tuple[int, int] = (800, 450)
) -> Image.Image:
    """The loss over steps as an RGB image. Non-finite values are skipped; the y range ignores the top 1 % so one
    spike does not flatten the curve."""
    w, h = size
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    left, right, top, bottom = 70, 20, 30, 40
    pw, ph = w - left - right, h - top - bottom
    d.text((left, 8), title, fill="black", font=font)
    pts = [(int(s), float(v)) for s, v in zip(steps, losses) if math.isfinite(float(v))]
    d.rectangle([left, top, left + pw, top + ph], outline=(120, 120, 120))
    if not pts:
        d.text((left + 10, top + ph // 2), "no loss values yet", fill="black", font=font)
        return img
    xs = [p[0] for p in pts]
    ys = [p[1] for p in pts]
    sm = smooth(ys)
    ordered = sorted(ys)
    y_hi = ordered[min(len(ordered) - 1, int(math.ceil(0.99 * (len(ordered) - 1))))]
    y_lo = min(ordered[0], min(sm))
    y_hi = max(y_hi, max(sm))
    if y_hi <= y_lo:
        y_hi = y_lo + (abs(y_lo) or 1.0) * 0.1
    pad = (y_hi - y_lo) * 0.05
    y_lo, y_hi = y_lo - pad, y_hi + pad
    x_lo, x_hi = min(xs), max(xs)
    if x_hi == x_lo:
        x_hi = x_lo + 1

    def px(x, y):
        fx = left + (x - x_lo) / (x_hi - x_lo) * pw
        fy = top + ph - (min(max(y, y_lo), y_hi) - y_lo) / (y_hi - y_lo) * ph
        return fx, fy

    for i in range(5):  # grid and y labels
        yv = y_lo + (y_hi - y_lo) * i / 4
        _, gy = px(x_lo, yv)
        d.line([left, gy, left + pw, gy], fill=(230, 230, 230))
        d.text((4, gy - 6), _fmt(yv), fill="black", font=font)
    for i in range(5):  # x labels
        xv = x_lo + (x_hi - x_lo) * i / 4
        gx, _ = px(xv, y_lo)
        d.text((gx - 12, top + ph + 6), str(int(round(xv))), fill="black", font=font)
    d.text((left + pw // 2 - 12, h - 16), "step", fill="black", font=font)
    if len(pts) == 1:
        cx, cy = px(xs[0], ys[0])
        d.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=(30, 90, 200))
        return img
    d.line([px(x, y) for x, y in zip(xs, ys)], fill=(190, 190, 190), width=1)
    d.line([px(x, y) for x, y in zip(xs, sm)], fill=(30, 90, 200), width=2)
    d.text((left + pw - 150, top + 6), f"last (smoothed): {_fmt(sm[-1])}", fill=(30, 90, 200), font=font)
    return img
