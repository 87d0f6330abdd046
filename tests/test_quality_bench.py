"""The quality benchmark's pieces on cases with known answers: CutPaste/Perlin pairs, the texture detector, the
segmentation trainer, and the whole benchmark on a tiny MiniDefect set with a generated folder written by the real
exporter."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from dualanodiff_core.dataset.acceptance import check_pair
from dualanodiff_core.dataset.export import DatasetWriter, ExportSample
from dualanodiff_core.dataset.masks import extract_mask
from dualanodiff_core.evaluation import benchmark as ev
from dualanodiff_core.evaluation import synthetic
from dualanodiff_core.minidefect import procedural as md


def noise_textures(n, size=32, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.uniform(90, 160, (n, 1, 1, 3))
    return np.clip(base + rng.normal(0, 12, (n, size, size, 3)), 0, 255).astype(np.uint8)


def square_defects(n, size=32, seed=1):
    """Noise textures with a bright or dark square (side 5-9 px) at a random place: images and exact masks."""
    rng = np.random.default_rng(seed)
    imgs = noise_textures(n, size, seed + 100).copy()
    masks = np.zeros((n, size, size), bool)
    for i in range(n):
        s = int(rng.integers(5, 10))
        y, x = rng.integers(0, size - s, 2)
        masks[i, y : y + s, x : x + s] = True
        imgs[i][masks[i]] = 250 if rng.random() < 0.5 else 10
    return imgs, masks


@pytest.mark.parametrize("kind", ["normal", "scar", "perlin"])
def test_synthetic_pairs_are_valid(kind):
    normal, _ = md.normal_image("fabric", 0, "train", 0)
    other, _ = md.normal_image("metal", 0, "train", 0)
    for seed in range(5):
        rng = np.random.default_rng(seed)
        if kind == "perlin":
            img, mask = synthetic.perlin_anomaly(normal, rng, [other])
        else:
            img, mask = synthetic.cutpaste(normal, rng, kind)
        assert img.shape == normal.shape and img.dtype == np.uint8
        assert mask.shape == normal.shape[:2] and mask.dtype == np.uint8
        assert set(np.unique(mask).tolist()) == {0, 255}
        inside = mask > 0
        assert (img[~inside] == normal[~inside]).all(), "nothing may change outside the mask"
        assert np.any(img[inside] != normal[inside])
        # deterministic for a seeded generator
        rng2 = np.random.default_rng(seed)
        again = (
            synthetic.perlin_anomaly(normal, rng2, [other])
            if kind == "perlin"
            else synthetic.cutpaste(normal, rng2, kind)
        )
        assert (again[0] == img).all() and (again[1] == mask).all()
    if kind == "normal":  # a rectangle of 2-15 % of the area
        assert 0.015 <= inside.mean() <= 0.16


def test_perlin_noise_range_and_rotation():
    rng = np.random.default_rng(0)
    n = synthetic.perlin_noise((64, 64), (4, 4), rng, angle=0.7)
    assert n.shape == (64, 64) and np.isfinite(n).all()
    assert -1.05 < n.min() < 0 < n.max() < 1.05
    m = synthetic.perlin_mask((64, 64), np.random.default_rng(1))
    assert m.dtype == bool and m.mean() >= 0.003


def test_texture_detector_finds_squares():
    normals = noise_textures(16)
    imgs, masks = square_defects(8)
    det = ev.TextureDetector(quantile=0.999).fit(normals)
    a = ev.alignment(det, imgs, masks)
    assert a["pixel_auroc"] > 0.95
    assert a["iou_mean"] > 0.5 and a["hit_rate"] == 1.0
    fp = det.detect(noise_textures(6, seed=7)).mean()
    assert fp < 0.01  # about 1 - quantile of a normal image is flagged
    # a mask that does not match the defect scores low
    shifted = np.roll(masks, 12, axis=2)
    assert ev.alignment(det, imgs, shifted)["iou_mean"] < 0.2
    # one defect per image, of the masks' own size
    assert a["defects_per_image"] == 1.0 and a["defect_area"] == pytest.approx(masks.mean())
    # the same area as two defects per image: the mask area alone cannot tell them apart
    split = masks.copy()
    for m in split:
        ys, xs = np.nonzero(m)
        m[ys.min() + (ys.max() - ys.min()) // 2] = False  # a gap across the middle row: two components
    b = ev.alignment(det, imgs, split)
    assert b["defects_per_image"] == 2.0
    assert b["defect_area"] == pytest.approx(split.mean() / 2)


def test_segnet_learns_an_easy_task():
    torch.set_num_threads(1)
    normals = noise_textures(24)
    train = ev.PairSet(*square_defects(24, seed=2), names=[str(i) for i in range(24)])
    cfg = ev.SegConfig(steps=60, batch=8, lr=3e-3, width=8)
    losses = []
    net = ev.train_segnet(normals, train, cfg, seed=0, progress=lambda s, n, l: losses.append(l))
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:5])
    test_imgs, test_masks = square_defects(12, seed=3)
    imgs = np.concatenate([test_imgs, noise_textures(6, seed=9)])
    masks = np.concatenate([test_masks, np.zeros((6, 32, 32), bool)])
    labels = np.r_[np.ones(12, bool), np.zeros(6, bool)]
    s = ev.segmentation_scores(ev.predict(net, imgs), masks, labels)
    assert s["pixel_auroc"] > 0.95 and s["pixel_ap"] > 0.6 and s["image_auroc"] > 0.9
    # training made the difference (an untrained network on the same data is far worse)
    untrained = ev.segmentation_scores(ev.predict(ev.SegNet(8).eval(), imgs), masks, labels)
    assert untrained["pixel_ap"] < s["pixel_ap"] - 0.3


def write_fake_generated(out, real_root, category, defect, n=6):
    """A `dualanodiff generate`-style folder made with the real exporter; the 'generated' pairs are real defect
    images of another seed, the anomaly part drawn on mid-gray as the anomaly branch does."""
    with DatasetWriter(out, category, defect, settings={"fake": True}) as w:
        for i in range(n):
            img, mask, _ = md.defect_image(category, defect, seed=99, index=i)
            fg = np.where(mask[..., None] > 0, img, 128).astype(np.uint8)
            mres = extract_mask(fg, min_area=2, open_radius=0, close_radius=0)
            w.write(ExportSample(i, Image.fromarray(img), Image.fromarray(fg), mres, check_pair(mres), {"seed": i}))


def test_benchmark_end_to_end_on_tiny_data(tmp_path):
    torch.set_num_threads(1)
    data = md.write_minidefect(
        tmp_path / "data",
        md.MiniDefectSpec(seed=1, train_good=8, test_good=3, test_defect=6, products=("metal", "fabric")),
    )
    gen = tmp_path / "gen"
    write_fake_generated(gen, data, "fabric", "hole")
    cfg = ev.BenchConfig(seeds=(0,), seg=ev.SegConfig(steps=4, batch=4, width=4), n_synthetic=8, max_diversity_items=5)
    r = ev.benchmark(data, "fabric", "hole", gen, cfg, log=lambda s: None)
    assert r["counts"] == {
        "normal_train": 8,
        "normal_test": 3,
        "few_shot": 2,
        "held_out": 4,
        "generated": 6,
        "generated_rejected": 0,
    }
    a = r["alignment"]
    assert a["generated"]["n"] == 6 and 0 <= a["generated"]["iou_mean"] <= 1
    assert (
        a["generated"]["stored_vs_reextracted_mask_iou"] == pytest.approx(1.0, abs=0.05)
        or a["generated"]["stored_vs_reextracted_mask_iou"] <= 1.0
    )
    assert r["diversity"]["generated"]["n"] == 5 and r["diversity"]["generated"]["pixel_l1"] > 0
    assert set(r["usefulness"]) == {"texture_detector (no training)", *ev.SOURCES}
    for src in ev.SOURCES:
        s = r["usefulness"][src]["scores"]
        assert 0 <= s["pixel_ap"] <= 1 and 0 <= s["pixel_auroc"] <= 1
    assert r["usefulness"]["real+generated"]["train_pairs"] == 6 + 2 * 3
    text = ev.format_report(r)
    assert "fabric/hole" in text and "cutpaste" in text and "generated" in text
    json.dumps(r)  # JSON-able
    # without a generated folder the generated rows are skipped, not faked
    r2 = ev.benchmark(
        data,
        "metal",
        "scratch",
        None,
        ev.BenchConfig(seeds=(0,), seg=cfg.seg, n_synthetic=4, sources=("generated", "real")),
        log=lambda s: None,
    )
    assert r2["usefulness"]["generated"] == {"skipped": "no generated folder given"}
    assert "generated" not in r2["alignment"]
    with pytest.raises(FileNotFoundError, match="dualanodiff generate"):
        ev.benchmark(data, "metal", "scratch", gen, cfg, log=lambda s: None)


def test_bench_cli_writes_table_and_json(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    md.write_minidefect(
        tmp_path / "data", md.MiniDefectSpec(seed=2, train_good=6, test_good=2, test_defect=3, products=("metal",))
    )
    r = subprocess.run(
        [
            sys.executable,
            "bench/quality.py",
            "--reference-only",
            "--work",
            str(tmp_path / "work"),
            "--data",
            str(tmp_path / "data"),
            "--target",
            "metal/hole",
            "--sources",
            "real",
            "cutpaste",
            "--seeds",
            "0",
            "--steps",
            "2",
            "--width",
            "4",
            "--n-synthetic",
            "4",
            "--json",
            str(tmp_path / "q.json"),
        ],
        cwd=root,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert r.returncode == 0, r.stderr
    assert "metal/hole" in r.stdout and "cutpaste" in r.stdout and "(a) mask alignment" in r.stdout
    out = json.loads((tmp_path / "q.json").read_text())
    assert out["results"][0]["counts"]["few_shot"] == 1
    assert set(out["results"][0]["usefulness"]) == {"texture_detector (no training)", "real", "cutpaste"}
    assert len(list((tmp_path / "work" / "cache").glob("*.json"))) == 2  # the reference rows' scores, cached
    assert "| metal/hole |" in r.stdout  # the summary table


def test_sampler_cost_compares_settings_on_the_same_weights(tmp_path):
    """bench/sampler_cost.py end to end on tiny data: one weights file, one generated set per sampler setting,
    one row per (setting, target) with that setting's own generation time and counts."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    md.write_minidefect(
        tmp_path / "data", md.MiniDefectSpec(seed=3, train_good=6, test_good=2, test_defect=3, products=("metal",))
    )
    work = tmp_path / "work"
    cmd = [sys.executable, "bench/sampler_cost.py", "--target", "metal/hole", "--settings", "ddim:2", "dpmpp:3"]
    cmd += ["--work", str(work), "--seeds", "0", "--steps", "2", "--json", str(tmp_path / "cost.json")]
    cmd += ["--markdown", str(tmp_path / "cost.md"), "--train-steps", "2", "--samples", "2"]
    cmd += ["--data", str(tmp_path / "data"), "--mask-min-contrast", "0.08"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run(cmd, cwd=root, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads((tmp_path / "cost.json").read_text())
    assert [(x["sampler"], x["steps"], x["target"]) for x in out["rows"]] == [
        ("ddim", 2, "metal/hole"),
        ("dpmpp", 3, "metal/hole"),
    ]
    for row in out["rows"]:
        assert row["samples"] == 2 and row["generate_seconds"] > 0
    # both settings' full quality JSONs are kept, and they differ in the sampler they ran
    parts = {k: json.loads((tmp_path / v).read_text()) for k, v in out["parts"].items()}
    assert {k: p["run_settings"]["sampler"] for k, p in parts.items()} == {"ddim:2": "ddim", "dpmpp:3": "dpmpp"}
    assert [p["run_settings"]["sampling_steps"] for p in parts.values()] == [2, 3]
    # the mask floor is handed on (v1's tables were measured with 0.08)
    assert {p["run_settings"]["mask_min_contrast"] for p in parts.values()} == {0.08}
    # trained once: one weights file, two generated sets
    assert len(list(work.rglob("*.safetensors"))) == 1
    assert len([d for d in work.rglob("generated/metal_hole*") if d.is_dir()]) == 2
    table = (tmp_path / "cost.md").read_text()
    assert "| metal/hole | ddim 2 |" in table and "| metal/hole | dpmpp 3 |" in table


def test_sampler_cost_rejects_a_bad_setting():
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    r = subprocess.run(
        [sys.executable, "bench/sampler_cost.py", "--target", "metal/hole", "--settings", "euler:20"],
        cwd=root,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert r.returncode == 2 and "SAMPLER:STEPS" in r.stderr and "euler:20" in r.stderr


def test_vae_capacity_compares_a_trained_vae_with_the_shipped_one(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    md.write_minidefect(tmp_path / "data", md.MiniDefectSpec(seed=4, train_good=4, test_good=2, test_defect=3))
    cmd = [sys.executable, "bench/vae_capacity.py", "--data", str(tmp_path / "data")]
    cmd += ["--json", str(tmp_path / "v.json")]
    cmd += ["--vae-channels", "16,32,32", "--vae-steps", "2", "--vae-batch", "2", "--pool", "2", "--clutter", "2"]
    cmd += ["--warmup", "1", "--save", str(tmp_path / "vae")]
    r = subprocess.run(cmd, cwd=root, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads((tmp_path / "v.json").read_text())
    assert out["vae_config"]["block_out_channels"] == [16, 32, 32]
    assert out["parameters"]["trained"] < out["parameters"]["shipped"]
    types = {f"{p}/{d}" for p, ds in md.PRODUCTS.items() for d in ds}
    assert set(out["capacity"]["shipped"]) == set(out["capacity"]["trained"]) == types
    # two steps of training reconstruct far worse than the shipped VAE, on every type
    for t in types:
        assert out["capacity"]["trained"][t]["mae_outside"] > out["capacity"]["shipped"][t]["mae_outside"]
    assert (tmp_path / "vae" / "config.json").is_file()
    assert "fabric/thread" in r.stdout and "hit rec/rec shipped" in r.stdout


def test_quality_bench_trains_and_generates_from_another_base_model(tmp_path):
    """--base-model: the weights and pairs come from the given folder (recorded in the JSON and in the generated
    manifest), in a run folder of their own; a folder that is not a model is refused with one message."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from dualanodiff_core.dataset.export import MANIFEST, read_manifest
    from dualanodiff_core.minidefect.tiny import save_tiny_model

    root = Path(__file__).resolve().parents[1]
    md.write_minidefect(
        tmp_path / "data", md.MiniDefectSpec(seed=3, train_good=6, test_good=2, test_defect=3, products=("metal",))
    )
    base = save_tiny_model(tmp_path / "tiny base")
    work = tmp_path / "work"
    cmd = [sys.executable, "bench/quality.py", "--target", "metal/hole", "--data", str(tmp_path / "data")]
    cmd += ["--work", str(work), "--seeds", "0", "--steps", "2", "--train-steps", "2", "--samples", "2"]
    cmd += ["--sources", "generated", "--json", str(tmp_path / "q.json"), "--base-model", str(base)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run(cmd, cwd=root, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads((tmp_path / "q.json").read_text())
    assert out["base_model"]["folder"] == str(base.resolve()) and out["base_model"]["shipped"] is False
    (run_dir,) = [d for d in work.iterdir() if d.name.startswith("shared-noise-seed0")]
    assert run_dir.name.startswith("shared-noise-seed0-base-tiny_base-")
    assert [p.name for p in (run_dir / "weights").glob("*.safetensors")] == ["metal_hole-train_steps=2.safetensors"]
    records, _ = read_manifest(Path(out["results"][0]["run"]["generated"]) / MANIFEST)
    assert records and {r["base_model"] for r in records} == {str(base.resolve())}

    bad = subprocess.run(cmd[:-1] + [str(tmp_path / "data")], cwd=root, capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "--base-model" in bad.stderr and "Traceback" not in bad.stderr
    # a mask floor outside (0, 1): one message naming the option, before anything is written
    fresh = tmp_path / "fresh work"
    bad = subprocess.run(
        cmd + ["--mask-min-contrast", "1.5", "--work", str(fresh)], cwd=root, capture_output=True, text=True, env=env
    )
    assert bad.returncode == 2 and "--mask-min-contrast 1.5" in bad.stderr and "Traceback" not in bad.stderr
    assert not fresh.exists()
    bad = subprocess.run(
        cmd + ["--anomaly-contrast", "0.7", "--work", str(fresh)], cwd=root, capture_output=True, text=True, env=env
    )
    assert bad.returncode == 2 and "--anomaly-contrast 0.7" in bad.stderr and "Traceback" not in bad.stderr
    assert not fresh.exists()
    # a target MiniDefect does not have, or excluding options: one message, and no MiniDefect dataset written
    q = [sys.executable, "bench/quality.py", "--work", str(fresh)]
    for extra, says in (
        (["--target", "metal/crack"], "--target metal/crack: MiniDefect has metal/scratch"),
        (["--target", "metal"], "give --target CATEGORY/DEFECT"),
        (["--all", "--generated", "x", "--reference-only"], "exclude each other"),
    ):
        bad = subprocess.run(q + extra, cwd=root, capture_output=True, text=True, env=env)
        assert bad.returncode == 2 and says in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
        assert not fresh.exists()


def test_diagnose_usefulness_ceiling_on_another_base_model(tmp_path):
    """bench/diagnose.py --capacity-usefulness --base-model: the real row is the benchmark's own segmentation run
    (same seed and steps, same number), the through-the-VAE row uses that model's VAE; bad options exit 2."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from dualanodiff_core.minidefect.tiny import save_tiny_model

    root = Path(__file__).resolve().parents[1]
    data = tmp_path / "data"
    md.write_minidefect(data, md.MiniDefectSpec(seed=3, train_good=6, test_good=2, test_defect=3, products=("metal",)))
    base = save_tiny_model(tmp_path / "tiny base")
    cmd = [sys.executable, "bench/diagnose.py", "--data", str(data), "--overfit", "--skip-capacity"]
    cmd += ["--capacity-usefulness", "metal/hole", "--seg-seeds", "0", "--seg-steps", "3"]
    cmd += ["--json", str(tmp_path / "d.json"), "--base-model", str(base)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run(cmd, cwd=root, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads((tmp_path / "d.json").read_text())
    assert out["base_model"] == str(base)
    row = out["capacity_usefulness"]["metal/hole"]
    torch.set_num_threads(1)
    real = ev.load_real(data, "metal", "hole")
    imgs, masks, labels = ev.held_out_test_set(real)
    net = ev.train_segnet(real.normals_train, real.few_shot, ev.SegConfig(steps=3), 0)
    expected = ev.segmentation_scores(ev.predict(net, imgs), masks, labels)["pixel_ap"]
    assert row["real"]["per_seed"] == [pytest.approx(expected, abs=1e-6)]
    # the random tiny VAE turns the images into something else: a different network, a different score
    assert row["real_through_vae"]["per_seed"][0] != pytest.approx(expected, abs=1e-6)
    for bad, said in (
        (["--capacity-usefulness", "metal/dent"], "--capacity-usefulness metal/dent"),
        (["--base-model", str(data)], "--base-model"),
        (["--mask-min-contrast", "1.5"], "--mask-min-contrast 1.5"),
    ):
        b = subprocess.run(cmd + bad, cwd=root, capture_output=True, text=True, env=env)
        assert b.returncode == 2 and said in b.stderr and "Traceback" not in b.stderr


def test_diagnose_sample_metrics_use_the_given_mask_floor(monkeypatch):
    """bench/diagnose.py --mask-min-contrast: its sample metrics extract masks with that floor (tables measured on
    base model v1 used 0.08), and with the MiniDefect default without it."""
    import sys
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    sys.modules.pop("diagnose", None)
    import diagnose

    assert diagnose.mask_options() == md.mask_options()

    class NoDetection:  # the texture detector's interface: one boolean map per image
        def detect(self, images):
            return np.zeros(images.shape[:3], bool)

    # an anomaly-branch image with a faint gray scratch (about 0.06 from mid-gray) and its global image
    fg = np.full((1, 64, 64, 3), 128, np.uint8)
    fg[0, 30:34, 10:50] = 112
    glob = np.full((1, 64, 64, 3), 150, np.uint8)
    kept = diagnose.sample_metrics(glob, fg, NoDetection(), None)
    monkeypatch.setattr(diagnose, "MASK_MIN_CONTRAST", 0.08)
    assert diagnose.mask_options() == md.mask_options(min_contrast=0.08) != md.mask_options()
    lost = diagnose.sample_metrics(glob, fg, NoDetection(), None)
    assert kept["anomaly_mask_empty"] == 0 and lost["anomaly_mask_empty"] == 1


def test_mask_halo_splits_the_area_ratio_into_defect_count_and_size(tmp_path):
    """bench/mask_halo.py: masks twice the real area made of two real-sized defects show 2 defects per image of
    1.0x the real defect's area, not a halo."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    data = md.write_minidefect(
        tmp_path / "data", md.MiniDefectSpec(seed=0, train_good=2, test_good=1, test_defect=4, products=("fabric",))
    )
    real = ev.load_pairs(data / "fabric" / "test" / "hole", data / "fabric" / "ground_truth" / "hole")
    gen = tmp_path / "gen"
    (gen / "fg").mkdir(parents=True)
    recs = []
    for i, m in enumerate(real.masks[:2]):
        m = m > 0
        fg = np.full((*m.shape, 3), 128, np.uint8)
        fg[m] = 20  # the real defect, dark on mid-gray
        fg[np.roll(m, m.shape[0] // 2, axis=0)] = 20  # and a copy of it half the image away
        Image.fromarray(fg).save(gen / "fg" / f"{i}.png")
        Image.fromarray(real.images[i]).save(gen / f"{i}.png")
        recs.append({"category": "fabric", "defect": "hole", "files": {"fg": f"fg/{i}.png", "image": f"{i}.png"}})
    (gen / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = tmp_path / "halo.json"
    cmd = [
        sys.executable,
        "bench/mask_halo.py",
        "--data",
        str(data),
        "--generated",
        str(gen),
        "--target",
        "fabric/hole",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run(
        cmd + ["--json", str(out)], cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, env=env
    )
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["real_defects_per_image"] == 1.0
    now = res["sets"]["now (floor 0.05, no hysteresis)"]
    assert now["defects_per_image"] == 2.0
    assert 0.8 < now["defect_area_ratio"] < 1.25  # each defect has about the real size: no halo
    # the global images (the real ones) show the real defect but not its moved copy over plain fabric
    assert now["shown_defects_per_image"] == 1.0
    assert "defects/img" in r.stdout
