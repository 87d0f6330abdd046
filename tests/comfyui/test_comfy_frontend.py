"""Every UI workflow in ComfyUI's own web frontend (the comfyui-frontend-package the server serves), in headless
Chromium driven over the DevTools protocol: it loads with no missing node types, the frontend's own "Export (API)"
conversion equals workflows/api/<name>.json, and queued from the page (with the tiny test models) it runs.

A screenshot of each loaded workflow is kept in the test's temp folder; with DUALANODIFF_WRITE_THUMBNAILS=1 it is
written as the workflow's template thumbnail, workflows/<name>.jpg.
"""

import io
import json
import os
import time

import chromium
import comfy_env as ce
import pytest
from comfy_server import DEFECT_FOLDER

pytestmark = pytest.mark.skipif(
    chromium.find() is None,
    reason="Chromium is not installed (Debian: apt-get install chromium); the frontend test loads the workflows in "
    "ComfyUI's web page in headless Chromium",
)

WORKFLOWS = ce.ROOT / "workflows"
GRAPHS = [
    "dualanodiff_generate",
    "dualanodiff_generate_bcm",
    "dualanodiff_generate_ksampler",
    "dualanodiff_generate_placement",
    "dualanodiff_train",
]
SETTINGS = {
    "Comfy.TutorialCompleted": True,
    "Comfy.Minimap.Visible": False,
    "Comfy.Graph.CanvasInfo": False,
    "LiteGraph.Canvas.LowQualityRenderingZoomThreshold": 0.1,
}
SMALL = [
    ("CheckpointLoaderSimple", "ckpt_name", "tiny_sd15.ckpt"),
    ("DualAnoDiffLoRALoader", "weights", "test_defect.safetensors"),
    ("DualAnoDiffSampler", "pairs", 1),
    ("DualAnoDiffSampler", "width", 64),
    ("DualAnoDiffSampler", "height", 64),
    ("DualAnoDiffSampler", "steps", 2),
    ("EmptyLatentImage", "width", 64),
    ("EmptyLatentImage", "height", 64),
    ("EmptyLatentImage", "batch_size", 2),
    ("KSampler", "steps", 2),
    ("DualAnoDiffTrainer", "folder", DEFECT_FOLDER),
    ("DualAnoDiffTrainer", "output_name", "frontend_trained"),
    ("DualAnoDiffTrainer", "steps", 2),
    ("DualAnoDiffTrainer", "resolution", 64),
    ("DualAnoDiffTrainer", "batch_size", 1),
    ("DualAnoDiffTrainer", "rank", 4),
    ("DualAnoDiffTrainer", "train_text_encoder", False),
]
THUMB_WIDTH = 1024
THUMB_ASPECT = 4 / 3


@pytest.fixture(scope="module")
def page(server):
    for key, value in SETTINGS.items():
        server.post(f"/settings/{key}", value)
    browser = chromium.Chromium(chromium.find(), width=2400, height=1300)
    try:
        browser.navigate(server.url + "/")
        browser.wait_for(
            "!!(window.app && window.app.graph && window.LiteGraph && "
            "LiteGraph.registered_node_types['DualAnoDiffTrainer'])",
            120,
            "ComfyUI's page and our nodes",
        )
        yield browser
    finally:
        browser.close()


def _build():
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_workflows", WORKFLOWS / "build_workflows.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BUILD = _build()
#: the thumbnail's zoom: node titles and widget text stay readable (about 11 px text) in the 1024 px picture
MIN_THUMB_SCALE = 0.8


def _load(page, name: str, workflow: dict | None = None) -> dict:
    workflow = workflow or json.loads(BUILD.ui_path(name).read_text())
    return page.evaluate(f"""(async () => {{
        await app.loadGraphData({json.dumps(workflow)}, true, true, {json.dumps(name)},
                                {{showMissingModelsDialog: false}});
        await new Promise(r => setTimeout(r, 300));
        const ctx = app.canvas.ctx;
        const nodes = app.graph._nodes.map(n => {{
            ctx.font = n.titleFontStyle;
            return {{id: n.id, type: n.type, errors: !!n.has_errors, title: n.getTitle(), box: [...n.getBounding()],
                     registered: !!LiteGraph.registered_node_types[n.type],
                     title_width: ctx.measureText(n.getTitle()).width,
                     title_room: n.size[0] - LiteGraph.NODE_TITLE_HEIGHT * 2,
                     widgets: (n.widgets || []).map(w => ({{name: w.name, label: w.label || w.name, value: w.value,
                                                              precision: w.options && w.options.precision}})),
                     inputs: (n.inputs || []).map(i => ({{name: i.name,
                                                           label: i.label || i.localized_name || i.name}}))}};
        }});
        const dialogs = Array.from(document.querySelectorAll('[role=dialog]')).map(d => d.innerText);
        const prompt = await app.graphToPrompt();
        return {{nodes, links: Object.keys(app.graph.links).length, dialogs, api: prompt.output}};
    }})()""")


