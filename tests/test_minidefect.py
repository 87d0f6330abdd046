"""MiniDefect: deterministic bytes, exact masks, the MVTec layout as anomalib reads it, defects only inside masks."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from anomalib_rules import load_folder, load_mvtec
from PIL import Image

from dualanodiff_core.minidefect import procedural as md

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(train_good=3, test_good=2, test_defect=3)


def digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("md") / "data"
    md.write_minidefect(root, md.MiniDefectSpec(seed=3, **SMALL))
    return root


def test_same_seed_same_bytes_other_seed_other_bytes(small, tmp_path):
    again = md.write_minidefect(tmp_path / "again", md.MiniDefectSpec(seed=3, **SMALL))
    assert digests(small) == digests(again)
    other = md.write_minidefect(tmp_path / "other", md.MiniDefectSpec(seed=4, **SMALL))
    a, b = digests(small), digests(other)
    assert a.keys() == b.keys()
    pngs = [k for k in a if k.endswith(".png") and "ground_truth" not in k]
    assert all(a[k] != b[k] for k in pngs), "another seed must change every image"


def test_image_does_not_depend_on_counts(small, tmp_path):
    bigger = md.write_minidefect(
        tmp_path / "big", md.MiniDefectSpec(seed=3, train_good=4, test_good=2, test_defect=4, products=("fabric",))
    )
    a, b = digests(small), digests(bigger)
    for k in ("fabric/train/good/002.png", "fabric/test/hole/002.png", "fabric/ground_truth/thread/001_mask.png"):
        assert a[k] == b[k]


def test_layout_reads_with_anomalib_rules(small):
    meta = json.loads((small / "minidefect.json").read_text())
    for product, defects in md.PRODUCTS.items():
        rows = load_mvtec(small, product)  # raises on any pairing/stem/mask-value problem
        by = {(r["split"], r["label"]) for r in rows}
        assert by == {("train", "good"), ("test", "good")} | {("test", d) for d in defects}
        assert sum(r["label_index"] for r in rows) == 3 * len(defects)
        for d in defects:
            pairs = load_folder(small / product / "test" / d, small / product / "ground_truth" / d)
            assert len(pairs) == 3
        assert meta["products"][product]["defects"] == list(defects)
    assert md.verify_minidefect(small) == []


def test_masks_exact_and_defect_only_inside_mask(small):
    for product, defects in md.PRODUCTS.items():
        for d in defects:
            for i in range(3):
                img_path = small / product / "test" / d / f"{i:03d}.png"
                with Image.open(small / product / "ground_truth" / d / f"{i:03d}_mask.png") as m:
                    assert m.mode == "L"
                    mask = np.asarray(m)
                assert set(np.unique(mask).tolist()) == {0, 255}
                with Image.open(img_path) as im:
                    assert im.mode == "RGB" and im.size == (64, 64)
                    img = np.asarray(im)
                # the same texture without the defect: the renderer's own normal image for this seed/index
                rng = md._rng(3, product, "test", d, i)
                normal = md.to_uint8(md.RENDERERS[product](rng, 64)[0])
                changed = np.any(img != normal, axis=-1)
                inside = mask > 0
                assert not changed[~inside].any(), f"{img_path}: pixels changed outside the mask"
                assert changed[inside].mean() > 0.8, f"{img_path}: most mask pixels must show the defect"


def test_defects_vary(small):
    meta = json.loads((small / "minidefect.json").read_text())["images"]
    areas = [meta[f"metal/test/stain/{i:03d}.png"]["defect"]["area_px"] for i in range(3)]
    assert len(set(areas)) == 3
    # normal images differ from each other (texture variation), not only by noise
    a, _ = md.normal_image("fabric", 0, "train", 0)
    b, _ = md.normal_image("fabric", 0, "train", 1)
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 10


def test_refuses_foreign_folder_and_checks_integrity(small, tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        md.write_minidefect(tmp_path / "busy", md.MiniDefectSpec(**SMALL))
    # same settings into an existing dataset: allowed (it is completed/checked), different ones: refused
    md.write_minidefect(small, md.MiniDefectSpec(seed=3, **SMALL))
    with pytest.raises(FileExistsError):
        md.write_minidefect(small, md.MiniDefectSpec(seed=5, **SMALL))
    copy = tmp_path / "copy"
    md.write_minidefect(copy, md.MiniDefectSpec(seed=3, products=("metal",), train_good=1, test_good=1, test_defect=1))
    p = copy / "metal" / "test" / "hole" / "000.png"
    Image.new("RGB", (64, 64)).save(p)
    assert md.verify_minidefect(copy) == ["metal/test/hole/000.png: changed (sha256 differs)"]
    with pytest.raises(ValueError, match="unknown MiniDefect product"):
        md.MiniDefectSpec(products=("wood",))
    with pytest.raises(ValueError, match="no defect"):
        md.defect_image("metal", "thread")


def test_other_sizes(tmp_path):
    img, mask, _ = md.defect_image("metal", "scratch", 0, "test", 0, size=96)
    assert img.shape == (96, 96, 3) and mask.shape == (96, 96) and mask.max() == 255


def test_cli_writes_dataset(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "dualanodiff_core",
            "minidefect",
            "--out",
            str(tmp_path / "d"),
            "--products",
            "fabric",
            "--train-good",
            "1",
            "--test-good",
            "1",
            "--test-defect",
            "1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "d" / "fabric" / "ground_truth" / "stain" / "000_mask.png").is_file()
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "dualanodiff_core",
            "minidefect",
            "--out",
            str(tmp_path / "d"),
            "--seed",
            "9",
            "--products",
            "fabric",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "not empty" in r.stderr and "Traceback" not in r.stderr
