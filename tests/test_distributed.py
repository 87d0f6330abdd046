"""Several processes through torchrun (2 CPU processes, gloo): sharded generation, data-parallel training, train-all;
and that no option of ours is taken by the launchers' own parsers."""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from defect_data import make_mvtec

from dualanodiff_core import cli
from dualanodiff_core.dataset.export import MANIFEST
from dualanodiff_core.minidefect.tiny import save_tiny_model, tiny_components
from dualanodiff_core.sd15.pipeline import DualAnoDiffPipeline

ROOT = Path(__file__).resolve().parents[1]
#: loss curves of 1 and N processes agree to this relative tolerance (they differ only in summation order)
LOSS_RTOL = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args: list[str], n: int = 2) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc-per-node",
        str(n),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(_free_port()),
        "-m",
        "dualanodiff_core.cli",
        *args,
    ]


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")


def _run(cmd: list[str], expect: int = 0, timeout: float = 400) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(), cwd=ROOT)
    assert proc.returncode == expect, f"{' '.join(cmd)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr[-6000:]}"
    return proc


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist_assets")
    save_tiny_model(root / "model")
    c = tiny_components(0)
    pipe = DualAnoDiffPipeline(c["unet"], c["vae"], c["text_encoder"], c["tokenizer"], c["scheduler_config"], rank=4)
    pipe.to_weights({"note": "test"}).save(root / "w.safetensors")
    return root


# ---- options and launchers --------------------------------------------------------------------------------------
def _options(command: str) -> list[str]:
    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sorted({o for a in sub.choices[command]._actions for o in a.option_strings if o.startswith("--")})


def _launcher_parsers():
    from torch.distributed.run import get_args_parser

    parsers = [("torchrun", get_args_parser(), ["--nproc-per-node", "2"])]
    try:
        from accelerate.commands.launch import launch_command_parser
    except ImportError:  # the [distributed] extra is not installed: torchrun only
        return parsers
    return parsers + [("accelerate launch", launch_command_parser(), ["--num_processes", "2"])]


@pytest.mark.parametrize("command", sorted(cli.MULTI_PROCESS))
def test_no_option_of_ours_is_taken_by_the_launchers(command):
    options = [o for o in _options(command) if o not in ("--n", "--help")]
    assert "--count" in _options("generate") and "--n" in _options("generate")  # the old name stays an alias
    for name, parser, own in _launcher_parsers():
        for opt in options:
            argv = [*own, "-m", "dualanodiff_core.cli", command, opt, "1"]
            try:
                args = parser.parse_args(argv)
            except SystemExit:
                pytest.fail(f"{name} takes {command} {opt} as its own option")
            assert [args.training_script, *args.training_script_args] == ["dualanodiff_core.cli", command, opt, "1"]
    # why --count exists: torchrun reads --n as an ambiguous abbreviation of its own options
    from torch.distributed.run import get_args_parser

    with pytest.raises(SystemExit):
        get_args_parser().parse_args(["-m", "dualanodiff_core.cli", "generate", "--n", "6"])


