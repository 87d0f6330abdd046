#!/usr/bin/env python3
"""Queue a batch of a ComfyUI workflow over the HTTP API, follow its progress, and report where the outputs landed.

Standard library only: copy it anywhere and run it with any Python >= 3.9.

    python workflows/queue_batch.py workflows/api/dualanodiff_generate.json --count 8 --seed 1000
    python workflows/queue_batch.py "workflows/DualAnoDiff 2 - generate on your background (BCM).json" \\
        --server 192.168.1.20:8188 \\
        --seeds 1,2,3 --set DualAnoDiffLoRALoader.weights=bottle_broken.safetensors --set DualAnoDiffSampler.pairs=8

* WORKFLOW is API format ("Export (API)" in ComfyUI) or UI format (a saved workflow / template); UI format is
  converted with the server's /object_info, the way the web page converts it.
* Each queued prompt gets its own seed (``--seed S --count N`` = S, S+1, ..., or ``--seeds a,b,c``; with ``--count N``
  alone the workflow's own seed counts up) in every integer input named ``seed`` or ``noise_seed`` (or the inputs
  named with ``--seed-input``); the DualAnoDiff Trainer's seed is a training setting and is left alone. A workflow
  without a seed input is not queued more than once (the copies would be identical).
* ``--set SELECTOR.INPUT=VALUE`` changes an input first; SELECTOR is a node id, a node title or a node type (every
  node of that type); VALUE is JSON (``3``, ``2.5``, ``"text"``, ``true``) or else a plain string. It is checked
  against the server's node definitions: an input the node does not have, or a value it cannot take, is refused.
* ``--server`` takes HOST, HOST:PORT or http(s)://HOST:PORT (the port defaults to 8188, ComfyUI's own).
* Several servers (``--server A --server B ...``, e.g. one ComfyUI per GPU): each prompt goes to the server with the
  shortest queue, at most ``--per-server`` of ours waiting on each; all are followed (by polling /history); when a
  server goes down (refuses connections, or no usable answer for 120 s), its unfinished prompts are queued again on
  the others. The report names the server of every prompt and output.
* Progress comes from the server's websocket (/ws); ``--poll`` polls /history instead.
* At the end every output file is listed as ``<type>/<subfolder>/<filename>`` (``output/...`` is under the server's
  output directory) with its /view URL; ``--download DIR`` fetches them and ``--summary FILE`` writes a JSON report.
  What nodes tell the user (e.g. a warning shown on the node in the web page) is printed too.
* ComfyUI answers a prompt identical to an earlier one from its cache without running it: such a prompt is reported
  as ``cached`` (no new files; the files listed are an earlier prompt's).

Exit status: 0 when every prompt succeeded (or was answered from the cache), 1 when one failed or was interrupted,
2 when nothing could be queued (bad arguments, unreachable server, a workflow the server rejects).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import http.client
import json
import os
import socket
import struct
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

SEED_INPUTS = ("seed", "noise_seed")
#: nodes whose seed is a setting, not a per-run seed: --seed/--seeds leave it alone (a training run must keep its
#: seed to be resumed); --seed-input can still name it
FIXED_SEED_NODES = ("DualAnoDiffTrainer",)
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
FRONTEND_ONLY = ("Note", "MarkdownNote", "Reroute", "PrimitiveNode")


class UsageError(Exception):
    """Nothing was queued: the message says why."""


class NoAnswer(UsageError):
    """A request got no usable answer. ``refused``: nothing listens on the server's port any more (the server is
    gone); otherwise a timeout or an answer cut off, which a busy but working server also gives under load."""

    def __init__(self, message: str, refused: bool = False):
        super().__init__(message)
        self.refused = refused


# ----------------------------------------------------------------------------------------------------------------
# HTTP


DEFAULT_PORT = 8188
#: seconds one HTTP request may take
REQUEST_TIMEOUT = 30.0
#: with several servers: how long a server may go without a usable answer (timeouts, cut-off answers) before its
#: prompts are queued again elsewhere; a server that refuses connections is given up at once. A server that only
#: answers slowly (its machine is busy) keeps its prompts: queueing them again would run them twice.
DOWN_AFTER = 120.0


def parse_server(text: str) -> tuple[str, str, int]:
    """``host``, ``host:port``, ``http(s)://host[:port]`` or ``[ipv6]:port`` -> (scheme, host, port); the port
    defaults to ComfyUI's 8188 (443 for an explicit ``https://`` without a port). A bad address raises UsageError."""
    raw = str(text or "").strip()
    example = "give HOST, HOST:PORT or http(s)://HOST:PORT, e.g. 127.0.0.1:8188"
    scheme, rest = "http", raw
    if "://" in raw:
        scheme, rest = raw.split("://", 1)
        scheme = scheme.lower()
        if scheme not in ("http", "https"):
            raise UsageError(f"--server {raw!r}: the scheme must be http:// or https://; {example}")
    rest = rest.rstrip("/")
    if "/" in rest or "?" in rest or "#" in rest or "@" in rest:
        raise UsageError(f"--server {raw!r}: give the server address only, without a path; {example}")
    port_text = None
    if rest.startswith("["):  # [ipv6] or [ipv6]:port
        host, bracket, tail = rest[1:].partition("]")
        if not bracket or (tail and not tail.startswith(":")):
            raise UsageError(f"--server {raw!r}: write an IPv6 address as [ADDRESS]:PORT; {example}")
        port_text = tail[1:] if tail else None
    elif rest.count(":") == 1:
        host, _, port_text = rest.partition(":")
    else:
        host = rest  # a host name, an IPv4 address, or a bare IPv6 address (no port)
    allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_:")
    if not host or not set(host) <= allowed or (":" in host and not set(host) <= set("0123456789abcdefABCDEF:.")):
        raise UsageError(f"--server {raw!r}: {host or 'the host'!r} is not a host name or address; {example}")
    if port_text is None:
        port = 443 if scheme == "https" and "://" in raw else DEFAULT_PORT
    elif not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise UsageError(f"--server {raw!r}: the port must be a number from 1 to 65535, got {port_text!r}")
    else:
        port = int(port_text)
    return scheme, host, port


