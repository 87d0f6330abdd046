"""``dualanodiff demo`` at a reduced budget: every stage runs on the shipped base model, writes what it promises,
reruns reuse finished stages, changed settings are refused without --overwrite, and the run is deterministic."""

import hashlib
import json

import pytest
from PIL import Image

from dualanodiff_core import cli
from dualanodiff_core.cli.demo import DemoConfig, run_demo

TINY = [
    "--train-steps",
    "3",
    "--samples",
    "3",
    "--sampling-steps",
    "2",
    "--seg-steps",
    "2",
    "--no-progress",
    "--threads",
    "1",
]


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    rc = cli.main(["demo", "--out", str(out), *TINY])
    assert rc == 0
    return out


def test_demo_writes_every_result(first_run, capsys):
    out = first_run
    # 1. the dataset, intact
    from dualanodiff_core.minidefect.procedural import verify_minidefect

    assert verify_minidefect(out / "minidefect") == []
    # 2. trained weights that the pipeline reads
    w = out / "weights" / "fabric_hole.safetensors"
    from dualanodiff_core.method.weights import DualAnoDiffWeights

    meta = DualAnoDiffWeights.load(w).metadata
    assert int(meta["trained_steps"]) == 3 and int(meta["train_images"]) == 10 and meta["defect"] == "hole"
    # 3. a generated dataset with one manifest line per sample, images and masks of the right size
    lines = (out / "generated" / "manifest.jsonl").read_text().splitlines()
    assert len(lines) == 3
    for rec in map(json.loads, lines):
        for rel in rec["files"].values():
            im = Image.open(out / "generated" / rel)
            assert im.size == (64, 64)
    # 4. the reports and the contact sheet
    report = json.loads((out / "report.json").read_text())
    q = report["quality"]
    assert q["category"] == "fabric" and q["defect"] == "hole"
    assert q["counts"]["few_shot"] == 10 and q["counts"]["held_out"] == 20
    assert set(q["usefulness"]) >= {"real", "cutpaste", "perlin", "generated"}
    assert 0.0 <= q["alignment"]["real_held_out"]["iou_mean"] <= 1.0
    md = (out / "report.md").read_text()
    assert "mask alignment" in md and "usefulness" in md and "fabric/hole" in md
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.width >= 8 * 96 and sheet.height > 96
    state = json.loads((out / "demo.json").read_text())
    assert set(state["stages"]) == {"dataset", "train", "generate", "evaluate"}


def test_rerun_reuses_finished_stages(first_run, capsys):
    w = first_run / "weights" / "fabric_hole.safetensors"
    before = (_sha(w), w.stat().st_mtime_ns, (first_run / "generated" / "manifest.jsonl").read_text())
    assert cli.main(["demo", "--out", str(first_run), *TINY]) == 0
    err = capsys.readouterr().err
    assert "dataset: reusing" in err and "train: reusing" in err and "generate: reusing" in err
    assert before == (_sha(w), w.stat().st_mtime_ns, (first_run / "generated" / "manifest.jsonl").read_text())


def test_changed_settings_need_overwrite(first_run, capsys):
    args = ["demo", "--out", str(first_run), *TINY]
    args[args.index("--train-steps") + 1] = "4"
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and "train" in err
    # nothing was touched
    state = json.loads((first_run / "demo.json").read_text())
    assert state["stages"]["train"]["settings"]["train_steps"] == 3


def test_same_settings_give_the_same_results(first_run, tmp_path):
    """A second demo folder with the same settings holds identical weight tensors and byte-identical generated
    images and masks (the weights file differs only in its creation time)."""
    import torch

    from dualanodiff_core.method.weights import DualAnoDiffWeights

    run_demo(
        DemoConfig(out=str(tmp_path / "again"), train_steps=3, samples=3, sampling_steps=2, seg_steps=0, threads=1),
        progress=False,
        log=lambda s: None,
    )
    a, b = first_run, tmp_path / "again"
    wa = DualAnoDiffWeights.load(a / "weights" / "fabric_hole.safetensors").tensors
    wb = DualAnoDiffWeights.load(b / "weights" / "fabric_hole.safetensors").tensors
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    pngs = sorted(p.relative_to(a / "generated") for p in (a / "generated").rglob("*.png"))
    assert any(rel.parts[0] != "contact_sheets" for rel in pngs)
    for rel in pngs:  # images, masks, anomaly-branch images and the contact sheets drawn from them
        assert _sha(a / "generated" / rel) == _sha(b / "generated" / rel), rel


def test_refuses_foreign_folder_and_bad_settings(tmp_path, capsys):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert cli.main(["demo", "--out", str(foreign), *TINY]) == 2
    assert "not a demo folder" in capsys.readouterr().err
    assert (foreign / "notes.txt").read_text() == "keep me"
    assert cli.main(["demo", "--out", str(tmp_path / "x"), "--defect", "scratch", *TINY]) == 2
    assert "--defect 'scratch'" in capsys.readouterr().err
    assert cli.main(["demo", "--out", str(tmp_path / "x"), "--train-steps", "0"]) == 2
    assert "--train-steps" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
