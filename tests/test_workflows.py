"""The example workflows and workflows/queue_batch.py, without ComfyUI (the server test in tests/comfyui/ runs them
against a real ComfyUI)."""

import base64
import hashlib
import importlib.util
import json
import socket
import struct
import threading
from pathlib import Path

import pytest

WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, WORKFLOWS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build = _load("build_workflows")
qb = _load("queue_batch")


@pytest.mark.parametrize("name", sorted(build.GRAPHS))
def test_committed_workflows_are_the_generated_ones(name):
    nodes = build.GRAPHS[name]()
    assert json.loads(build.ui_path(name).read_text()) == json.loads(json.dumps(build.to_ui(nodes)))
    assert json.loads((WORKFLOWS / "api" / f"{name}.json").read_text()) == json.loads(json.dumps(build.to_api(nodes)))


@pytest.mark.parametrize("name", sorted(build.GRAPHS))
def test_every_ui_workflow_has_a_thumbnail(name):
    # the template browser shows <name>.jpg beside <name>.json; made from a screenshot of the workflow loaded in
    # ComfyUI's frontend (tests/comfyui/test_comfy_frontend.py with DUALANODIFF_WRITE_THUMBNAILS=1)
    from PIL import Image

    path = build.ui_path(name).with_suffix(".jpg")
    with Image.open(path) as im:
        assert im.format == "JPEG" and im.size == (1024, 768), (path, im.format, im.size)
        assert len(set(im.convert("L").resize((64, 48)).getdata())) > 8  # a picture, not a blank canvas


def test_templates_are_titled_and_numbered_with_the_basic_generate_workflow_first():
    # ComfyUI's template browser titles a pack's templates by file name and lists them in directory order
    names = sorted(p.stem for p in WORKFLOWS.glob("*.json"))
    assert names == sorted(build.TEMPLATES.values())
    assert [build.TEMPLATES[g][: len("DualAnoDiff 1")] for g in build.GRAPHS] == [
        f"DualAnoDiff {i}" for i in range(1, len(build.GRAPHS) + 1)
    ]
    assert build.TEMPLATES["dualanodiff_generate"] == "DualAnoDiff 1 - generate defects and masks"
    assert sorted(p.stem for p in WORKFLOWS.glob("*.jpg")) == names  # a thumbnail beside each


def test_linked_prompt_boxes_say_their_text_is_unused():
    for name in build.GRAPHS:
        ui = json.loads(build.ui_path(name).read_text())
        for n in ui["nodes"]:
            if n["type"] == "CLIPTextEncode" and any(i["name"] == "text" and i["link"] for i in n["inputs"]):
                assert n["widgets_values"][0].startswith("(not used: the text comes from"), (name, n["title"])
                assert "from the weights" in n["title"]


def test_only_ui_files_sit_directly_in_workflows():
    # ComfyUI lists workflows/*.json as templates (UI format); API files live in workflows/api/
    for path in WORKFLOWS.glob("*.json"):
        assert qb.is_ui_format(json.loads(path.read_text())), path


INFO = {
    "Loader": {
        "input": {"required": {"name": [["a.ckpt", "b.ckpt"], {}]}},
        "input_order": {"required": ["name"]},
        "output": ["MODEL", "STRING"],
    },
    "Sampler": {
        "input": {
            "required": {
                "model": ["MODEL", {}],
                "seed": ["INT", {"control_after_generate": True}],
                "text": ["STRING", {"multiline": True}],
                "mode": ["COMBO", {"options": ["x"]}],
            },
            "optional": {"extra": ["MODEL", {}], "forced": ["INT", {"forceInput": True}]},
        },
        "input_order": {"required": ["model", "seed", "text", "mode"], "optional": ["extra", "forced"]},
        "output": ["LATENT"],
    },
    "Image": {
        "input": {"required": {"image": [["bg.png"], {"image_upload": True}], "scale": ["FLOAT", {}]}},
        "input_order": {"required": ["image", "scale"]},
        "output": ["IMAGE"],
    },
}


def _ui(nodes, links):
    return {"nodes": nodes, "links": links, "version": 0.4}


