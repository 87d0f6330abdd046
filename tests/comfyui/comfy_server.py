"""A headless ComfyUI server for the server and frontend tests: CPU, this checkout symlinked into custom_nodes/, a
generated SD1.5-detectable checkpoint, DualAnoDiff weights, a background image and a tiny defect folder. Started on
a free 127.0.0.1 port and stopped by its own PID."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import comfy_env as ce

PACK_DIR_NAME = "ComfyUI-DualAnoDiff"
DEFECT_FOLDER = "toy_defect"
PHOTO_FOLDER = "normal_photos"
REGION_BOX = (8, 24, 40, 56)  # x0, y0, x1, y1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, timeout=10.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def post(url: str, body, timeout=10.0):
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), method="POST", headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.read()


def prepare_base(env, base: Path) -> None:
    import tiny_checkpoint
    from defect_data import make_flat
    from PIL import Image

    for sub in ("custom_nodes", "models/checkpoints", "models/dualanodiff", "input", "output"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    (base / "custom_nodes" / PACK_DIR_NAME).symlink_to(ce.ROOT, target_is_directory=True)
    tiny_checkpoint.write(base / "models/checkpoints/tiny_sd15.ckpt")
    tiny_checkpoint.dualanodiff_weights(env.core_weights.DualAnoDiffWeights).save(
        base / "models/dualanodiff/test_defect.safetensors"
    )
    image = Image.new("RGBA", (64, 64), (90, 120, 150, 255))
    image.paste((0, 0, 0, 0), (20, 20, 44, 44))  # transparent = the object, blacked out by BCM
    image.save(base / "input/background.png")
    make_flat(base / "input" / DEFECT_FOLDER, n=2, size=64)
    # placement workflow: a folder of normal photos and a region mask (white = defects allowed)
    (base / "input" / PHOTO_FOLDER).mkdir()
    for k, color in enumerate(((200, 60, 40), (40, 160, 90))):
        photo = Image.effect_noise((64, 64), 40).convert("RGB")
        Image.blend(photo, Image.new("RGB", (64, 64), color), 0.6).save(base / "input" / PHOTO_FOLDER / f"p{k}.png")
    region = Image.new("RGB", (64, 64), (0, 0, 0))
    region.paste((255, 255, 255), REGION_BOX)
    region.save(base / "input/region.png")


class Server:
    def __init__(self, base: Path):
        self.base = base
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.address = f"127.0.0.1:{self.port}"
        self.log = base / "server.log"
        self.proc = None

    def start(self, timeout: float = 180.0) -> Server:
        env_vars = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        cmd = [
            sys.executable,
            str(Path(os.environ["COMFYUI_PATH"]) / "main.py"),
            "--cpu",
            "--listen",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--base-directory",
            str(self.base),
            "--database-url",
            "sqlite:///:memory:",
            "--disable-api-nodes",
            "--preview-method",
            "latent2rgb",
        ]
        self._log = open(self.log, "w")
        self.proc = subprocess.Popen(
            cmd, cwd=str(self.base), stdout=self._log, stderr=subprocess.STDOUT, env=env_vars, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited ({self.proc.returncode}):\n{self.log.read_text()[-5000:]}")
            try:
                get(f"{self.url}/object_info/DualAnoDiffSampler", timeout=2)
                return self
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"ComfyUI did not answer within {timeout:.0f} s:\n{self.log.read_text()[-5000:]}"
                    ) from None
                time.sleep(0.5)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if getattr(self, "_log", None):
            self._log.close()

    def get(self, path: str, timeout=10.0):
        return get(self.url + path, timeout)

    def post(self, path: str, body, timeout=10.0):
        return post(self.url + path, body, timeout)

    def wait_history(self, prompt_id: str, timeout: float = 600.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if (
                entry
                and entry.get("status", {}).get("completed") is not None
                and entry["status"].get("status_str") in ("success", "error")
            ):
                return entry
            time.sleep(0.3)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout:.0f} s:\n{self.log.read_text()[-4000:]}")
