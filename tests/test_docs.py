"""The documentation tells the truth about this repository: its runnable examples run, its links and anchors
resolve, the module paths and Python names it mentions exist, it links only to real public pages, and no file in the
repository points at material that exists only outside it."""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOC_FILES = [README] + sorted((ROOT / "docs").glob("*.md"))

RUNNABLE_MARK = "# runs as-is"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)

#: the only external pages the docs may link to (prefix match on a path boundary)
ALLOWED_URLS = (
    "https://arxiv.org/abs/2408.13509",  # the DualAnoDiff paper
    "https://github.com/yinyjin/DualAnoDiff",  # the authors' official code repository
    "https://github.com/Comfy-Org/ComfyUI",
    "https://github.com/comfyanonymous/ComfyUI",
    "https://pytorch.org/get-started/locally",
    "https://download.pytorch.org/whl/cpu",  # PyTorch's CPU wheel index
)

METHOD_SECTIONS = [
    "Two branches, one batch",
    "Per-branch LoRA",
    "SAIM: cross-branch attention",
    "BCM: background compensation",
    "Training",
    "Inference",
    "Mask extraction",
    "Weights format and the reference checkpoint",
    "Where paper and reference code differ",
]

# assembled so that this file does not match itself
FORBIDDEN = ["../" + "shared", "METHOD" + ".md", "COMFYUI" + ".md", "ECOSYSTEM" + ".md", "ARCHITECTURE" + ".md"]
FORBIDDEN += ["readme" + "_parts"]


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in FENCE.finditer(text)]


def runnable_blocks() -> list[tuple[str, int, str, str]]:
    out = []
    for path in DOC_FILES:
        for i, (lang, code) in enumerate(fenced_blocks(path.read_text())):
            if lang in ("python", "bash") and code.startswith(RUNNABLE_MARK):
                out.append((rel(path), i, lang, code))
    return out


def prose(text: str) -> str:
    """The text without fenced code blocks and inline code (links inside code are not links)."""
    text = FENCE.sub("", text)
    return re.sub(r"`[^`\n]*`", "", text)


def slug(heading: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped (word characters, spaces and hyphens kept), spaces to
    hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip()).lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", path.read_text()).splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        s = slug(m.group(1))
        n = seen.get(s, 0)
        seen[s] = n + 1
        out.add(s if n == 0 else f"{s}-{n}")
    return out


# ---- runnable examples -------------------------------------------------------------------------------------------


def test_readme_has_runnable_python_example():
    blocks = [b for b in runnable_blocks() if b[0] == "README.md" and b[2] == "python"]
    assert blocks, "README.md has no runnable python example"


@pytest.mark.parametrize("where,index,lang,code", runnable_blocks(), ids=lambda v: str(v)[:20])
def test_runnable_block_runs(where, index, lang, code, tmp_path, monkeypatch):
    """Every block that starts with '# runs as-is' works exactly as written (paths under /tmp/ go to a temporary
    folder; bash blocks run from the repository root with `dualanodiff` meaning this checkout's CLI)."""
    code = code.replace("/tmp/", f"{tmp_path}/")
    if lang == "python":
        monkeypatch.chdir(tmp_path)
        exec(compile(code, f"{where} block {index}", "exec"), {"__name__": "__docs__"})
        return
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "dualanodiff"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m dualanodiff_core "$@"\n')
    shim.chmod(shim.stat().st_mode | stat.S_IXUSR)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    r = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, f"{where} block {index} failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    assert "Traceback" not in r.stderr, r.stderr[-4000:]


# ---- links -------------------------------------------------------------------------------------------------------


def test_links_and_anchors_resolve():
    problems = []
    for path in DOC_FILES:
        for target in re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", prose(path.read_text())):
            if re.match(r"^[a-z]+:", target):
                continue  # external: checked by test_external_urls_are_allowed
            file_part, _, anchor = target.partition("#")
            dest = path if not file_part else (path.parent / file_part).resolve()
            if not dest.exists():
                problems.append(f"{rel(path)}: link to missing {target}")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                problems.append(f"{rel(path)}: no heading #{anchor} in {rel(dest)}")
    assert problems == []