class Server:
    def __init__(self, address: str, timeout: float | None = None):
        self.scheme, self.host, self.port = parse_server(address)
        shown = f"[{self.host}]" if ":" in self.host else self.host
        self.base = f"{self.scheme}://{shown}:{self.port}"
        self.timeout = REQUEST_TIMEOUT if timeout is None else timeout

    def request(self, method: str, path: str, body=None):
        data = None if body is None else json.dumps(body).encode("utf-8")
        req = urllib.request.Request(
            self.base + path, data=data, method=method, headers={"Content-Type": "application/json"} if data else {}
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                payload = json.loads(raw)
            except ValueError:
                payload = raw.decode("utf-8", "replace")
            raise HTTPError(e.code, payload) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            # HTTPException: an answer cut off (IncompleteRead, BadStatusLine) when the server dies while answering
            reason = getattr(e, "reason", e)
            raise NoAnswer(
                f"cannot reach the ComfyUI server at {self.base} ({reason or type(reason).__name__}): is it running? "
                "Start it (python main.py) or give its address with --server HOST:PORT.",
                refused=isinstance(reason, ConnectionRefusedError),
            ) from None
        try:
            return json.loads(raw) if raw else None
        except ValueError:
            raise NoAnswer(f"the server at {self.base} answered {path} with something that is not JSON") from None

    def get(self, path: str):
        return self.request("GET", path)

    def post(self, path: str, body):
        return self.request("POST", path, body)

    def download(self, image: dict, folder: str) -> str:
        query = urllib.parse.urlencode({k: image.get(k, "") for k in ("filename", "subfolder", "type")})
        target = os.path.join(folder, image.get("subfolder", ""), image["filename"])
        os.makedirs(os.path.dirname(target), exist_ok=True)
        try:
            with urllib.request.urlopen(f"{self.base}/view?{query}", timeout=self.timeout) as resp:
                data = resp.read()
        except http.client.HTTPException as e:  # cut off: reported like the other download failures
            raise OSError(f"{self.base}: {type(e).__name__}: {e}") from None
        tmp = target + ".part"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
        return target

    def view_url(self, image: dict) -> str:
        return f"{self.base}/view?" + urllib.parse.urlencode(
            {k: image.get(k, "") for k in ("filename", "subfolder", "type")}
        )


class HTTPError(Exception):
    def __init__(self, status: int, payload):
        super().__init__(f"HTTP {status}")
        self.status, self.payload = status, payload


def describe_rejection(payload) -> str:
    """A readable version of ComfyUI's 400 answer to /prompt."""
    if not isinstance(payload, dict):
        return str(payload)
    lines = []
    err = payload.get("error")
    if isinstance(err, dict):
        lines.append(f"{err.get('message', 'rejected')}{': ' + err['details'] if err.get('details') else ''}")
    for node_id, info in (payload.get("node_errors") or {}).items():
        for e in info.get("errors", []):
            detail = e.get("details") or e.get("message")
            lines.append(f"  node {node_id} ({info.get('class_type', '?')}): {detail}")
    return "\n".join(lines) or json.dumps(payload)


# ----------------------------------------------------------------------------------------------------------------
# a minimal websocket client (RFC 6455, text and binary frames, ping/pong, close)


class WebSocket:
    GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

    def __init__(self, host: str, port: int, path: str, timeout: float = 10.0, tls: bool = False):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        if tls:
            import ssl

            self.sock = ssl.create_default_context().wrap_socket(self.sock, server_hostname=host)
        key = base64.b64encode(os.urandom(16)).decode("ascii")
        self.sock.sendall(
            (
                f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode("ascii")
        )
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise OSError("the server closed the websocket handshake")
            head += chunk
        head, self.buffer = head.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        if " 101 " not in lines[0] + " ":
            raise OSError(f"websocket handshake refused: {lines[0]}")
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
        expected = base64.b64encode(hashlib.sha1((key + self.GUID).encode("ascii")).digest()).decode("ascii")
        if headers.get("sec-websocket-accept") != expected:
            raise OSError("websocket handshake: bad Sec-WebSocket-Accept")

    def _read(self, n: int) -> bytes:
        while len(self.buffer) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("the websocket was closed by the server")
            self.buffer += chunk
        out, self.buffer = self.buffer[:n], self.buffer[n:]
        return out

    def _send(self, opcode: int, payload: bytes = b"") -> None:
        mask = os.urandom(4)
        n = len(payload)
        if n < 126:
            header = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
        elif n < 65536:
            header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
        else:
            header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(header + mask + masked)

    def receive(self, timeout: float):
        """The next complete message as (opcode, payload), or None when nothing arrived within ``timeout``."""
        self.sock.settimeout(timeout)
        parts, opcode = [], None
        try:
            while True:
                b1, b2 = self._read(2)
                fin, op, n = b1 & 0x80, b1 & 0x0F, b2 & 0x7F
                self.sock.settimeout(30.0)  # the rest of a started frame must follow
                if n == 126:
                    n = struct.unpack("!H", self._read(2))[0]
                elif n == 127:
                    n = struct.unpack("!Q", self._read(8))[0]
                mask = self._read(4) if b2 & 0x80 else None
                payload = self._read(n)
                if mask:
                    payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
                if op == 0x9:
                    self._send(0xA, payload)
                    continue
                if op == 0xA:
                    continue
                if op == 0x8:
                    raise ConnectionError("the websocket was closed by the server")
                if op != 0x0:
                    opcode = op
                parts.append(payload)
                if fin:
                    return opcode, b"".join(parts)
        except TimeoutError:
            if parts:
                raise ConnectionError("a websocket message was cut off") from None
            return None

    def close(self) -> None:
        try:
            self._send(0x8)
        except OSError:
            pass
        self.sock.close()


# ----------------------------------------------------------------------------------------------------------------
# workflows


def is_ui_format(workflow) -> bool:
    return isinstance(workflow, dict) and isinstance(workflow.get("nodes"), list) and "links" in workflow


def _input_specs(info: dict):
    order = info.get("input_order") or {k: list(v) for k, v in info.get("input", {}).items() if k != "hidden"}
    for section in ("required", "optional"):
        for name in order.get(section, []):
            yield name, info["input"].get(section, {}).get(name)


def _is_widget(spec) -> bool:
    if not spec:
        return False
    kind = spec[0]
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if options.get("forceInput"):
        return False
    return isinstance(kind, list) or kind in WIDGET_TYPES


def _extra_widget_slots(spec, name: str | None = None) -> int:
    """Frontend-only widget values that follow an input's value in ``widgets_values``: "control after generate"
    (asked for, or by the frontend's legacy rule for an INT named seed/noise_seed) and image upload buttons."""
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    control = options.get("control_after_generate")
    if control is None:
        control = spec[0] == "INT" and name in ("seed", "noise_seed")
    extra = 1 if control else 0
    extra += sum(1 for k, v in options.items() if k.endswith("_upload") and v is True)
    return extra


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """Convert a UI-format workflow to API format using /object_info (muted nodes dropped, bypassed nodes and
    reroutes passed through, primitive nodes resolved to their values)."""
    nodes = {n["id"]: n for n in workflow["nodes"]}
    links = {}
    for link in workflow.get("links", []):
        if isinstance(link, dict):
            links[link["id"]] = (link["origin_id"], link["origin_slot"], link.get("type"))
        else:
            links[link[0]] = (link[1], link[2], link[5] if len(link) > 5 else None)
    if workflow.get("definitions", {}).get("subgraphs"):
        raise UsageError("this workflow uses subgraphs; open it in ComfyUI and use 'Export (API)' instead.")
    missing = sorted(
        {
            n["type"]
            for n in nodes.values()
            if n.get("mode", 0) != 2 and n["type"] not in object_info and n["type"] not in FRONTEND_ONLY
        }
    )
    if missing:
        raise UsageError(
            f"the server does not know the node types {', '.join(missing)}; install the packs that "
            "provide them (ComfyUI-Manager: 'Install Missing Custom Nodes')."
        )

    def source(link_id, depth=0):
        """Follow a link back through reroutes and bypassed nodes: ("link", [id, slot]) or ("value", v) or None."""
        if link_id is None or link_id not in links or depth > 100:
            return None
        node_id, slot, kind = links[link_id]
        node = nodes.get(node_id)
        if node is None or node.get("mode", 0) == 2:
            return None
        if node["type"] == "Reroute":
            return source((node.get("inputs") or [{}])[0].get("link"), depth + 1)
        if node["type"] == "PrimitiveNode":
            return ("value", (node.get("widgets_values") or [None])[0])
        if node.get("mode", 0) == 4:  # bypassed: pass the first input of the same type through
            for inp in node.get("inputs") or []:
                if inp.get("link") is not None and (kind is None or inp.get("type") == kind):
                    return source(inp["link"], depth + 1)
            return None
        return ("link", [str(node_id), slot])

    api = {}
    for node in sorted(nodes.values(), key=lambda n: n["id"]):
        if node.get("mode", 0) in (2, 4) or node["type"] in FRONTEND_ONLY:
            continue
        info = object_info[node["type"]]
        ui_inputs = {i["name"]: i for i in node.get("inputs") or []}
        values = node.get("widgets_values")
        index, inputs = 0, {}
        for name, spec in _input_specs(info):
            if _is_widget(spec):
                if isinstance(values, dict):
                    if name in values:
                        inputs[name] = values[name]
                elif values is not None and index < len(values):
                    inputs[name] = values[index]
                index += 1 + _extra_widget_slots(spec, name)
            linked = ui_inputs.get(name, {}).get("link")
            if linked is not None:
                src = source(linked)
                if src is not None:
                    inputs[name] = src[1]
        entry = {"inputs": inputs, "class_type": node["type"]}
        if node.get("title"):
            entry["_meta"] = {"title": node["title"]}
        api[str(node["id"])] = entry
    return api


def _select(workflow: dict, selector: str) -> list[str]:
    if selector in workflow:
        return [selector]
    by_title = [k for k, v in workflow.items() if (v.get("_meta") or {}).get("title") == selector]
    by_type = [k for k, v in workflow.items() if v.get("class_type") == selector]
    found = by_title or by_type
    if not found:
        raise UsageError(f"no node {selector!r} in the workflow (give a node id, a title or a node type).")
    return found


def _parse_assignment(text: str):
    target, eq, raw = text.partition("=")
    selector, dot, name = target.rpartition(".")
    if not eq or not dot or not selector or not name:
        raise UsageError(f"--set {text!r}: write SELECTOR.INPUT=VALUE, e.g. DualAnoDiffSampler.pairs=8")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    return selector, name, value


def _node_inputs(info: dict) -> dict:
    """{input name: spec} of a node type (required and optional; hidden inputs are not settable)."""
    inputs = {}
    for section in ("required", "optional"):
        inputs.update(info.get("input", {}).get(section, {}) or {})
    return inputs


def _combo_options(spec):
    if not spec:
        return None
    if isinstance(spec[0], list):
        return spec[0]
    if spec[0] == "COMBO":
        options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
        return options.get("options")
    return None


def check_value(label: str, spec, value):
    """``value`` as the input ``spec`` (from /object_info) takes it, or UsageError saying what is wrong."""
    if not spec:
        return value
    kind = spec[0]
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    choices = _combo_options(spec)
    if choices is not None:
        if value not in choices:
            shown = ", ".join(repr(c) for c in choices[:12]) + (
                f", ... ({len(choices)} in all)" if len(choices) > 12 else ""
            )
            raise UsageError(f"{label}: {value!r} is not one of the choices: {shown or '(none: the list is empty)'}")
        return value
    if kind == "INT":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise UsageError(f"{label}: {value!r} is not a whole number")
        value = int(value)
    elif kind == "FLOAT":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UsageError(f"{label}: {value!r} is not a number")
        value = float(value)
    elif kind == "BOOLEAN":
        if not isinstance(value, bool):
            raise UsageError(f"{label}: {value!r} is not true or false")
        return value
    elif kind == "STRING":
        return value if isinstance(value, str) else json.dumps(value)
    elif kind not in WIDGET_TYPES:
        raise UsageError(f"{label}: this input takes a connection ({kind}) from another node, not a value")
    else:
        return value
    low, high = options.get("min"), options.get("max")
    if low is not None and value < low or high is not None and value > high:
        raise UsageError(f"{label}: {value} is outside the allowed range {low} to {high}")
    return value


def _check_input(label: str, node: dict, name: str, object_info: dict | None):
    """The /object_info spec of input ``name`` of ``node``; UsageError naming the node's real inputs if it has none
    (None when the server's node list is not known)."""
    if object_info is None:
        return None
    info = object_info.get(node.get("class_type"))
    if info is None:
        raise UsageError(f"{label}: the server does not know the node type {node.get('class_type')!r}")
    inputs = _node_inputs(info)
    if name not in inputs:
        import difflib

        close = difflib.get_close_matches(name, list(inputs), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UsageError(
            f"{label}: {node.get('class_type')} has no input {name!r}.{hint} Its inputs: {', '.join(inputs)}"
        )
    return inputs[name]


def apply_overrides(workflow: dict, assignments, object_info: dict | None = None) -> dict:
    """Apply ``--set SELECTOR.INPUT=VALUE`` changes; with ``object_info`` (the server's /object_info) an unknown
    input or a value the input cannot take is refused before anything is queued."""
    workflow = json.loads(json.dumps(workflow))
    for text in assignments or []:
        selector, name, value = _parse_assignment(text)
        for key in _select(workflow, selector):
            label = f"--set {text!r} (node {key})"
            spec = _check_input(label, workflow[key], name, object_info)
            inputs = workflow[key].setdefault("inputs", {})
            if isinstance(inputs.get(name), list):
                raise UsageError(f"--set {text!r}: input {name!r} of node {key} is connected to another node.")
            inputs[name] = check_value(label, spec, value)
    return workflow


def seed_targets(workflow: dict, explicit=None, object_info: dict | None = None) -> list[tuple[str, str]]:
    if explicit:
        targets = []
        for text in explicit:
            selector, dot, name = text.rpartition(".")
            if not dot:
                raise UsageError(f"--seed-input {text!r}: write SELECTOR.INPUT, e.g. 7.seed")
            for key in _select(workflow, selector):
                _check_input(f"--seed-input {text!r} (node {key})", workflow[key], name, object_info)
                if isinstance((workflow[key].get("inputs") or {}).get(name), list):
                    raise UsageError(
                        f"--seed-input {text!r}: input {name!r} of node {key} is connected to another node."
                    )
                targets.append((key, name))
        return targets
    return [
        (key, name)
        for key, node in workflow.items()
        for name, value in (node.get("inputs") or {}).items()
        if name in SEED_INPUTS
        and isinstance(value, int)
        and not isinstance(value, bool)
        and node.get("class_type") not in FIXED_SEED_NODES
    ]


def plan_seeds(workflow: dict, targets, count: int, seed=None, seeds_text=None) -> list[dict]:
    """One ``{(node, input): seed}`` per prompt to queue. ``--seeds`` gives each prompt its seed, ``--seed S``
    counts up from S; otherwise the workflow's own seeds count up (prompt i gets seed + i), so that ``--count N``
    never queues N identical prompts (ComfyUI would answer the repeats from its cache without running them)."""
    if seeds_text is not None:
        try:
            values = [int(x) for x in seeds_text.split(",") if x.strip()]
        except ValueError:
            raise UsageError(f"--seeds {seeds_text!r}: give integers separated by commas") from None
        if not values:
            raise UsageError(f"--seeds {seeds_text!r}: give at least one seed")
        plans = [{t: v for t in targets} for v in values]
    else:
        if count < 1:
            raise UsageError(f"--count {count}: give at least 1")
        if seed is not None:
            plans = [{t: seed + i for t in targets} for i in range(count)]
        else:
            own = {t: workflow[t[0]]["inputs"].get(t[1]) for t in targets}
            if count > 1 and not all(isinstance(v, int) and not isinstance(v, bool) for v in own.values()):
                raise UsageError("--count: a seed input is connected to another node; give --seed or --seeds")
            plans = [{t: v + i for t, v in own.items()} for i in range(count)]
    n = len(plans)
    if n > 1 and not targets:
        raise UsageError(
            f"{n} prompts would be identical: the workflow has no seed input (an integer input named seed or "
            "noise_seed), and ComfyUI answers a repeated prompt from its cache without running it. Name the "
            "input that varies with --seed-input SELECTOR.INPUT."
        )
    if (seed is not None or seeds_text is not None) and not targets:
        raise UsageError(
            "the workflow has no seed input (an integer input named seed/noise_seed); name one "
            "with --seed-input SELECTOR.INPUT"
        )
    for plan in plans:
        for v in plan.values():
            if not 0 <= v <= 0xFFFFFFFFFFFFFFFF:
                raise UsageError(f"seed {v}: seeds must be between 0 and 2**64-1")
    return plans


# ----------------------------------------------------------------------------------------------------------------
# running


class Job:
    def __init__(self, index: int, seed, prompt_id: str, nodes: int = 0, server=None):
        self.index, self.seed, self.prompt_id, self.nodes = index, seed, prompt_id, nodes
        self.server = server  # where it runs (several servers)
        self.tries: list[str] = []  # servers that went down while holding it
        self.status = "queued"  # queued, running, success, cached, error, interrupted
        self.error = None
        self.outputs: list[dict] = []
        self.messages: list[str] = []  # what nodes said to the user (ComfyUI's progress text)
        self.node = None

    @property
    def label(self) -> str:
        return f"seed {self.seed}" if self.seed is not None else f"prompt {self.index + 1}"


def _log(quiet: bool, message: str, end: str = "\n") -> None:
    if not quiet:
        sys.stderr.write(message + end)
        sys.stderr.flush()


def _collect(server: Server, job: Job) -> bool:
    """Read the job's history entry; True when it finished."""
    history = server.get(f"/history/{job.prompt_id}") or {}
    entry = history.get(job.prompt_id)
    if not entry:
        return False
    status = entry.get("status") or {}
    if not status.get("completed", False) and status.get("status_str") != "error":
        return False
    cached = set()
    for event, data in status.get("messages", []):
        if event == "execution_cached":
            cached.update(str(n) for n in data.get("nodes") or [])
    if status.get("status_str") == "error":
        job.status = "error"
        for event, data in status.get("messages", []):
            if event == "execution_error":
                kind = str(data.get("exception_type", "")).rsplit(".", 1)[-1]
                job.error = (
                    f"node {data.get('node_id')} ({data.get('node_type')}): "
                    f"{kind}: {str(data.get('exception_message', '')).strip()}"
                )
            elif event == "execution_interrupted":
                job.status, job.error = "interrupted", "interrupted"
    elif job.nodes and len(cached) >= job.nodes:
        # nothing ran: ComfyUI answered from its cache (an earlier prompt had the same inputs)
        job.status = "cached"
    else:
        job.status = "success"
    job.outputs = []
    for node_id, out in (entry.get("outputs") or {}).items():
        for kind, items in out.items():
            if not isinstance(items, list):
                continue
            for item in items:
                if isinstance(item, dict) and "filename" in item:
                    job.outputs.append(dict(item, node=node_id, kind=kind, cached=str(node_id) in cached))
    return True


def _describe(job: Job) -> str:
    if job.status == "cached":
        return "cached: ComfyUI did not run it (an earlier prompt had the same inputs); no new files"
    return job.status + (f": {job.error}" if job.error else "")


def node_text(payload: bytes):
    """(node id, text) of a ComfyUI binary "text" message (event 3: a node's progress text), else None."""
    if len(payload) < 8 or struct.unpack(">I", payload[:4])[0] != 3:
        return None
    n = struct.unpack(">I", payload[4:8])[0]
    if len(payload) < 8 + n:
        return None
    return payload[8 : 8 + n].decode("utf-8", "replace"), payload[8 + n :].decode("utf-8", "replace")


def follow(server: Server, jobs: list[Job], ws: WebSocket | None, timeout: float, quiet: bool, names: dict):
    pending = {job.prompt_id: job for job in jobs}
    deadline = time.monotonic() + timeout
    tty = sys.stderr.isatty()
    last_poll = 0.0
    current = None
    while pending:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(pending)} prompt(s) still unfinished after {timeout:.0f} s")
        message = None
        if ws is not None:
            try:
                message = ws.receive(timeout=1.0)
            except (ConnectionError, OSError) as e:
                _log(quiet, f"websocket lost ({e}); polling /history instead")
                ws = None
        else:
            time.sleep(0.5)
        if message and message[0] == 0x2 and current is not None:
            said = node_text(message[1])
            if said is not None and said[1].strip():
                node, text = said
                current.messages.append(f"node {node} ({names.get(node, '?')}): {text.strip()}")
                _log(quiet, f"[{current.index + 1}/{len(jobs)} {current.label}] {current.messages[-1]}")
        if message and message[0] == 0x1:
            try:
                msg = json.loads(message[1])
            except ValueError:
                msg = {}
            data = msg.get("data") or {}
            job = pending.get(data.get("prompt_id"))
            kind = msg.get("type")
            if job is not None:
                label = f"[{job.index + 1}/{len(jobs)} {job.label}]"
                if kind == "execution_start":
                    job.status, current = "running", job
                    _log(quiet, f"{label} started")
                elif kind == "executing" and data.get("node") is not None:
                    job.node, current = data["node"], job
                    _log(quiet, f"{label} node {job.node} ({names.get(job.node, '?')})")
                elif kind == "progress":
                    text = f"{label} node {data.get('node')}: step {data.get('value')}/{data.get('max')}"
                    if tty:
                        _log(quiet, "\r" + text, end="" if data.get("value") != data.get("max") else "\n")
                    elif data.get("value") == data.get("max"):
                        _log(quiet, text)
                elif kind in ("execution_success", "execution_error", "execution_interrupted") or (
                    kind == "executing" and data.get("node") is None
                ):
                    if _collect(server, job):
                        del pending[job.prompt_id]
                        _log(quiet, f"{label} {_describe(job)}")
        now = time.monotonic()
        if ws is None or now - last_poll > 5.0:  # also covers messages missed while connecting
            last_poll = now
            for prompt_id, job in list(pending.items()):
                if _collect(server, job):
                    del pending[prompt_id]
                    _log(quiet, f"[{job.index + 1}/{len(jobs)} {job.label}] {_describe(job)}")


def prepare(args, workflow, object_info: dict):
    """(API workflow with --set applied, seed targets, seed plans), checked against the server's /object_info."""
    if is_ui_format(workflow):
        workflow = ui_to_api(workflow, object_info)
    elif not (
        isinstance(workflow, dict)
        and workflow
        and all(isinstance(v, dict) and "class_type" in v for v in workflow.values())
    ):
        raise UsageError(f"{args.workflow} is neither an API-format nor a UI-format ComfyUI workflow.")
    workflow = apply_overrides(workflow, args.set, object_info)
    targets = seed_targets(workflow, args.seed_input, object_info)
    plans = plan_seeds(workflow, targets, args.count, args.seed, args.seeds)
    return workflow, targets, plans


# ----------------------------------------------------------------------------------------------------------------
# several servers


def queue_length(server: Server) -> int:
    """Prompts waiting or running on ``server`` (everyone's, not only ours)."""
    info = server.get("/prompt") or {}
    return int((info.get("exec_info") or {}).get("queue_remaining", 0))


def run_many(args, workflow, addresses: list[str]) -> int:
    """Spread the prompts over several servers: shortest queue first, at most ``--per-server`` of ours on each,
    follow them all by polling, queue a prompt again elsewhere when its server goes down."""
    quiet = args.quiet
    try:
        servers = [Server(a) for a in addresses]
        if args.per_server < 1:
            raise UsageError(f"--per-server {args.per_server}: give at least 1")
        alive, object_info = [], None
        failing_since: dict[str, float] = {}  # server -> when its requests started failing (see DOWN_AFTER)
        for srv in servers:
            try:
                info = srv.get("/object_info")
            except NoAnswer as e:
                if e.refused:
                    _log(quiet, f"warning: {e} Going on without it.")
                    continue
                # slow, not gone (its /object_info is the slowest answer of all): tried again while running
                _log(quiet, f"warning: {srv.base} did not answer in time ({e}); trying it again while running")
                failing_since[srv.base] = time.monotonic()
                alive.append(srv)
                continue
            except HTTPError as e:
                _log(quiet, f"warning: {srv.base} answered /object_info with HTTP {e.status}. Going on without it.")
                continue
            object_info = object_info or info
            alive.append(srv)
        if object_info is None:
            raise UsageError("none of the servers answers: " + ", ".join(s.base for s in servers))
        workflow, targets, plans = prepare(args, workflow, object_info)
    except UsageError as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    client_id = uuid.uuid4().hex
    n = len(plans)
    jobs: list[Job | None] = [None] * n
    todo = list(range(n))  # prompts not queued on a live server, in order
    flying: dict[str, dict[str, tuple[int, Job]]] = {s.base: {} for s in alive}
    lost: list[str] = []
    deadline = time.monotonic() + args.timeout
    label = lambda i: f"[{i + 1}/{n}" + (f" seed {plans[i][targets[0]]}]" if targets else "]")  # noqa: E731

    def down(srv: Server, why: str) -> None:
        """``srv`` stopped answering: its unfinished prompts go back to the front of the line."""
        if srv not in alive:
            return
        alive.remove(srv)
        lost.append(srv.base)
        back = sorted(i for i, _ in flying.pop(srv.base).values())
        for i in back:
            jobs[i].tries.append(srv.base)
        todo[:0] = back
        _log(
            quiet,
            f"server {srv.base} went down ({why}); "
            + (f"queueing {len(back)} prompt(s) again on the others" if back else "none of ours was on it"),
        )

    def no_answer(srv: Server, e: UsageError) -> None:
        """A request to ``srv`` failed: it is down when it refuses connections, or after DOWN_AFTER seconds without
        a usable answer; until then it keeps its prompts (a server that is only slow would run them twice)."""
        since = failing_since.setdefault(srv.base, time.monotonic())
        if getattr(e, "refused", False) or time.monotonic() - since >= DOWN_AFTER:
            down(srv, "connection refused" if getattr(e, "refused", False) else f"no answer for {DOWN_AFTER:.0f} s")

    def answered(srv: Server) -> None:
        failing_since.pop(srv.base, None)

    def prompt_for(i: int) -> dict:
        prompt = json.loads(json.dumps(workflow))
        for (key, name), value in plans[i].items():
            prompt[key]["inputs"][name] = value
        return prompt

    rejected = False
    while todo or any(flying.values()):
        if time.monotonic() > deadline:
            sys.stderr.write(f"error: prompts still unfinished after {args.timeout:.0f} s\n")
            break
        if not alive:
            break
        # dispatch: the server with the shortest queue that has room for one more of ours
        while todo and not rejected:
            room = [s for s in alive if len(flying[s.base]) < args.per_server]
            if not room:
                break
            lengths = {}
            for srv in room:
                try:
                    lengths[srv.base] = queue_length(srv)
                    answered(srv)
                except UsageError as e:
                    no_answer(srv, e)
                except HTTPError:
                    lengths[srv.base] = len(flying[srv.base])
            room = [s for s in room if s.base in lengths]
            if not room:
                break  # none answered: follow what is running, try again after the pause
            srv = min(room, key=lambda s: (lengths[s.base], len(flying[s.base]), alive.index(s)))
            i = todo[0]
            try:
                answer = srv.post("/prompt", {"prompt": prompt_for(i), "client_id": client_id})
            except UsageError as e:
                no_answer(srv, e)
                break  # try again after the pause (on another server if this one is down now)
            except HTTPError as e:
                _log(quiet, f"{label(i)} rejected by {srv.base}:\n{describe_rejection(e.payload)}")
                if all(j is None for j in jobs):
                    sys.stderr.write(
                        "error: the server rejected the workflow:\n" + describe_rejection(e.payload) + "\n"
                    )
                    return 2
                rejected = True  # the same workflow: the rest would be rejected too
                break
            todo.pop(0)
            seed = plans[i][targets[0]] if targets else None
            job = Job(i, seed, answer["prompt_id"], nodes=len(workflow), server=srv)
            if jobs[i] is not None:
                job.tries = jobs[i].tries
            jobs[i] = job
            flying[srv.base][job.prompt_id] = (i, job)
            _log(quiet, f"{label(i)} queued on {srv.base}: {job.prompt_id}" + (" (again)" if job.tries else ""))
        # follow: poll every prompt in flight
        time.sleep(0.5)
        for srv in list(alive):
            for prompt_id, (i, job) in list(flying.get(srv.base, {}).items()):
                try:
                    finished = _collect(srv, job)
                    answered(srv)
                except (UsageError, HTTPError) as e:
                    no_answer(srv, e)
                    break
                if finished:
                    del flying[srv.base][prompt_id]
                    _log(quiet, f"{label(i)} {_describe(job)} on {srv.base}")
        if rejected and not any(flying.values()):
            break
    report = []
    for i in range(n):
        job = jobs[i]
        seed = plans[i][targets[0]] if targets else None
        if job is None or i in todo:
            why = "not run: every server went down" if not alive else "not queued"
            if rejected:
                why = "not queued: the server rejected the workflow"
            report.append(
                {
                    "index": i,
                    "seed": seed,
                    "server": None,
                    "status": "error",
                    "error": why,
                    "tries": job.tries if job else [],
                    "messages": [],
                    "outputs": [],
                }
            )
            continue
        files = []
        for item in job.outputs:
            rel = "/".join(p for p in (item.get("type", "output"), item.get("subfolder", ""), item["filename"]) if p)
            entry = {"node": item["node"], "path": rel, "url": job.server.view_url(item), "cached": item["cached"]}
            if args.download:
                try:
                    entry["downloaded"] = job.server.download(
                        item, os.path.join(args.download, _server_folder(job.server))
                    )
                except OSError as e:  # e.g. that server went down after the prompt finished
                    entry["download_error"] = str(e)
            files.append(entry)
        status = job.status if job.status not in ("queued", "running") else "error"
        report.append(
            {
                "index": i,
                "prompt_id": job.prompt_id,
                "seed": seed,
                "server": job.server.base,
                "status": status,
                "error": job.error if status == job.status else "unfinished",
                "tries": job.tries,
                "messages": job.messages,
                "outputs": files,
            }
        )
    for r in report:
        head = f"seed {r['seed']}" if r["seed"] is not None else f"prompt {r['index'] + 1}"
        where = f" on {r['server']}" if r["server"] else ""
        again = f" (queued again after {', '.join(r['tries'])} went down)" if r["tries"] else ""
        print(f"{head}: {r['status']}{': ' + r['error'] if r.get('error') else ''}{where}{again}")
        for m in r["messages"]:
            print(f"  {m}")
        for f in r["outputs"]:
            got = f"  -> {f['downloaded']}" if "downloaded" in f else ""
            got += f"  (not downloaded: {f['download_error']})" if "download_error" in f else ""
            print(f"  {f['path']}  {f['url']}" + got)
    per = {}
    for r in report:
        if r["server"] and r["status"] in ("success", "cached"):
            per[r["server"]] = per.get(r["server"], 0) + 1
    print(
        "per server: "
        + ", ".join(f"{s.base} {per.get(s.base, 0)}" for s in servers)
        + (f"; went down: {', '.join(lost)}" if lost else "")
    )
    if args.summary:
        tmp = args.summary + ".part"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(
                {"servers": [s.base for s in servers], "went_down": lost, "workflow": args.workflow, "prompts": report},
                f,
                indent=2,
            )
        os.replace(tmp, args.summary)
    return 0 if all(r["status"] in ("success", "cached") for r in report) else 1


def _server_folder(server: Server) -> str:
    """A folder name for a server's downloads (several servers may write files of the same name)."""
    return f"{server.host}_{server.port}".replace(":", "_")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("workflow", help="workflow JSON file (API or UI format)")
    p.add_argument(
        "--server",
        action="append",
        default=None,
        help="ComfyUI address: HOST, HOST:PORT or http(s)://HOST:PORT (default 127.0.0.1:8188; port 8188); repeat "
        "it to spread the prompts over several servers",
    )
    p.add_argument(
        "--per-server",
        type=int,
        default=2,
        metavar="K",
        help="with several servers: at most K of our prompts queued on a server at a time (default 2; the rest wait "
        "here, so a server that goes down takes at most K prompts with it, and they are queued again elsewhere)",
    )
    p.add_argument("--count", type=int, default=1, help="number of prompts to queue (default 1)")
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed of the first prompt; the next ones count up (default: the workflow's own seed, counting up)",
    )
    p.add_argument("--seeds", default=None, help="comma-separated seeds, one prompt each (overrides --count/--seed)")
    p.add_argument(
        "--seed-input",
        action="append",
        metavar="SELECTOR.INPUT",
        help="the input(s) that receive the seed (default: every integer input named seed/noise_seed)",
    )
    p.add_argument("--set", action="append", metavar="SELECTOR.INPUT=VALUE", help="change an input (repeatable)")
    p.add_argument("--poll", action="store_true", help="follow progress by polling /history instead of /ws")
    p.add_argument("--timeout", type=float, default=3600.0, help="give up after this many seconds (default 3600)")
    p.add_argument("--download", metavar="DIR", help="also fetch every output file into DIR")
    p.add_argument("--summary", metavar="FILE", help="write a JSON report of prompts, seeds and outputs")
    p.add_argument("--quiet", action="store_true", help="only print the final report")
    return p


def run(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with open(args.workflow, encoding="utf-8") as f:
            workflow = json.load(f)
    except (OSError, ValueError) as e:
        sys.stderr.write(f"error: cannot read the workflow {args.workflow}: {e}\n")
        return 2
    jobs: list[Job] = []
    addresses = args.server or ["127.0.0.1:8188"]
    try:
        unique = {}
        for a in addresses:  # the same server written twice counts once
            unique.setdefault(Server(a).base, a)
    except UsageError as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    addresses = list(unique.values())
    if len(addresses) > 1:
        return run_many(args, workflow, addresses)
    try:
        server = Server(addresses[0])
        object_info = server.get("/object_info")  # first contact: an unreachable server is one clear error
        workflow, targets, plans = prepare(args, workflow, object_info)
        client_id = uuid.uuid4().hex
        ws = None
        if not args.poll:
            try:
                ws = WebSocket(server.host, server.port, f"/ws?clientId={client_id}", tls=server.scheme == "https")
            except OSError as e:
                _log(args.quiet, f"no websocket ({e}); following progress by polling /history instead")
        names = {k: (v.get("_meta") or {}).get("title") or v["class_type"] for k, v in workflow.items()}
        for i, plan in enumerate(plans):
            prompt = json.loads(json.dumps(workflow))
            for (key, name), value in plan.items():
                prompt[key]["inputs"][name] = value
            seed = plan[targets[0]] if targets else None
            try:
                answer = server.post("/prompt", {"prompt": prompt, "client_id": client_id})
            except HTTPError as e:
                if jobs:
                    _log(args.quiet, f"prompt {i + 1} was rejected; following the {len(jobs)} already queued")
                    _log(args.quiet, describe_rejection(e.payload))
                    break
                raise UsageError("the server rejected the workflow:\n" + describe_rejection(e.payload)) from None
            jobs.append(Job(i, seed, answer["prompt_id"], nodes=len(prompt)))
            _log(args.quiet, f"queued prompt {i + 1}/{len(plans)} seed {seed}: {answer['prompt_id']}")
        try:
            follow(server, jobs, ws, args.timeout, args.quiet, names)
        finally:
            if ws is not None:
                ws.close()
    except UsageError as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    except TimeoutError as e:
        sys.stderr.write(f"error: {e}\n")
        return 1

    report = []
    for job in jobs:
        files = []
        for item in job.outputs:
            rel = "/".join(p for p in (item.get("type", "output"), item.get("subfolder", ""), item["filename"]) if p)
            entry = {"node": item["node"], "path": rel, "url": server.view_url(item), "cached": item["cached"]}
            if args.download:
                entry["downloaded"] = server.download(item, args.download)
            files.append(entry)
        report.append(
            {
                "prompt_id": job.prompt_id,
                "seed": job.seed,
                "status": job.status,
                "error": job.error,
                "messages": job.messages,
                "outputs": files,
            }
        )
    for job, r in zip(jobs, report):
        print(f"{job.label}: {_describe(job)}")
        for m in r["messages"]:
            print(f"  {m}")
        for f in r["outputs"]:
            note = "  (from the cache: written by an earlier prompt)" if f["cached"] else ""
            print(f"  {f['path']}" + (f"  -> {f['downloaded']}" if "downloaded" in f else "") + note)
    ran = sum(1 for j in jobs if j.status == "success")
    cached = sum(1 for j in jobs if j.status == "cached")
    if cached:
        print(
            f"{ran} of {len(jobs)} prompt(s) ran; {cached} were answered from ComfyUI's cache (same inputs as an "
            "earlier prompt) and wrote nothing new: change the seed (--seed/--seeds) to get new results."
        )
    if args.summary:
        tmp = args.summary + ".part"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"server": server.base, "workflow": args.workflow, "prompts": report}, f, indent=2)
        os.replace(tmp, args.summary)
    return 0 if all(j.status in ("success", "cached") for j in jobs) else 1


if __name__ == "__main__":
    sys.exit(run())