def test_help_says_what_the_global_batch_is(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "the global batch is --batch-size x processes" in out and "torchrun --nproc-per-node 8" in out
    with pytest.raises(SystemExit):
        cli.main(["train-all", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "job k goes to process k mod N" in out and "summary.md" in out


def test_single_process_commands_refuse_a_launcher(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert cli.main(["inspect", "nothing.safetensors"]) == 2
    assert "runs as one process" in capsys.readouterr().err


# ---- generation -------------------------------------------------------------------------------------------------
LOOSE = ["--max-area", "1", "--max-gray-offset", "1", "--mask-min-contrast", "0.05", "--mask-min-area", "1"]


def _gen_args(assets, out, count):
    return [
        "generate",
        "--weights",
        str(assets / "w.safetensors"),
        "--base",
        str(assets / "model"),
        "--out",
        str(out),
        "--count",
        str(count),
        "--batch-size",
        "2",
        "--size",
        "16",
        "--steps",
        "3",
        "--device",
        "cpu",
        "--no-progress",
        *LOOSE,
    ]


def _records(out: Path) -> list[dict]:
    recs = [json.loads(x) for x in (out / MANIFEST).read_text().splitlines()]
    for r in recs:
        for k in ("created", "process"):  # provenance: when and by which process
            r.pop(k, None)
    return recs


def _files(out: Path) -> dict[str, bytes]:
    return {
        p.relative_to(out).as_posix(): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def _worker_pids(launcher_pid: int) -> dict[int, int]:
    """{rank: pid} of torchrun's worker processes (children of the launcher with RANK in their environment)."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid != launcher_pid:
                continue
            env = dict(
                kv.split("=", 1)
                for kv in (d / "environ").read_bytes().decode(errors="replace").split("\0")
                if "=" in kv
            )
        except (OSError, ValueError, IndexError):
            continue
        if "RANK" in env:
            out[int(env["RANK"])] = int(d.name)
    return out


def _merged(out: Path) -> int:
    """Manifest lines the merging process has written so far."""
    return (out / MANIFEST).read_text().count("\n") if (out / MANIFEST).is_file() else 0


def _launch_and_kill_rank1(args: list[str], env: dict, ready) -> tuple[bool, subprocess.Popen, str]:
    """Run ``generate`` under torchrun with 2 processes and SIGKILL process 1 as soon as ``ready()`` holds;
    returns (killed, the launcher, its output). The launcher's process group is killed if it outlives the test."""
    proc = subprocess.Popen(
        _torchrun(args),
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    killed = False
    deadline = time.monotonic() + 300
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if ready():
                workers = _worker_pids(proc.pid)
                if 1 in workers:
                    os.kill(workers[1], signal.SIGKILL)
                    killed = True
                    break
            time.sleep(0.05)
        log = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return killed, proc, log


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the worker to kill through /proc")
def test_sharded_generation_equals_one_process_and_a_killed_run_resumes(assets, tmp_path):
    count = 14
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    assert cli.main(_gen_args(assets, single, count)) == 0

    # 2 processes; process 1 is killed once the first samples are in: nothing partial may be left in the dataset
    killed, proc, log = _launch_and_kill_rank1(_gen_args(assets, sharded, count), _env(), lambda: _merged(sharded) >= 1)
    assert killed, log
    assert proc.returncode != 0, log
    done = _records(sharded)
    assert 1 <= len(done) < count, log
    assert [r["index"] for r in done] == list(range(len(done)))  # merged in index order
    for r in done:  # every recorded sample is complete and identical to the single-process one
        for rel in r["files"].values():
            assert (sharded / rel).read_bytes() == (single / rel).read_bytes()
    listed = {rel for r in done for rel in r["files"].values()}
    on_disk = {p.relative_to(sharded).as_posix() for p in (sharded / "object").rglob("*.png")}
    assert on_disk <= listed  # no partial sample in the MVTec tree

    # the same command again (2 processes) finishes only what is missing
    log = _run(_torchrun(_gen_args(assets, sharded, count))).stderr
    assert f"({len(done)} already in the dataset)" in log, log
    got, want = _records(sharded), _records(single)
    differing = [
        (a.get("index"), {k: (a.get(k), b.get(k)) for k in set(a) | set(b) if a.get(k) != b.get(k)})
        for a, b in zip(got, want)
        if a != b
    ]
    assert got == want, f"records that differ from one process (index, {{key: (sharded, single)}}): {differing}"
    assert _files(sharded) == _files(single)  # byte for byte, contact sheets included; no staging left
    procs = {json.loads(x)["process"]["rank"] for x in (sharded / MANIFEST).read_text().splitlines()}
    assert procs == {0, 1}


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the worker to kill through /proc")
def test_a_process_killed_between_two_samples_of_a_batch_resumes_to_the_one_process_result(assets, tmp_path):
    """Process 1 (batch [2, 3]) is killed right after staging sample 2, once process 0 has merged its batch [0, 1]:
    the rerun must make sample 3 in the batch a single process makes it in ([2, 3]), not alone."""
    count = 4
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    assert cli.main(_gen_args(assets, single, count)) == 0
    flag = tmp_path / "paused"
    env = dict(
        _env(),
        DUALANODIFF_TEST_PAUSE="shard_staged",
        DUALANODIFF_TEST_PAUSE_RANK="1",
        DUALANODIFF_TEST_PAUSE_FILE=str(flag),
        DUALANODIFF_TEST_PAUSE_SECONDS="600",
    )
    # process 1 paused after staging 2; process 0 merged 0 and 1
    killed, proc, log = _launch_and_kill_rank1(
        _gen_args(assets, sharded, count), env, lambda: flag.is_file() and _merged(sharded) >= 2
    )
    assert killed, log
    assert flag.read_text().split() == ["shard_staged"], log  # only process 1 paused, once
    done = [r["index"] for r in _records(sharded)]
    staged = (sharded / ".shards" / "object" / "defect" / "002" / "sample.json").is_file()
    assert done == [0, 1, 2] or (done == [0, 1] and staged), (done, log)

    _run(_torchrun(_gen_args(assets, sharded, count)))
    got, want = _records(sharded), _records(single)
    assert [r["batch_size"] for r in got] == [2] * count
    assert got == want
    assert _files(sharded) == _files(single)


# ---- training ---------------------------------------------------------------------------------------------------
def _train_args(data, assets, out, batch, steps, *extra):
    return [
        "train",
        str(data),
        "--defect",
        "scratch",
        "--model",
        str(assets / "model"),
        "-o",
        str(out),
        "--resolution",
        "16",
        "--rank",
        "4",
        "--lr",
        "1e-3",
        "--batch-size",
        str(batch),
        "--steps",
        str(steps),
        "--device",
        "cpu",
        "--no-progress",
        *extra,
    ]


def _losses(work: Path) -> list[float]:
    with open(work / "loss.csv") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def test_two_process_training_follows_the_one_process_loss_curve_and_resumes_with_one(assets, tmp_path):
    data = make_mvtec(tmp_path / "widget", n=5, size=16)
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    assert cli.main(_train_args(data, assets, one, 4, 5)) == 0
    # 2 processes x 2 images = the same global batch of 4, for 3 of the 5 steps
    _run(_torchrun(_train_args(data, assets, two, 2, 3, "--checkpoint-every", "1")))
    ref, dist = _losses(tmp_path / "one_train"), _losses(tmp_path / "two_train")
    assert len(dist) == 3
    assert dist == pytest.approx(ref[:3], rel=LOSS_RTOL)
    assert two.is_file()  # written by process 0
    config = json.loads((tmp_path / "two_train" / "train_config.json").read_text())
    assert config["processes"] == 2 and config["global_batch"] == 4
    # resume on 1 process: the global batch must stay 4 (--batch-size 4); another one is refused, naming the fix
    assert cli.main(_train_args(data, assets, two, 2, 5, "--resume")) == 2
    assert cli.main(_train_args(data, assets, two, 4, 5, "--resume")) == 0
    assert _losses(tmp_path / "two_train") == pytest.approx(ref, rel=LOSS_RTOL)


def test_resume_refusal_names_the_batch_size_to_use(assets, tmp_path, capsys):
    data = make_mvtec(tmp_path / "widget", n=3, size=16)
    out = tmp_path / "w.safetensors"
    assert cli.main(_train_args(data, assets, out, 2, 1)) == 0
    capsys.readouterr()
    assert cli.main(_train_args(data, assets, out, 1, 2, "--resume")) == 2
    err = capsys.readouterr().err
    assert "global batch of 2 pairs (2 per process x 1 process(es))" in err and "--batch-size 2" in err, err


# ---- many defect types --------------------------------------------------------------------------------------------
def _train_all_args(data, assets, out, *extra):
    return [
        "train-all",
        str(data),
        "--model",
        str(assets / "model"),
        "--out",
        str(out),
        "--resolution",
        "16",
        "--rank",
        "4",
        "--batch-size",
        "2",
        "--steps",
        "2",
        "--checkpoint-every",
        "1",
        "--device",
        "cpu",
        "--no-progress",
        "--generate",
        "2",
        "--generate-steps",
        "2",
        *extra,
    ]


def test_train_all_spreads_jobs_reports_failures_and_resumes(assets, tmp_path):
    root = tmp_path / "mvtec"
    make_mvtec(root / "gadget", n=3, size=16, other_defects=())
    make_mvtec(root / "widget", n=3, size=16)  # scratch and hole
    broken = root / "widget" / "ground_truth" / "hole" / "001_mask.png"
    saved = broken.read_bytes()
    broken.unlink()  # widget/hole lacks a mask: that job fails, the others finish
    out = tmp_path / "runs"
    proc = _run(_torchrun(_train_all_args(root, assets, out)), expect=1)
    summary = {(s["category"], s["defect"]): s for s in json.loads((out / "summary.json").read_text())}
    assert {k: s["status"] for k, s in summary.items()} == {
        ("gadget", "scratch"): "done",
        ("widget", "hole"): "failed",
        ("widget", "scratch"): "done",
    }
    assert "001" in summary[("widget", "hole")]["reason"], summary
    assert "| widget | hole | failed |" in proc.stdout and "2 done, 1 failed" in proc.stderr
    for c, d in (("gadget", "scratch"), ("widget", "scratch")):
        assert (out / c / d / "weights.safetensors").is_file()
        assert summary[(c, d)]["accepted"] + summary[(c, d)]["rejected"] == 2
        assert (out / c / d / "generated" / MANIFEST).read_text().count("\n") == 2
    # jobs went to both processes: job k to process k mod 2 (gadget/scratch 0, widget/hole 1, widget/scratch 0)
    assert "[process 1] widget/hole: failed" in proc.stderr and "[process 0] widget/scratch: done" in proc.stderr

    # fix the data, and lose one finished job's weights as if it had been interrupted after its last checkpoint
    broken.write_bytes(saved)
    (out / "widget" / "scratch" / "weights.safetensors").unlink()
    (out / "widget" / "scratch" / "job.json").unlink()
    shutil.rmtree(out / "widget" / "scratch" / "generated")
    gadget = (out / "gadget" / "scratch" / "weights.safetensors").stat().st_mtime_ns
    proc = subprocess.run(
        [sys.executable, "-m", "dualanodiff_core.cli", *_train_all_args(root, assets, out)],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=ROOT,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr
    assert "gadget/scratch: done earlier, skipped" in proc.stderr
    assert "widget/scratch: training on cpu (resuming)" in proc.stderr
    assert (out / "gadget" / "scratch" / "weights.safetensors").stat().st_mtime_ns == gadget
    statuses = [s["status"] for s in json.loads((out / "summary.json").read_text())]
    assert statuses == ["done"] * 3
    assert "3 done, 0 failed" in proc.stderr
