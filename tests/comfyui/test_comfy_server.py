"""ComfyUI as users run it: a headless CPU server with this pack installed (a symlink in custom_nodes/), a generated
SD1.5-detectable checkpoint, the example workflows queued over the HTTP API with workflows/queue_batch.py, and the
outputs checked on disk."""

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import comfy_env as ce

ROOT = ce.ROOT
WORKFLOWS = ROOT / "workflows"
PACK_DIR_NAME = "ComfyUI-DualAnoDiff"
NODE_IDS = ["DualAnoDiffLoRALoader", "DualAnoDiffAttentionPatch", "DualAnoDiffBackgroundCompensate",
            "DualAnoDiffSampler", "DualAnoDiffPairConditioning", "DualAnoDiffSplitLatentPairs",
            "DualAnoDiffSplitImagePairs"]
GRAPHS = ["dualanodiff_generate", "dualanodiff_generate_bcm", "dualanodiff_generate_ksampler"]
SMALL = ["--set", "CheckpointLoaderSimple.ckpt_name=tiny_sd15.ckpt",
         "--set", "DualAnoDiffLoRALoader.weights=test_defect.safetensors"]
SMALL_DUAL = SMALL + ["--set", "DualAnoDiffSampler.pairs=2", "--set", "DualAnoDiffSampler.width=64",
                      "--set", "DualAnoDiffSampler.height=64", "--set", "DualAnoDiffSampler.steps=3"]
SMALL_STOCK = SMALL + ["--set", "EmptyLatentImage.width=64", "--set", "EmptyLatentImage.height=64",
                       "--set", "EmptyLatentImage.batch_size=4", "--set", "KSampler.steps=3"]


def _queue_script():
    spec = importlib.util.spec_from_file_location("queue_batch", WORKFLOWS / "queue_batch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout=10.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def server(env, tmp_path_factory):
    import tiny_checkpoint
    from PIL import Image

    base = tmp_path_factory.mktemp("comfy_base")
    for sub in ("custom_nodes", "models/checkpoints", "models/dualanodiff", "input", "output"):
        (base / sub).mkdir(parents=True)
    (base / "custom_nodes" / PACK_DIR_NAME).symlink_to(ROOT, target_is_directory=True)
    tiny_checkpoint.write(base / "models/checkpoints/tiny_sd15.ckpt")
    tiny_checkpoint.dualanodiff_weights(env.core_weights.DualAnoDiffWeights).save(
        base / "models/dualanodiff/test_defect.safetensors")
    image = Image.new("RGBA", (64, 64), (90, 120, 150, 255))
    image.paste((0, 0, 0, 0), (20, 20, 44, 44))  # transparent = the object, blacked out by BCM
    image.save(base / "input/background.png")

    port = _free_port()
    log_path = base / "server.log"
    env_vars = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, str(Path(os.environ["COMFYUI_PATH"]) / "main.py"), "--cpu", "--listen", "127.0.0.1",
           "--port", str(port), "--base-directory", str(base), "--database-url", "sqlite:///:memory:",
           "--disable-api-nodes", "--preview-method", "latent2rgb"]
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, cwd=str(base), stdout=log, stderr=subprocess.STDOUT, env=env_vars,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ComfyUI exited ({proc.returncode}):\n{log_path.read_text()[-5000:]}")
            try:
                _get(f"{url}/object_info/DualAnoDiffSampler", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"ComfyUI did not answer within 180 s:\n{log_path.read_text()[-5000:]}")
                time.sleep(0.5)
        yield dict(url=url, address=f"127.0.0.1:{port}", base=base, log=log_path, proc=proc)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


def _queue(server, workflow, *args, expect=0):
    summary = server["base"] / f"summary_{time.monotonic_ns()}.json"
    cmd = [sys.executable, str(WORKFLOWS / "queue_batch.py"), str(workflow), "--server", server["address"],
           "--summary", str(summary), "--timeout", "600", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=700)
    assert proc.returncode == expect, (f"{' '.join(cmd)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}\n"
                                       f"server log:\n{server['log'].read_text()[-4000:]}")
    return (json.loads(summary.read_text()) if summary.exists() else None), proc


def _check_outputs(server, report, pairs):
    from PIL import Image

    for prompt in report["prompts"]:
        assert prompt["status"] == "success", prompt
        paths = [o["path"] for o in prompt["outputs"]]
        images = [p for p in paths if "/DualAnoDiff/image" in p]
        anomalies = [p for p in paths if "/DualAnoDiff/anomaly" in p]
        assert len(images) == pairs and len(anomalies) == pairs, paths
        for rel in paths:
            assert rel.startswith("output/")
            file = server["base"] / rel
            assert file.is_file(), file
            with Image.open(file) as im:
                assert im.size == (64, 64)
        with Image.open(server["base"] / images[0]) as a, Image.open(server["base"] / anomalies[0]) as b:
            assert a.tobytes() != b.tobytes()  # two different branches


