"""GPU correctness checks (run by bench/gpu.sh before the timings): the inference fast paths agree with the
straightforward path on CUDA, and half-precision forwards stay finite and close to fp32."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402
from helpers import randomize_, unet_inputs  # noqa: E402

from dualanodiff_core.minidefect.tiny import tiny_unet  # noqa: E402
from dualanodiff_core.sd15.pipeline import DualUNet  # noqa: E402


def main():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    unet = tiny_unet(0).cuda()
    dual = DualUNet(unet, rank=32, bcm=True)
    randomize_(dual, seed=3)
    x, t, ctx = (a.cuda() for a in unet_inputs(unet, pairs=2))
    bg = torch.randn(2, 4, 8, 8, device="cuda")
    with torch.no_grad():
        fast = dual(x, t, ctx)
        fast_bcm = dual.forward_with_background(x, t, ctx, bg, t, ctx[0::2])
    with torch.enable_grad():
        slow = dual(x, t, ctx)
        slow_bcm = dual.forward_with_background(x, t, ctx, bg, t, ctx[0::2])
    d1, d2 = (fast - slow).abs().max().item(), (fast_bcm - slow_bcm).abs().max().item()
    print(f"cuda fp32 fast vs straightforward: dual {d1:.2e}, bcm {d2:.2e}")
    ok = d1 < 1e-4 and d2 < 1e-4
    for dtype in (torch.float16, torch.bfloat16):
        unet.to(dtype)
        for p in dual.processors.values():
            p.float()  # the DualAnoDiff layers stay fp32 under a half-precision UNet
        with torch.no_grad():
            h = dual(x.to(dtype), t, ctx.to(dtype)).float()
        rel = ((h - fast).norm() / fast.norm()).item()
        print(f"{dtype}: finite={bool(torch.isfinite(h).all())}, relative error vs fp32 {rel:.2e}")
        ok = ok and bool(torch.isfinite(h).all()) and rel < 0.05
        unet.float()
    print("GPU CHECKS", "PASSED" if ok else "FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
