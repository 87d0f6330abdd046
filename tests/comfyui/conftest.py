"""ComfyUI tests: they run in ComfyUI's interpreter (COMFYUI_PYTHON) with COMFYUI_PATH set, and skip elsewhere.

`python -m pytest` in the project's own environment runs this folder through tests/test_comfyui.py, which starts
`$COMFYUI_PYTHON -m pytest tests/comfyui` in a subprocess. Nothing here imports ComfyUI at collection time.
"""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: defect_data, anomalib_rules
import comfy_env  # noqa: E402

_REASON = comfy_env.skip_reason()


def pytest_collection_modifyitems(config, items):
    if _REASON is None:
        return
    here = os.path.dirname(os.path.abspath(__file__))
    mark = pytest.mark.skip(reason=_REASON)
    for item in items:
        if os.path.abspath(str(item.fspath)).startswith(here):
            item.add_marker(mark)


@pytest.fixture(scope="session")
def env():
    return comfy_env.setup()


@pytest.fixture()
def tiny(env):
    """A fresh tiny MODEL, CLIP and VAE for one test."""
    import types

    return types.SimpleNamespace(model=comfy_env.tiny_model(0), clip=comfy_env.tiny_clip(1), vae=comfy_env.tiny_vae(2))


@pytest.fixture()
def dirs(env, tmp_path):
    """ComfyUI's input/output folders and models/dualanodiff redirected into tmp_path for one test."""
    ns, restore = comfy_env.dirs(env, tmp_path)
    yield ns
    restore()


@pytest.fixture(scope="session")
def server(env, tmp_path_factory):
    """One headless ComfyUI server (CPU, this pack installed) for the server and frontend tests."""
    import comfy_server

    base = tmp_path_factory.mktemp("comfy_base")
    comfy_server.prepare_base(env, base)
    srv = comfy_server.Server(base)
    try:
        srv.start()
    except RuntimeError as e:
        pytest.fail(str(e))
    try:
        yield srv
    finally:
        srv.stop()
