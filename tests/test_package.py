"""Packaging promises: importable without ComfyUI, core free of ComfyUI, dependency lists in sync, CLI entry."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import tomllib
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_pack_imports_without_comfyui():
    spec = importlib.util.spec_from_file_location(
        "ComfyUI_DualAnoDiff_under_test", ROOT / "__init__.py", submodule_search_locations=[str(ROOT)]
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert callable(mod.comfy_entrypoint)
    assert not hasattr(mod, "NODE_CLASS_MAPPINGS"), "V1 mappings would make ComfyUI ignore the V3 entry point"
    assert "comfy" not in sys.modules or hasattr(sys.modules["comfy"], "__file__")


def test_core_never_imports_comfyui():
    pattern = re.compile(
        r"^\s*(import comfy|from comfy|import folder_paths|from folder_paths|from comfy_api|import nodes\b)", re.M
    )
    offenders = [p.name for p in (ROOT / "dualanodiff_core").rglob("*.py") if pattern.search(p.read_text())]
    assert offenders == []


def test_requirements_match_pyproject():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    reqs = [
        l.strip() for l in (ROOT / "requirements.txt").read_text().splitlines() if l.strip() and not l.startswith("#")
    ]
    assert sorted(deps) == sorted(reqs)
    assert not any(re.match(r"^torch\s*==", d) for d in deps), "torch must stay unpinned for users"


def test_comfy_registry_metadata():
    """The Registry's minimum ComfyUI version is the one the nodes check at start-up; no placeholder identifiers."""
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["comfy"]
    assert tool["DisplayName"]
    m = re.search(r"^MIN_COMFYUI = \((\d+), (\d+), (\d+)\)", (ROOT / "nodes" / "extension.py").read_text(), re.M)
    assert m, "nodes/extension.py no longer defines MIN_COMFYUI"
    assert tool["requires-comfyui"] == ">=" + ".".join(m.groups())
    for key in ("PublisherId", "Icon"):  # optional until a maintainer registers them; never empty placeholders
        assert tool.get(key, "x").strip(), f"{key} is set but empty in pyproject.toml"


def test_inspect_cli_converts_and_exports(tmp_path):
    from dualanodiff_core.minidefect.tiny import tiny_unet
    from dualanodiff_core.sd15.pipeline import DualUNet

    dual = DualUNet(tiny_unet(0), rank=4)
    ref = {"unet." + k: v for k, v in dual.unet.state_dict().items() if ".processor." in k}
    torch.save(ref, tmp_path / "ref.bin")

    def run(*a):
        return subprocess.run([sys.executable, "-m", "dualanodiff_core", *a], cwd=ROOT, capture_output=True, text=True)

    r = run(
        "inspect",
        str(tmp_path / "ref.bin"),
        "--convert",
        str(tmp_path / "ours.safetensors"),
        "--export-branch-lora",
        "anomaly",
        str(tmp_path / "anomaly_lora.safetensors"),
    )
    assert r.returncode == 0, r.stderr
    assert "unet_layers: 14" in r.stdout and "rank: 4" in r.stdout
    assert (tmp_path / "ours.safetensors").is_file() and (tmp_path / "anomaly_lora.safetensors").is_file()
    r = run("inspect", str(tmp_path / "missing.bin"))
    assert r.returncode == 2 and "no such file" in r.stderr and "Traceback" not in r.stderr
    r = run("--help")
    assert r.returncode == 0 and "inspect" in r.stdout
