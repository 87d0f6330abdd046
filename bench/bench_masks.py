"""Time mask extraction on anomaly-branch-like images (defects on noisy mid-gray).

    python bench/bench_masks.py [--size 512] [--repeat 20]

Prints the median time per image for a few shapes. Not a test: timings depend on the machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def main() -> None:
    from dualanodiff_core.dataset.masks import extract_mask

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--repeat", type=int, default=20)
    a = p.parse_args()
    n = a.size
    yy, xx = np.mgrid[:n, :n]
    rng = np.random.default_rng(0)
    cases = {
        "blob": (yy - n * 0.4) ** 2 + (xx - n * 0.5) ** 2 < (n * 0.1) ** 2,
        "scratch": np.abs(yy - (0.4 * xx + n * 0.2)) < n / 128,
        "many specks": rng.random((n, n)) < 0.002,
        "empty": np.zeros((n, n), bool),
    }
    for name, m in cases.items():
        im = np.full((n, n, 3), 0.5, np.float32)
        im[m] = (0.15, 0.1, 0.1)
        im += rng.normal(0, 0.02, im.shape).astype(np.float32)
        img = (np.clip(im, 0, 1) * 255).round().astype(np.uint8)
        extract_mask(img)  # warm-up
        times = []
        for _ in range(a.repeat):
            t = time.perf_counter()
            res = extract_mask(img)
            times.append(time.perf_counter() - t)
        print(
            f"{name:>12} {n}x{n}: {statistics.median(times) * 1000:7.1f} ms  "
            f"(area {res.area_fraction:.3%}, {res.components} component(s), empty={res.empty})"
        )


if __name__ == "__main__":
    main()
