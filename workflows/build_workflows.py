#!/usr/bin/env python3
"""Writes the example workflows: ``workflows/<template title>.json`` (UI format: drag and drop into ComfyUI, listed
in its template browser; see :data:`TEMPLATES`) and ``workflows/api/<name>.json`` (API format: ``POST /prompt``,
``queue_batch.py``).

Both files come from one description per graph below, so they cannot drift apart; the ComfyUI server test converts
every UI file to API format with ``queue_batch.py``'s converter (driven by the live ``/object_info``) and checks it
equals the API file. Run ``python workflows/build_workflows.py`` after editing a graph. Standard library only.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
CKPT = "v1-5-pruned-emaonly-fp16.safetensors"
CKPT_URL = (
    "https://huggingface.co/Comfy-Org/stable-diffusion-v1-5-archive/resolve/main/"
    "v1-5-pruned-emaonly-fp16.safetensors?download=true"
)
WEIGHTS = "my_defect.safetensors"

# node type -> (link inputs [(name, type, optional)], widgets [name or (name, "control"/"upload")], outputs)
TYPES = {
    "CheckpointLoaderSimple": ([], ["ckpt_name"], [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")]),
    "CLIPTextEncode": ([("clip", "CLIP", False)], ["text"], [("CONDITIONING", "CONDITIONING")]),
    "VAEDecode": ([("samples", "LATENT", False), ("vae", "VAE", False)], [], [("IMAGE", "IMAGE")]),
    "SaveImage": ([("images", "IMAGE", False)], ["filename_prefix"], []),
    "LoadImage": ([], [("image", "upload")], [("IMAGE", "IMAGE"), ("MASK", "MASK")]),
    "EmptyLatentImage": ([], ["width", "height", "batch_size"], [("LATENT", "LATENT")]),
    "KSampler": (
        [
            ("model", "MODEL", False),
            ("positive", "CONDITIONING", False),
            ("negative", "CONDITIONING", False),
            ("latent_image", "LATENT", False),
        ],
        [("seed", "control"), "steps", "cfg", "sampler_name", "scheduler", "denoise"],
        [("LATENT", "LATENT")],
    ),
    "DualAnoDiffLoRALoader": (
        [("model", "MODEL", False), ("clip", "CLIP", False)],
        ["weights", "strength_global", "strength_anomaly", "strength_text"],
        [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("prompt_global", "STRING"), ("prompt_anomaly", "STRING")],
    ),
    "DualAnoDiffAttentionPatch": ([("model", "MODEL", False)], ["saim_strength"], [("MODEL", "MODEL")]),
    "DualAnoDiffBackgroundCompensate": (
        [
            ("model", "MODEL", False),
            ("vae", "VAE", False),
            ("background", "IMAGE", False),
            ("object_mask", "MASK", True),
        ],
        ["strength", ("seed", "control")],
        [("MODEL", "MODEL")],
    ),
    "DualAnoDiffSampler": (
        [
            ("model", "MODEL", False),
            ("positive_global", "CONDITIONING", False),
            ("positive_anomaly", "CONDITIONING", False),
            ("negative", "CONDITIONING", False),
            ("latent", "LATENT", True),
        ],
        ["pairs", "width", "height", ("seed", "control"), "steps", "cfg", "sampler_name", "scheduler", "denoise"],
        [("global", "LATENT"), ("anomaly", "LATENT")],
    ),
    "DualAnoDiffPairConditioning": (
        [("global_prompt", "CONDITIONING", False), ("anomaly_prompt", "CONDITIONING", False)],
        [],
        [("CONDITIONING", "CONDITIONING")],
    ),
    "DualAnoDiffSplitLatentPairs": ([("latent", "LATENT", False)], [], [("global", "LATENT"), ("anomaly", "LATENT")]),
    "DualAnoDiffMaskFromAnomalyBranch": (
        [("anomaly", "IMAGE", False), ("image", "IMAGE", True)],
        [
            "gray",
            "threshold",
            "min_contrast",
            "hysteresis",
            "blur",
            "reduce",
            "open_radius",
            "close_radius",
            "fill_holes",
            "min_area",
            "dilate",
        ],
        [("mask", "MASK"), ("overlay", "IMAGE"), ("report", "STRING")],
    ),
    "DualAnoDiffSaveDataset": (
        [("images", "IMAGE", False), ("anomaly", "IMAGE", True), ("mask", "MASK", True)],
        ["dataset", "category", "defect", "max_area", "max_gray_offset", "keep_rejected", "min_alignment"],
        [],
    ),
    "DualAnoDiffTrainer": (
        [("model", "MODEL", False), ("clip", "CLIP", False), ("vae", "VAE", False)],
        [
            "folder",
            "defect",
            "output_name",
            "steps",
            "learning_rate",
            "rank",
            "batch_size",
            "resolution",
            "seed",
            "resume",
            "train_text_encoder",
            "bcm",
            "split",
            "checkpoint_every",
        ],
        [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("weights", "STRING"), ("loss", "IMAGE")],
    ),
    "PreviewImage": ([("images", "IMAGE", False)], [], []),
    "LoadImageSetFromFolderNode": ([], ["folder", "resize_method"], [("IMAGE", "IMAGE")]),
    "ImageToMask": ([("image", "IMAGE", False)], ["channel"], [("MASK", "MASK")]),
    "DualAnoDiffCompositeOnNormal": (
        [("images", "IMAGE", False), ("normal", "IMAGE", False), ("placement", "MASK", True)],
        ["feather"],
        [("IMAGE", "IMAGE")],
    ),
}
#: optional inputs added to a node type later: listed only on the nodes that use them, so the older workflows stay
#: exactly as they were saved (and keep proving that they load)
LATER_INPUTS = {
    "DualAnoDiffSampler": [("placement", "MASK", True), ("normal", "IMAGE", True), ("vae", "VAE", True)],
    "DualAnoDiffSaveDataset": [("placement", "MASK", True)],
}
#: widgets added to a node type later, with their defaults: the frontend shows them (with the default) on every such
#: node and saves their values, so both files list them everywhere (the workflows as saved before they existed are
#: kept in tests/comfyui/old_workflows/ and still load)
LATER_WIDGETS = {
    # anomaly_noise_share: nodes/sampler.py's DEFAULT_ANOMALY_NOISE_SHARE (a ComfyUI test checks they agree)
    "DualAnoDiffSampler": [("placement_steering", "shift"), ("anomaly_noise_share", 1.0)],
    # anomaly_contrast: nodes/train.py's DEFAULT_ANOMALY_CONTRAST (the default recipe's, a ComfyUI test checks it)
    "DualAnoDiffTrainer": [("anomaly_contrast", 0.4)],
}
MASK_DEFAULTS = {
    "gray": "median",
    "threshold": 0.0,
    "min_contrast": 0.1,
    "hysteresis": 0.5,
    "blur": 1.0,
    "reduce": "max",
    "open_radius": 1,
    "close_radius": 2,
    "fill_holes": True,
    "min_area": 20,
    "dilate": 0,
}
WIDGET_TYPES = {"text": "STRING"}


def node(nid, kind, pos, size, widgets, links=None, title=None, properties=None, controls=None):
    """``widgets``: {name: value} in any order; ``links``: {input name: (source id, output slot)}; ``controls``:
    {INT widget name: the frontend's "control after generate" value} (default "randomize")."""
    return dict(
        id=nid,
        type=kind,
        pos=pos,
        size=size,
        widgets=widgets,
        links=links or {},
        title=title,
        properties=properties or {},
        controls=controls or {},
    )


def _common():
    """Checkpoint -> DualAnoDiff LoRA Loader -> Attention Patch, and the three prompts."""
    nodes = [
        _checkpoint(),
        node(
            2,
            "DualAnoDiffLoRALoader",
            [420, 200],
            [330, 190],
            {"weights": WEIGHTS, "strength_global": 1.0, "strength_anomaly": 1.0, "strength_text": 1.0},
            links={"model": (1, 0), "clip": (1, 1)},
        ),
        node(3, "DualAnoDiffAttentionPatch", [800, 40], [330, 70], {"saim_strength": 1.0}, links={"model": (2, 0)}),
    ] + _prompts(4, (2, 1), 800, texts=((2, 2), (2, 3)))
    return nodes


def _checkpoint():
    return node(
        1,
        "CheckpointLoaderSimple",
        [20, 200],
        [360, 100],
        {"ckpt_name": CKPT},
        title="Load SD1.5 checkpoint",
        properties={"models": [{"name": CKPT, "url": CKPT_URL, "directory": "checkpoints"}]},
    )


#: the text left in a prompt box whose text comes from a link (the frontend greys the box out but still shows it)
LINKED_TEXT = (
    "(not used: the text comes from the DualAnoDiff LoRA Loader's {output} output, the prompt the weights "
    "were trained with)"
)


def _prompts(first_id, clip, x, texts=(None, None)):
    """The global, anomaly and negative prompts (texts: optional links for the first two)."""
    out = []
    for i, (text, title, y) in enumerate(
        (
            ("a vfx with sks", "Prompt: global branch (whole image)", 160),
            ("sks", "Prompt: anomaly branch (defect only)", 330),
            ("", "Negative prompt", 500),
        )
    ):
        links = {"clip": clip}
        if i < 2 and texts[i] is not None:
            links["text"] = texts[i]
            text = LINKED_TEXT.format(output=("prompt_global", "prompt_anomaly")[i])
            title = ("Global prompt (from the weights)", "Anomaly prompt (from the weights)")[i]
        out.append(node(first_id + i, "CLIPTextEncode", [x, y], [330, 130], {"text": text}, links=links, title=title))
    return out


def _shift(nodes, from_x, dx):
    """Move every node at x >= from_x right by dx (room for a wider column)."""
    for n in nodes:
        if n["pos"][0] >= from_x:
            n["pos"] = [n["pos"][0] + dx, n["pos"][1]]
    return nodes


def _decode_and_save(first_id, latent_global, latent_anomaly, x):
    return [
        node(
            first_id,
            "VAEDecode",
            [x, 60],
            [260, 50],
            {},
            links={"samples": latent_global, "vae": (1, 2)},
            title="Decode whole images",
        ),
        node(
            first_id + 1,
            "VAEDecode",
            [x, 400],
            [260, 50],
            {},
            links={"samples": latent_anomaly, "vae": (1, 2)},
            title="Decode defect-only images",
        ),
        node(
            first_id + 2,
            "SaveImage",
            [x + 300, 60],
            [320, 300],
            {"filename_prefix": "DualAnoDiff/image"},
            links={"images": (first_id, 0)},
            title="Save whole images",
        ),
        node(
            first_id + 3,
            "SaveImage",
            [x + 300, 400],
            [320, 300],
            {"filename_prefix": "DualAnoDiff/anomaly"},
            links={"images": (first_id + 1, 0)},
            title="Save defect-only images",
        ),
    ]


def _decode_mask_save(first_id, latent_global, latent_anomaly, x, vae=(1, 2), save=True):
    """2x VAE Decode -> Mask From Anomaly Branch -> Save Dataset (MVTec) and a preview of the mask overlay."""
    d_g, d_a, mask, out = first_id, first_id + 1, first_id + 2, first_id + 3
    nodes = [
        node(
            d_g,
            "VAEDecode",
            [x, 60],
            [260, 50],
            {},
            links={"samples": latent_global, "vae": vae},
            title="Decode whole images",
        ),
        node(
            d_a,
            "VAEDecode",
            [x, 200],
            [260, 50],
            {},
            links={"samples": latent_anomaly, "vae": vae},
            title="Decode defect-only images",
        ),
        node(
            mask,
            "DualAnoDiffMaskFromAnomalyBranch",
            [x + 300, 200],
            [330, 350],
            dict(MASK_DEFAULTS),
            links={"anomaly": (d_a, 0), "image": (d_g, 0)},
        ),
    ]
    if save:
        nodes.append(
            node(
                out,
                "DualAnoDiffSaveDataset",
                [x + 680, 40],
                [350, 260],
                {
                    "dataset": "DualAnoDiff_dataset",
                    "category": "my_object",
                    "defect": "my_defect",
                    "max_area": 0.5,
                    "max_gray_offset": 0.2,
                    "keep_rejected": True,
                    "min_alignment": 0.57,  # the node's default (the CLI's --min-alignment)
                },
                links={"images": (d_g, 0), "anomaly": (d_a, 0), "mask": (mask, 0)},
            )
        )
    nodes.append(
        node(
            out + 1,
            "PreviewImage",
            [x + 680, 340],
            [350, 330],
            {},
            links={"images": (mask, 1)},
            title="Mask overlay (red = defect)",
        )
    )
    return nodes


def _dual_sampler(model_link, cfg, nid=7, pos=(1180, 160), prompts=((4, 0), (5, 0), (6, 0)), pairs=4):
    return node(
        nid,
        "DualAnoDiffSampler",
        list(pos),
        [340, 370],
        {
            "pairs": pairs,
            "width": 512,
            "height": 512,
            "seed": 0,
            "steps": 30,
            "cfg": cfg,
            "sampler_name": "dpmpp_2m",
            "scheduler": "karras",
            "denoise": 1.0,
        },
        links={
            "model": model_link,
            "positive_global": prompts[0],
            "positive_anomaly": prompts[1],
            "negative": prompts[2],
        },
    )


def graph_generate():
    return _common() + [_dual_sampler((3, 0), 2.5)] + _decode_mask_save(8, (7, 0), (7, 1), 1570)


def graph_generate_bcm():
    nodes = _common()
    nodes += [
        node(
            14,
            "LoadImage",
            [420, 460],
            [400, 360],
            {"image": "background.png"},
            title="Background image (transparent = object)",
        ),
        node(
            13,
            "DualAnoDiffBackgroundCompensate",
            [800, 690],
            [360, 170],
            {"strength": 1.0, "seed": 0},
            controls={"seed": "fixed"},
            links={"model": (3, 0), "vae": (1, 2), "background": (14, 0), "object_mask": (14, 1)},
        ),
    ]
    nodes.append(_dual_sampler((13, 0), 2.0))
    # the frontend draws Load Image at least 395 px wide: the columns right of it move over
    return _shift(nodes + _decode_mask_save(8, (7, 0), (7, 1), 1570), 800, 70)


def graph_generate_ksampler():
    nodes = _common()
    nodes += [
        node(
            7,
            "DualAnoDiffPairConditioning",
            [1180, 160],
            [300, 60],
            {},
            links={"global_prompt": (4, 0), "anomaly_prompt": (5, 0)},
        ),
        node(
            8,
            "EmptyLatentImage",
            [1180, 300],
            [300, 120],
            {"width": 512, "height": 512, "batch_size": 8},
            title="Empty latent: batch = 2 x pairs",
        ),
        node(
            9,
            "KSampler",
            [1530, 160],
            [330, 270],
            {"seed": 0, "steps": 30, "cfg": 2.5, "sampler_name": "dpmpp_2m", "scheduler": "karras", "denoise": 1.0},
            links={"model": (3, 0), "positive": (7, 0), "negative": (6, 0), "latent_image": (8, 0)},
        ),
        node(10, "DualAnoDiffSplitLatentPairs", [1910, 160], [280, 60], {}, links={"latent": (9, 0)}),
    ]
    return nodes + _decode_and_save(11, (10, 0), (10, 1), 2240)


def graph_train():
    """Checkpoint -> DualAnoDiff Trainer -> (trained MODEL/CLIP) -> prompts -> DualAnoDiff Sampler -> decode -> mask
    preview: train, then look at a few generated pairs in the same run."""
    return (
        [
            _checkpoint(),
            node(
                2,
                "DualAnoDiffTrainer",
                [420, 60],
                [350, 464],
                {
                    "folder": "my_defect",
                    "defect": "",
                    "output_name": "my_defect",
                    "steps": 5000,
                    "learning_rate": 2e-5,
                    "rank": 32,
                    "batch_size": 4,
                    "resolution": 512,
                    "seed": 32,
                    "resume": True,
                    "train_text_encoder": True,
                    "bcm": False,
                    "split": "all",
                    "checkpoint_every": 500,
                },
                links={"model": (1, 0), "clip": (1, 1), "vae": (1, 2)},
            ),
        ]
        + _prompts(3, (2, 1), 820)
        + [
            _dual_sampler((2, 0), 2.5, nid=6, pos=(1200, 160), prompts=((3, 0), (4, 0), (5, 0)), pairs=2),
        ]
        + _decode_mask_save(7, (6, 0), (6, 1), 1590, save=False)
    )


def graph_generate_placement():
    """A folder of normal photos + a region mask -> one pair per photo, defects only inside the region, pasted back
    into the photos (exact pixels outside a feathered band) -> mask -> Save Dataset (rejects masks outside)."""
    nodes = _common()
    nodes += [
        node(
            20,
            "LoadImageSetFromFolderNode",
            [420, 460],
            [400, 100],
            {"folder": "normal_photos", "resize_method": "None"},
            title="Normal photos (input folder, one size)",
        ),
        node(
            21,
            "LoadImage",
            [420, 620],
            [400, 360],
            {"image": "region.png"},
            title="Placement region (white = allowed)",
        ),
        node(22, "ImageToMask", [800, 690], [360, 60], {"channel": "red"}, links={"image": (21, 0)}),
    ]
    sampler = _dual_sampler((3, 0), 2.5)
    sampler["links"].update(placement=(22, 0), normal=(20, 0), vae=(1, 2))
    sampler["widgets"]["placement_steering"] = "shift"
    nodes.append(sampler)
    tail = _decode_mask_save(8, (7, 0), (7, 1), 1570)
    composite = node(
        23,
        "DualAnoDiffCompositeOnNormal",
        [1570, 320],
        [300, 100],
        {"feather": 8},
        links={"images": (8, 0), "normal": (20, 0), "placement": (22, 0)},
        title="Paste into the photos",
    )
    for n in tail:
        if n["type"] == "DualAnoDiffMaskFromAnomalyBranch":
            n["links"]["image"] = (23, 0)
            n["pos"] = [1920, 200]
        elif n["type"] == "DualAnoDiffSaveDataset":
            n["links"].update(images=(23, 0), placement=(22, 0))
            n["widgets"]["dataset"] = "DualAnoDiff_placement"
            n["pos"] = [2300, 40]
        elif n["type"] == "PreviewImage":
            n["pos"] = [2300, 340]
    # the frontend draws Load Image at least 395 px wide: the columns right of it move over
    return _shift(nodes + tail + [composite], 800, 70)


GRAPHS = {
    "dualanodiff_generate": graph_generate,
    "dualanodiff_generate_bcm": graph_generate_bcm,
    "dualanodiff_generate_ksampler": graph_generate_ksampler,
    "dualanodiff_train": graph_train,
    "dualanodiff_generate_placement": graph_generate_placement,
}

#: the UI file (template) of each graph: ComfyUI's template browser titles a pack's templates by file name and lists
#: them in directory order, so the names are numbered titles (the basic generate workflow first). The API files
#: keep the graph names (workflows/api/<name>.json); earlier versions named the UI files workflows/<name>.json.
TEMPLATES = {
    "dualanodiff_generate": "DualAnoDiff 1 - generate defects and masks",
    "dualanodiff_generate_bcm": "DualAnoDiff 2 - generate on your background (BCM)",
    "dualanodiff_generate_ksampler": "DualAnoDiff 3 - generate with a stock KSampler",
    "dualanodiff_train": "DualAnoDiff 4 - train weights, then generate",
    "dualanodiff_generate_placement": "DualAnoDiff 5 - defects in a region of your own photos",
}


def ui_path(name: str) -> Path:
    """workflows/<template title>.json: the UI-format file of graph ``name``."""
    return HERE / f"{TEMPLATES[name]}.json"


def _order(nodes):
    deps = {n["id"]: {src for src, _ in n["links"].values()} for n in nodes}
    done, order = set(), []
    while len(order) < len(nodes):
        for n in nodes:
            if n["id"] not in done and deps[n["id"]] <= done:
                done.add(n["id"])
                order.append(n["id"])
    return {nid: i for i, nid in enumerate(order)}


def to_ui(nodes) -> dict:
    order = _order(nodes)
    links, by_id = [], {n["id"]: n for n in nodes}
    out_links: dict[tuple, list] = {}
    ui_nodes = []
    for n in sorted(nodes, key=lambda n: n["id"]):
        inputs_def, widgets_def, _ = TYPES[n["type"]]
        later = LATER_INPUTS.get(n["type"], [])
        if any(name in n["links"] for name, _, _ in later):
            inputs_def = inputs_def + later
        inputs = []
        for name, kind, _optional in inputs_def:
            inputs.append({"name": name, "type": kind, "link": None})
        widget_values = []
        for w in widgets_def:
            name, extra = (w, None) if isinstance(w, str) else w
            if name in n["links"]:
                inputs.append(
                    {"name": name, "type": WIDGET_TYPES.get(name, "STRING"), "widget": {"name": name}, "link": None}
                )
            widget_values.append(n["widgets"][name])
            if extra == "control":
                widget_values.append(n["controls"].get(name, "randomize"))
            elif extra == "upload":
                widget_values.append("image")
        widget_values += [n["widgets"].get(name, default) for name, default in LATER_WIDGETS.get(n["type"], [])]
        for slot, entry in enumerate(inputs):
            if entry["name"] in n["links"]:
                src, src_slot = n["links"][entry["name"]]
                link_id = len(links) + 1
                kind = TYPES[by_id[src]["type"]][2][src_slot][1]
                links.append([link_id, src, src_slot, n["id"], slot, kind])
                entry["link"] = link_id
                out_links.setdefault((src, src_slot), []).append(link_id)
        missing = set(n["links"]) - {e["name"] for e in inputs}
        assert not missing, (n["type"], missing)
        ui_nodes.append((n, inputs, widget_values))
    result = []
    for n, inputs, widget_values in ui_nodes:
        outputs = [
            {"name": name, "type": kind, "links": out_links.get((n["id"], slot), []), "slot_index": slot}
            for slot, (name, kind) in enumerate(TYPES[n["type"]][2])
        ]
        entry = {
            "id": n["id"],
            "type": n["type"],
            "pos": n["pos"],
            "size": n["size"],
            "flags": {},
            "order": order[n["id"]],
            "mode": 0,
            "inputs": inputs,
            "outputs": outputs,
            "properties": {"Node name for S&R": n["type"], **n["properties"]},
        }
        if widget_values:
            entry["widgets_values"] = widget_values
        if n["title"]:
            entry["title"] = n["title"]
        result.append(entry)
    return {
        "last_node_id": max(n["id"] for n in nodes),
        "last_link_id": len(links),
        "nodes": result,
        "links": links,
        "groups": [],
        "config": {},
        "extra": {"ds": {"scale": 0.75, "offset": [0, 0]}},
        "version": 0.4,
    }


def to_api(nodes) -> dict:
    out = {}
    for n in sorted(nodes, key=lambda n: n["id"]):
        inputs_def, widgets_def, _ = TYPES[n["type"]]
        inputs = {}
        for w in widgets_def:
            name = w if isinstance(w, str) else w[0]
            inputs[name] = n["widgets"][name]
        for name, default in LATER_WIDGETS.get(n["type"], []):
            inputs[name] = n["widgets"].get(name, default)
        for name, (src, slot) in n["links"].items():
            inputs[name] = [str(src), slot]
        entry = {"inputs": inputs, "class_type": n["type"]}
        if n["title"]:
            entry["_meta"] = {"title": n["title"]}
        out[str(n["id"])] = entry
    return out


def main() -> None:
    (HERE / "api").mkdir(exist_ok=True)
    for name, build in GRAPHS.items():
        nodes = build()
        ui_path(name).write_text(json.dumps(to_ui(nodes), indent=2) + "\n", encoding="utf-8")
        (HERE / "api" / f"{name}.json").write_text(json.dumps(to_api(nodes), indent=2) + "\n", encoding="utf-8")
        print(f"wrote workflows/{ui_path(name).name} and workflows/api/{name}.json")


if __name__ == "__main__":
    main()
