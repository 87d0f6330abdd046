"""The package's shape: no import cycles, old module paths still work, one error root, a cheap top-level import,
and the plain method (method/attention.py) equal to its fast paths (method/fused.py)."""

import ast
import importlib
import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import dualanodiff_core
from dualanodiff_core import _compat
from dualanodiff_core.errors import DualAnoDiffError
from dualanodiff_core.method.attention import (
    MODE_DUAL,
    MODE_RECORD,
    DualBranchLayers,
    DualControl,
    dual_branch_attention,
    run_with_background,
)

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "dualanodiff_core"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in CORE.rglob("*.py") if p.name != "__main__.py"}


def _module_level_imports(name: str, path: Path) -> set[str]:
    """The core modules that ``name`` imports when it is imported (imports inside functions do not count)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    deps = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in MODULES else module for a in node.names]
        else:
            continue
        deps.update(t for t in targets if t in MODULES and t != name)
    return deps


def test_no_import_cycle_inside_the_core():
    graph = {name: _module_level_imports(name, path) for name, path in MODULES.items()}
    assert graph["dualanodiff_core.sd15.pipeline"] >= {"dualanodiff_core.sd15.loading"}  # the graph is real
    state: dict[str, int] = {}
    cycles = []

    def visit(node, stack):
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep) :] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("old,new", sorted(_compat.MOVED.items()))
def test_old_module_paths_are_the_new_modules(old, new):
    moved = importlib.import_module(f"dualanodiff_core.{old}")
    assert moved is importlib.import_module(f"dualanodiff_core.{new}")
    assert moved.__name__ == moved.__spec__.name == f"dualanodiff_core.{new}"
    assert getattr(dualanodiff_core, old) is moved


def test_old_paths_work_in_a_fresh_interpreter_before_the_new_ones():
    code = (
        "import sys\n"
        "import dualanodiff_core.train as old\n"
        "from dualanodiff_core.masks import extract_mask\n"
        "from dualanodiff_core.diffusers_backend import DualAnoDiffPipeline, TextEncoderLoRA\n"
        "from dualanodiff_core import minidefect, evaluation, quality\n"
        "import dualanodiff_core.training.trainer as new\n"
        "import dualanodiff_core.dataset.masks as masks, dualanodiff_core.sd15.text as text\n"
        "import dualanodiff_core.minidefect.procedural as proc, dualanodiff_core.evaluation.benchmark as bench\n"
        "assert old is new and extract_mask is masks.extract_mask and TextEncoderLoRA is text.TextEncoderLoRA\n"
        "assert minidefect.verify_minidefect is proc.verify_minidefect and evaluation.load_real is bench.load_real\n"
        "assert quality is sys.modules['dualanodiff_core.dataset.acceptance']\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_public_api_still_resolves():
    for name in dualanodiff_core.__all__:
        assert getattr(dualanodiff_core, name) is not None
    from dualanodiff_core.sd15.pipeline import DualAnoDiffPipeline

    assert dualanodiff_core.DualAnoDiffPipeline is DualAnoDiffPipeline


def _core_exception_classes():
    for name in sorted(MODULES):
        module = importlib.import_module(name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == name and issubclass(cls, BaseException) and not issubclass(cls, Warning):
                yield cls


def test_every_core_error_derives_from_the_root_and_keeps_its_old_base():
    errors = [c for c in _core_exception_classes() if c.__name__ != "RecordComplete"]  # control flow, not an error
    names = {c.__name__ for c in errors}
    assert {"LayoutError", "WeightsError", "WeightsKeyError", "ModelLoadError", "DatasetError", "DataError"} <= names
    assert {"TrainingError", "CheckpointError", "DualAnoDiffError"} <= names
    for cls in errors:
        assert issubclass(cls, DualAnoDiffError), f"{cls.__module__}.{cls.__name__} does not derive from the root"
        if cls.__name__ == "TrainingError":
            assert issubclass(cls, RuntimeError) and cls.exit_code == 1  # a failure during the run
        elif cls.__name__ == "RunError":  # new: failures during a run (disk full, ...), exit status 1
            assert cls.exit_code == 1
        elif cls.__name__ == "MissingInputError":  # what used to be raised as FileNotFoundError
            assert issubclass(cls, FileNotFoundError) and cls.exit_code == 2
        elif cls is not DualAnoDiffError:
            assert issubclass(cls, ValueError), f"{cls.__name__}: `except ValueError` callers must still catch it"


def test_the_cli_turns_a_core_error_into_one_line_and_exit_code_2(tmp_path, capsys):
    from dualanodiff_core.cli import main

    bad = tmp_path / "w.safetensors"
    bad.write_bytes(b"not a safetensors file")
    assert main(["inspect", str(bad)]) == DualAnoDiffError.exit_code == 2
    err = capsys.readouterr().err
    assert err.startswith("dualanodiff inspect: error:") and "Traceback" not in err


def test_importing_the_package_does_not_import_torch():
    code = "import sys, dualanodiff_core; print('torch' in sys.modules, 'diffusers' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "False"]


# ---- plain == fused ---------------------------------------------------------------------------------------------


class _Attention(nn.Module):
    """The minimum an attention module must offer (to_q/to_k/to_v/to_out and heads), without diffusers."""

    def __init__(self, query_dim, context_dim, heads=2, dim_head=8):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim), nn.Dropout(0.0)])


def _randomized(layers, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layers.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return layers


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("rank", [2, 8])  # 8: the LoRA is merged into the base weight under no_grad
def test_plain_and_fused_layers_give_the_same_numbers(grad, rank):
    torch.manual_seed(0)
    c, ctx_dim, tokens, pairs = 16, 12, 10, 3
    self_attn, cross_attn = _Attention(c, c), _Attention(c, ctx_dim)
    self_layers = _randomized(DualBranchLayers(c, c, 16, c, rank=rank, bcm=True), 1)
    cross_layers = _randomized(DualBranchLayers(c, ctx_dim, 16, c, rank=rank), 2)
    h = torch.randn(2 * pairs, tokens, c)
    ctx = torch.randn(2 * pairs, 7, ctx_dim)
    bg = torch.randn(pairs, tokens, c)

    def run(fused, **settings):
        control = DualControl(fused=fused, **settings)
        with torch.set_grad_enabled(grad):
            cross = dual_branch_attention(cross_attn, cross_layers, h, ctx, control, layer_name="b.attn2")
            plain = dual_branch_attention(self_attn, self_layers, h, None, control, layer_name="b.attn1")
            with_bcm = run_with_background(
                control,
                lambda: dual_branch_attention(self_attn, self_layers, bg, None, control, layer_name="b.attn1"),
                lambda: dual_branch_attention(self_attn, self_layers, h, None, control, layer_name="b.attn1"),
            )
            recording = DualControl(fused=fused, mode=MODE_RECORD, bcm_cache={}, **settings)
            record = dual_branch_attention(self_attn, self_layers, bg, None, recording, layer_name="b.attn1")
        return cross, plain, with_bcm, record

    for settings in [dict(), dict(lora_strength=(0.5, 1.5), saim_strength=0.7, bcm_strength=0.4)]:
        fast, slow = run(True, **settings), run(False, **settings)
        for a, b in zip(fast, slow):
            assert a.shape == b.shape
            assert (a - b).abs().max() < 1e-5, settings
        assert (fast[1] - fast[2]).abs().max() > 1e-3, "BCM must change the output here"
    assert DualControl().fused and DualControl().mode == MODE_DUAL