def test_ui_to_api_maps_widgets_links_reroutes_bypass_primitives_and_mutes():
    ui = _ui(
        [
            {"id": 1, "type": "Loader", "mode": 0, "widgets_values": ["b.ckpt"]},
            {"id": 2, "type": "Reroute", "mode": 0, "inputs": [{"name": "", "type": "*", "link": 1}]},
            {
                "id": 3,
                "type": "Sampler",
                "mode": 4,
                "inputs": [{"name": "model", "type": "MODEL", "link": 2}],
                "widgets_values": [1, "fixed", "t", "x"],
            },  # bypassed: passes its MODEL input through
            {
                "id": 4,
                "type": "Sampler",
                "mode": 0,
                "title": "main",
                "inputs": [
                    {"name": "model", "type": "MODEL", "link": 3},
                    {"name": "text", "type": "STRING", "widget": {"name": "text"}, "link": 4},
                    {"name": "forced", "type": "INT", "link": 5},
                ],
                "widgets_values": [42, "randomize", "ignored because linked", "x"],
            },
            {"id": 5, "type": "PrimitiveNode", "mode": 0, "widgets_values": [7, "fixed"]},
            {"id": 6, "type": "Image", "mode": 2, "widgets_values": ["bg.png", "image", 1.0]},  # muted
            {"id": 7, "type": "Image", "mode": 0, "widgets_values": ["bg.png", "image", 0.5]},
            {"id": 8, "type": "Note", "mode": 0, "widgets_values": ["hello"]},
        ],
        [
            [1, 1, 0, 2, 0, "MODEL"],
            [2, 2, 0, 3, 0, "MODEL"],
            [3, 3, 0, 4, 0, "MODEL"],
            [4, 1, 1, 4, 1, "STRING"],
            [5, 5, 0, 4, 2, "INT"],
        ],
    )
    api = qb.ui_to_api(ui, INFO)
    assert api == {
        "1": {"inputs": {"name": "b.ckpt"}, "class_type": "Loader"},
        "4": {
            "inputs": {"model": ["1", 0], "seed": 42, "text": ["1", 1], "mode": "x", "forced": 7},
            "class_type": "Sampler",
            "_meta": {"title": "main"},
        },
        "7": {"inputs": {"image": "bg.png", "scale": 0.5}, "class_type": "Image"},
    }


def test_ui_to_api_names_missing_node_types():
    with pytest.raises(qb.UsageError, match="SomePackNode"):
        qb.ui_to_api(_ui([{"id": 1, "type": "SomePackNode", "mode": 0}], []), INFO)


def test_overrides_select_by_id_title_or_type_and_refuse_linked_inputs():
    wf = {
        "1": {"class_type": "Sampler", "inputs": {"seed": 1, "model": ["2", 0]}, "_meta": {"title": "main"}},
        "3": {"class_type": "Sampler", "inputs": {"seed": 1}},
    }
    out = qb.apply_overrides(wf, ["main.seed=5", "3.cfg=2.5", "Sampler.text=a vfx with sks", "1.flag=true"])
    assert out["1"]["inputs"] == {"seed": 5, "model": ["2", 0], "text": "a vfx with sks", "flag": True}
    assert out["3"]["inputs"] == {"seed": 1, "cfg": 2.5, "text": "a vfx with sks"}
    assert wf["1"]["inputs"]["seed"] == 1  # the original is untouched
    with pytest.raises(qb.UsageError, match="connected"):
        qb.apply_overrides(wf, ["1.model=3"])
    with pytest.raises(qb.UsageError, match="no node 'Nope'"):
        qb.apply_overrides(wf, ["Nope.seed=1"])
    with pytest.raises(qb.UsageError, match="SELECTOR.INPUT=VALUE"):
        qb.apply_overrides(wf, ["seed=1"])
    assert sorted(qb.seed_targets(out)) == [("1", "seed"), ("3", "seed")]
    assert qb.seed_targets(out, ["main.text"]) == [("1", "text")]


def test_rejections_are_readable():
    payload = {
        "error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation"},
        "node_errors": {
            "2": {
                "class_type": "DualAnoDiffLoRALoader",
                "errors": [
                    {
                        "message": "Custom validation failed for node",
                        "details": "weights - DualAnoDiff weights 'x' are not in ...",
                    }
                ],
            }
        },
    }
    text = qb.describe_rejection(payload)
    assert "Prompt outputs failed validation" in text and "node 2 (DualAnoDiffLoRALoader): weights - " in text


def test_usage_errors_exit_2(tmp_path, capsys):
    assert qb.run([str(tmp_path / "missing.json")]) == 2
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps({"1": {"class_type": "X", "inputs": {}}}))
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert qb.run([str(wf), "--server", f"127.0.0.1:{port}", "--poll"]) == 2
    assert "cannot reach the ComfyUI server" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("[1, 2]")
    assert qb.run([str(tmp_path / "bad.json"), "--server", f"127.0.0.1:{port}"]) == 2


