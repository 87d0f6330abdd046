"""workflows/queue_batch.py with several ComfyUI servers: the prompts are spread over both, and a server that goes
down mid-run has its prompts queued again on the other (two local CPU servers)."""

import json
import subprocess
import sys
import threading

import comfy_server
from test_comfy_server import SMALL_STOCK, WORKFLOWS

API = WORKFLOWS / "api/dualanodiff_generate_ksampler.json"


def _fanout_cmd(a, b, summary, *args):
    return [
        sys.executable,
        str(WORKFLOWS / "queue_batch.py"),
        str(API),
        "--server",
        a.address,
        "--server",
        b.address,
        "--summary",
        str(summary),
        "--timeout",
        "600",
        *SMALL_STOCK,
        *args,
    ]


def _outputs_on_their_server(report, servers):
    by_url = {s.url: s for s in servers}
    for p in report["prompts"]:
        assert p["status"] == "success", p
        srv = by_url[p["server"]]
        assert p["outputs"], p
        for o in p["outputs"]:
            assert (srv.base / o["path"]).is_file(), (p["server"], o["path"])
            assert o["url"].startswith(srv.url + "/view?")


def test_prompts_spread_over_two_servers_and_survive_one_going_down(server, env, tmp_path):
    base = tmp_path / "second"
    comfy_server.prepare_base(env, base)
    second = comfy_server.Server(base).start()
    try:
        # 1. both servers up: each gets prompts (shortest queue, one of ours at a time on each)
        summary = tmp_path / "both.json"
        cmd = _fanout_cmd(server, second, summary, "--count", "4", "--seed", "700", "--per-server", "1")
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=700)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        report = json.loads(summary.read_text())
        assert [p["seed"] for p in report["prompts"]] == [700, 701, 702, 703]
        used = {p["server"] for p in report["prompts"]}
        assert used == {server.url, second.url}, report
        _outputs_on_their_server(report, [server, second])
        assert f"per server: {server.url} " in proc.stdout and f"{second.url} " in proc.stdout

        # 2. the second server dies while it holds one of our prompts: that prompt runs again on the first
        summary = tmp_path / "down.json"
        slow = ["--set", "KSampler.steps=12"]  # long enough to be killed mid-prompt
        cmd = _fanout_cmd(server, second, summary, "--count", "3", "--seed", "800", "--per-server", "1", *slow)
        # stderr is read by the watcher alone (communicate() would read it too and could take the line it waits
        # for); stdout, the report, goes to a file
        stdout = tmp_path / "down.out"
        with open(stdout, "w") as out_file:
            qb = subprocess.Popen(cmd, stdout=out_file, stderr=subprocess.PIPE, text=True)
        lines = []
        killed = threading.Event()

        def watch():
            for line in qb.stderr:
                lines.append(line)
                if not killed.is_set() and f"queued on {second.url}" in line:
                    second.proc.kill()  # a crash, not a clean shutdown
                    killed.set()

        t = threading.Thread(target=watch, daemon=True)
        t.start()
        try:
            qb.wait(timeout=700)
        finally:
            if qb.poll() is None:
                qb.kill()
        t.join(timeout=30)
        out, log = stdout.read_text(), "".join(lines)
        assert killed.is_set(), log
        assert qb.returncode == 0, out + log
        report = json.loads(summary.read_text())
        assert report["went_down"] == [second.url], report
        assert f"server {second.url} went down" in log, log
        assert all(p["status"] == "success" for p in report["prompts"]), report
        again = [p for p in report["prompts"] if p["tries"]]
        assert again and all(p["tries"] == [second.url] and p["server"] == server.url for p in again), report
        _outputs_on_their_server(report, [server, second])
        assert f"queued again after {second.url} went down" in out
    finally:
        second.stop()