def test_external_urls_are_allowed():
    def allowed(url: str) -> bool:
        return any(url == a or url.startswith(a + "/") or url.startswith(a + "#") for a in ALLOWED_URLS)

    found = [
        (rel(p), u.rstrip(".,);:")) for p in DOC_FILES for u in re.findall(r"https?://[^\s)>\]`\"']+", p.read_text())
    ]
    assert found, "expected at least the paper link"
    assert [f for f in found if not allowed(f[1])] == []


# ---- names and paths the docs mention ------------------------------------------------------------------------------

_PACKAGE_DIRS = "method|sd15|training|dataset|evaluation|minidefect|cli"


def test_mentioned_paths_exist():
    """Repository paths in backticks (`dualanodiff_core/...`, `nodes/...`, `bench/...`, ...; module files of the
    core's sub-packages may omit `dualanodiff_core/`) exist."""
    missing = set()
    for path in DOC_FILES:
        text = path.read_text()
        for token in re.findall(r"`([^`\n]+)`", text):
            if (ROOT / token).exists() and "/" in token:  # a whole path with spaces (the UI workflow files)
                continue
            for part in re.split(r"[\s,]+", token):
                part = part.rstrip(".:;)")
                if re.search(r"[<>{}*…]", part):
                    continue
                if re.match(r"^(dualanodiff_core|nodes|bench|tests|workflows|scripts|docs)/[\w./-]*$", part):
                    candidate = ROOT / part
                elif re.match(rf"^({_PACKAGE_DIRS})/\w+\.py$", part):
                    candidate = ROOT / "dualanodiff_core" / part
                else:
                    continue
                if not candidate.exists():
                    missing.add(f"{rel(path)}: {part}")
    assert sorted(missing) == []


def _resolve(dotted: str) -> bool:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            if importlib.util.find_spec(module_name) is None:
                continue
        except ModuleNotFoundError:
            continue
        obj = importlib.import_module(module_name)
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def test_mentioned_python_names_exist(monkeypatch):
    """`dualanodiff_core.x.y` names and every `from dualanodiff_core... import a, b` in the docs' code resolve."""
    monkeypatch.syspath_prepend(str(ROOT))
    wanted = set()
    for path in DOC_FILES:
        text = path.read_text()
        for m in re.finditer(r"from (dualanodiff_core[\w.]*) import ([\w, ]+)", text):
            wanted.update(f"{m.group(1)}.{name.strip()}" for name in m.group(2).split(",") if name.strip())
        wanted.update(re.findall(r"\b(dualanodiff_core(?:\.\w+)+)", text))
    assert wanted, "the docs mention no dualanodiff_core names"
    assert sorted(n for n in wanted if not _resolve(n)) == []


# ---- shape of the docs ---------------------------------------------------------------------------------------------


def test_readme_is_short():
    assert len(README.read_text().splitlines()) <= 250


def test_readme_keeps_the_ci_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python -m pytest -q" in ci
    blocks = fenced_blocks(README.read_text())
    assert any(lang == "bash" and code.strip() == "python -m pytest -q" for lang, code in blocks)


def test_method_page_has_its_sections():
    titles = re.findall(r"^## (.+?)\s*$", FENCE.sub("", (ROOT / "docs" / "method.md").read_text()), re.M)
    assert titles == METHOD_SECTIONS


def test_every_docs_page_is_linked_from_the_readme():
    linked = set(re.findall(r"\]\(docs/([\w-]+\.md)", README.read_text()))
    assert {p.name for p in DOC_FILES[1:]} <= linked


# ---- the repository stands alone -------------------------------------------------------------------------------------


def _tracked_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        files = [ROOT / f for f in out.split("\0") if f]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: every file but build outputs
        skip = {".git", ".ci", "__pycache__", ".pytest_cache", ".ruff_cache"}
        files = [p for p in ROOT.rglob("*") if p.is_file() and not skip & set(p.relative_to(ROOT).parts)]
    return [f for f in files if f.is_file() and f.relative_to(ROOT).parts[0] != ".ci"]


def test_no_file_refers_outside_the_repository():
    offenders = []
    for path in _tracked_files():
        try:
            text = path.read_text()
        except (UnicodeDecodeError, OSError):
            continue  # images and other binary files
        offenders += [f"{rel(path)}: {word}" for word in FORBIDDEN if word in text]
    assert offenders == []
