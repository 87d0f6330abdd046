"""VAE capacity: does another autoencoder architecture keep MiniDefect's defects through a round trip?

Trains only stage 1 of the base-model pre-training (the VAE, with exactly the shipped model's data, loss and
schedule unless told otherwise) with the given architecture, then encodes and decodes every real defect image of a
MiniDefect dataset with it and with the shipped VAE, side by side (the measurements of ``bench/diagnose.py``'s
capacity part: reconstruction error inside / outside the defect mask, alignment contrast, and whether the texture
detector still finds the defect)::

    OMP_NUM_THREADS=1 python bench/vae_capacity.py --data <minidefect seed 0> --vae-channels 48,96,96 \\
        --vae-layers 2 --json bench/results_vae_capacity.json

The UNet is not trained: this answers whether a base model built on that VAE *could* draw the defects, before the
hours a whole pre-training run takes. ``--vae-steps`` etc. are the pre-training options (``scripts/
pretrain_minidefect.py --help``); ``--save DIR`` keeps the trained VAE (diffusers folder).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from dualanodiff_core.fileio import write_json_atomic  # noqa: E402
from dualanodiff_core.minidefect import pretrain as pt  # noqa: E402
from dualanodiff_core.minidefect import procedural as md  # noqa: E402

KEYS = (
    ("mae_inside", "MAE in"),
    ("mae_outside", "MAE out"),
    ("alignment_reconstruction_median", "align rec"),
    ("detector_hit_reconstruction", "hit rec"),
    ("detector_hit_reconstruction_decoded_normals", "hit rec/rec"),
)


def train(config: pt.PretrainConfig, device: str, log) -> tuple[object, list[float], float]:
    """Stage 1 of :func:`dualanodiff_core.minidefect.pretrain.pretrain` alone: (VAE, loss history, seconds)."""
    normals, _, _ = pt.normal_pool(config, log)
    clutter = pt.clutter_pool(config, normals)
    vae = pt.build_models(config.seed, config)[0].to(device)
    hist, seconds = pt.vae_stage(vae, normals, clutter, config, log)
    return vae.cpu().eval(), hist, seconds


def table(results: dict[str, dict]) -> str:
    names = list(results)
    types = list(results[names[0]])
    cols = [(n, k, label, max(12, len(label + n) + 2)) for n in names for k, label in KEYS]
    lines = [f"{'type':<15}" + "".join(f"{label + ' ' + n:>{w}}" for n, _, label, w in cols)]
    for t in types:
        lines.append(f"{t:<15}" + "".join(f"{results[n][t][k]:>{w}.3f}" for n, k, _, w in cols))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import diagnose  # bench/diagnose.py: the capacity measurements

    from dualanodiff_core.sd15.loading import load_diffusers_components

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="MiniDefect root (written with --dataset-seed if missing)")
    p.add_argument("--dataset-seed", type=int, default=0)
    p.add_argument("--json", default="vae_capacity.json", help="where to write the results")
    p.add_argument("--save", help="also save the trained VAE (a diffusers AutoencoderKL folder) here")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    for f in dataclasses.fields(pt.PretrainConfig):
        if f.name.startswith("unet") or f.name in ("ema", "uncond_prob", "min_snr"):
            continue
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    a = p.parse_args(argv)
    known = {f.name for f in dataclasses.fields(pt.PretrainConfig)}
    config = pt.PretrainConfig(**{k: v for k, v in vars(a).items() if k in known})
    try:
        config.vae_config()
    except ValueError as e:
        p.error(str(e))
    torch.set_num_threads(max(1, a.threads))
    data = Path(a.data)
    if not data.exists():
        md.write_minidefect(data, md.MiniDefectSpec(seed=a.dataset_seed))

    def log(s: str) -> None:
        print(s, file=sys.stderr, flush=True)

    shipped = load_diffusers_components(md.base_model_dir())["vae"].eval()
    vae, hist, seconds = train(config, a.device, log)
    if a.save:
        vae.save_pretrained(a.save, safe_serialization=True)
    results = {"shipped": diagnose.capacity(data, shipped), "trained": diagnose.capacity(data, vae)}
    print(table(results))
    write_json_atomic(
        a.json,
        {
            "command": " ".join(["vae_capacity.py", *(sys.argv[1:] if argv is None else argv)]),
            "config": config.to_dict(),
            "vae_config": pt._jsonable(config.vae_config()),
            "parameters": {
                "shipped": sum(x.numel() for x in shipped.parameters()),
                "trained": sum(x.numel() for x in vae.parameters()),
            },
            "final_loss": float(np.mean(hist[-100:])),
            "train_seconds": round(seconds, 1),
            "threads": torch.get_num_threads(),
            "device": a.device,
            "torch": torch.__version__,
            "capacity": results,
        },
    )
    print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
