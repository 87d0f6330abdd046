"""CPU benchmark: DualAnoDiff against a plain UNet, measured side by side in one run.

Prints ratios (medians of interleaved repeats) and writes JSON. Times are CPU time of this (single-threaded)
process, so other work on the machine disturbs them far less than wall-clock time would. Run:

    OMP_NUM_THREADS=1 python bench/bench_cpu.py --out bench/results_cpu.json

Measured per size (tiny and mid UNets, random weights, nothing downloaded):
- dual forward / plain forward on the same rows (2N rows = N pairs)
- "reference-style" dual forward (a loop per branch, generic 2-token attention for SAIM) / plain
- BCM forward (background record pass included) / plain
- training step (forward + MSE + backward + AdamW step on the DualAnoDiff parameters) / its forward
- sampling N pairs with CFG / plain sampling of 2N images with CFG
- peak memory (process high-water mark during sampling, each case in its own process) / plain
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

SIZES = {
    # block_out_channels, cross_attention_dim, heads, latent size, pairs
    "tiny": dict(block_out_channels=(32, 64), cross_attention_dim=32, heads=4, latent=16, pairs=2),
    "mid": dict(block_out_channels=(64, 128, 256), cross_attention_dim=256, heads=8, latent=32, pairs=4),
}


def build(size: str, seed: int = 0):
    from dualanodiff_core.minidefect.tiny import tiny_unet

    s = SIZES[size]
    unet = tiny_unet(
        seed,
        block_out_channels=s["block_out_channels"],
        cross_attention_dim=s["cross_attention_dim"],
        heads=s["heads"],
        sample_size=s["latent"],
    )
    unet.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    n = 2 * s["pairs"]
    x = torch.randn(n, 4, s["latent"], s["latent"], generator=g)
    ctx = torch.randn(n, 77, s["cross_attention_dim"], generator=g)
    return unet, x, ctx, s


def randomize(dual, seed=1):
    from helpers import randomize_

    randomize_(dual, seed=seed, bcm_alpha=0.3)


def timeit(fn, warmup=2):
    for _ in range(warmup):
        fn()
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


def interleaved(cases: dict, repeats: int) -> dict:
    """Time every case once per round, ``repeats`` rounds; return medians (seconds)."""
    for fn in cases.values():
        fn()
        fn()
    times = {k: [] for k in cases}
    for _ in range(repeats):
        for k, fn in cases.items():
            t0 = time.process_time()
            fn()
            times[k].append(time.process_time() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def forward_cases(size: str, repeats: int) -> dict:
    from reference_impl import install_reference

    from dualanodiff_core.sd15.pipeline import DualUNet

    unet, x, ctx, s = build(size)
    t = torch.tensor(500)
    bg = torch.randn(s["pairs"], 4, s["latent"], s["latent"])
    plain_procs = dict(unet.attn_processors)
    dual = DualUNet(unet, rank=32, bcm=True)
    randomize(dual)
    dual_procs = dict(unet.attn_processors)
    state = {"mode": "r"}
    install_reference(unet, dual.processors, state)
    ref_procs = dict(unet.attn_processors)

    def run_plain():
        unet.set_attn_processor(dict(plain_procs))
        with torch.no_grad():
            unet(x, t, encoder_hidden_states=ctx)

    def run_dual():
        unet.set_attn_processor(dict(dual_procs))
        with torch.no_grad():
            dual(x, t, ctx)

    def run_ref():
        unet.set_attn_processor(dict(ref_procs))
        state.pop("ref", None)
        with torch.no_grad():
            unet(x, t, encoder_hidden_states=ctx)

    def run_bcm():
        unet.set_attn_processor(dict(dual_procs))
        with torch.no_grad():
            dual.forward_with_background(x, t, ctx, bg, t, ctx[0::2])

    med = interleaved({"plain": run_plain, "dual": run_dual, "reference_style": run_ref, "bcm": run_bcm}, repeats)
    unet.set_attn_processor(dict(dual_procs))

    # training step vs its forward (dual, no BCM)
    params = dual.parameters()
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-5)
    target = torch.randn_like(x)

    def train_step():
        unet.set_attn_processor(dict(dual_procs))
        out = dual(x, t, ctx)
        loss = torch.nn.functional.mse_loss(out, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    def fwd():
        unet.set_attn_processor(dict(dual_procs))
        with torch.no_grad():
            dual(x, t, ctx)

    def fwd_grad():  # the forward of a training step: straightforward path, autograd graph recorded
        unet.set_attn_processor(dict(dual_procs))
        dual(x, t, ctx).sum()

    # the floor: the plain UNet trained the way an ordinary attention LoRA is (q/k/v/out of every attention layer
    # trainable), so the backward runs through every attention layer exactly as DualAnoDiff's must
    plain_params = [
        getattr(m, proj).weight if proj != "to_out" else m.to_out[0].weight
        for n, m in unet.named_modules()
        if n.endswith(("attn1", "attn2"))
        for proj in ("to_q", "to_k", "to_v", "to_out")
    ]
    plain_opt = torch.optim.AdamW(plain_params, lr=1e-5)

    def plain_fwd():
        unet.set_attn_processor(dict(plain_procs))
        with torch.no_grad():
            unet(x, t, encoder_hidden_states=ctx)

    def plain_fwd_grad():
        unet.set_attn_processor(dict(plain_procs))
        for p in plain_params:
            p.requires_grad_(True)
        unet(x, t, encoder_hidden_states=ctx).sample.sum()
        for p in plain_params:
            p.requires_grad_(False)

    def plain_step():
        unet.set_attn_processor(dict(plain_procs))
        for p in plain_params:
            p.requires_grad_(True)
        out = unet(x, t, encoder_hidden_states=ctx).sample
        loss = torch.nn.functional.mse_loss(out, target)
        plain_opt.zero_grad(set_to_none=True)
        loss.backward()
        plain_opt.step()
        for p in plain_params:
            p.requires_grad_(False)
        unet.set_attn_processor(dict(dual_procs))

    tr = interleaved(
        {
            "forward": fwd,
            "forward_grad": fwd_grad,
            "train_step": train_step,
            "plain_forward": plain_fwd,
            "plain_forward_grad": plain_fwd_grad,
            "plain_train_step": plain_step,
        },
        max(3, repeats // 2),
    )
    return {
        "seconds": {**med, **{"train_" + k: v for k, v in tr.items()}},
        "ratios": {
            "dual_forward_vs_plain": med["dual"] / med["plain"],
            "reference_style_forward_vs_plain": med["reference_style"] / med["plain"],
            "bcm_forward_vs_plain": med["bcm"] / med["plain"],
            "train_step_vs_forward": tr["train_step"] / tr["forward"],
            "train_step_vs_its_forward": tr["train_step"] / tr["forward_grad"],
            "plain_train_step_vs_forward": tr["plain_train_step"] / tr["plain_forward"],
            "plain_train_step_vs_its_forward": tr["plain_train_step"] / tr["plain_forward_grad"],
        },
    }


def sampling_case(size: str, mode: str, steps: int) -> float:
    """Time one sampling run (CFG 2.5): 'plain' = 2N images with the plain UNet, 'dual' = N pairs."""
    from dualanodiff_core.sd15.pipeline import SD15_SCHEDULER_CONFIG, DualUNet, make_scheduler

    unet, x, ctx, s = build(size)
    cond = torch.cat([ctx, ctx])
    if mode == "dual":
        dual = DualUNet(unet, rank=32)
        randomize(dual)
        model = dual
    else:

        def model(a, t, c):
            return unet(a, t, encoder_hidden_states=c).sample

    def run():
        sched = make_scheduler("pndm", SD15_SCHEDULER_CONFIG)
        sched.set_timesteps(steps)
        lat = x.clone()
        with torch.no_grad():
            for t in sched.timesteps:
                eps = model(torch.cat([lat, lat]), t, cond)
                u, c = eps.chunk(2)
                lat = sched.step(u + 2.5 * (c - u), t, lat).prev_sample
        return lat

    return run


def memory_child(size: str, mode: str, steps: int) -> None:
    """In a fresh process: build, reset the RSS high-water mark, sample, print the peak (bytes)."""
    run = sampling_case(size, mode, steps)
    run()  # warm-up (lazy allocations, kernels)
    import gc

    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM
    except OSError:
        pass
    run()
    status = Path("/proc/self/status").read_text()
    hwm = int(next(l for l in status.splitlines() if l.startswith("VmHWM")).split()[1]) * 1024
    print(json.dumps({"peak_rss": hwm}))


# glibc's malloc otherwise keeps freed blocks and moves its mmap threshold, which makes RSS drift by ~10% between
# identical runs; with a fixed threshold large tensors are returned to the OS on free and RSS tracks live memory
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def measure_memory(size: str, steps: int) -> dict:
    out = {}
    for mode in ("plain", "dual"):
        r = subprocess.run(
            [sys.executable, __file__, "--memory-child", size, mode, str(steps)],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, **MALLOC_ENV},
        )
        out[mode] = json.loads(r.stdout.strip().splitlines()[-1])["peak_rss"]
    return {"peak_rss_bytes": out, "ratio": out["dual"] / out["plain"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--repeats", type=int, default=7, help="interleaved rounds per measurement (median)")
    ap.add_argument("--steps", type=int, default=5, help="sampling steps for the sampling/memory cases")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--memory-child", nargs=3, metavar=("SIZE", "MODE", "STEPS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        size, mode, steps = args.memory_child
        memory_child(size, mode, int(steps))
        return

    results = {"torch": torch.__version__, "threads": torch.get_num_threads(), "sizes": {}}
    for size in args.sizes:
        r = forward_cases(size, args.repeats)
        samp = interleaved(
            {"plain": sampling_case(size, "plain", args.steps), "dual": sampling_case(size, "dual", args.steps)},
            max(3, args.repeats // 2),
        )
        r["seconds"]["sampling_plain"] = samp["plain"]
        r["seconds"]["sampling_dual"] = samp["dual"]
        r["ratios"]["sampling_pairs_vs_plain"] = samp["dual"] / samp["plain"]
        mem = measure_memory(size, args.steps)
        r["memory"] = mem
        r["ratios"]["peak_memory_vs_plain"] = mem["ratio"]
        r["config"] = SIZES[size]
        results["sizes"][size] = r

    print(
        f"\nDualAnoDiff CPU benchmark (torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
        f"medians of {args.repeats} interleaved runs)\n"
    )
    names = list(next(iter(results["sizes"].values()))["ratios"])
    print(f"{'ratio':40s}" + "".join(f"{s:>10s}" for s in results["sizes"]))
    for n in names:
        print(f"{n:40s}" + "".join(f"{results['sizes'][s]['ratios'][n]:10.3f}" for s in results["sizes"]))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
