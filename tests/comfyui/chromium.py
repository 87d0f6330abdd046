"""Headless Chromium driven over the Chrome DevTools Protocol, standard library only (the websocket client is
workflows/queue_batch.py's). Used by the frontend test to load the workflows in ComfyUI's own web page.

``find()`` says where Chromium is (or None); :class:`Chromium` starts it with a fresh profile on a free debugging
port, and stops it by its own PID.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--mute-audio",
]


def find() -> str | None:
    for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name:
            path = shutil.which(name)
            if path:
                return path
    return None


def _websocket_class():
    spec = importlib.util.spec_from_file_location("queue_batch_ws", ROOT / "workflows" / "queue_batch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.WebSocket


class CDPError(RuntimeError):
    pass


class Chromium:
    def __init__(self, executable: str, width: int = 1600, height: int = 1000):
        self.profile = tempfile.mkdtemp(prefix="dualanodiff-chromium-")
        self.width, self.height = width, height
        cmd = [
            executable,
            *FLAGS,
            f"--user-data-dir={self.profile}",
            "--remote-debugging-port=0",
            f"--window-size={width},{height}",
            "about:blank",
        ]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        self._id = 0
        self.console: list[str] = []
        try:
            port = self._port()
            pages = []
            deadline = time.monotonic() + 30
            while not pages and time.monotonic() < deadline:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as r:
                    pages = [p for p in json.loads(r.read()) if p.get("type") == "page"]
                time.sleep(0.1)
            if not pages:
                raise CDPError("Chromium opened no page")
            path = pages[0]["webSocketDebuggerUrl"].split(str(port), 1)[1]
            self.ws = _websocket_class()("127.0.0.1", port, path, timeout=30)
            self.call("Runtime.enable")
            self.call("Page.enable")
            self.call(
                "Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False
            )
        except BaseException:
            self.close()
            raise

    def _port(self) -> int:
        marker = Path(self.profile) / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise CDPError(f"Chromium exited ({self.proc.returncode}): {self.proc.stderr.read().decode()[-2000:]}")
            if marker.is_file():
                text = marker.read_text().split()
                if text:
                    return int(text[0])
            time.sleep(0.1)
        raise CDPError("Chromium did not open its debugging port within 60 s")

    # ---- protocol -------------------------------------------------------------------------------------------------
    def call(self, method: str, timeout: float = 60.0, **params):
        self._id += 1
        mid = self._id
        self.ws._send(0x1, json.dumps({"id": mid, "method": method, "params": params}).encode())
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise CDPError(f"{method}: no answer within {timeout:.0f} s")
            msg = self.ws.receive(min(left, 5.0))
            if msg is None:
                continue
            data = json.loads(msg[1])
            if data.get("id") == mid:
                if "error" in data:
                    raise CDPError(f"{method}: {data['error']}")
                return data.get("result", {})
            self._event(data)

    def _event(self, data: dict) -> None:
        if data.get("method") == "Runtime.consoleAPICalled":
            args = data["params"].get("args", [])
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in args)
            self.console.append(f"{data['params'].get('type')}: {text}")
        elif data.get("method") == "Runtime.exceptionThrown":
            d = data["params"].get("exceptionDetails", {})
            self.console.append(f"exception: {d.get('exception', {}).get('description', d.get('text'))}")

    def evaluate(self, expression: str, timeout: float = 60.0):
        """The value of a JavaScript expression (promises are awaited; the value comes back as JSON)."""
        r = self.call("Runtime.evaluate", timeout=timeout, expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in r:
            d = r["exceptionDetails"]
            raise CDPError(f"JavaScript error: {d.get('exception', {}).get('description', d.get('text'))}")
        return r.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float = 60.0, what: str = "") -> object:
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise CDPError(f"timed out waiting for {what or expression}; console: {self.console[-10:]}")
            time.sleep(0.25)

    def navigate(self, url: str, ready: str = "document.readyState === 'complete'", timeout: float = 90.0):
        self.call("Page.navigate", url=url)
        self.wait_for(ready, timeout, f"{url} to load")

    def screenshot(self, clip: dict | None = None, fmt: str = "png") -> bytes:
        params = {"format": fmt, "captureBeyondViewport": False}
        if clip:
            params["clip"] = dict(clip, scale=1)
        return base64.b64decode(self.call("Page.captureScreenshot", **params)["data"])

    def close(self) -> None:
        ws = getattr(self, "ws", None)
        if ws is not None:
            try:
                self.call("Browser.close", timeout=5)
            except Exception:  # noqa: BLE001 - it closes the socket as it goes
                pass
            ws.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        shutil.rmtree(self.profile, ignore_errors=True)