def test_pack_loads_and_registers_its_nodes(server):
    log = server["log"].read_text()
    assert "IMPORT FAILED" not in log or PACK_DIR_NAME not in log.split("IMPORT FAILED", 1)[1][:500], log[-3000:]
    info = _get(f"{server['url']}/object_info")
    for node_id in NODE_IDS:
        assert node_id in info, node_id
        assert info[node_id]["category"].startswith("DualAnoDiff/") and info[node_id]["description"]
    assert "test_defect.safetensors" in info["DualAnoDiffLoRALoader"]["input"]["required"]["weights"][1]["options"]


def test_workflows_are_served_as_templates(server):
    templates = _get(f"{server['url']}/workflow_templates")
    assert sorted(templates.get(PACK_DIR_NAME, [])) == GRAPHS  # UI files only, not workflows/api/
    served = _get(f"{server['url']}/api/workflow_templates/{PACK_DIR_NAME}/dualanodiff_generate.json")
    assert served == json.loads((WORKFLOWS / "dualanodiff_generate.json").read_text())


def test_ui_workflows_have_no_missing_nodes_and_match_the_api_files(server):
    qb = _queue_script()
    info = _get(f"{server['url']}/object_info")
    for name in GRAPHS:
        ui = json.loads((WORKFLOWS / f"{name}.json").read_text())
        for node in ui["nodes"]:
            assert node["type"] in info, f"{name}: missing node type {node['type']}"
            specs = list(qb._input_specs(info[node["type"]]))
            widgets = sum(1 + qb._extra_widget_slots(s) for _, s in specs if qb._is_widget(s))
            assert len(node.get("widgets_values", [])) == widgets, (name, node["type"])
            for slot, inp in enumerate(node.get("inputs", [])):
                names = [n for n, _ in specs]
                assert inp["name"] in names, (name, node["type"], inp["name"])
        for link_id, src, src_slot, dst, dst_slot, kind in ui["links"]:
            src_type = next(n["type"] for n in ui["nodes"] if n["id"] == src)
            assert info[src_type]["output"][src_slot] == kind, (name, link_id)
        api = json.loads((WORKFLOWS / "api" / f"{name}.json").read_text())
        converted = qb.ui_to_api(ui, info)
        assert {k: (v["class_type"], v["inputs"]) for k, v in converted.items()} == \
               {k: (v["class_type"], v["inputs"]) for k, v in api.items()}, name


def test_generate_workflow_over_the_api(server):
    report, proc = _queue(server, WORKFLOWS / "api/dualanodiff_generate.json", "--count", "2", "--seed", "100",
                          *SMALL_DUAL)
    assert [p["seed"] for p in report["prompts"]] == [100, 101]
    _check_outputs(server, report, pairs=2)
    assert "step 3/3" in proc.stderr  # progress followed over the websocket
    assert "output/DualAnoDiff/image" in proc.stdout


def test_generate_with_background_compensation_over_the_api(server):
    report, _ = _queue(server, WORKFLOWS / "api/dualanodiff_generate_bcm.json", "--seed", "7", *SMALL_DUAL)
    _check_outputs(server, report, pairs=2)


def test_stock_ksampler_workflow_over_the_api(server):
    report, _ = _queue(server, WORKFLOWS / "api/dualanodiff_generate_ksampler.json", "--seed", "7", *SMALL_STOCK)
    _check_outputs(server, report, pairs=2)


def test_ui_workflow_is_queued_directly_by_polling(server, tmp_path):
    report, _ = _queue(server, WORKFLOWS / "dualanodiff_generate.json", "--seeds", "55", "--poll",
                       "--download", str(tmp_path), *SMALL_DUAL)
    _check_outputs(server, report, pairs=2)
    for out in report["prompts"][0]["outputs"]:
        assert Path(out["downloaded"]).read_bytes() == (server["base"] / out["path"]).read_bytes()


def test_a_bad_batch_fails_clearly_and_the_server_survives(server):
    bad = [a if a != "EmptyLatentImage.batch_size=4" else "EmptyLatentImage.batch_size=3" for a in SMALL_STOCK]
    report, proc = _queue(server, WORKFLOWS / "api/dualanodiff_generate_ksampler.json", "--seed", "1", *bad, expect=1)
    assert report["prompts"][0]["status"] == "error"
    error = report["prompts"][0]["error"]
    assert error.startswith("node 9 (KSampler): LayoutError:") and "whole (global, anomaly) pairs" in error, error
    assert "DualAnoDiff Sampler" in error and "batch_size = 2 x pairs" in error, error
    _, proc = _queue(server, WORKFLOWS / "api/dualanodiff_generate.json", *SMALL_DUAL,
                     "--set", "DualAnoDiffLoRALoader.weights=nope.safetensors", expect=2)
    assert "nope.safetensors" in proc.stderr and "not in models/dualanodiff" in proc.stderr
    _, proc = _queue(server, WORKFLOWS / "api/dualanodiff_generate.json", *SMALL_DUAL,
                     "--set", "DualAnoDiffSampler.sampler_name=nope", expect=2)
    assert "unknown sampler 'nope'" in proc.stderr
    assert _get(f"{server['url']}/system_stats")["system"]
