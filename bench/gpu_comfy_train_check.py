#!/usr/bin/env python3
"""GPU check of training inside ComfyUI: the DualAnoDiff Trainer node on CUDA, then the trained MODEL sampling.

Runs ComfyUI in-process (COMFYUI_PATH, GPU mode) with the generated SD1.5-detectable checkpoint of the tests
(UNet with 320 channels but one level, full-size CLIP-L, TAESD; random weights), on 512 px synthetic defect images.
Reports the dtype ComfyUI loads the UNet in, the dtype training computes in, where the trainable layers live, time
per step, peak GPU memory, the loss, and whether the trained MODEL samples finite images. Prints one JSON object
(and writes it to --out).

    COMFYUI_PATH=~/comfy/ComfyUI python bench/gpu_comfy_train_check.py --steps 8 --out result.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _stub_av() -> None:
    """ComfyUI's API package imports PyAV (video types) at import time; nothing here uses video. Where PyAV is not
    installed, a stub lets ComfyUI import (this check only)."""
    try:
        import av  # noqa: F401

        return
    except ImportError:
        pass
    for name in ("av", "av.container", "av.subtitles", "av.subtitles.stream"):
        mod = types.ModuleType(name)
        mod.__getattr__ = lambda attr: type(attr, (), {})  # noqa: E731
        sys.modules[name] = mod


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    _stub_av()
    sys.path.insert(0, os.environ["COMFYUI_PATH"])
    sys.path.insert(1, str(ROOT / "tests" / "comfyui"))
    sys.path.insert(2, str(ROOT / "tests"))
    import torch
    from comfy.cli_args import args as comfy_args

    comfy_args.cpu = not torch.cuda.is_available()  # a dry run on the CPU checks the script itself
    cuda = torch.cuda.is_available()
    import comfy.model_management as mm
    import comfy.sd
    import comfy_env
    import folder_paths
    import tiny_checkpoint
    from defect_data import make_flat

    pack = comfy_env.load_pack()
    import importlib

    train = importlib.import_module(f"{pack.__name__}.nodes.train")
    sampler = importlib.import_module(f"{pack.__name__}.nodes.sampler")
    comfy_train = importlib.import_module(f"{pack.__name__}.nodes.comfy_train")
    loaders = importlib.import_module(f"{pack.__name__}.nodes.loaders")

    tmp = Path(tempfile.mkdtemp(prefix="dualanodiff-gpu-"))
    (tmp / "input").mkdir()
    (tmp / "models").mkdir()
    folder_paths.set_input_directory(str(tmp / "input"))
    loaders.register_model_folder()
    folder_paths.add_model_folder_path("dualanodiff", str(tmp / "models"), is_default=True)
    make_flat(tmp / "input" / "toy", n=4, size=args.resolution)

    report: dict = {"device": str(mm.get_torch_device()), "gpu": torch.cuda.get_device_name(0) if cuda else None}
    with torch.inference_mode():
        model, clip, vae, _ = comfy.sd.load_state_dict_guess_config(tiny_checkpoint.state_dict())
        report["unet_dtype"] = str(model.model.get_dtype())
        report["clip_dtype"] = str(next(clip.cond_stage_model.parameters()).dtype)
        report["train_dtype"], report["precision"] = map(str, comfy_train.plan_precision(model))

        seen = {}
        original_load = comfy_train.ComfyTrainingBackbone.load

        def load(self):
            original_load(self)
            devices = {str(p.device) for _, p in self.trainable_parameters()}
            seen["trainable_devices"] = sorted(devices)
            seen["trainable_dtypes"] = sorted({str(p.dtype) for _, p in self.trainable_parameters()})

        comfy_train.ComfyTrainingBackbone.load = load
        times = []
        core_train = importlib.import_module(f"{pack.__name__}.dualanodiff_core.train")

        original_step = core_train.Trainer.train_step

        def timed_step(self):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = original_step(self)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            return out

        core_train.Trainer.train_step = timed_step
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        node = train.DualAnoDiffTrainer.PREPARE_CLASS_CLONE({"UNIQUE_ID": "1"})
        t0 = time.perf_counter()
        out = node.execute(
            model=model,
            clip=clip,
            vae=vae,
            folder="toy",
            defect="",
            output_name="gpu",
            steps=args.steps,
            learning_rate=1e-4,
            rank=32,
            batch_size=args.batch_size,
            resolution=args.resolution,
            seed=32,
            resume=False,
            train_text_encoder=True,
            bcm=False,
            split="all",
            checkpoint_every=max(1, args.steps // 2),
        )
        report["train_wall_s"] = round(time.perf_counter() - t0, 2)
        report["peak_gpu_gib_training"] = round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None
        live = dict(model.model.diffusion_model.named_modules())
        report["base_model_restored"] = type(live["input_blocks.1.1.transformer_blocks.0.attn1"]).__name__
        report.update(seen)
        report["step_s"] = [round(t, 3) for t in times]
        report["step_s_median_after_first"] = (
            round(sorted(times[1:])[len(times[1:]) // 2], 3) if len(times) > 1 else None
        )
        model_out, clip_out, name, loss = out.result
        w = importlib.import_module(f"{pack.__name__}.dualanodiff_core.weights").DualAnoDiffWeights.load(
            tmp / "models" / name
        )
        report["weights"] = {
            "file": name,
            "trained_steps": w.metadata.get("trained_steps"),
            "text": w.has_text,
            "tensors": len(w.tensors),
        }
        csv = (tmp / "models" / "gpu_train" / "loss.csv").read_text().splitlines()[1:]
        report["losses"] = [round(float(line.split(",")[1]), 4) for line in csv]
        enc = lambda text: clip_out.encode_from_tokens_scheduled(clip_out.tokenize(text))  # noqa: E731
        g, a = sampler.DualSampler.execute(
            model=model_out,
            positive_global=enc("a vfx with sks"),
            positive_anomaly=enc("sks"),
            negative=enc(""),
            pairs=2,
            width=args.resolution,
            height=args.resolution,
            seed=0,
            steps=4,
            cfg=2.5,
            sampler_name="euler",
            scheduler="normal",
            denoise=1.0,
        ).result
        images = vae.decode(torch.cat([g["samples"], a["samples"]]))
        report["sampled"] = {"shape": list(images.shape), "finite": bool(torch.isfinite(images).all())}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
