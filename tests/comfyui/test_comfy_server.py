"""ComfyUI as users run it: a headless CPU server with this pack installed (a symlink in custom_nodes/), a generated
SD1.5-detectable checkpoint, the example workflows queued over the HTTP API with workflows/queue_batch.py, and the
outputs checked on disk (see comfy_server.py and the session fixture ``server`` in conftest.py)."""

import importlib
import importlib.util
import json
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import comfy_env as ce
from anomalib_rules import load_mvtec
from comfy_server import DEFECT_FOLDER, PACK_DIR_NAME, PHOTO_FOLDER, REGION_BOX

ROOT = ce.ROOT
WORKFLOWS = ROOT / "workflows"
NODE_IDS = [
    "DualAnoDiffLoRALoader",
    "DualAnoDiffAttentionPatch",
    "DualAnoDiffBackgroundCompensate",
    "DualAnoDiffSampler",
    "DualAnoDiffPairConditioning",
    "DualAnoDiffSplitLatentPairs",
    "DualAnoDiffSplitImagePairs",
    "DualAnoDiffMaskFromAnomalyBranch",
    "DualAnoDiffSaveDataset",
    "DualAnoDiffTrainer",
    "DualAnoDiffCompositeOnNormal",
]
GRAPHS = ["dualanodiff_generate", "dualanodiff_generate_bcm", "dualanodiff_generate_ksampler", "dualanodiff_train"]
NEW_GRAPHS = ["dualanodiff_generate_placement"]  # added after the old workflows were shipped
OLD_WORKFLOWS = Path(__file__).resolve().parent / "old_workflows"  # the UI/API files as shipped before issue 15