def _frame_thumbnail(page, width: int, height: int) -> dict:
    """Zoom and pan the canvas for the thumbnail: the whole graph when it fits at a readable scale, else the
    DualAnoDiff nodes at MIN_THUMB_SCALE, cropped to the graph. Returns the scale and the screen rectangle."""
    return page.evaluate(f"""(async () => {{
        const W = {width}, H = {height}, minScale = {MIN_THUMB_SCALE}, m = 24;
        const boxes = app.graph._nodes.map(n => [n.type, n.getBounding()]);
        const span = list => list.reduce((a, [, b]) => [Math.min(a[0], b[0]), Math.min(a[1], b[1]),
                                                        Math.max(a[2], b[0] + b[2]), Math.max(a[3], b[1] + b[3])],
                                         [1e9, 1e9, -1e9, -1e9]);
        const all = span(boxes);
        const core = span(boxes.filter(([t]) => t.startsWith('DualAnoDiff')));
        const fit = Math.min(W / (all[2] - all[0] + 2 * m), H / (all[3] - all[1] + 2 * m));
        const scale = Math.min(1.0, Math.max(fit, minScale));
        const vw = W / scale, vh = H / scale;  // the graph area the thumbnail shows
        const clampTo = (c, lo, hi, v) => (hi - lo + 2 * m <= v) ? (lo + hi) / 2
                                          : Math.min(Math.max(c, lo - m + v / 2), hi + m - v / 2);
        const cx = clampTo((core[0] + core[2]) / 2, all[0], all[2], vw);
        const cy = clampTo((core[1] + core[3]) / 2, all[1], all[3], vh);
        const c = document.querySelector('#graph-canvas').getBoundingClientRect();
        app.canvas.ds.scale = scale;
        app.canvas.ds.offset[0] = (c.width / 2) / scale - cx;
        app.canvas.ds.offset[1] = (c.height / 2) / scale - cy;
        app.canvas.setDirty(true, true);
        app.canvas.draw(true, true);
        await new Promise(r => setTimeout(r, 500));
        // share of the frame covered by nodes
        const x0 = cx - vw / 2, y0 = cy - vh / 2;
        let covered = 0;
        const step = 8;
        for (let y = y0; y < y0 + vh; y += step / scale)
            for (let x = x0; x < x0 + vw; x += step / scale)
                if (boxes.some(([, b]) => x >= b[0] && x <= b[0] + b[2] && y >= b[1] && y <= b[1] + b[3])) covered++;
        const total = Math.ceil(W / step) * Math.ceil(H / step);
        return {{scale, covered: covered / total,
                 clip: {{x: c.x + c.width / 2 - W / 2, y: c.y + c.height / 2 - H / 2, width: W, height: H}}}};
    }})()""")


def thumbnail(png: bytes) -> bytes:
    """A screenshot of the framed graph as the JPEG template thumbnail (1024 x 768)."""
    from PIL import Image

    with Image.open(io.BytesIO(png)) as im:
        im = im.convert("RGB")
    if im.size != (THUMB_WIDTH, round(THUMB_WIDTH / THUMB_ASPECT)):
        im = im.resize((THUMB_WIDTH, round(THUMB_WIDTH / THUMB_ASPECT)), Image.LANCZOS)
    out = io.BytesIO()
    im.save(out, format="JPEG", quality=88, optimize=True)
    return out.getvalue()


def _overlap(a, b) -> bool:
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


