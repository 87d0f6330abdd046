"""The V3 extension ComfyUI loads through the pack's ``comfy_entrypoint``.

Every module named in :data:`NODE_MODULES` exports ``NODES``, a list of ``io.ComfyNode`` classes. A module that
fails to import is logged and skipped, so one broken optional feature never hides the others.
"""

from __future__ import annotations

import importlib
import logging

from comfy_api.latest import ComfyExtension, io
from typing_extensions import override

log = logging.getLogger("DualAnoDiff")

#: the oldest ComfyUI this pack is tested with (also ``requires-comfyui`` in pyproject.toml)
MIN_COMFYUI = (0, 3, 64)

#: node modules, in menu order
NODE_MODULES = ("loaders", "patch", "background", "sampler", "mask", "dataset", "train", "placement")


def _version_tuple(text: str) -> tuple[int, ...]:
    out = []
    for part in text.split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        if not digits:
            break
        out.append(int(digits))
    return tuple(out)


def check_comfyui_version() -> None:
    try:
        from comfyui_version import __version__ as version
    except ImportError:  # not every install ships the file
        return
    if _version_tuple(version) < MIN_COMFYUI:
        log.warning(
            "DualAnoDiff is tested with ComfyUI >= %s; this is %s. Update ComfyUI if nodes fail.",
            ".".join(map(str, MIN_COMFYUI)),
            version,
        )


def node_list() -> list[type[io.ComfyNode]]:
    nodes: list[type[io.ComfyNode]] = []
    for name in NODE_MODULES:
        try:
            module = importlib.import_module(f".{name}", __package__)
        except Exception:
            log.exception("DualAnoDiff: the node module %r failed to import; its nodes are unavailable.", name)
            continue
        nodes.extend(module.NODES)
    return nodes


class DualAnoDiffExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        check_comfyui_version()
        return node_list()
