"""`dualanodiff generate` end to end on a tiny model (16x16 px, 2 steps): layout, manifest, resume, determinism,
BCM backgrounds, errors."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib_rules import load_folder, load_mvtec
from PIL import Image

from dualanodiff_core import cli
from dualanodiff_core.dataset.export import MANIFEST, iter_records, read_manifest
from dualanodiff_core.dataset.generate import BackgroundSet, sample_seed
from dualanodiff_core.fileio import sha256_file
from dualanodiff_core.minidefect.tiny import save_tiny_model, tiny_components
from dualanodiff_core.sd15.pipeline import DualAnoDiffPipeline


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen_assets")
    save_tiny_model(root / "model")
    paths = {"model": root / "model"}
    for bcm in (False, True):
        c = tiny_components(0)
        pipe = DualAnoDiffPipeline(
            c["unet"], c["vae"], c["text_encoder"], c["tokenizer"], c["scheduler_config"], rank=4, bcm=bcm
        )
        if bcm:  # make the fusion weight non-zero so the background actually matters
            with torch.no_grad():
                for proc in pipe.dual.processors.values():
                    if hasattr(proc, "temporal_a"):
                        proc.temporal_a.fill_(0.5)
        name = "w_bcm.safetensors" if bcm else "w.safetensors"
        pipe.to_weights({"note": "test"}).save(root / name)
        paths["bcm" if bcm else "plain"] = root / name
    bg = root / "good"
    masks = root / "good_masks"
    bg.mkdir()
    masks.mkdir()
    rng = np.random.default_rng(0)
    for name in ("b.png", "a.png"):
        Image.fromarray((rng.random((20, 20, 3)) * 255).astype(np.uint8)).save(bg / name)  # resized to 16x16
        m = np.zeros((20, 20), np.uint8)
        m[5:15, 5:15] = 255
        Image.fromarray(m).save(masks / name.replace(".png", "_mask.png"))
    paths.update(good=bg, good_masks=masks)
    return paths


# loose filter/mask settings: a random tiny model draws noise, not defects on gray
LOOSE = [
    "--min-alignment",
    "0",
    "--max-area",
    "1",
    "--max-gray-offset",
    "1",
    "--mask-min-contrast",
    "0.05",
    "--mask-min-area",
    "1",
    "--mask-open",
    "0",
]


def gen(assets, out, *extra, weights="plain", n=3, batch=2):
    argv = [
        "generate",
        "--weights",
        str(assets[weights]),
        "--base",
        str(assets["model"]),
        "--out",
        str(out),
        "--n",
        str(n),
        "--size",
        "16",
        "--steps",
        "2",
        "--batch-size",
        str(batch),
        "--device",
        "cpu",
        "--no-progress",
        "--category",
        "widget",
        "--defect",
        "dent",
        *extra,
    ]
    return cli.main(argv)


def pngs(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def test_help_explains_everything(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps to the terminal's width
    for word in (
        "--weights",
        "--base",
        "--n",
        "--out",
        "--batch-size",
        "--backgrounds",
        "--object-masks",
        "--switch-every",
        "--sampler",
        "--steps",
        "--cfg",
        "--size",
        "--mask-threshold",
        "--mask-min-contrast",
        "--max-area",
        "--research-layout",
        "--discard-rejected",
        "manifest.jsonl",
        "ground_truth",
        "BCM reference uses 50",
        "pndm",
        "pndm with reference and ours",
    ):
        assert word in text, word


def test_generate_end_to_end(assets, tmp_path, capsys):
    out = tmp_path / "out"
    assert gen(assets, out, *LOOSE, "--research-layout") == 0
    summary = capsys.readouterr().out
    assert "widget/dent: 3 generated now, 0 already there" in summary
    records, _ = read_manifest(out / MANIFEST)
    assert [r["index"] for r in records] == [0, 1, 2]
    sha = sha256_file(assets["plain"])
    for r in records:
        assert r["seed"] == sample_seed(0, r["index"])
        assert (r["sampler"], r["steps"], r["cfg"], r["width"], r["height"]) == ("ddim", 2, 2.5, 16, 16)
        assert r["weights_sha256"] == sha and r["base_model"] == str(assets["model"].resolve())
        assert r["prompt_global"] == "a vfx with sks" and r["prompt_anomaly"] == "sks"
        assert isinstance(r["mask_area"], float) and r["reason"] and "accepted" in r
        # the alignment check ran on every non-empty mask (its threshold is 0 here)
        assert r["mask"]["empty"] or isinstance(r["filter"]["alignment"], float)
        for rel in r["files"].values():
            assert (out / rel).is_file()
    accepted = [r for r in records if r["accepted"]]
    assert accepted, [r["detail"] for r in records]
    rows = load_mvtec(out, "widget")
    assert len(rows) == len(accepted)
    assert len(load_folder(out / "widget/test/dent", out / "widget/ground_truth/dent")) == len(accepted)
    img = Image.open(out / accepted[0]["files"]["image"])
    assert img.size == (16, 16) and img.mode == "RGB"
    assert (out / "research/widget/dent/mask" / f"{accepted[0]['name']}.png").is_file()
    assert (out / "contact_sheets/widget/dent/sheet_000.png").is_file()
    assert not (out / ".staging").exists() and not (out / ".dualanodiff.lock").exists()


def test_default_filter_rejects_noise_and_keeps_it_out_of_the_tree(assets, tmp_path, capsys):
    out = tmp_path / "out"
    assert gen(assets, out, n=2) == 0
    records = list(iter_records(out))
    assert len(records) == 2 and not any(r["accepted"] for r in records)
    assert all(r["reason"] in ("background_not_gray", "mask_too_large", "empty_mask") for r in records)
    assert not (out / "widget").exists()  # nothing in the MVTec tree
    assert (out / "rejected/widget/dent/000_fg.png").is_file()
    assert "no sample was accepted" in capsys.readouterr().err


def test_resume_extend_and_rebatch_are_deterministic(assets, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert gen(assets, out, *LOOSE) == 0
    first = pngs(out / "widget") | pngs(out / "fg") | pngs(out / "rejected")
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.png") if "contact_sheets" not in p.parts}

    # nothing left to do: the model is not even loaded
    def boom(*a, **k):
        raise AssertionError("the model should not be loaded")

    monkeypatch.setattr(DualAnoDiffPipeline, "from_pretrained", classmethod(boom))
    assert gen(assets, out, *LOOSE) == 0
    monkeypatch.undo()
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps

    # a larger --n adds samples 3 and 4 only, with another batch size
    assert gen(assets, out, *LOOSE, n=5, batch=3) == 0
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert [r["index"] for r in iter_records(out)] == [0, 1, 2, 3, 4]

    # the same samples from scratch with batch size 1: same seeds, same pixels (up to 1 level of rounding)
    out1 = tmp_path / "out1"
    assert gen(assets, out1, *LOOSE, n=5, batch=1) == 0
    a = {r["index"]: r for r in iter_records(out)}
    b = {r["index"]: r for r in iter_records(out1)}
    for i in range(5):
        assert a[i]["seed"] == b[i]["seed"]
        assert a[i]["files"] == b[i]["files"]
        for rel in a[i]["files"].values():
            x = np.asarray(Image.open(out / rel), dtype=np.int16)
            y = np.asarray(Image.open(out1 / rel), dtype=np.int16)
            assert np.abs(x - y).max() <= 1, rel
    assert set(first) <= set(pngs(out / "widget") | pngs(out / "fg") | pngs(out / "rejected"))


def _same_images(out_a, files_a, out_b, files_b):
    assert files_a == files_b
    for rel in files_a.values():
        x = np.asarray(Image.open(out_a / rel), dtype=np.int16)
        y = np.asarray(Image.open(out_b / rel), dtype=np.int16)
        assert np.abs(x - y).max() <= 1, rel


def test_interrupted_runs_leave_no_half_sample_and_resume(assets, tmp_path, monkeypatch, capsys):
    ref = tmp_path / "ref"
    assert gen(assets, ref, *LOOSE, n=4) == 0
    ref_recs = {r["index"]: r for r in iter_records(ref)}
    import os

    from dualanodiff_core.dataset import export

    real_replace = os.replace

    # 1. killed between the renames of sample 2 (its mask is in place, its image, published last, is not)
    def dying_replace(src, dst):
        if ".staging" in str(src) and Path(dst).as_posix().endswith("test/dent/002.png"):
            raise KeyboardInterrupt
        return real_replace(src, dst)

    out = tmp_path / "out"
    monkeypatch.setattr(os, "replace", dying_replace)
    assert gen(assets, out, *LOOSE, n=4) == 130
    monkeypatch.setattr(os, "replace", real_replace)
    assert "run the same command again to resume" in capsys.readouterr().err
    assert [r["index"] for r in iter_records(out)] == [0, 1]
    assert (out / "widget/ground_truth/dent/002_mask.png").is_file() and not (out / "widget/test/dent/002.png").exists()

    # 2. killed while appending sample 2's manifest line (the line is torn)
    real_dump = export._dump

    def torn_dump(rec):
        line = real_dump(rec)
        return line[: len(line) // 2] if rec.get("index") == 2 else line

    # the resume first cleans up case 1, then dies in case 2: write() runs up to a torn append
    orig_write = export.DatasetWriter.write

    def write_then_die(self, sample):
        rec = orig_write(self, sample) if sample.index != 2 else None
        if sample.index == 2:
            paths = self.sample_paths(2, sample.decision.accepted)
            note = self.staging_dir / "002.commit.json"
            note.parent.mkdir(parents=True, exist_ok=True)
            rels = [p.relative_to(self.out).as_posix() for p in paths.values()]
            note.write_text(json.dumps({"index": 2, "files": rels}))
            for dest in paths.values():
                dest.parent.mkdir(parents=True, exist_ok=True)
                sample.image.save(dest)
            with open(self.manifest_path, "a") as f:
                f.write(torn_dump({**sample.info, "index": 2}))
            raise KeyboardInterrupt
        return rec

    monkeypatch.setattr(export.DatasetWriter, "write", write_then_die)
    assert gen(assets, out, *LOOSE, n=4) == 130
    monkeypatch.undo()
    text = (out / MANIFEST).read_text()
    assert not text.endswith("\n")  # the torn line is there

    # 3. a file lost by hand
    (out / "widget/ground_truth/dent/000_mask.png").unlink()

    # resume: everything repaired, samples identical to an uninterrupted run
    assert gen(assets, out, *LOOSE, n=4) == 0
    err = capsys.readouterr().err
    assert "partly written sample 002" in err and "repaired the last line" in err and "sample 000 had missing" in err
    recs = {r["index"]: r for r in iter_records(out)}
    assert sorted(recs) == [0, 1, 2, 3]
    for i in range(4):
        _same_images(ref, ref_recs[i]["files"], out, recs[i]["files"])
    load_mvtec(out, "widget")
    assert not (out / ".staging").exists()


def test_a_run_stopped_mid_batch_resumes_to_the_uninterrupted_result(assets, tmp_path, monkeypatch):
    """Stopped after sample 2 of batch [2, 3]: the resume makes 3 in the same batch [2, 3] (2 again, not written), so
    its record (batch_size included) and files equal an uninterrupted run's; cutting the missing [3, 4, 5] into
    [3, 4], [5] would not."""
    ref = tmp_path / "ref"
    assert gen(assets, ref, *LOOSE, n=6) == 0
    from dualanodiff_core.dataset import export

    real_write = export.DatasetWriter.write

    def write_then_stop(self, sample):
        rec = real_write(self, sample)
        if sample.index == 2:
            raise KeyboardInterrupt
        return rec

    out = tmp_path / "out"
    monkeypatch.setattr(export.DatasetWriter, "write", write_then_stop)
    assert gen(assets, out, *LOOSE, n=6) == 130
    monkeypatch.undo()
    assert [r["index"] for r in iter_records(out)] == [0, 1, 2]
    written = []

    def write_and_note(self, sample):
        written.append(sample.index)
        return real_write(self, sample)

    monkeypatch.setattr(export.DatasetWriter, "write", write_and_note)
    assert gen(assets, out, *LOOSE, n=6) == 0
    assert written == [3, 4, 5]  # sample 2 is made again with 3 but not written twice

    def records(root):
        return [{k: v for k, v in r.items() if k != "created"} for r in iter_records(root)]

    assert [r["batch_size"] for r in records(out)] == [2] * 6
    assert records(out) == records(ref)
    assert pngs(out) == pngs(ref)


def test_changed_settings_are_refused(assets, tmp_path, capsys):
    out = tmp_path / "out"
    assert gen(assets, out, *LOOSE, n=1) == 0
    capsys.readouterr()
    assert gen(assets, out, *LOOSE, "--cfg", "4", n=1) == 2
    err = capsys.readouterr().err
    assert "cfg: 2.5 before, 4.0 now" in err and "new output folder" in err


def test_bcm_backgrounds_switch_every_k(assets, tmp_path):
    out = tmp_path / "out"
    assert (
        gen(
            assets,
            out,
            *LOOSE,
            "--backgrounds",
            str(assets["good"]),
            "--object-masks",
            str(assets["good_masks"]),
            "--switch-every",
            "2",
            "--filter-against-background",
            "--refine-mask",
            weights="bcm",
            n=5,
        )
        == 0
    )
    recs = {r["index"]: r for r in iter_records(out)}
    used = [recs[i]["background"].rsplit("/", 1)[-1] for i in range(5)]
    assert used == ["a.png", "a.png", "b.png", "b.png", "a.png"]  # sorted, switched every 2, wrapping around
    assert all(recs[i]["object_mask"].endswith("_mask.png") for i in range(5))
    assert all(recs[i]["filter"]["agreement"] is not None for i in range(5))
    assert recs[0]["settings"]["backgrounds"]["switch_every"] == 2
    # the background matters: the same seeds without BCM give other images
    out2 = tmp_path / "plain"
    with pytest.warns(UserWarning, match="no backgrounds were given"):  # BCM weights without backgrounds: a warning
        assert gen(assets, out2, *LOOSE, weights="bcm", n=1) == 0
    r0 = list(iter_records(out2))[0]
    a = np.asarray(Image.open(out / list(recs[0]["files"].values())[0]), dtype=np.int16)
    b = np.asarray(Image.open(out2 / list(r0["files"].values())[0]), dtype=np.int16)
    assert np.abs(a - b).max() > 0


def test_background_set_rules(assets, tmp_path):
    s = BackgroundSet.from_folder(assets["good"], assets["good_masks"], switch_every=3)
    assert [p.name for p in s.images] == ["a.png", "b.png"]
    assert [s.position(i) for i in range(8)] == [0, 0, 0, 1, 1, 1, 0, 0]
    item = s.get(0, (16, 16))
    assert item.background.size == (16, 16) and item.object_mask is not None
    assert np.asarray(item.background)[8, 8].max() == 0  # the object is blacked out
    empty = tmp_path / "empty_masks"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no object mask for background a.png"):
        BackgroundSet.from_folder(assets["good"], empty)


@pytest.mark.parametrize(
    "extra, kwargs, message",
    [
        (["--backgrounds", "GOOD"], {}, "no BCM layers"),
        (["--defect", "good"], {}, "means *normal*"),
        (["--size", "20"], {}, "multiple of 8"),
        (["--steps", "0"], {}, "steps=0"),
        (["--mask-threshold", "2"], {}, "threshold"),
        (["--weights", "nope.safetensors"], {}, "no such file"),
    ],
)
def test_errors_are_one_clear_line(assets, tmp_path, capsys, extra, kwargs, message):
    extra = [str(assets["good"]) if x == "GOOD" else x for x in extra]
    rc = gen(assets, tmp_path / "out", *extra, n=1, **kwargs)
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err


@pytest.mark.parametrize("recipe, expected", [(None, ("ddim", 50)), ("reference", ("pndm", 100))])
def test_generate_samples_with_the_recipes_sampler_and_steps_when_not_given(assets, tmp_path, recipe, expected):
    """Without --sampler/--steps a run samples, and records in the manifest, the recipe's schedule: DDIM 50 by
    default, the paper's PNDM 100 with --recipe reference."""
    out = tmp_path / "out"
    argv = ["generate", "--weights", str(assets["plain"]), "--base", str(assets["model"]), "--out", str(out)]
    argv += ["--n", "1", "--size", "16", "--device", "cpu", "--no-progress", "--category", "w", "--defect", "d"]
    argv += LOOSE + (["--recipe", recipe] if recipe else [])
    assert cli.main(argv) == 0
    records, _ = read_manifest(out / MANIFEST)
    assert [(r["sampler"], r["steps"]) for r in records] == [expected]


