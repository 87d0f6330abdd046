"""Dataset export: MVTec/anomalib layout read back by anomalib's rules, manifest, crash recovery, resume."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from anomalib_rules import MisMatchError, load_folder, load_mvtec
from PIL import Image

from dualanodiff_core.dataset.acceptance import check_pair
from dualanodiff_core.dataset.export import (
    LOCK,
    MANIFEST,
    DatasetError,
    DatasetWriter,
    ExportSample,
    check_name,
    digits_for,
    iter_records,
    read_manifest,
)
from dualanodiff_core.dataset.masks import extract_mask

S = 24


def make_sample(index, kind="ok", size=(S, S)):
    """A synthetic pair: a dark square on gray ('ok'), or a flat gray anomaly part ('empty', rejected)."""
    w, h = size
    rng = np.random.default_rng(index)
    fg = np.full((h, w, 3), 128, np.uint8)
    if kind == "ok":
        y, x = 3 + index % 5, 4 + index % 7
        fg[y : y + 9, x : x + 10] = (30, 20, 10)
    img = (rng.random((h, w, 3)) * 255).astype(np.uint8)
    res = extract_mask(fg, min_area=4)
    dec = check_pair(res)
    assert dec.accepted == (kind == "ok")
    info = dict(seed=1000 + index, sampler="pndm", steps=2, cfg=2.5, weights_sha256="ab" * 32, base_model="/m")
    return ExportSample(index, Image.fromarray(img), Image.fromarray(fg), res, dec, info)


def write_all(out, kinds, **kw):
    with DatasetWriter(out, "bottle", "crack", **kw) as w:
        for i, k in enumerate(kinds):
            if k is not None:
                w.write(make_sample(i, k))
    return w


KINDS = ["ok", "empty", "ok", "ok", "empty", "ok"]


def test_mvtec_tree_reads_back_by_anomalib_rules(tmp_path):
    write_all(tmp_path, KINDS, research_layout=True)
    rows = load_mvtec(tmp_path, "bottle")  # every PNG under bottle/ is considered, as anomalib does
    assert [os.path.basename(r["image_path"]) for r in rows] == ["000.png", "002.png", "003.png", "005.png"]
    assert all(r["split"] == "test" and r["label"] == "crack" and r["label_index"] == 1 for r in rows)
    assert [os.path.basename(r["mask_path"]) for r in rows] == [
        "000_mask.png",
        "002_mask.png",
        "003_mask.png",
        "005_mask.png",
    ]
    pairs = load_folder(tmp_path / "bottle/test/crack", tmp_path / "bottle/ground_truth/crack")
    assert len(pairs) == 4
    # mask content is the extracted mask, exactly
    m = np.asarray(Image.open(tmp_path / "bottle/ground_truth/crack/002_mask.png"))
    assert np.array_equal(m, make_sample(2).mask.mask)
    # research layout: same names in image/ mask/ fg/
    for sub in ("image", "mask", "fg"):
        names = sorted(p.name for p in (tmp_path / "research/bottle/crack" / sub).iterdir())
        assert names == ["000.png", "002.png", "003.png", "005.png"]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "research/bottle/crack/mask/002.png")), m)


def test_the_rules_loader_catches_broken_trees(tmp_path):
    write_all(tmp_path, ["ok", "ok"])
    (tmp_path / "bottle/ground_truth/crack/001_mask.png").unlink()
    with pytest.raises(MisMatchError):
        load_mvtec(tmp_path, "bottle")
    out2 = tmp_path / "b"
    write_all(out2, ["ok"])
    Image.fromarray(np.full((S, S), 128, np.uint8)).save(out2 / "bottle/ground_truth/crack/000_mask.png")
    with pytest.raises(MisMatchError, match="not in"):
        load_mvtec(out2, "bottle")


def test_rejected_samples_are_recorded_and_kept_outside_the_mvtec_tree(tmp_path):
    write_all(tmp_path, KINDS)
    rej = sorted(p.name for p in (tmp_path / "rejected/bottle/crack").iterdir())
    assert rej == ["001.png", "001_fg.png", "001_mask.png", "004.png", "004_fg.png", "004_mask.png"]
    recs = {r["index"]: r for r in iter_records(tmp_path, "bottle", "crack")}
    assert recs[1]["accepted"] is False and recs[1]["reason"] == "empty_mask"
    out2 = tmp_path / "discard"
    write_all(out2, KINDS, keep_rejected=False)
    assert not (out2 / "rejected").exists()
    recs = {r["index"]: r for r in iter_records(out2)}
    assert set(recs) == set(range(6)) and recs[4]["files"] == {} and recs[4]["reason"] == "empty_mask"


def test_manifest_is_complete(tmp_path):
    write_all(tmp_path, KINDS)
    records, repaired = read_manifest(tmp_path / MANIFEST)
    assert not repaired and [r["index"] for r in records] == list(range(6))
    for r in records:
        for key in (
            "index",
            "name",
            "seed",
            "sampler",
            "steps",
            "cfg",
            "weights_sha256",
            "base_model",
            "mask_area",
            "accepted",
            "reason",
            "detail",
            "files",
            "mask",
            "filter",
            "category",
            "defect",
            "created",
            "width",
            "height",
        ):
            assert key in r, key
        assert r["seed"] == 1000 + r["index"] and r["category"] == "bottle" and r["defect"] == "crack"
        for rel in r["files"].values():
            assert (tmp_path / rel).is_file()
        assert r["mask"]["area_fraction"] == r["mask_area"]
    # strict JSON: no NaN/Infinity tokens
    for line in (tmp_path / MANIFEST).read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-finite {c} in the manifest"))


def test_contact_sheets(tmp_path):
    write_all(tmp_path, KINDS)
    with DatasetWriter(tmp_path, "bottle", "crack") as w:
        sheets = w.write_contact_sheets(per_page=4, columns=2, thumb=32)
    assert [p.name for p in sheets] == ["sheet_000.png", "sheet_001.png"]
    im = Image.open(sheets[0])
    assert im.mode == "RGB" and im.width > 3 * 32 * 2 and im.height > 32 * 2
    # fewer samples later: stale pages are removed
    with DatasetWriter(tmp_path, "bottle", "crack") as w:
        assert len(w.write_contact_sheets(per_page=32)) == 1
    assert sorted(p.name for p in sheets[0].parent.iterdir()) == ["sheet_000.png"]


def test_resume_skips_existing_and_refuses_rewrites(tmp_path):
    write_all(tmp_path, ["ok", "empty", "ok"])
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.png")}
    with DatasetWriter(tmp_path, "bottle", "crack") as w:
        assert w.done == {0, 1, 2}
        with pytest.raises(DatasetError, match="already written"):
            w.write(make_sample(1, "empty"))
        w.write(make_sample(3))
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert [r["index"] for r in iter_records(tmp_path)] == [0, 1, 2, 3]


def test_interrupted_sample_is_removed_and_redone(tmp_path):
    write_all(tmp_path, ["ok", "ok"])
    # simulate a crash in the middle of writing sample 2: commit note written, image renamed into place,
    # mask not yet, no manifest line
    w = DatasetWriter(tmp_path, "bottle", "crack")
    paths = w.sample_paths(2, accepted=True)
    w.staging_dir.mkdir(parents=True)
    (w.staging_dir / "002.commit.json").write_text(
        json.dumps({"index": 2, "files": [p.relative_to(tmp_path).as_posix() for p in paths.values()]})
    )
    (w.staging_dir / "002").mkdir()
    (w.staging_dir / "002" / "mask.png").write_bytes(b"partial")
    make_sample(2).image.save(paths["image"])
    with pytest.raises(MisMatchError):  # this is what anomalib would choke on
        load_mvtec(tmp_path, "bottle")
    with DatasetWriter(tmp_path, "bottle", "crack") as w:
        assert w.done == {0, 1}
        assert any("partly written sample 002" in r for r in w.recovered)
        assert not paths["image"].exists() and not w.staging_dir.exists()
        w.write(make_sample(2))
    assert len(load_mvtec(tmp_path, "bottle")) == 3
    assert not (tmp_path / ".staging").exists()


def test_torn_manifest_line_is_repaired(tmp_path):
    write_all(tmp_path, ["ok", "ok"])
    man = tmp_path / MANIFEST
    text = man.read_text()
    man.write_text(text + '{"category": "bottle", "defect": "crack", "ind')  # append cut short
    with DatasetWriter(tmp_path, "bottle", "crack") as w:
        assert w.done == {0, 1}
        w.write(make_sample(2))
    records, repaired = read_manifest(man)
    assert not repaired and [r["index"] for r in records] == [0, 1, 2]
    # a broken line in the middle is not "repaired" silently
    lines = man.read_text().splitlines()
    lines[1] = lines[1][:20]
    man.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match="line 2"):
        DatasetWriter(tmp_path, "bottle", "crack").open()


def test_sample_with_missing_files_is_redone(tmp_path):
    write_all(tmp_path, ["ok", "ok", "ok"])
    (tmp_path / "bottle/ground_truth/crack/001_mask.png").unlink()
    with DatasetWriter(tmp_path, "bottle", "crack") as w:
        assert w.done == {0, 2}
        assert not (tmp_path / "bottle/test/crack/001.png").exists()  # no orphan image left for anomalib
    assert [r["index"] for r in iter_records(tmp_path)] == [0, 2]
    assert len(load_mvtec(tmp_path, "bottle")) == 2


def test_foreign_files_are_never_touched(tmp_path):
    d = tmp_path / "bottle/test/crack"
    d.mkdir(parents=True)
    Image.new("RGB", (S, S)).save(d / "000.png")  # e.g. a real MVTec test image
    with pytest.raises(DatasetError, match="does not list"):
        DatasetWriter(tmp_path, "bottle", "crack").open()
    assert (d / "000.png").is_file() and not (tmp_path / LOCK).exists()


def test_settings_must_match_on_resume(tmp_path):
    write_all(tmp_path, ["ok"], settings={"steps": 100, "mask": {"blur": 1.0}})
    with pytest.raises(DatasetError, match=r"steps: 100 before, 50 now"):
        DatasetWriter(tmp_path, "bottle", "crack", settings={"steps": 50, "mask": {"blur": 1.0}}).open()
    with pytest.raises(DatasetError, match=r"mask\.blur"):
        DatasetWriter(tmp_path, "bottle", "crack", settings={"steps": 100, "mask": {"blur": 2.0}}).open()
    with DatasetWriter(tmp_path, "bottle", "crack", settings={"steps": 100, "mask": {"blur": 1.0}}) as w:
        assert w.done == {0}
    # another defect in the same folder is independent
    with DatasetWriter(tmp_path, "bottle", "scratch", settings={"steps": 50}) as w:
        assert w.done == set()
        w.write(make_sample(0))
    assert {(r["defect"], r["index"]) for r in iter_records(tmp_path)} == {("crack", 0), ("scratch", 0)}


def test_lock_keeps_two_runs_apart(tmp_path):
    w = DatasetWriter(tmp_path, "bottle", "crack").open()
    try:
        with pytest.raises(DatasetError, match="being written by this process"):
            DatasetWriter(tmp_path, "bottle", "other").open()
    finally:
        w.close()
    assert not (tmp_path / LOCK).exists()
    # a lock left by a process that is gone is taken over
    p = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / LOCK).write_text(p.stdout.strip())
    with DatasetWriter(tmp_path, "bottle", "crack") as w:
        assert w.done == set()


def test_names_and_digits(tmp_path):
    assert check_name("broken_large", "defect") == "broken_large"
    for bad in ("", "../x", "a/b", ".hidden", "with space"):
        with pytest.raises(DatasetError, match="letters, digits"):
            check_name(bad, "defect")
    with pytest.raises(DatasetError, match="normal"):
        check_name("good", "defect")
    with pytest.raises(DatasetError, match="collides"):
        check_name("fg", "category")
    assert digits_for(500) == 3 and digits_for(1000) == 3 and digits_for(1001) == 4
    write_all(tmp_path, ["ok"], digits=4)
    assert (tmp_path / "bottle/test/crack/0000.png").is_file()
    with pytest.raises(DatasetError, match="4-digit names"):
        DatasetWriter(tmp_path, "bottle", "crack", digits=3).open()


def test_size_mismatch_is_refused(tmp_path):
    s = make_sample(0)
    s.image = s.image.resize((S + 8, S))
    with DatasetWriter(tmp_path, "bottle", "crack") as w:
        with pytest.raises(DatasetError, match="same size"):
            w.write(s)
