"""``dualanodiff inspect``: show what a weights file holds; convert a reference checkpoint; export branch LoRAs."""

from __future__ import annotations

import argparse
import json

from ..method.weights import DualAnoDiffWeights


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("weights", help="our .safetensors or an official reference checkpoint (.bin / .safetensors)")
    p.add_argument("--json", action="store_true", help="print a JSON summary instead of text")
    p.add_argument(
        "--convert",
        metavar="OUT.safetensors",
        help="write the weights in our .safetensors format (e.g. to convert a reference .bin)",
    )
    p.add_argument(
        "--export-branch-lora",
        nargs=2,
        metavar=("BRANCH", "OUT.safetensors"),
        help="write one branch's LoRA (global or anomaly) in kohya style for ComfyUI's stock LoraLoader; "
        "SAIM/BCM are not included",
    )


def run(args: argparse.Namespace) -> int:
    w = DualAnoDiffWeights.load(args.weights)
    summary = {
        "file": args.weights,
        "unet_layers": len(w.unet_layers()),
        "tensors": len(w.tensors),
        "parameters": int(sum(t.numel() for t in w.tensors.values())),
        "rank": w.rank,
        "alpha": w.alpha,
        "saim": w.has_saim,
        "bcm": w.has_bcm,
        "text_encoder_lora": w.has_text,
        "metadata": w.metadata,
    }
    if args.json:
        print(json.dumps(summary, indent=2, sort_keys=True))
    else:
        for k, v in summary.items():
            if k != "metadata":
                print(f"{k:>18}: {v}")
        for k, v in sorted(w.metadata.items()):
            print(f"{'meta.' + k:>18}: {v}")
    if args.convert:
        w.save(args.convert)
        print(f"wrote {args.convert}")
    if args.export_branch_lora:
        branch, out = args.export_branch_lora
        names = {"global": 0, "anomaly": 1, "0": 0, "1": 1}
        if branch not in names:
            raise ValueError(f"branch must be 'global' or 'anomaly', got {branch!r}")
        w.save_branch_lora(names[branch], out)
        print(f"wrote {out}")
    return 0