@pytest.mark.parametrize("name", GRAPHS)
def test_workflow_loads_in_the_frontend_with_no_missing_nodes_and_runs(server, page, name, tmp_path):
    workflow = json.loads(BUILD.ui_path(name).read_text())
    r = _load(page, name)
    assert [n["type"] for n in r["nodes"] if not n["registered"] or n["errors"]] == []
    assert not any("Nodes Are Missing" in d or "missing" in d.lower() and "node" in d.lower() for d in r["dialogs"]), r[
        "dialogs"
    ]
    assert len(r["nodes"]) == len(workflow["nodes"]) and r["links"] == len(workflow["links"])
    # the frontend's own UI -> API conversion ("Export (API)") gives exactly our API file
    api = json.loads((WORKFLOWS / "api" / f"{name}.json").read_text())
    assert {k: (v["class_type"], v["inputs"]) for k, v in r["api"].items()} == {
        k: (v["class_type"], v["inputs"]) for k, v in api.items()
    }

    # the layout as the frontend draws it (its own minimum widths): no node covers another, no title is cut
    nodes = r["nodes"]
    overlaps = [
        (a["title"], b["title"]) for i, a in enumerate(nodes) for b in nodes[i + 1 :] if _overlap(a["box"], b["box"])
    ]
    assert overlaps == [], overlaps
    cut = [(n["title"], round(n["title_width"]), n["title_room"]) for n in nodes if n["title_width"] > n["title_room"]]
    assert cut == [], cut
    # labels that say what a widget means (the input ids stay: they are the API)
    labels = {(n["type"], w["name"]): w for n in nodes for w in n["widgets"]}
    inputs = {(n["type"], i["name"]): i["label"] for n in nodes for i in n["inputs"]}
    if ("DualAnoDiffMaskFromAnomalyBranch", "threshold") in labels:
        assert labels[("DualAnoDiffMaskFromAnomalyBranch", "threshold")]["label"] == "threshold (0 = auto, Otsu)"
    if ("DualAnoDiffTrainer", "learning_rate") in labels:
        assert labels[("DualAnoDiffTrainer", "learning_rate")]["precision"] == 6  # 0.000020, not 0.0000200
    if ("DualAnoDiffSaveDataset", "min_alignment") in labels:
        assert labels[("DualAnoDiffSaveDataset", "min_alignment")]["label"] == "min_alignment (0 = off)"
    if ("DualAnoDiffPairConditioning", "global_prompt") in inputs:
        assert inputs[("DualAnoDiffPairConditioning", "global_prompt")] == "global conditioning"
        assert inputs[("DualAnoDiffPairConditioning", "anomaly_prompt")] == "anomaly conditioning"

    # the template thumbnail: the graph at a readable zoom, filling the frame
    frame = _frame_thumbnail(page, THUMB_WIDTH, round(THUMB_WIDTH / THUMB_ASPECT))
    assert frame["scale"] >= MIN_THUMB_SCALE and frame["covered"] > 0.3, frame
    jpeg = thumbnail(page.screenshot(frame["clip"]))
    (tmp_path / f"{name}.jpg").write_bytes(jpeg)
    if os.environ.get("DUALANODIFF_WRITE_THUMBNAILS") == "1":
        BUILD.ui_path(name).with_suffix(".jpg").write_bytes(jpeg)

    # queue it from the page, with the tiny test models
    before = set(server.get("/history"))
    dataset = f"frontend_{name}"
    changes = SMALL + [("DualAnoDiffSaveDataset", "dataset", dataset)]
    page.evaluate(f"""(async () => {{
        const types = new Set(app.graph._nodes.map(n => n.type));
        for (const [type, name, value] of {json.dumps(changes)}) {{
            if (!types.has(type)) continue;
            for (const n of app.graph._nodes.filter(n => n.type === type)) {{
                const w = n.widgets.find(w => w.name === name);
                if (!w) throw new Error(`${{type}} has no widget ${{name}}`);
                w.value = value;
            }}
        }}
        await app.queuePrompt(0, 1);
    }})()""")
    deadline = time.monotonic() + 300
    new = set()
    while not new:
        assert time.monotonic() < deadline, f"nothing was queued from the page; console: {page.console[-10:]}"
        time.sleep(0.3)
        new = set(server.get("/history")) - before
    (prompt_id,) = new
    entry = server.wait_history(prompt_id, timeout=300)
    assert entry["status"]["status_str"] == "success", entry["status"]["messages"]
    files = [
        (i.get("type"), i.get("subfolder", ""), i["filename"])
        for out in entry["outputs"].values()
        for i in out.get("images", [])
    ]
    assert files
    for kind, sub, filename in files:
        assert (server.base / kind / sub / filename).is_file(), (kind, sub, filename)
    if name in ("dualanodiff_generate", "dualanodiff_generate_bcm", "dualanodiff_generate_placement"):
        assert any(sub.startswith(dataset) for _, sub, _ in files)
    if name == "dualanodiff_train":
        assert (server.base / "models" / "dualanodiff" / "frontend_trained.safetensors").is_file()


def test_old_workflow_in_the_frontend_gets_the_new_widget_at_its_default(server, page):
    # a UI workflow saved before Save Dataset had min_alignment: the frontend fills a widget missing from
    # widgets_values with the widget's default, so the alignment check is on there (docs/comfyui.md says so); the
    # rest of the node keeps its saved values
    old = json.loads((ce.ROOT / "tests/comfyui/old_workflows/dualanodiff_generate.json").read_text())
    saved = next(n for n in old["nodes"] if n["type"] == "DualAnoDiffSaveDataset")
    assert len(saved["widgets_values"]) == 6
    r = _load(page, "old_dualanodiff_generate", old)
    (node,) = [n for n in r["nodes"] if n["type"] == "DualAnoDiffSaveDataset"]
    values = {w["name"]: w["value"] for w in node["widgets"]}
    assert [values[w["name"]] for w in node["widgets"][:6]] == saved["widgets_values"]
    assert values["min_alignment"] == 0.57
    (api,) = [v for v in r["api"].values() if v["class_type"] == "DualAnoDiffSaveDataset"]
    assert api["inputs"]["min_alignment"] == 0.57
    # the same for the sampler's anomaly_noise_share: the frontend gives it the widget's default (docs/comfyui.md)
    (sampler,) = [v for v in r["api"].values() if v["class_type"] == "DualAnoDiffSampler"]
    assert (
        sampler["inputs"]["anomaly_noise_share"]
        == dict(BUILD.LATER_WIDGETS["DualAnoDiffSampler"])["anomaly_noise_share"]
    )
