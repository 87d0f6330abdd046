"""GPU check of the trainer at full SD1.5 size (random weights: no real checkpoint can be downloaded here).

Measures, for batch 4 at 512 px (8 UNet rows, the reference setting): seconds per step and peak GPU memory in fp32,
bf16 and fp16 (loss scaling), with/without gradient checkpointing, with/without BCM; checks that the loss and the
gradients stay finite; counts the trainable parameters against docs/method.md; times a checkpoint write and a resume
load. Writes ``$OUT/gpu_train_check.json`` and prints a table.

    python bench/gpu_train_check.py            # needs CUDA, diffusers, transformers
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dualanodiff_core.sd15.training import DiffusersTrainingBackbone  # noqa: E402
from dualanodiff_core.training.data import DefectDataset, find_defect_set  # noqa: E402
from dualanodiff_core.training.trainer import TrainConfig, Trainer, load_checkpoint  # noqa: E402

RES = 512
OUT = Path(os.environ.get("OUT", "/tmp/gpu_train_check"))


def sd15_components(device: str) -> dict:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from dualanodiff_core.minidefect.tiny import tiny_tokenizer
    from dualanodiff_core.sd15.pipeline import SD15_SCHEDULER_CONFIG

    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(
            sample_size=64,
            in_channels=4,
            out_channels=4,
            cross_attention_dim=768,
            attention_head_dim=8,
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        )
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            layers_per_block=2,
            sample_size=512,
        )
        te = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=49408,
                hidden_size=768,
                intermediate_size=3072,
                num_hidden_layers=12,
                num_attention_heads=12,
                max_position_embeddings=77,
                hidden_act="quick_gelu",
            )
        )
    for m in (unet, vae, te):
        m.requires_grad_(False).eval()
    return dict(
        unet=unet,
        vae=vae,
        text_encoder=te,
        tokenizer=tiny_tokenizer(),
        scheduler_config=dict(SD15_SCHEDULER_CONFIG),
        name="sd15-shaped random",
    )


def make_data(root: Path, n: int = 6) -> Path:
    rng = np.random.default_rng(0)
    for sub in ("images", "masks", "object_masks"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = rng.integers(30, 80, (RES, RES, 3), dtype=np.uint8)
        img[128:384, 128:384] = (180, 180, 170)
        obj = np.zeros((RES, RES), np.uint8)
        obj[128:384, 128:384] = 255
        y, x = rng.integers(140, 320, 2)
        mask = np.zeros((RES, RES), np.uint8)
        mask[y : y + 40, x : x + 60] = 255
        img[mask > 0] = (200, 40, 30)
        Image.fromarray(img).save(root / "images" / f"{i:03d}.png")
        Image.fromarray(mask).save(root / "masks" / f"{i:03d}.png")
        Image.fromarray(obj).save(root / "object_masks" / f"{i:03d}.png")
    return root


def count(bb) -> dict:
    saim = lora = bcm = text = 0
    for n, p in bb.trainable_parameters():
        k = p.numel()
        if n.startswith("text_encoder."):
            text += k
        elif ".temporal_condition_mlp." in n or n.endswith("temporal_a"):
            bcm += k
        elif ".temporal_" in n:
            saim += k
        else:
            lora += k
    return dict(saim=saim, unet_lora=lora, bcm=bcm, text_lora=text)


def variant(data: Path, work: Path, precision: str, gc: bool, bcm: bool, steps: int = 5, warmup: int = 2) -> dict:
    config = TrainConfig(
        steps=100,
        batch_size=4,
        resolution=RES,
        precision=precision,
        gradient_checkpointing=gc,
        bcm=bcm,
        checkpoint_every=0,
        checkpoint_weights=False,
    )
    ds = DefectDataset(find_defect_set(data), RES, backgrounds=bcm)
    bb = DiffusersTrainingBackbone.build(sd15_components("cuda"), config, device="cuda")
    tr = Trainer(bb, ds, config, work)
    torch.cuda.synchronize()
    for _ in range(warmup):
        tr.train_step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    losses, norms = [], []
    t0 = time.perf_counter()
    for _ in range(steps):
        loss, norm = tr.train_step()
        losses.append(loss)
        norms.append(norm)
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    res = dict(
        precision=precision,
        gc=gc,
        bcm=bcm,
        s_per_step=round(dt, 4),
        peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
        losses=[round(v, 5) for v in losses],
        grad_norms=[round(v, 4) for v in norms],
        finite=bool(all(np.isfinite(losses)) and all(np.isfinite(norms))),
        params_fp32=all(p.dtype == torch.float32 for p in tr.params),
        scale=float(tr.scaler.get_scale()) if tr.scaler.is_enabled() else None,
    )
    if precision == "fp32" and not gc and not bcm:
        res["counts"] = count(bb)
    if precision == "bf16" and bcm and not gc:
        res["counts_bcm"] = count(bb)
    del tr, bb
    torch.cuda.empty_cache()
    return res


def checkpoint_io(data: Path, work: Path) -> dict:
    config = TrainConfig(steps=2, batch_size=4, resolution=RES, precision="bf16", checkpoint_every=0, bcm=True)
    ds = DefectDataset(find_defect_set(data), RES, backgrounds=True)
    bb = DiffusersTrainingBackbone.build(sd15_components("cuda"), config, device="cuda")
    tr = Trainer(bb, ds, config, work, output=work / "out.safetensors")
    tr.run()
    ck = tr.last_checkpoint
    t0 = time.perf_counter()
    tr.save_checkpoint()
    t_save = time.perf_counter() - t0
    t0 = time.perf_counter()
    state = load_checkpoint(ck)
    t_load = time.perf_counter() - t0
    cfg2 = TrainConfig(**{**config.to_dict(), "steps": 3})
    tr2 = Trainer(DiffusersTrainingBackbone.build(sd15_components("cuda"), cfg2, device="cuda"), ds, cfg2, work)
    t0 = time.perf_counter()
    tr2.load_state_dict(state)
    t_restore = time.perf_counter() - t0
    r = tr2.run()
    return dict(
        checkpoint_mb=round(ck.stat().st_size / 2**20, 1),
        weights_mb=round((work / "out.safetensors").stat().st_size / 2**20, 1),
        save_s=round(t_save, 2),
        load_s=round(t_load, 2),
        restore_s=round(t_restore, 2),
        resumed_to=r.step,
        resumed_loss=r.history[-1]["loss"],
    )


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    info = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__)
    import diffusers
    import transformers

    info.update(diffusers=diffusers.__version__, transformers=transformers.__version__)
    print(info, flush=True)
    results = dict(info=info, variants=[])
    with tempfile.TemporaryDirectory() as tmp:
        data = make_data(Path(tmp) / "data")
        for precision, gc, bcm in (
            ("fp32", False, False),
            ("bf16", False, False),
            ("fp16", False, False),
            ("bf16", True, False),
            ("fp32", True, False),
            ("bf16", False, True),
            ("bf16", True, True),
        ):
            try:
                r = variant(data, Path(tmp) / "w", precision, gc, bcm)
            except Exception as e:  # noqa: BLE001 - record and go on
                r = dict(precision=precision, gc=gc, bcm=bcm, error=f"{type(e).__name__}: {e}"[:500])
                torch.cuda.empty_cache()
            results["variants"].append(r)
            print(json.dumps(r), flush=True)
            (OUT / "gpu_train_check.json").write_text(json.dumps(results, indent=2))
        try:
            results["checkpoint_io"] = checkpoint_io(data, Path(tmp) / "ck")
        except Exception as e:  # noqa: BLE001
            results["checkpoint_io"] = dict(error=f"{type(e).__name__}: {e}"[:500])
        print(json.dumps(results["checkpoint_io"]), flush=True)
    (OUT / "gpu_train_check.json").write_text(json.dumps(results, indent=2))
    print("\nprecision  gc     bcm    s/step  peak GiB  finite")
    for r in results["variants"]:
        if "error" in r:
            print(f"{r['precision']:<10} {r['gc']!s:<6} {r['bcm']!s:<6} ERROR {r['error'][:80]}")
        else:
            print(
                f"{r['precision']:<10} {r['gc']!s:<6} {r['bcm']!s:<6} {r['s_per_step']:<7} {r['peak_gib']:<9} "
                f"{r['finite']}"
            )


if __name__ == "__main__":
    main()
