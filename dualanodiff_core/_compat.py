"""Old module paths keep working.

The core used to be one flat folder (``dualanodiff_core.train``, ``dualanodiff_core.attention``, ...). Those modules
now live in subpackages; :data:`MOVED` maps each old name to its new home. A finder on :data:`sys.meta_path` answers
an import of an old path with the new module object itself, so ``import dualanodiff_core.train`` and
``from dualanodiff_core.masks import extract_mask`` work and ``dualanodiff_core.train is
dualanodiff_core.training.trainer`` (patching one patches the other). Nothing is imported until an old path is used.

``dualanodiff_core.evaluation`` and ``dualanodiff_core.minidefect`` are now packages of the same name; they serve the
old module's names themselves (see their ``__init__``).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys

#: old module (relative to the core package) -> new module
MOVED: dict[str, str] = {
    "layout": "method.layout",
    "attention": "method.attention",
    "weights": "method.weights",
    "models": "sd15.loading",
    "single_file": "sd15.single_file",
    "diffusers_backend": "sd15.pipeline",
    "train_diffusers": "sd15.training",
    "train": "training.trainer",
    "data": "training.data",
    "backgrounds": "training.backgrounds",
    "lossplot": "training.lossplot",
    "generate": "dataset.generate",
    "masks": "dataset.masks",
    "quality": "dataset.acceptance",
    "export": "dataset.export",
    "metrics": "evaluation.metrics",
    "synthetic": "evaluation.synthetic",
    "minidefect_pretrain": "minidefect.pretrain",
    "tiny": "minidefect.tiny",
    "cmd_demo": "cli.demo",
    "cmd_generate": "cli.generate",
    "cmd_inspect": "cli.inspect",
    "cmd_minidefect": "cli.minidefect",
    "cmd_train": "cli.train",
    "imageutil": "fileio",
}


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target: str):
        self.target = target
        self._spec = None

    def create_module(self, spec):
        module = importlib.import_module(self.target)
        self._spec = module.__spec__
        return module

    def exec_module(self, module) -> None:
        # the import system stamped the alias spec on the shared module object; give it back its own
        module.__spec__ = self._spec


class _MovedModuleFinder(importlib.abc.MetaPathFinder):
    def __init__(self, package: str):
        self.package = package

    def find_spec(self, fullname, path=None, target=None):
        prefix, _, name = fullname.rpartition(".")
        if prefix != self.package or name not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(f"{self.package}.{MOVED[name]}"))


def install(package: str) -> None:
    """Serve ``package.<old>`` from ``package.<new>`` (once per package name: the core may be imported as
    ``dualanodiff_core`` and, inside ComfyUI, as a subpackage of the node pack)."""
    for finder in sys.meta_path:
        if isinstance(finder, _MovedModuleFinder) and finder.package == package:
            return
    # first in line: an old file left behind by an upgrade (or another copy of the package on the path) must not
    # shadow the moved module
    sys.meta_path.insert(0, _MovedModuleFinder(package))
