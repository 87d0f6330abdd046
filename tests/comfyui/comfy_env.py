"""ComfyUI in this process, for the pack's ComfyUI tests (run by COMFYUI_PYTHON; see tests/test_comfyui.py).

``skip_reason()`` says why these tests cannot run here (checked without importing ComfyUI); ``setup()`` imports
ComfyUI from ``COMFYUI_PATH`` in CPU mode and loads this checkout as a ComfyUI pack package (the way ComfyUI's
loader does: a package whose ``nodes``/``dualanodiff_core`` subpackages import each other relatively).
Tiny models are built in Python: no model detection, no files.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACK = "dualanodiff_pack"

#: a tiny SD1.x-shaped UNet (GroupNorm(32) needs channels that are multiples of 32)
TINY_UNET = dict(
    image_size=32,
    use_spatial_transformer=True,
    legacy=False,
    use_checkpoint=False,
    in_channels=4,
    out_channels=4,
    model_channels=32,
    num_res_blocks=[1, 1],
    channel_mult=[1, 2],
    transformer_depth=[1, 1],
    transformer_depth_output=[1, 1, 1, 1],
    transformer_depth_middle=1,
    context_dim=64,
    use_linear_in_transformer=False,
    adm_in_channels=None,
    use_temporal_attention=False,
    use_temporal_resblock=False,
)
TINY_CLIP = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2}


def dirs(env, tmp_path):
    """Point ComfyUI's input and output folders and the first ``models/dualanodiff`` path at ``tmp_path``; returns
    ``(namespace of the paths, restore function)``."""
    fp = env.folder_paths
    old_input, old_output = fp.get_input_directory(), fp.get_output_directory()
    env.loaders.register_model_folder()
    ns = types.SimpleNamespace(input=tmp_path / "input", output=tmp_path / "output", models=tmp_path / "dualanodiff")
    for p in (ns.input, ns.output, ns.models):
        p.mkdir(parents=True, exist_ok=True)
    fp.add_model_folder_path("dualanodiff", str(ns.models), is_default=True)
    fp.set_input_directory(str(ns.input))
    fp.set_output_directory(str(ns.output))

    def restore():
        fp.set_input_directory(old_input)
        fp.set_output_directory(old_output)
        paths = fp.folder_names_and_paths["dualanodiff"][0]
        if str(ns.models) in paths:
            paths.remove(str(ns.models))

    return ns, restore


def skip_reason() -> str | None:
    path = os.environ.get("COMFYUI_PATH")
    if not path:
        return (
            "COMFYUI_PATH is not set: the ComfyUI tests need a ComfyUI checkout and its interpreter "
            "(COMFYUI_PYTHON); see docs/contributing.md"
        )
    if not (Path(path) / "comfy" / "model_patcher.py").is_file():
        return f"COMFYUI_PATH={path} is not a ComfyUI checkout (no comfy/model_patcher.py)"
    py = os.environ.get("COMFYUI_PYTHON")
    if py:
        want = Path(py).absolute().parent.parent.resolve()
        if want != Path(sys.prefix).resolve():
            return (
                f"these tests run in ComfyUI's interpreter COMFYUI_PYTHON={py}, not {sys.executable}; "
                "`python -m pytest` runs them there through tests/test_comfyui.py"
            )
    return None


_env = None


def setup() -> types.SimpleNamespace:
    """Import ComfyUI (CPU) and this pack once; return a namespace of the modules the tests use."""
    global _env
    if _env is not None:
        return _env
    path = os.environ["COMFYUI_PATH"]
    # ComfyUI's top-level modules (nodes, utils, ...) must win over anything else on sys.path
    sys.path.insert(0, path)
    from comfy.cli_args import args

    args.cpu = True
    import comfy.model_management  # noqa: F401  (reads args.cpu)
    import folder_paths

    import nodes

    pack = load_pack()
    ns = types.SimpleNamespace(
        comfy=sys.modules["comfy"],
        nodes=nodes,
        folder_paths=folder_paths,
        pack=pack,
        backend=importlib.import_module(f"{PACK}.nodes.comfy_backend"),
        conditioning=importlib.import_module(f"{PACK}.nodes.conditioning"),
        loaders=importlib.import_module(f"{PACK}.nodes.loaders"),
        patch=importlib.import_module(f"{PACK}.nodes.patch"),
        background=importlib.import_module(f"{PACK}.nodes.background"),
        sampler=importlib.import_module(f"{PACK}.nodes.sampler"),
        extension=importlib.import_module(f"{PACK}.nodes.extension"),
        mask=importlib.import_module(f"{PACK}.nodes.mask"),
        dataset=importlib.import_module(f"{PACK}.nodes.dataset"),
        dataset_io=importlib.import_module(f"{PACK}.nodes.dataset_io"),
        train=importlib.import_module(f"{PACK}.nodes.train"),
        comfy_train=importlib.import_module(f"{PACK}.nodes.comfy_train"),
        core_train=importlib.import_module(f"{PACK}.dualanodiff_core.train"),
        core_data=importlib.import_module(f"{PACK}.dualanodiff_core.data"),
        core_export=importlib.import_module(f"{PACK}.dualanodiff_core.export"),
        core_weights=importlib.import_module(f"{PACK}.dualanodiff_core.weights"),
        core_layout=importlib.import_module(f"{PACK}.dualanodiff_core.layout"),
        core_attention=importlib.import_module(f"{PACK}.dualanodiff_core.attention"),
    )
    _env = ns
    return ns


def load_pack():
    if PACK in sys.modules:
        return sys.modules[PACK]
    spec = importlib.util.spec_from_file_location(PACK, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK] = module
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------------------------------------------
# tiny models (recipe A)


def init_module(module, seed: int, std: float = 0.02) -> None:
    """comfy ops do not initialise weights: fill every parameter (norm weights 1, biases 0, the rest normal)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "bias" or leaf.endswith("shift"):
                p.zero_()
            elif p.ndim <= 1:  # norm scales, vae_scale
                p.fill_(1.0)
            else:
                fan_in = max(1, p[0].numel())
                p.copy_(torch.randn(p.shape, generator=g) * min(std * 5, fan_in**-0.5))