def test_a_folder_sampled_with_the_old_defaults_resumes_with_recipe_reference(assets, tmp_path, capsys):
    """Before shared-noise and DDIM 50 were the defaults, `generate` sampled as the reference (independent noise,
    PNDM 100): resuming such a folder with the new defaults stops naming what differs; `--recipe reference` resumes
    it unchanged."""
    out = tmp_path / "out"
    argv = ["generate", "--weights", str(assets["plain"]), "--base", str(assets["model"]), "--out", str(out)]
    argv += ["--size", "16", "--device", "cpu", "--no-progress", "--category", "w", "--defect", "d", *LOOSE]
    assert cli.main(argv + ["--n", "1", "--recipe", "reference"]) == 0
    before = (out / MANIFEST).read_bytes()
    capsys.readouterr()
    assert cli.main(argv + ["--n", "2"]) != 0
    err = capsys.readouterr().err
    assert "other settings" in err and "sampler" in err and "steps" in err and "anomaly_noise_share" in err
    assert "Traceback" not in err and (out / MANIFEST).read_bytes() == before  # nothing written
    assert cli.main(argv + ["--n", "2", "--recipe", "reference"]) == 0
    records, _ = read_manifest(out / MANIFEST)
    assert [(r["index"], r["sampler"], r["steps"]) for r in records] == [(0, "pndm", 100), (1, "pndm", 100)]
