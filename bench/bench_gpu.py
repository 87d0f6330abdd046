"""GPU benchmark at the real size: an SD1.5-shaped UNet with random weights at 512 px (nothing downloaded).

For fp16 and bf16: seconds per pair at 25 steps (CFG) with and without BCM against plain SD sampling of the same
number of images, DualAnoDiff training steps per second at batch 4 (4 pairs = 8 UNet rows), peak VRAM of each.
Prints a table and writes JSON. Run through ``bench/gpu.sh`` (under 10 minutes on one modern GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    cross_attention_dim=768,
    attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)


DEVICE = "cuda"


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def reset_peak():
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_bytes():
    return torch.cuda.max_memory_allocated() if DEVICE == "cuda" else 0


def build_unet(dtype):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET).to(DEVICE, dtype).eval()
    unet.requires_grad_(False)
    return unet


def randomize_dual(dual, std=0.02):
    g = torch.Generator(device=DEVICE).manual_seed(1)
    with torch.no_grad():
        for p in dual.parameters():
            if p.numel() == 1:
                p.fill_(0.2)
            else:
                p.add_(torch.randn(p.shape, device=p.device, generator=g, dtype=torch.float32).to(p.dtype) * std)


def sample_loop(model, lat, ctx, steps, cfg=2.5, bg=None):
    from dualanodiff_core.sd15.pipeline import SD15_SCHEDULER_CONFIG, make_scheduler

    sched = make_scheduler("pndm", SD15_SCHEDULER_CONFIG)
    sched.set_timesteps(steps, device=DEVICE)
    with torch.no_grad():
        for t in sched.timesteps:
            x = torch.cat([lat, lat])
            eps = model(x, t, ctx)
            u, c = eps.chunk(2)
            lat = sched.step(u + cfg * (c - u), t, lat).prev_sample
    return lat


def measure(fn, repeats=2):
    fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        reset_peak()
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best, peak_bytes()


def run_dtype(dtype, steps, pairs, train_steps):
    from dualanodiff_core.sd15.pipeline import DualUNet

    res = {}
    unet = build_unet(dtype)
    n = 2 * pairs
    g = torch.Generator(device=DEVICE).manual_seed(0)
    lat = torch.randn(
        n, 4, SD15_UNET["sample_size"], SD15_UNET["sample_size"], device=DEVICE, generator=g, dtype=torch.float32
    ).to(dtype)
    ctx = torch.randn(2 * n, 77, 768, device=DEVICE, generator=g, dtype=torch.float32).to(dtype)

    plain = lambda x, t, c: unet(x, t, encoder_hidden_states=c, return_dict=False)[0]  # noqa: E731
    t_plain, m_plain = measure(lambda: sample_loop(plain, lat, ctx, steps))
    res["plain_s_per_image"] = t_plain / n
    res["plain_peak_gib"] = m_plain / 2**30

    dual = DualUNet(unet, rank=32, bcm=True)
    for p in dual.processors.values():
        p.to(dtype)
    randomize_dual(dual)
    t_dual, m_dual = measure(lambda: sample_loop(dual, lat, ctx, steps))
    res["dual_s_per_pair"] = t_dual / pairs
    res["dual_peak_gib"] = m_dual / 2**30

    bg = torch.randn(
        2 * pairs,
        4,
        SD15_UNET["sample_size"],
        SD15_UNET["sample_size"],
        device=DEVICE,
        generator=g,
        dtype=torch.float32,
    ).to(dtype)
    bg_ctx = ctx[0::2]
    bcm = lambda x, t, c: dual.forward_with_background(x, t, c, bg, t, bg_ctx)  # noqa: E731
    t_bcm, m_bcm = measure(lambda: sample_loop(bcm, lat, ctx, steps))
    res["bcm_s_per_pair"] = t_bcm / pairs
    res["bcm_peak_gib"] = m_bcm / 2**30
    res["dual_vs_plain_2n_images"] = t_dual / t_plain
    res["bcm_vs_plain_2n_images"] = t_bcm / t_plain

    # training: base frozen in `dtype`, DualAnoDiff layers trainable in fp32 (mixed precision as the trainer does)
    for p in dual.processors.values():
        p.float()
    params = dual.parameters()
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=2e-5, weight_decay=1e-2)
    s_ = SD15_UNET["sample_size"]
    x = torch.randn(2 * 4, 4, s_, s_, device=DEVICE, dtype=dtype)
    c = torch.randn(2 * 4, 77, 768, device=DEVICE, dtype=dtype)
    t = torch.randint(0, 1000, (4,), device=DEVICE).repeat_interleave(2)
    target = torch.randn_like(x, dtype=torch.float32)

    def step():
        out = dual(x, t, c)
        loss = torch.nn.functional.mse_loss(out.float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    for checkpointing in (False, True):
        if checkpointing:
            unet.enable_gradient_checkpointing()
        unet.train(checkpointing)
        step()
        sync()
        reset_peak()
        t0 = time.perf_counter()
        for _ in range(train_steps):
            step()
        sync()
        key = "train_ckpt" if checkpointing else "train"
        res[f"{key}_steps_per_s"] = train_steps / (time.perf_counter() - t0)
        res[f"{key}_peak_gib"] = peak_bytes() / 2**30
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--train-steps", type=int, default=10)
    ap.add_argument("--dtypes", nargs="+", default=["fp16", "bf16"])
    ap.add_argument("--out", default="bench_gpu.json")
    ap.add_argument(
        "--dry-run-cpu",
        action="store_true",
        help="check the script on the CPU with a narrow UNet at 64 px (numbers meaningless)",
    )
    args = ap.parse_args()
    global DEVICE
    if args.dry_run_cpu:
        DEVICE = "cpu"
        SD15_UNET.update(block_out_channels=(32, 32, 64, 64), sample_size=8)
        args.dtypes = ["bf16"]
    elif not torch.cuda.is_available():
        sys.exit("bench_gpu.py needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = True
    out = {
        "gpu": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (dry run)",
        "torch": torch.__version__,
        "steps": args.steps,
        "pairs": args.pairs,
        "resolution": 512,
        "results": {},
    }
    for name in args.dtypes:
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[name]
        t0 = time.time()
        out["results"][name] = run_dtype(dtype, args.steps, args.pairs, args.train_steps)
        out["results"][name]["wall_s"] = time.time() - t0
        print(name, json.dumps(out["results"][name]), flush=True)
    rows = [
        (f"plain SD, s per image ({args.steps} steps, CFG)", "plain_s_per_image", "{:.3f}"),
        ("DualAnoDiff, s per pair", "dual_s_per_pair", "{:.3f}"),
        ("DualAnoDiff + BCM, s per pair", "bcm_s_per_pair", "{:.3f}"),
        ("dual / plain (N pairs vs 2N images)", "dual_vs_plain_2n_images", "{:.2f}"),
        ("BCM / plain (N pairs vs 2N images)", "bcm_vs_plain_2n_images", "{:.2f}"),
        ("peak VRAM plain sampling, GiB", "plain_peak_gib", "{:.2f}"),
        ("peak VRAM dual sampling, GiB", "dual_peak_gib", "{:.2f}"),
        ("peak VRAM BCM sampling, GiB", "bcm_peak_gib", "{:.2f}"),
        ("training steps/s, batch 4", "train_steps_per_s", "{:.2f}"),
        ("peak VRAM training, GiB", "train_peak_gib", "{:.2f}"),
        ("training steps/s, batch 4, grad. checkpointing", "train_ckpt_steps_per_s", "{:.2f}"),
        ("peak VRAM training, grad. checkpointing, GiB", "train_ckpt_peak_gib", "{:.2f}"),
    ]
    print(f"\n{out['gpu']}, torch {out['torch']}, SD1.5-shaped UNet, 512 px, {args.pairs} pairs\n")
    print(f"| {'':48s} | " + " | ".join(f"{d:>6s}" for d in out["results"]) + " |")
    print(f"|{'-' * 50}|" + "|".join("-" * 8 for _ in out["results"]) + "|")
    for label, key, fmt in rows:
        print(
            f"| {label:48s} | " + " | ".join(f"{fmt.format(out['results'][d][key]):>6s}" for d in out["results"]) + " |"
        )
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
