#!/usr/bin/env python3
"""Writes the example workflows: ``workflows/<name>.json`` (UI format: drag and drop into ComfyUI, listed in its
template browser) and ``workflows/api/<name>.json`` (API format: ``POST /prompt``, ``queue_batch.py``).

Both files come from one description per graph below, so they cannot drift apart; the ComfyUI server test converts
every UI file to API format with ``queue_batch.py``'s converter (driven by the live ``/object_info``) and checks it
equals the API file. Run ``python workflows/build_workflows.py`` after editing a graph. Standard library only.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
CKPT = "v1-5-pruned-emaonly-fp16.safetensors"
CKPT_URL = ("https://huggingface.co/Comfy-Org/stable-diffusion-v1-5-archive/resolve/main/"
            "v1-5-pruned-emaonly-fp16.safetensors?download=true")
WEIGHTS = "my_defect.safetensors"

# node type -> (link inputs [(name, type, optional)], widgets [name or (name, "control"/"upload")], outputs)
TYPES = {
    "CheckpointLoaderSimple": ([], ["ckpt_name"], [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")]),
    "CLIPTextEncode": ([("clip", "CLIP", False)], ["text"], [("CONDITIONING", "CONDITIONING")]),
    "VAEDecode": ([("samples", "LATENT", False), ("vae", "VAE", False)], [], [("IMAGE", "IMAGE")]),
    "SaveImage": ([("images", "IMAGE", False)], ["filename_prefix"], []),
    "LoadImage": ([], [("image", "upload")], [("IMAGE", "IMAGE"), ("MASK", "MASK")]),
    "EmptyLatentImage": ([], ["width", "height", "batch_size"], [("LATENT", "LATENT")]),
    "KSampler": ([("model", "MODEL", False), ("positive", "CONDITIONING", False),
                  ("negative", "CONDITIONING", False), ("latent_image", "LATENT", False)],
                 [("seed", "control"), "steps", "cfg", "sampler_name", "scheduler", "denoise"], [("LATENT", "LATENT")]),
    "DualAnoDiffLoRALoader": ([("model", "MODEL", False), ("clip", "CLIP", False)],
                              ["weights", "strength_global", "strength_anomaly", "strength_text"],
                              [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("prompt_global", "STRING"),
                               ("prompt_anomaly", "STRING")]),
    "DualAnoDiffAttentionPatch": ([("model", "MODEL", False)], ["saim_strength"], [("MODEL", "MODEL")]),
    "DualAnoDiffBackgroundCompensate": ([("model", "MODEL", False), ("vae", "VAE", False),
                                         ("background", "IMAGE", False), ("object_mask", "MASK", True)],
                                        ["strength", "seed"], [("MODEL", "MODEL")]),
    "DualAnoDiffSampler": ([("model", "MODEL", False), ("positive_global", "CONDITIONING", False),
                            ("positive_anomaly", "CONDITIONING", False), ("negative", "CONDITIONING", False),
                            ("latent", "LATENT", True)],
                           ["pairs", "width", "height", ("seed", "control"), "steps", "cfg", "sampler_name",
                            "scheduler", "denoise"],
                           [("global", "LATENT"), ("anomaly", "LATENT")]),
    "DualAnoDiffPairConditioning": ([("global_prompt", "CONDITIONING", False),
                                     ("anomaly_prompt", "CONDITIONING", False)],
                                    [], [("CONDITIONING", "CONDITIONING")]),
    "DualAnoDiffSplitLatentPairs": ([("latent", "LATENT", False)], [], [("global", "LATENT"), ("anomaly", "LATENT")]),
}
WIDGET_TYPES = {"text": "STRING"}


def node(nid, kind, pos, size, widgets, links=None, title=None, properties=None):
    """``widgets``: {name: value} in any order; ``links``: {input name: (source id, output slot)}."""
    return dict(id=nid, type=kind, pos=pos, size=size, widgets=widgets, links=links or {}, title=title,
                properties=properties or {})


def _common():
    """Checkpoint -> DualAnoDiff LoRA Loader -> Attention Patch, and the three prompts."""
    nodes = [
        node(1, "CheckpointLoaderSimple", [20, 200], [315, 98], {"ckpt_name": CKPT}, title="Load SD1.5 checkpoint",
             properties={"models": [{"name": CKPT, "url": CKPT_URL, "directory": "checkpoints"}]}),
        node(2, "DualAnoDiffLoRALoader", [380, 200], [320, 170],
             {"weights": WEIGHTS, "strength_global": 1.0, "strength_anomaly": 1.0, "strength_text": 1.0},
             links={"model": (1, 0), "clip": (1, 1)}),
        node(3, "DualAnoDiffAttentionPatch", [750, 60], [300, 60], {"saim_strength": 1.0}, links={"model": (2, 0)}),
        node(4, "CLIPTextEncode", [750, 200], [300, 90], {"text": "a vfx with sks"},
             links={"clip": (2, 1), "text": (2, 2)}, title="Prompt: global branch (whole image)"),
        node(5, "CLIPTextEncode", [750, 340], [300, 90], {"text": "sks"},
             links={"clip": (2, 1), "text": (2, 3)}, title="Prompt: anomaly branch (defect only)"),
        node(6, "CLIPTextEncode", [750, 480], [300, 90], {"text": ""}, links={"clip": (2, 1)},
             title="Negative prompt"),
    ]
    return nodes


def _decode_and_save(first_id, latent_global, latent_anomaly, x):
    return [
        node(first_id, "VAEDecode", [x, 100], [210, 46], {}, links={"samples": latent_global, "vae": (1, 2)},
             title="Decode whole images"),
        node(first_id + 1, "VAEDecode", [x, 420], [210, 46], {}, links={"samples": latent_anomaly, "vae": (1, 2)},
             title="Decode defect-only images"),
        node(first_id + 2, "SaveImage", [x + 250, 100], [300, 300], {"filename_prefix": "DualAnoDiff/image"},
             links={"images": (first_id, 0)}, title="Save whole images"),
        node(first_id + 3, "SaveImage", [x + 250, 420], [300, 300], {"filename_prefix": "DualAnoDiff/anomaly"},
             links={"images": (first_id + 1, 0)}, title="Save defect-only images"),
    ]


def _dual_sampler(model_link, cfg):
    return node(7, "DualAnoDiffSampler", [1100, 200], [320, 330],
                {"pairs": 4, "width": 512, "height": 512, "seed": 0, "steps": 30, "cfg": cfg,
                 "sampler_name": "dpmpp_2m", "scheduler": "karras", "denoise": 1.0},
                links={"model": model_link, "positive_global": (4, 0), "positive_anomaly": (5, 0),
                       "negative": (6, 0)})


def graph_generate():
    return _common() + [_dual_sampler((3, 0), 2.5)] + _decode_and_save(8, (7, 0), (7, 1), 1470)


def graph_generate_bcm():
    nodes = _common()
    nodes += [
        node(12, "LoadImage", [380, 430], [320, 320], {"image": "background.png"},
             title="Background: normal product image (transparent = object)"),
        node(13, "DualAnoDiffBackgroundCompensate", [750, 620], [320, 130], {"strength": 1.0, "seed": 0},
             links={"model": (3, 0), "vae": (1, 2), "background": (12, 0), "object_mask": (12, 1)}),
    ]
    nodes.append(_dual_sampler((13, 0), 2.0))
    return nodes + _decode_and_save(8, (7, 0), (7, 1), 1470)


def graph_generate_ksampler():
    nodes = _common()
    nodes += [
        node(7, "DualAnoDiffPairConditioning", [1100, 200], [280, 50], {},
             links={"global_prompt": (4, 0), "anomaly_prompt": (5, 0)}),
        node(8, "EmptyLatentImage", [1100, 330], [280, 110], {"width": 512, "height": 512, "batch_size": 8},
             title="Empty latent: batch = 2 x pairs"),
        node(9, "KSampler", [1420, 200], [315, 262],
             {"seed": 0, "steps": 30, "cfg": 2.5, "sampler_name": "dpmpp_2m", "scheduler": "karras", "denoise": 1.0},
             links={"model": (3, 0), "positive": (7, 0), "negative": (6, 0), "latent_image": (8, 0)}),
        node(10, "DualAnoDiffSplitLatentPairs", [1770, 200], [260, 50], {}, links={"latent": (9, 0)}),
    ]
    return nodes + _decode_and_save(11, (10, 0), (10, 1), 2070)


GRAPHS = {
    "dualanodiff_generate": graph_generate,
    "dualanodiff_generate_bcm": graph_generate_bcm,
    "dualanodiff_generate_ksampler": graph_generate_ksampler,
}


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
        inputs = []
        for name, kind, _optional in inputs_def:
            inputs.append({"name": name, "type": kind, "link": None})
        widget_values = []
        for w in widgets_def:
            name, extra = (w, None) if isinstance(w, str) else w
            if name in n["links"]:
                inputs.append({"name": name, "type": WIDGET_TYPES.get(name, "STRING"), "widget": {"name": name},
                               "link": None})
            widget_values.append(n["widgets"][name])
            if extra == "control":
                widget_values.append("randomize")
            elif extra == "upload":
                widget_values.append("image")
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
        outputs = [{"name": name, "type": kind, "links": out_links.get((n["id"], slot), []), "slot_index": slot}
                   for slot, (name, kind) in enumerate(TYPES[n["type"]][2])]
        entry = {"id": n["id"], "type": n["type"], "pos": n["pos"], "size": n["size"], "flags": {},
                 "order": order[n["id"]], "mode": 0, "inputs": inputs, "outputs": outputs,
                 "properties": {"Node name for S&R": n["type"], **n["properties"]}}
        if widget_values:
            entry["widgets_values"] = widget_values
        if n["title"]:
            entry["title"] = n["title"]
        result.append(entry)
    return {"last_node_id": max(n["id"] for n in nodes), "last_link_id": len(links), "nodes": result,
            "links": links, "groups": [], "config": {}, "extra": {"ds": {"scale": 0.75, "offset": [0, 0]}},
            "version": 0.4}


def to_api(nodes) -> dict:
    out = {}
    for n in sorted(nodes, key=lambda n: n["id"]):
        inputs_def, widgets_def, _ = TYPES[n["type"]]
        inputs = {}
        for w in widgets_def:
            name = w if isinstance(w, str) else w[0]
            inputs[name] = n["widgets"][name]
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
        (HERE / f"{name}.json").write_text(json.dumps(to_ui(nodes), indent=2) + "\n", encoding="utf-8")
        (HERE / "api" / f"{name}.json").write_text(json.dumps(to_api(nodes), indent=2) + "\n", encoding="utf-8")
        print(f"wrote workflows/{name}.json and workflows/api/{name}.json")


if __name__ == "__main__":
    main()