def _build():
    spec = importlib.util.spec_from_file_location("build_workflows", WORKFLOWS / "build_workflows.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BUILD = _build()


def ui_file(name: str) -> Path:
    return BUILD.ui_path(name)


SMALL = [
    "--set",
    "CheckpointLoaderSimple.ckpt_name=tiny_sd15.ckpt",
    "--set",
    "DualAnoDiffLoRALoader.weights=test_defect.safetensors",
]
SMALL_SAMPLER = [
    "--set",
    "DualAnoDiffSampler.pairs=2",
    "--set",
    "DualAnoDiffSampler.width=64",
    "--set",
    "DualAnoDiffSampler.height=64",
    "--set",
    "DualAnoDiffSampler.steps=3",
]
SMALL_DUAL = SMALL + SMALL_SAMPLER
SMALL_STOCK = SMALL + [
    "--set",
    "EmptyLatentImage.width=64",
    "--set",
    "EmptyLatentImage.height=64",
    "--set",
    "EmptyLatentImage.batch_size=4",
    "--set",
    "KSampler.steps=3",
]
SMALL_TRAIN = [
    "--set",
    "CheckpointLoaderSimple.ckpt_name=tiny_sd15.ckpt",
    "--set",
    f"DualAnoDiffTrainer.folder={DEFECT_FOLDER}",
    "--set",
    "DualAnoDiffTrainer.resolution=64",
    "--set",
    "DualAnoDiffTrainer.batch_size=1",
    "--set",
    "DualAnoDiffTrainer.rank=4",
    "--set",
    "DualAnoDiffTrainer.learning_rate=0.001",
] + SMALL_SAMPLER
# the random tiny checkpoint does not draw defects on gray, nor the same defect in both branches: accept every
# non-empty mask to exercise the MVTec tree
ACCEPT_ALL = [
    "--set",
    "DualAnoDiffSaveDataset.max_area=1.0",
    "--set",
    "DualAnoDiffSaveDataset.max_gray_offset=1.0",
    "--set",
    "DualAnoDiffSaveDataset.min_alignment=0",
]


def _queue_script():
    spec = importlib.util.spec_from_file_location("queue_batch", WORKFLOWS / "queue_batch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _queue(server, workflow, *args, expect=0):
    summary = server.base / f"summary_{time.monotonic_ns()}.json"
    cmd = [
        sys.executable,
        str(WORKFLOWS / "queue_batch.py"),
        str(workflow),
        "--server",
        server.address,
        "--summary",
        str(summary),
        "--timeout",
        "600",
        *args,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=700)
    assert proc.returncode == expect, (
        f"{' '.join(cmd)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}\n"
        f"server log:\n{server.log.read_text()[-4000:]}"
    )
    return (json.loads(summary.read_text()) if summary.exists() else None), proc


def _images_saved(server, report, pairs):
    """Stock-sampler workflow: image_* and anomaly_* PNGs from Save Image, two different branches."""
    from PIL import Image

    for prompt in report["prompts"]:
        assert prompt["status"] == "success", prompt
        paths = [o["path"] for o in prompt["outputs"]]
        images = [p for p in paths if "/DualAnoDiff/image" in p]
        anomalies = [p for p in paths if "/DualAnoDiff/anomaly" in p]
        assert len(images) == pairs and len(anomalies) == pairs, paths
        for rel in paths:
            assert rel.startswith("output/")
            with Image.open(server.base / rel) as im:
                assert im.size == (64, 64)
        with Image.open(server.base / images[0]) as a, Image.open(server.base / anomalies[0]) as b:
            assert a.tobytes() != b.tobytes()


def _dataset_saved(server, report, pairs, dataset):
    """Dataset workflows: every pair is in the dataset (MVTec tree or rejected/) with a manifest line, and the mask
    overlay is previewed."""
    root = server.base / "output" / dataset
    records = [json.loads(x) for x in (root / "manifest.jsonl").read_text().splitlines()]
    by_image = {r["files"].get("image") or r["files"].get("rejected_image"): r for r in records}
    for prompt in report["prompts"]:
        assert prompt["status"] == "success", prompt
        saved = [o["path"] for o in prompt["outputs"] if o["path"].startswith(f"output/{dataset}/")]
        previews = [o["path"] for o in prompt["outputs"] if o["path"].startswith("temp/")]
        assert len(saved) == pairs and len(previews) == pairs, prompt["outputs"]
        for rel in saved:
            record = by_image[rel[len(f"output/{dataset}/") :]]
            for f in record["files"].values():
                assert (root / f).is_file(), f
            assert record["workflow"] and record["seed"] == prompt["seed"]
    return root, records


def test_pack_loads_and_registers_its_nodes(server):
    log = server.log.read_text()
    assert "IMPORT FAILED" not in log or PACK_DIR_NAME not in log.split("IMPORT FAILED", 1)[1][:500], log[-3000:]
    info = server.get("/object_info")
    for node_id in NODE_IDS:
        assert node_id in info, node_id
        assert info[node_id]["category"].startswith("DualAnoDiff/") and info[node_id]["description"]
    assert "test_defect.safetensors" in info["DualAnoDiffLoRALoader"]["input"]["required"]["weights"][1]["options"]
    trainer = info["DualAnoDiffTrainer"]["input"]["required"]
    assert DEFECT_FOLDER in trainer["folder"][1]["options"]
    # the training seed must stay fixed (resume): no "control after generate" in the frontend
    assert trainer["seed"][1]["control_after_generate"] is False
    assert info["DualAnoDiffSaveDataset"]["output_node"] and info["DualAnoDiffTrainer"]["output_node"]


def test_workflows_are_served_as_templates_with_thumbnails(server):
    templates = server.get("/workflow_templates")
    titles = [BUILD.TEMPLATES[g] for g in GRAPHS + NEW_GRAPHS]
    assert sorted(templates.get(PACK_DIR_NAME, [])) == sorted(titles)  # UI files only, not workflows/api/
    # the frontend titles a template by its file name and keeps the server's order: numbered titles, generate first
    assert sorted(titles)[0] == "DualAnoDiff 1 - generate defects and masks"
    quote = urllib.parse.quote
    served = server.get(f"/api/workflow_templates/{PACK_DIR_NAME}/{quote(titles[0])}.json")
    assert served == json.loads(ui_file("dualanodiff_generate").read_text())
    for title in titles:
        with urllib.request.urlopen(f"{server.url}/api/workflow_templates/{PACK_DIR_NAME}/{quote(title)}.jpg") as r:
            assert r.read(3) == b"\xff\xd8\xff", title


def _without_later_defaults(api: dict) -> dict:
    """An API prompt as ``{id: (class_type, inputs)}`` without the widgets added since the old workflows were saved
    (``LATER_WIDGETS`` in workflows/build_workflows.py) where they hold their default."""
    out = {}
    for k, v in api.items():
        later = dict(BUILD.LATER_WIDGETS.get(v["class_type"], []))
        out[k] = (v["class_type"], {i: x for i, x in v["inputs"].items() if not (i in later and later[i] == x)})
    return out


def test_later_widgets_are_written_at_the_nodes_defaults(server):
    # build_workflows.py cannot import the nodes (no ComfyUI there): the defaults it writes for widgets added later
    # must be the ones the live nodes declare, or the shipped workflows would not start as a new node does
    info = server.get("/object_info")
    for class_type, widgets in BUILD.LATER_WIDGETS.items():
        spec = info[class_type]["input"]
        for name, default in widgets:
            declared = {**spec.get("required", {}), **spec.get("optional", {})}[name]
            assert declared[1]["default"] == default, (class_type, name)


def test_old_workflows_still_load_and_queue(server):
    # the workflows as shipped before (old file names, old titles and layout): converted with the live node
    # definitions they give the same API prompt as before, and the server accepts it
    qb = _queue_script()
    info = server.get("/object_info")
    for name in GRAPHS:
        old_ui = json.loads((OLD_WORKFLOWS / f"{name}.json").read_text())
        old_api = json.loads((OLD_WORKFLOWS / "api" / f"{name}.json").read_text())
        converted = qb.ui_to_api(old_ui, info)
        assert {k: (v["class_type"], v["inputs"]) for k, v in converted.items()} == {
            k: (v["class_type"], v["inputs"]) for k, v in old_api.items()
        }, name
        new_api = json.loads((WORKFLOWS / "api" / f"{name}.json").read_text())
        for node in new_api.values():  # an input added since: Save Dataset's alignment check, at its default
            if node["class_type"] == "DualAnoDiffSaveDataset":
                assert node["inputs"].pop("min_alignment") == 0.57, name
        # otherwise the graphs themselves did not change, only their layout and titles (and the widgets in
        # LATER_WIDGETS, at their defaults)
        assert _without_later_defaults(new_api) == {k: (v["class_type"], v["inputs"]) for k, v in old_api.items()}, name
    # queued as they are (with the tiny test models), the old files are accepted and run
    report, _ = _queue(
        server,
        OLD_WORKFLOWS / "api" / "dualanodiff_generate.json",
        "--seed",
        "5",
        *SMALL_DUAL,
        "--set",
        "DualAnoDiffSaveDataset.dataset=old_api",
    )
    _, records = _dataset_saved(server, report, pairs=2, dataset="old_api")
    # saved without min_alignment, they run without the alignment check, as before (the contrast is recorded)
    assert all(r["settings"]["filter"]["min_alignment"] == 0.0 and r["reason"] != "misaligned" for r in records)
    assert all((r["filter"]["alignment"] is None) == r["mask"]["empty"] for r in records)
    report, _ = _queue(
        server, OLD_WORKFLOWS / "dualanodiff_generate_ksampler.json", "--seed", "5", "--poll", *SMALL_STOCK
    )
    _images_saved(server, report, pairs=2)


def test_ui_workflows_have_no_missing_nodes_and_match_the_api_files(server):
    qb = _queue_script()
    info = server.get("/object_info")
    for name in GRAPHS + NEW_GRAPHS:
        ui = json.loads(ui_file(name).read_text())
        for node in ui["nodes"]:
            assert node["type"] in info, f"{name}: missing node type {node['type']}"
            specs = list(qb._input_specs(info[node["type"]]))
            widgets = sum(1 + qb._extra_widget_slots(s, n) for n, s in specs if qb._is_widget(s))
            assert len(node.get("widgets_values", [])) == widgets, (name, node["type"])
            for inp in node.get("inputs", []):
                names = [n for n, _ in specs]
                assert inp["name"] in names, (name, node["type"], inp["name"])
        for link_id, src, src_slot, _dst, _dst_slot, kind in ui["links"]:
            src_type = next(n["type"] for n in ui["nodes"] if n["id"] == src)
            assert info[src_type]["output"][src_slot] == kind, (name, link_id)
        api = json.loads((WORKFLOWS / "api" / f"{name}.json").read_text())
        converted = qb.ui_to_api(ui, info)
        assert {k: (v["class_type"], v["inputs"]) for k, v in converted.items()} == {
            k: (v["class_type"], v["inputs"]) for k, v in api.items()
        }, name


def test_generate_workflow_mask_and_dataset_over_the_api(server):
    report, proc = _queue(
        server,
        WORKFLOWS / "api/dualanodiff_generate.json",
        "--count",
        "2",
        "--seed",
        "100",
        *SMALL_DUAL,
        *ACCEPT_ALL,
        "--set",
        "DualAnoDiffSaveDataset.dataset=api_generate",
    )
    assert [p["seed"] for p in report["prompts"]] == [100, 101]
    root, records = _dataset_saved(server, report, pairs=2, dataset="api_generate")
    assert [r["index"] for r in records] == [0, 1, 2, 3]  # the second prompt appended after the first
    accepted = [r for r in records if r["accepted"]]
    assert accepted, [r["reason"] for r in records]
    assert len(load_mvtec(root, "my_object")) == len(accepted)  # what anomalib's MVTec loader would read
    assert "step 3/3" in proc.stderr  # progress followed over the websocket
    # the same dataset with another filter setting is refused with a clear error, and the server carries on
    report, _ = _queue(
        server,
        WORKFLOWS / "api/dualanodiff_generate.json",
        "--seed",
        "102",
        *SMALL_DUAL,
        "--set",
        "DualAnoDiffSaveDataset.dataset=api_generate",
        expect=1,
    )
    assert "other settings" in report["prompts"][0]["error"]


def test_generate_with_background_compensation_over_the_api(server):
    report, _ = _queue(
        server,
        WORKFLOWS / "api/dualanodiff_generate_bcm.json",
        "--seed",
        "7",
        *SMALL_DUAL,
        "--set",
        "DualAnoDiffSaveDataset.dataset=api_bcm",
    )
    _dataset_saved(server, report, pairs=2, dataset="api_bcm")


def test_placement_workflow_fills_a_dataset_from_a_photo_folder(server):
    import numpy as np
    from PIL import Image

    report, _ = _queue(
        server,
        WORKFLOWS / "api/dualanodiff_generate_placement.json",
        "--seed",
        "5",
        *SMALL_DUAL,
        *ACCEPT_ALL,
        "--set",
        "DualAnoDiffSaveDataset.dataset=api_placement",
    )
    root, records = _dataset_saved(server, report, pairs=2, dataset="api_placement")  # one pair per photo
    folder = server.base / "input" / PHOTO_FOLDER
    photos = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(folder.iterdir())]
    x0, y0, x1, y1 = REGION_BOX
    outside = np.ones((64, 64), bool)
    outside[y0 - 8 : y1 + 8, x0 - 8 : x1 + 8] = False  # the region and its 8 px feathered band
    for r in records:
        assert r["placement"] == "MASK input" and 0.0 <= r["outside_region"] <= 1.0
        assert r["accepted"] == (r["reason"] == "ok") and r["reason"] in ("ok", "outside_region", "empty_mask")
        image = np.asarray(Image.open(root / (r["files"].get("image") or r["files"]["rejected_image"])))
        assert any(np.array_equal(image[outside], p[outside]) for p in photos), "the photo outside the band"


def test_stock_ksampler_workflow_over_the_api(server):
    report, _ = _queue(server, WORKFLOWS / "api/dualanodiff_generate_ksampler.json", "--seed", "7", *SMALL_STOCK)
    _images_saved(server, report, pairs=2)


def test_ui_workflow_is_queued_directly_by_polling(server, tmp_path):
    report, _ = _queue(
        server,
        ui_file("dualanodiff_generate"),
        "--seeds",
        "55",
        "--poll",
        "--download",
        str(tmp_path),
        *SMALL_DUAL,
        "--set",
        "DualAnoDiffSaveDataset.dataset=api_ui",
    )
    _dataset_saved(server, report, pairs=2, dataset="api_ui")
    for out in report["prompts"][0]["outputs"]:
        if out["path"].startswith("output/"):
            assert Path(out["downloaded"]).read_bytes() == (server.base / out["path"]).read_bytes()


def test_train_workflow_over_the_api(server):
    report, proc = _queue(
        server,
        WORKFLOWS / "api/dualanodiff_train.json",
        *SMALL_TRAIN,
        "--set",
        "DualAnoDiffTrainer.steps=2",
        "--set",
        "DualAnoDiffTrainer.output_name=api_trained",
        "--set",
        "DualAnoDiffTrainer.checkpoint_every=1",
    )
    prompt = report["prompts"][0]
    assert prompt["status"] == "success", prompt
    models = server.base / "models" / "dualanodiff"
    weights = models / "api_trained.safetensors"
    w = importlib.import_module(f"{ce.PACK}.dualanodiff_core.weights").DualAnoDiffWeights.load(weights)
    assert w.has_text and w.has_saim and w.metadata["trained_steps"] == "2"
    assert "tiny_sd15.ckpt" in w.metadata["base_model"]
    ckpts = sorted(p.name for p in (models / "api_trained_train" / "checkpoints").iterdir())
    assert ckpts == [
        "checkpoint-000001.pt",
        "checkpoint-000001.safetensors",
        "checkpoint-000002.pt",
        "checkpoint-000002.safetensors",
    ]
    assert (models / "api_trained_train" / "loss.png").is_file()
    previews = [o for o in prompt["outputs"] if o["path"].startswith("temp/")]
    assert len(previews) == 1 + 2  # the loss curve on the trainer node and the mask overlays of the 2 pairs
    assert "step 2/2" in proc.stderr
    # the new weights are listed by the loader at once
    info = server.get("/object_info/DualAnoDiffLoRALoader")["DualAnoDiffLoRALoader"]
    assert "api_trained.safetensors" in info["input"]["required"]["weights"][1]["options"]


def test_cancel_stops_training_with_a_checkpoint_and_resume_finishes(server):
    qb = _queue_script()
    prompt = json.loads((WORKFLOWS / "api/dualanodiff_train.json").read_text())
    prompt = qb.apply_overrides(
        prompt,
        [a for a in SMALL_TRAIN if a != "--set"]
        + [
            "DualAnoDiffTrainer.steps=100000",
            "DualAnoDiffTrainer.output_name=api_cancel",
            "DualAnoDiffTrainer.checkpoint_every=0",
            "DualAnoDiffTrainer.train_text_encoder=false",
        ],
    )
    work = server.base / "models" / "dualanodiff" / "api_cancel_train"
    answer = json.loads(server.post("/prompt", {"prompt": prompt}))
    deadline = time.monotonic() + 120
    while not (work / "train_config.json").exists():  # written when the training loop starts
        assert time.monotonic() < deadline, server.log.read_text()[-3000:]
        time.sleep(0.2)
    time.sleep(1.0)
    server.post("/interrupt", {})
    entry = server.wait_history(answer["prompt_id"], timeout=120)
    events = [e for e, _ in entry["status"]["messages"]]
    assert entry["status"]["status_str"] == "error" and "execution_interrupted" in events, events
    state = importlib.import_module(f"{ce.PACK}.dualanodiff_core.train").load_checkpoint(work)
    step = int(state["step"])
    assert step >= 1
    assert not (server.base / "models" / "dualanodiff" / "api_cancel.safetensors").exists()
    # queue again with resume on (the default) and one more step: it continues and finishes
    prompt["2"]["inputs"]["steps"] = step + 1
    answer = json.loads(server.post("/prompt", {"prompt": prompt}))
    entry = server.wait_history(answer["prompt_id"], timeout=300)
    assert entry["status"]["status_str"] == "success", entry["status"]
    w = importlib.import_module(f"{ce.PACK}.dualanodiff_core.weights").DualAnoDiffWeights.load(
        server.base / "models" / "dualanodiff" / "api_cancel.safetensors"
    )
    assert w.metadata["trained_steps"] == str(step + 1)


def test_a_bad_batch_fails_clearly_and_the_server_survives(server):
    bad = [a if a != "EmptyLatentImage.batch_size=4" else "EmptyLatentImage.batch_size=3" for a in SMALL_STOCK]
    report, proc = _queue(server, WORKFLOWS / "api/dualanodiff_generate_ksampler.json", "--seed", "1", *bad, expect=1)
    assert report["prompts"][0]["status"] == "error"
    error = report["prompts"][0]["error"]
    assert error.startswith("node 9 (KSampler): LayoutError:") and "whole (global, anomaly) pairs" in error, error
    assert "DualAnoDiff Sampler" in error and "batch_size = 2 x pairs" in error, error
    assert "a batch of 3 latent images, an odd number" in error and "CFG chunk" not in error, error
    _, proc = _queue(
        server,
        WORKFLOWS / "api/dualanodiff_generate.json",
        *SMALL_DUAL,
        "--set",
        "DualAnoDiffLoRALoader.weights=nope.safetensors",
        expect=2,
    )
    # caught by queue_batch against /object_info (the server's own refusals: the tests below that post directly)
    assert "'nope.safetensors' is not one of the choices" in proc.stderr, proc.stderr
    _, proc = _queue(
        server,
        WORKFLOWS / "api/dualanodiff_generate.json",
        *SMALL_DUAL,
        "--set",
        "DualAnoDiffSampler.sampler_name=nope",
        expect=2,
    )
    assert "'nope' is not one of the choices" in proc.stderr, proc.stderr
    _, proc = _queue(
        server,
        WORKFLOWS / "api/dualanodiff_train.json",
        *SMALL_TRAIN,
        "--set",
        "DualAnoDiffTrainer.folder=no_such_folder",
        expect=2,
    )
    assert "'no_such_folder' is not one of the choices" in proc.stderr, proc.stderr
    assert server.get("/system_stats")["system"]


def test_count_without_a_seed_counts_up_and_a_cached_prompt_is_reported_as_such(server):
    api = WORKFLOWS / "api/dualanodiff_generate_ksampler.json"
    report, proc = _queue(server, api, "--count", "2", *SMALL_STOCK)
    assert [p["seed"] for p in report["prompts"]] == [0, 1]  # the workflow's seed 0, counting up
    _images_saved(server, report, pairs=2)
    first, second = ({o["path"] for o in p["outputs"]} for p in report["prompts"])
    assert not first & second  # two runs, two sets of files
    # the last prompt again: ComfyUI answers from its cache without running; the report says so
    report, proc = _queue(server, api, "--seeds", "1", *SMALL_STOCK)
    prompt = report["prompts"][0]
    assert prompt["status"] == "cached" and all(o["cached"] for o in prompt["outputs"]), prompt
    assert "0 of 1 prompt(s) ran; 1 were answered from ComfyUI's cache" in proc.stdout, proc.stdout
    assert "seed 1: cached" in proc.stdout and "success" not in proc.stdout


def test_set_refuses_unknown_inputs_and_bad_values_before_queueing(server):
    before = len(server.get("/history"))
    api = WORKFLOWS / "api/dualanodiff_generate.json"
    for args, words in [
        (["--set", "DualAnoDiffSampler.pair=1"], ["has no input 'pair'", "Did you mean 'pairs'?", "denoise"]),
        (["--set", "DualAnoDiffSampler.pairs=0"], ["outside the allowed range 1 to"]),
        (["--set", "DualAnoDiffSampler.sampler_name=nope"], ["'nope' is not one of the choices"]),
        (["--set", "DualAnoDiffLoRALoader.weights=nope.safetensors"], ["is not one of the choices"]),
    ]:
        # http://host:port is accepted as an address (the error is about --set, after /object_info was read)
        _, proc = _queue(server, api, "--server", f"http://{server.address}/", *args, expect=2)
        assert proc.stderr.count("\n") == 1 and all(w in proc.stderr for w in words), proc.stderr
    _, proc = _queue(server, WORKFLOWS / "api/dualanodiff_train.json", "--set", "DualAnoDiffTrainer.step=2", expect=2)
    assert "Did you mean 'steps'?" in proc.stderr, proc.stderr
    assert len(server.get("/history")) == before  # nothing was queued


def _rejection(server, prompt) -> dict:
    try:
        server.post("/prompt", {"prompt": prompt})
    except urllib.error.HTTPError as e:
        return json.loads(e.read())
    raise AssertionError("the prompt was accepted")


def test_one_problem_is_one_error_on_the_widget_that_causes_it(server):
    train = json.loads((WORKFLOWS / "api/dualanodiff_train.json").read_text())
    train["1"]["inputs"]["ckpt_name"] = "tiny_sd15.ckpt"
    train["2"]["inputs"]["folder"] = "no_such_folder"
    errors = _rejection(server, train)["node_errors"]["2"]["errors"]
    assert [e["extra_info"]["input_name"] for e in errors] == ["folder"], errors
    assert "no_such_folder" in errors[0]["details"] and "does not exist" in errors[0]["details"]
    generate = json.loads((WORKFLOWS / "api/dualanodiff_generate.json").read_text())
    generate["1"]["inputs"]["ckpt_name"] = "tiny_sd15.ckpt"
    generate["2"]["inputs"]["weights"] = "test_defect.safetensors"
    for key in [k for k, v in generate.items() if v["class_type"] == "PreviewImage"]:
        del generate[key]  # no valid output left: ComfyUI refuses the prompt instead of running part of it
    save = next(k for k, v in generate.items() if v["class_type"] == "DualAnoDiffSaveDataset")
    generate[save]["inputs"]["dataset"] = "../outside"
    errors = _rejection(server, generate)["node_errors"][save]["errors"]
    assert [e["extra_info"]["input_name"] for e in errors] == ["dataset"], errors
    generate[save]["inputs"]["dataset"] = "fine"
    generate["7"]["inputs"]["sampler_name"] = "nope"
    errors = _rejection(server, generate)["node_errors"]["7"]["errors"]
    assert [e["extra_info"]["input_name"] for e in errors] == ["sampler_name"], errors
    assert "unknown sampler 'nope'" in errors[0]["details"]


def test_the_loader_lists_weights_only_and_explains_a_resume_checkpoint(server):
    models = server.base / "models" / "dualanodiff" / "listing_train" / "checkpoints"
    models.mkdir(parents=True, exist_ok=True)
    tiny_weights = server.base / "models" / "dualanodiff" / "test_defect.safetensors"
    (models / "checkpoint-000003.safetensors").write_bytes(tiny_weights.read_bytes())
    (models / "checkpoint-000003.pt").write_bytes(b"not read")
    info = server.get("/object_info/DualAnoDiffLoRALoader")["DualAnoDiffLoRALoader"]
    options = info["input"]["required"]["weights"][1]["options"]
    assert "listing_train/checkpoints/checkpoint-000003.safetensors" in options
    assert not [o for o in options if o.endswith(".pt")], options
    prompt = json.loads((WORKFLOWS / "api/dualanodiff_generate.json").read_text())
    prompt["1"]["inputs"]["ckpt_name"] = "tiny_sd15.ckpt"
    prompt["2"]["inputs"]["weights"] = "listing_train/checkpoints/checkpoint-000003.pt"
    errors = _rejection(server, prompt)["node_errors"]["2"]["errors"]
    assert len(errors) == 1 and "is a training checkpoint" in errors[0]["details"], errors
    assert "checkpoint-000003.safetensors beside it" in errors[0]["details"]


def test_warnings_reach_the_user_not_only_the_log(server):
    # a stock sampler given one prompt for both images of a pair: the warning is shown on the KSampler node
    prompt = json.loads((WORKFLOWS / "api/dualanodiff_generate_ksampler.json").read_text())
    prompt["9"]["inputs"]["positive"] = ["4", 0]
    unpaired = server.base / "unpaired.json"
    unpaired.write_text(json.dumps(prompt))
    report, proc = _queue(server, unpaired, "--seed", "3", *SMALL_STOCK)
    said = report["prompts"][0]["messages"]
    assert any(m.startswith("node 9 (KSampler): DualAnoDiff: both images of a pair got the same prompt") for m in said)
    # weights trained on another checkpoint: the loader says so on its node
    weights_mod = importlib.import_module(f"{ce.PACK}.dualanodiff_core.method.weights")
    w = weights_mod.DualAnoDiffWeights.load(server.base / "models" / "dualanodiff" / "test_defect.safetensors")
    meta = dict(w.metadata, base_model="CheckpointLoaderSimple (ckpt_name=sd15/other_model.safetensors)")
    weights_mod.DualAnoDiffWeights(w.tensors, meta).save(
        server.base / "models" / "dualanodiff" / "other_base.safetensors"
    )
    args = [
        a
        if a != "DualAnoDiffLoRALoader.weights=test_defect.safetensors"
        else "DualAnoDiffLoRALoader.weights=other_base.safetensors"
        for a in SMALL_DUAL
    ]
    report, proc = _queue(
        server,
        WORKFLOWS / "api/dualanodiff_generate.json",
        "--seed",
        "3",
        *args,
        "--set",
        "DualAnoDiffSaveDataset.dataset=api_other_base",
    )
    said = report["prompts"][0]["messages"]
    assert any(
        m.startswith(
            "node 2 (DualAnoDiffLoRALoader): DualAnoDiff: these weights were trained on 'other_model' but are "
            "loaded onto 'tiny_sd15'"
        )
        for m in said
    ), said
    assert "trained on 'other_model'" in proc.stdout  # in the final report too
    # the same base model: no warning
    report, _ = _queue(
        server,
        WORKFLOWS / "api/dualanodiff_generate.json",
        "--seed",
        "4",
        *SMALL_DUAL,
        "--set",
        "DualAnoDiffSaveDataset.dataset=api_other_base",
    )
    assert not report["prompts"][0]["messages"], report["prompts"][0]["messages"]


def test_bad_weights_files_and_a_busy_dataset_give_the_cli_messages_and_the_server_survives(server):
    """The same input reaching the nodes gives the same message as the command line; the server carries on."""
    import numpy as np

    DatasetWriter = importlib.import_module(f"{ce.PACK}.dualanodiff_core.dataset.export").DatasetWriter

    folder = server.base / "models" / "dualanodiff"
    (folder / "junk.bin").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    for name, words in (("junk.bin", ["junk.bin", "not a PyTorch weights file"]),):
        report, _ = _queue(
            server,
            WORKFLOWS / "api/dualanodiff_generate.json",
            *SMALL_DUAL,
            "--set",
            f"DualAnoDiffLoRALoader.weights={name}",
            expect=1,
        )
        error = report["prompts"][0]["error"]
        assert all(w in error for w in words) and "weights_only" not in error, error
    # another run holds the dataset's lock: the saver says so instead of writing beside it
    busy = server.base / "output" / "api_busy"
    with DatasetWriter(busy, "my_object", "other"):
        report, _ = _queue(
            server,
            WORKFLOWS / "api/dualanodiff_generate.json",
            *SMALL_DUAL,
            "--set",
            "DualAnoDiffSaveDataset.dataset=api_busy",
            expect=1,
        )
        error = report["prompts"][0]["error"]
        assert "is being written by" in error and "api_busy" in error, error
    assert not (busy / "manifest.jsonl").exists()
    assert server.get("/system_stats")["system"]