def tiny_model(seed: int = 0, unet_config: dict | None = None, heads: int | None = None, state_dict=None):
    """A ModelPatcher around a tiny SD15-class UNet (fp32, CPU)."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models
    import torch

    cls = comfy.supported_models.SD15
    if heads is not None:
        cls = type(
            "SD15Heads",
            (comfy.supported_models.SD15,),
            {"unet_extra_config": {"num_heads": heads, "num_head_channels": -1}},
        )
    mc = cls(dict(unet_config or TINY_UNET))
    mc.set_inference_dtype(torch.float32, None)
    base = mc.get_model({}, "")
    if state_dict is None:
        init_module(base.diffusion_model, seed)
    else:
        base.diffusion_model.load_state_dict(state_dict, strict=True)
    base.eval()
    return comfy.model_patcher.ModelPatcher(
        base, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device()
    )


def tiny_clip(seed: int = 0):
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base
    import torch

    target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
    clip = comfy.sd.CLIP(target, model_options={"clip_l_model_config": dict(TINY_CLIP), "dtype": torch.float32})
    init_module(clip.cond_stage_model, seed)
    return clip


def tiny_vae(seed: int = 0):
    import comfy.sd
    import comfy.taesd.taesd

    taesd = comfy.taesd.taesd.TAESD()
    init_module(taesd, seed, std=0.05)
    return comfy.sd.VAE(sd=taesd.state_dict())


def random_weights(
    env,
    model,
    *,
    seed: int = 0,
    rank: int = 4,
    saim: bool = True,
    bcm: bool = False,
    clip=None,
    lora_scale: float = 0.05,
    branches=(0, 1),
    zero: bool = False,
    bcm_alpha: float = 0.3,
):
    """DualAnoDiffWeights for ``model`` (the pack's class) with non-zero LoRA ups on ``branches``; ``zero`` makes
    every contribution exactly zero (LoRA ups, SAIM out-projection, BCM alpha). With ``clip``: a text LoRA."""
    import torch

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    torch.manual_seed(seed)
    for site in env.backend.attention_sites(model):
        attn = model.get_model_object(site.patch_name)
        layers = env.backend.build_layers(attn, rank=rank, alpha=None, saim=saim, bcm=bcm)
        sd = {k: v.detach().clone() for k, v in layers.state_dict().items()}
        for k in sd:
            if ".up." in k:
                branch = int(k.split("_lora.")[1][0])
                if not zero and branch in branches:
                    sd[k] = torch.randn(sd[k].shape, generator=g) * lora_scale
                else:
                    sd[k] = torch.zeros_like(sd[k])
            if zero and k.startswith("temporal_o."):
                sd[k] = torch.zeros_like(sd[k])
            if k == "temporal_a":
                sd[k] = torch.full_like(sd[k], 0.0 if zero else bcm_alpha)
        tensors.update({f"unet.{site.diffusers}.{k}": v for k, v in sd.items()})
    if clip is not None:
        csd = clip.cond_stage_model.state_dict()
        prefix = "clip_l.transformer."
        for key, w in csd.items():
            if key.startswith(prefix) and ".self_attn." in key and key.endswith("q_proj.weight"):
                layer = key[len(prefix) : -len(".q_proj.weight")]
                hidden = w.shape[1]
                for proj in ("to_q", "to_k", "to_v", "to_out"):
                    down = torch.randn(rank, hidden, generator=g) / rank
                    tensors[f"text_encoder.{layer}.{proj}_lora.down.weight"] = down
                    up = torch.zeros(hidden, rank) if zero else torch.randn(hidden, rank, generator=g) * 0.2
                    tensors[f"text_encoder.{layer}.{proj}_lora.up.weight"] = up
    return env.core_weights.DualAnoDiffWeights(tensors, {"prompt_global": "a vfx with sks", "prompt_anomaly": "sks"})


def forward(model, x, t, ctx, extra_options: dict | None = None):
    """One UNet forward (diffusion_model level) of a MODEL clone with its object patches and DualAnoDiff settings;
    the model is unpatched afterwards."""
    import torch

    to = dict(model.model_options.get("transformer_options", {}))
    to.update(extra_options or {})
    model.patch_model()
    try:
        with torch.inference_mode():
            return model.model.diffusion_model(x, t, context=ctx, transformer_options=to).clone()
    finally:
        model.unpatch_model()


def sample(env, model, positive, negative, latent, seed=1, steps=3, cfg=2.5, sampler="euler", scheduler="normal"):
    import torch

    with torch.inference_mode():
        (out,) = env.nodes.common_ksampler(model, seed, steps, cfg, sampler, scheduler, positive, negative, latent)
    return out


def encode(clip, text):
    import torch

    with torch.inference_mode():
        return clip.encode_from_tokens_scheduled(clip.tokenize(text))
