"""Reliability: the dataset lock, samples that appear whole or not at all, temp files after kills, modes.

Kill tests run a writer in a subprocess that pauses at a named point (``DUALANODIFF_TEST_PAUSE``, see
``dualanodiff_core/_testhook.py``), send it SIGKILL there, check what a reader sees, rerun, and check again.
"""

from __future__ import annotations

import os
import random
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from PIL import Image

from dualanodiff_core import fileio
from dualanodiff_core.dataset.export import LOCK, MANIFEST, DatasetBusyError, DatasetWriter, iter_records

sys.path.insert(0, str(Path(__file__).parent))
from test_export import make_sample  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
posix_only = pytest.mark.skipif(os.name == "nt", reason="uses SIGKILL")

#: a writer process: writes samples START.. of bottle/crack into OUT (one per index), prints DONE at the end
WRITER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    from test_export import make_sample
    from dualanodiff_core.dataset.export import DatasetWriter
    out, start, n, wait = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    with DatasetWriter(out, "bottle", "crack", lock_wait=wait) as w:
        for i in range(start, start + n):
            if i not in w.done:
                w.write(make_sample(i, "ok"))
    print("DONE", flush=True)
    """
).format(tests=str(Path(__file__).parent))


def _env(pause: str = "", seconds: float = 60, flag: Path | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("DUALANODIFF_TEST_PAUSE", None)
    if pause:
        env.update(
            DUALANODIFF_TEST_PAUSE=pause,
            DUALANODIFF_TEST_PAUSE_SECONDS=str(seconds),
            DUALANODIFF_TEST_PAUSE_FILE=str(flag),
        )
    return env


def _start_writer(out: Path, start: int, n: int, wait: float = 0.0, **env) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, str(out), str(start), str(n), str(wait)],
        env=_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(flag: Path, proc: subprocess.Popen, timeout: float = 120.0) -> str:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if flag.is_file() and flag.read_text().strip():
            return flag.read_text().split()[0]
        if proc.poll() is not None:
            raise AssertionError(f"the writer ended before the pause point: {proc.communicate()}")
        time.sleep(0.02)
    proc.kill()
    raise AssertionError("the writer never reached the pause point")


def _images_without_masks(out: Path) -> list[str]:
    test = out / "bottle" / "test" / "crack"
    gt = out / "bottle" / "ground_truth" / "crack"
    if not test.is_dir():
        return []
    return [p.name for p in sorted(test.glob("*.png")) if not (gt / f"{p.stem}_mask.png").is_file()]


def _leftovers(out: Path) -> list[str]:
    """Temp files, staging folders and lock files anywhere under ``out``."""
    bad = []
    for p in out.rglob("*"):
        if fileio.is_temp_name(p.name) or p.name in (".staging", LOCK):
            bad.append(p.relative_to(out).as_posix())
    return bad


# ---- the lock ------------------------------------------------------------------------------------------------------
@posix_only
def test_a_second_writer_never_gets_in_while_the_first_is_inside_the_lock_step(tmp_path):
    """The first writer is held for seconds right after taking the lock, before it writes its PID (where the old
    lock file was still empty and looked stale): the second open must fail, every time."""
    for attempt in range(2):
        out = tmp_path / f"d{attempt}"
        flag = tmp_path / f"flag{attempt}"
        first = _start_writer(out, 0, 1, pause="lock", seconds=2, flag=flag)
        assert _wait_for(flag, first) == "lock"
        assert (out / LOCK).read_text() == ""  # nothing written into the lock file yet
        with pytest.raises(DatasetBusyError, match="is being written by"):
            DatasetWriter(out, "bottle", "other").open()
        assert first.wait(120) == 0, first.communicate()
        assert [r["index"] for r in iter_records(out)] == [0]
        assert not (out / LOCK).exists()


@posix_only
def test_simultaneous_writers_take_turns_and_never_duplicate_records(tmp_path):
    out = tmp_path / "d"
    procs = [_start_writer(out, 2 * k, 2, wait=120) for k in range(4)]
    for p in procs:
        o, e = p.communicate(timeout=300)
        assert p.returncode == 0 and "DONE" in o, e
    idx = [r["index"] for r in iter_records(out)]
    assert sorted(idx) == list(range(8))  # every sample once: no duplicate manifest line, no lost sample
    assert _leftovers(out) == [] and _images_without_masks(out) == []


def test_lock_in_one_process_and_release(tmp_path):
    w = DatasetWriter(tmp_path, "bottle", "crack").open()
    try:
        with pytest.raises(DatasetBusyError, match="this process"):
            DatasetWriter(tmp_path, "bottle", "crack").open()
        w.write(make_sample(0))
    finally:
        w.close()
    with DatasetWriter(tmp_path, "bottle", "crack") as w2:  # free again, and the same file path is reused safely
        assert w2.done == {0}
    assert not (tmp_path / LOCK).exists()


# ---- kill at the risky moments -------------------------------------------------------------------------------------
@posix_only
@pytest.mark.parametrize("point", ["sample_commit", "manifest_line"])
def test_kill_while_a_sample_is_published_then_rerun(tmp_path, point):
    out = tmp_path / "d"
    flag = tmp_path / "flag"
    with DatasetWriter(out, "bottle", "crack") as w:  # two finished samples before
        w.write(make_sample(0))
        w.write(make_sample(1))
    proc = _start_writer(out, 0, 4, pause=point, flag=flag)
    assert _wait_for(flag, proc) == point
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # what a data loader sees right now: every image has its mask
    assert _images_without_masks(out) == []
    mask2 = out / "bottle" / "ground_truth" / "crack" / "002_mask.png"
    image2 = out / "bottle" / "test" / "crack" / "002.png"
    assert mask2.is_file()  # the mask was published first ...
    assert image2.is_file() == (point == "manifest_line")  # ... the image last
    # the same run again: the cut sample is removed and made again, nothing is left over
    with DatasetWriter(out, "bottle", "crack") as w:
        assert w.done == {0, 1}
        for i in (2, 3):
            w.write(make_sample(i))
    assert sorted(r["index"] for r in iter_records(out)) == [0, 1, 2, 3]
    assert _leftovers(out) == [] and _images_without_masks(out) == []


@posix_only
def test_kill_at_random_moments_never_shows_an_image_without_its_mask(tmp_path):
    out = tmp_path / "d"
    rng = random.Random(0)
    total = 0
    for _ in range(2):
        proc = _start_writer(out, 0, 400)
        # let it get going, then kill it somewhere in the middle of writing
        t0 = time.monotonic()
        while not (out / MANIFEST).is_file() and proc.poll() is None and time.monotonic() - t0 < 120:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert _images_without_masks(out) == []
        with DatasetWriter(out, "bottle", "crack") as w:  # reconciles
            assert all((out / rel).is_file() for r in w.records.values() for rel in r["files"].values())
            total = len(w.done)
        assert _leftovers(out) == [] and _images_without_masks(out) == []
    assert total > 0


# ---- temp files ----------------------------------------------------------------------------------------------------
def test_temp_files_get_the_umask_mode_and_vanish_on_errors(tmp_path):
    old = os.umask(0o022)
    try:
        fileio.write_text_atomic(tmp_path / "a.txt", "x")
        fileio.save_image_atomic(Image.new("RGB", (4, 4)), tmp_path / "b.png")
    finally:
        os.umask(old)
    if os.name != "nt":
        for name in ("a.txt", "b.png"):
            assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name
    for exc in (RuntimeError, KeyboardInterrupt):
        with pytest.raises(exc):
            with fileio.atomic_path(tmp_path / "c.pt") as tmp:
                tmp.write_bytes(b"half")
                assert fileio.is_temp_name(tmp.name) and tmp.suffix == ".pt"
                raise exc()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.png"]


def test_sweep_removes_only_dead_runs_temp_files(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    live_pid = os.getppid() if os.name != "nt" else os.getpid()
    names = {
        f".checkpoint-000002.pt.{dead_pid}-0a1b2c3d.dualanodiff-tmp.pt": False,  # a killed run's: removed
        f".loss.png.{live_pid}-0a1b2c3d.dualanodiff-tmp.png": True,  # another live run's: kept
        ".sheet_000.png.k2j3h4g5.tmp.png": False,  # the older pattern: removed
        ".notes.tmp.png": True,  # not ours
        "weights.safetensors": True,
        ".photo.abcdefgh.tmp.jpg": True,  # older pattern shape, but the suffix does not match: not ours
    }
    for n in names:
        (tmp_path / n).write_bytes(b"x")
    removed = {p.name for p in fileio.sweep_temp_files(tmp_path)}
    assert removed == {n for n, keep in names.items() if not keep}
    assert {p.name for p in tmp_path.iterdir()} == {n for n, keep in names.items() if keep}


@posix_only
def test_kill_during_an_atomic_write_then_the_next_write_there_sweeps_it(tmp_path):
    flag = tmp_path / "flag"
    code = "from dualanodiff_core.fileio import write_bytes_atomic; import sys; write_bytes_atomic(sys.argv[1], b'x')"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path / "loss.csv")], env=_env("atomic_write", flag=flag)
    )
    assert _wait_for(flag, proc) == "atomic_write"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert [p.name for p in tmp_path.iterdir() if fileio.is_temp_name(p.name)]  # left by the kill
    fileio._swept.discard(os.path.abspath(tmp_path))
    fileio.write_text_atomic(tmp_path / "loss.csv", "y")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flag", "loss.csv"]


@posix_only
def test_kill_during_a_checkpoint_write_then_rerun_leaves_no_temp_file(tmp_path):
    from defect_data import make_flat

    from dualanodiff_core import cli
    from dualanodiff_core.minidefect.tiny import save_tiny_model
    from dualanodiff_core.training.trainer import list_checkpoints

    model = save_tiny_model(tmp_path / "model")
    data = make_flat(tmp_path / "data", n=2, size=16)
    out = tmp_path / "w.safetensors"
    work = tmp_path / "w_train"
    argv = [
        "train",
        str(data),
        "--model",
        str(model),
        "-o",
        str(out),
        "--resolution",
        "16",
        "--rank",
        "4",
        "--batch-size",
        "1",
        "--steps",
        "2",
        "--checkpoint-every",
        "1",
        "--no-progress",
    ]
    flag = tmp_path / "flag"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dualanodiff_core", *argv],
        env=_env("checkpoint_write", flag=flag),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert _wait_for(flag, proc, timeout=300) == "checkpoint_write"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    temps = [p for p in work.rglob("*") if fileio.is_temp_name(p.name)]
    assert [p.name.split(".dualanodiff-tmp")[1] for p in temps] == [".pt"]  # the half-written checkpoint
    assert list_checkpoints(work) == [] and not out.exists()
    # the same command again: starts over (no checkpoint was finished), sweeps the leftover, finishes
    assert cli.main(argv) == 0
    assert out.is_file() and [s for s, _ in list_checkpoints(work)] == [1, 2]
    assert [p for p in tmp_path.rglob("*") if fileio.is_temp_name(p.name)] == []


def test_a_failure_while_staging_leaves_nothing_behind(tmp_path, monkeypatch):
    """E.g. the disk fills up while the PNGs are written: the sample is not there, no staged file stays."""
    import errno

    with DatasetWriter(tmp_path, "bottle", "crack") as w:
        w.write(make_sample(0))
        real_save = Image.Image.save

        def full(self, fp, *a, **k):
            if ".staging" in str(getattr(fp, "name", fp)):
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_save(self, fp, *a, **k)

        monkeypatch.setattr(Image.Image, "save", full)
        with pytest.raises(OSError):
            w.write(make_sample(1))
        monkeypatch.undo()
        assert w.done == {0}
    assert _leftovers(tmp_path) == [] and sorted(r["index"] for r in iter_records(tmp_path)) == [0]
