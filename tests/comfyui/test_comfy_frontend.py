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
CANVAS_BG = (34, 34, 34)


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


def _load(page, name: str) -> dict:
    workflow = json.loads((WORKFLOWS / f"{name}.json").read_text())
    return page.evaluate(f"""(async () => {{
        await app.loadGraphData({json.dumps(workflow)}, true, true, {json.dumps(name)},
                                {{showMissingModelsDialog: false}});
        await new Promise(r => setTimeout(r, 300));
        const nodes = app.graph._nodes.map(n => ({{id: n.id, type: n.type, errors: !!n.has_errors,
                                                  registered: !!LiteGraph.registered_node_types[n.type]}}));
        const dialogs = Array.from(document.querySelectorAll('[role=dialog]')).map(d => d.innerText);
        const prompt = await app.graphToPrompt();
        await app.extensionManager.command.execute('Comfy.Canvas.FitView');
        await new Promise(r => setTimeout(r, 800));
        let x0 = 1e9, y0 = 1e9, x1 = -1e9, y1 = -1e9;
        for (const n of app.graph._nodes) {{
            const b = n.getBounding();
            x0 = Math.min(x0, b[0]); y0 = Math.min(y0, b[1]);
            x1 = Math.max(x1, b[0] + b[2]); y1 = Math.max(y1, b[1] + b[3]);
        }}
        const c = document.querySelector('#graph-canvas').getBoundingClientRect();
        const p0 = app.canvas.ds.convertOffsetToCanvas([x0, y0]), p1 = app.canvas.ds.convertOffsetToCanvas([x1, y1]);
        return {{nodes, links: Object.keys(app.graph.links).length, dialogs, api: prompt.output,
                 canvas: [c.x, c.y, c.width, c.height], box: [p0[0] + c.x, p0[1] + c.y, p1[0] + c.x, p1[1] + c.y]}};
    }})()""")


def thumbnail(png: bytes) -> bytes:
    """A screenshot of the graph as a JPEG template thumbnail: padded to 4:3 on the canvas colour, 1024 px wide."""
    from PIL import Image

    with Image.open(io.BytesIO(png)) as im:
        im = im.convert("RGB")
    w, h = im.size
    if w / h > THUMB_ASPECT:
        size = (w, round(w / THUMB_ASPECT))
    else:
        size = (round(h * THUMB_ASPECT), h)
    canvas = Image.new("RGB", size, CANVAS_BG)
    canvas.paste(im, ((size[0] - w) // 2, (size[1] - h) // 2))
    canvas = canvas.resize((THUMB_WIDTH, round(THUMB_WIDTH / THUMB_ASPECT)), Image.LANCZOS)
    out = io.BytesIO()
    canvas.save(out, format="JPEG", quality=88, optimize=True)
    return out.getvalue()


@pytest.mark.parametrize("name", GRAPHS)
def test_workflow_loads_in_the_frontend_with_no_missing_nodes_and_runs(server, page, name, tmp_path):
    workflow = json.loads((WORKFLOWS / f"{name}.json").read_text())
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

    # screenshot of the graph (what the template browser shows)
    x0, y0, x1, y1 = r["box"]
    cx, cy, cw, ch = r["canvas"]
    m = 24
    clip = {"x": max(cx, x0 - m), "y": max(cy, y0 - m)}
    clip.update(width=min(cx + cw, x1 + m) - clip["x"], height=min(cy + ch, y1 + m) - clip["y"])
    jpeg = thumbnail(page.screenshot(clip))
    (tmp_path / f"{name}.jpg").write_bytes(jpeg)
    if os.environ.get("DUALANODIFF_WRITE_THUMBNAILS") == "1":
        (WORKFLOWS / f"{name}.jpg").write_bytes(jpeg)

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