def _frame(opcode, payload, fin=True):
    head = bytes([(0x80 if fin else 0) | opcode])
    n = len(payload)
    if n < 126:
        head += bytes([n])
    elif n < 65536:
        head += bytes([126]) + struct.pack("!H", n)
    else:
        head += bytes([127]) + struct.pack("!Q", n)
    return head + payload


def test_websocket_client_reads_text_binary_fragmented_ping_and_close():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    received = {}

    def serve():
        conn, _ = server.accept()
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(4096)
            headers = dict(line.split(": ", 1) for line in data.decode().split("\r\n")[1:] if ": " in line)
            received["path"] = data.decode().split(" ")[1]
            accept = base64.b64encode(
                hashlib.sha1((headers["Sec-WebSocket-Key"] + qb.WebSocket.GUID).encode()).digest()
            ).decode()
            conn.sendall(
                (
                    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                    f"Sec-WebSocket-Accept: {accept}\r\n\r\n"
                ).encode()
            )
            conn.sendall(_frame(1, json.dumps({"type": "status"}).encode()))
            conn.sendall(_frame(2, b"\x00" * 8 + b"P" * 300))  # a preview image (binary, 16-bit length)
            conn.sendall(_frame(9, b"hi"))  # ping: the client must answer with a masked pong
            conn.sendall(_frame(1, b'{"type": "prog', fin=False) + _frame(0, b'ress"}'))
            head = conn.recv(2)
            mask = conn.recv(4)
            body = conn.recv(head[1] & 0x7F)
            received["pong"] = (head[0] & 0x0F, head[1] & 0x80, bytes(b ^ mask[i % 4] for i, b in enumerate(body)))
            conn.sendall(_frame(8, b""))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    ws = qb.WebSocket("127.0.0.1", port, "/ws?clientId=abc")
    assert ws.receive(5) == (1, b'{"type": "status"}')
    op, payload = ws.receive(5)
    assert op == 2 and len(payload) == 308
    assert ws.receive(5) == (1, b'{"type": "progress"}')
    with pytest.raises(ConnectionError):
        ws.receive(5)
    ws.close()
    thread.join(5)
    server.close()
    assert received["path"] == "/ws?clientId=abc"
    assert received["pong"] == (0xA, 0x80, b"hi")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("127.0.0.1", ("http", "127.0.0.1", 8188)),
        ("localhost:8190", ("http", "localhost", 8190)),
        ("http://192.168.1.20:8188/", ("http", "192.168.1.20", 8188)),
        ("https://comfy.example:9443", ("https", "comfy.example", 9443)),
        ("HTTP://host", ("http", "host", 8188)),
        ("https://host", ("https", "host", 443)),
        ("[::1]:8189", ("http", "::1", 8189)),
        ("::1", ("http", "::1", 8188)),
    ],
)
def test_server_addresses_parse_like_comfyui(text, expected):
    assert qb.parse_server(text) == expected


