"""ComfyUI-DualAnoDiff: ComfyUI entry point.

ComfyUI imports this folder as a custom node pack and calls :func:`comfy_entrypoint` (V3 node API). Importing the
package where ComfyUI is absent does not fail: the node modules are imported only when ComfyUI asks for them.
The method itself lives in ``dualanodiff_core`` (no ComfyUI imports); ``nodes/`` is the thin ComfyUI layer.
"""

__version__ = "0.1.0"


async def comfy_entrypoint():
    from .nodes import extension

    return extension.DualAnoDiffExtension()