@pytest.mark.parametrize(
    "text, words",
    [
        ("localhost:notaport", "port must be a number"),
        ("127.0.0.1:99999", "from 1 to 65535"),
        ("127.0.0.1:0", "from 1 to 65535"),
        ("http://", "not a host name"),
        ("", "not a host name"),
        ("ftp://host:21", "http:// or https://"),
        ("host:8188/comfy", "without a path"),
        ("my host", "not a host name"),
    ],
)
def test_bad_server_addresses_exit_2_with_one_line(tmp_path, capsys, text, words):
    with pytest.raises(qb.UsageError, match=words):
        qb.parse_server(text)
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps({"1": {"class_type": "X", "inputs": {}}}))
    assert qb.run([str(wf), "--server", text]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --server") and err.count("\n") == 1 and "Traceback" not in err, err


def test_a_stopped_server_is_one_error_line_without_a_websocket_message(tmp_path, capsys):
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps({"1": {"class_type": "X", "inputs": {"seed": 1}}}))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert qb.run([str(wf), "--server", f"127.0.0.1:{port}", "--count", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: cannot reach the ComfyUI server"), err
    assert "websocket" not in err


SERVER_INFO = {
    "Sampler": {
        "input": {
            "required": {
                "model": ["MODEL", {}],
                "pairs": ["INT", {"default": 4, "min": 1, "max": 64}],
                "cfg": ["FLOAT", {"min": 0.0, "max": 30.0}],
                "sampler_name": ["COMBO", {"options": ["euler", "dpmpp_2m"]}],
                "flag": ["BOOLEAN", {}],
                "text": ["STRING", {}],
            },
            "optional": {"old_combo": [["a", "b"], {}]},
            "hidden": {"prompt": "PROMPT"},
        }
    }
}


def test_set_refuses_unknown_inputs_naming_the_real_ones_and_bad_values():
    wf = {"7": {"class_type": "Sampler", "inputs": {"pairs": 4, "model": ["1", 0]}}}
    out = qb.apply_overrides(
        wf, ["Sampler.pairs=2", "7.cfg=3", "7.sampler_name=euler", "7.text=123", "7.old_combo=b"], SERVER_INFO
    )
    assert out["7"]["inputs"] == {
        "pairs": 2,
        "model": ["1", 0],
        "cfg": 3.0,
        "sampler_name": "euler",
        "text": "123",
        "old_combo": "b",
    }
    with pytest.raises(qb.UsageError) as e:
        qb.apply_overrides(wf, ["Sampler.pair=1"], SERVER_INFO)
    message = str(e.value)
    assert "Sampler has no input 'pair'" in message and "Did you mean 'pairs'?" in message
    assert "model, pairs, cfg, sampler_name, flag, text, old_combo" in message and "prompt" not in message
    for text, words in [
        ("7.pairs=0", "outside the allowed range 1 to 64"),
        ("7.pairs=2.5", "not a whole number"),
        ("7.pairs=true", "not a whole number"),
        ("7.cfg=high", "not a number"),
        ("7.sampler_name=nope", "'nope' is not one of the choices: 'euler', 'dpmpp_2m'"),
        ("7.old_combo=c", "not one of the choices"),
        ("7.flag=1", "not true or false"),
        ("7.model=3", "is connected to another node"),
    ]:
        with pytest.raises(qb.UsageError, match=words):
            qb.apply_overrides(wf, [text], SERVER_INFO)
    with pytest.raises(qb.UsageError, match=r"takes a connection \(MODEL\) from another node"):
        qb.apply_overrides({"7": {"class_type": "Sampler", "inputs": {}}}, ["7.model=3"], SERVER_INFO)
    with pytest.raises(qb.UsageError, match="has no input 'sed'"):
        qb.seed_targets(wf, ["7.sed"], SERVER_INFO)


def test_count_makes_the_seeds_count_up_or_refuses_identical_prompts():
    wf = {
        "1": {"class_type": "Sampler", "inputs": {"seed": 10}},
        "2": {"class_type": "KSampler", "inputs": {"noise_seed": 50}},
        "3": {"class_type": "DualAnoDiffTrainer", "inputs": {"seed": 32}},
    }
    targets = qb.seed_targets(wf)
    assert sorted(targets) == [("1", "seed"), ("2", "noise_seed")]
    plans = qb.plan_seeds(wf, targets, 3)  # no --seed: the workflow's own seeds count up
    assert [(p[("1", "seed")], p[("2", "noise_seed")]) for p in plans] == [(10, 50), (11, 51), (12, 52)]
    plans = qb.plan_seeds(wf, targets, 2, seed=7)
    assert [p[("1", "seed")] for p in plans] == [7, 8] and [p[("2", "noise_seed")] for p in plans] == [7, 8]
    assert [p[("1", "seed")] for p in qb.plan_seeds(wf, targets, 1, seeds_text="5,9")] == [5, 9]
    assert qb.plan_seeds(wf, targets, 1) == [{("1", "seed"): 10, ("2", "noise_seed"): 50}]
    assert qb.plan_seeds({"1": {"class_type": "X", "inputs": {}}}, [], 1) == [{}]
    with pytest.raises(qb.UsageError, match="3 prompts would be identical"):
        qb.plan_seeds({"1": {"class_type": "X", "inputs": {}}}, [], 3)
    with pytest.raises(qb.UsageError, match="no seed input"):
        qb.plan_seeds({"1": {"class_type": "X", "inputs": {}}}, [], 1, seed=4)
    with pytest.raises(qb.UsageError, match="--count 0"):
        qb.plan_seeds(wf, targets, 0)
    with pytest.raises(qb.UsageError, match="between 0 and 2"):
        qb.plan_seeds(wf, targets, 1, seed=-1)


def test_node_text_messages_are_decoded():
    payload = struct.pack(">I", 3) + struct.pack(">I", 2) + b"12" + "warning: ü".encode()
    assert qb.node_text(payload) == ("12", "warning: ü")
    assert qb.node_text(struct.pack(">I", 1) + b"\x00" * 8) is None  # a preview image


def test_several_servers_none_answering_is_exit_2_and_one_address_twice_counts_once(tmp_path, capsys):
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps({"1": {"class_type": "X", "inputs": {"seed": 1}}}))
    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    a, b = (f"127.0.0.1:{p}" for p in ports)
    assert qb.run([str(wf), "--server", a, "--server", b, "--count", "2"]) == 2
    err = capsys.readouterr().err
    assert f"none of the servers answers: http://{a}, http://{b}" in err, err
    # the same server written two ways is one server: the single-server path and its one-line error
    assert qb.run([str(wf), "--server", a, "--server", f"http://{a}/", "--count", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: cannot reach the ComfyUI server"), err


class _FakeComfy:
    """A stand-in for ComfyUI's /object_info, /prompt and /history on a free port: every prompt finishes 0.2 s after
    it is queued. ``slow_history``: the first /history answer comes that late (a busy server); ``cut_queue``: the
    first GET /prompt answer is cut off (as when a server dies mid-answer); ``die_after_prompt``: the server is gone
    (refuses connections) right after it accepted its first prompt."""

    def __init__(self, slow_history=0.0, cut_queue=False, die_after_prompt=False):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.seeds: list[int] = []
        self.queued: dict[str, tuple[float, int]] = {}
        lock, fake, died = threading.Lock(), self, threading.Event()
        once = {"history": slow_history > 0, "queue": cut_queue}

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, body, cut=False):
                raw = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw) + (100 if cut else 0)))
                self.end_headers()
                self.wfile.write(raw)
                self.wfile.flush()
                if cut:
                    self.close_connection = True

            def do_GET(self):
                import time

                if self.path == "/object_info":
                    return self._send({"X": {"input": {"required": {"seed": ["INT", {}]}}}})
                now = time.monotonic()
                with lock:
                    running = sum(1 for t, _ in fake.queued.values() if now < t + 0.2)
                    stall = self.path.startswith("/history/") and once["history"]
                    cut = self.path == "/prompt" and once["queue"]
                    once["history"] = once["history"] and not stall
                    once["queue"] = once["queue"] and not cut
                if self.path == "/prompt":
                    return self._send({"exec_info": {"queue_remaining": running}}, cut=cut)
                if stall:
                    time.sleep(slow_history)
                pid = self.path.rsplit("/", 1)[-1]
                with lock:
                    t, seed = fake.queued.get(pid, (None, None))
                if t is None or time.monotonic() < t + 0.2:
                    return self._send({})
                status = {"completed": True, "status_str": "success", "messages": []}
                images = [{"filename": f"out_{seed}.png", "subfolder": "", "type": "output"}]
                try:
                    self._send({pid: {"status": status, "outputs": {"9": {"images": images}}}})
                except OSError:
                    pass  # the client gave up waiting

            def do_POST(self):
                import time
                import uuid

                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                pid = uuid.uuid4().hex
                with lock:
                    fake.seeds.append(body["prompt"]["1"]["inputs"]["seed"])
                    fake.queued[pid] = (time.monotonic() + (3600 if die_after_prompt else 0), fake.seeds[-1])
                self._send({"prompt_id": pid, "number": len(fake.seeds)})
                if die_after_prompt:
                    died.set()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.address = f"127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

        def kill():
            died.wait()
            self.close()

        threading.Thread(target=kill, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_several_servers_a_slow_answer_is_not_a_dead_server(tmp_path, capsys, monkeypatch):
    """A busy server (an answer later than the request timeout, one cut off) keeps its prompts; one that refuses
    connections has its prompt queued again on the other. Before, the busy one counted as down too and, with the
    other gone, the run failed (or crashed on the cut-off answer)."""
    monkeypatch.setattr(qb, "REQUEST_TIMEOUT", 0.5)
    busy = _FakeComfy(slow_history=2.0, cut_queue=True)
    gone = _FakeComfy(die_after_prompt=True)
    wf, summary = tmp_path / "wf.json", tmp_path / "report.json"
    wf.write_text(json.dumps({"1": {"class_type": "X", "inputs": {"seed": 1}}}))
    try:
        argv = [str(wf), "--server", busy.address, "--server", gone.address, "--seed", "10", "--count", "3"]
        code = qb.run([*argv, "--per-server", "1", "--timeout", "60", "--summary", str(summary)])
    finally:
        busy.close()
    err = capsys.readouterr().err
    assert code == 0, err
    assert "Traceback" not in err
    report = json.loads(summary.read_text())
    assert report["went_down"] == [f"http://{gone.address}"], err
    assert f"server http://{gone.address} went down (connection refused)" in err
    assert [p["status"] for p in report["prompts"]] == ["success"] * 3
    assert {p["server"] for p in report["prompts"]} == {f"http://{busy.address}"}
    assert [p["tries"] for p in report["prompts"] if p["tries"]] == [[f"http://{gone.address}"]]
    assert sorted(busy.seeds) == [10, 11, 12] and len(gone.seeds) == 1  # each prompt ran once on the busy server
