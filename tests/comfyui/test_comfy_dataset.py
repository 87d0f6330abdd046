"""Mask From Anomaly Branch and Save Dataset on synthetic anomaly images, called the way ComfyUI calls them; the
saved tree is read back by anomalib's rules."""

import json

import numpy as np
import pytest
import torch
from anomalib_rules import load_folder, load_mvtec

S = 48


def _pairs():
    """IMAGE batches (global, anomaly) of 3 pairs: a dark square defect, a flat gray anomaly image (nothing drawn),
    and a faint red blob."""
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, S, S, 3, generator=g)
    anomaly = torch.full((3, S, S, 3), 0.5)
    anomaly[0, 10:22, 14:30] = torch.tensor([0.1, 0.08, 0.05])
    anomaly[2, 30:40, 5:15, 0] = 0.75
    anomaly += torch.randn(anomaly.shape, generator=g) * 0.01  # decoder noise on the gray
    images[0, 10:22, 14:30] = torch.tensor([0.1, 0.08, 0.05])  # the global images show the defects
    images[2, 30:40, 5:15, 0] = 0.95
    return images, anomaly.clamp(0, 1)


MASK_ARGS = dict(
    gray="median",
    threshold=0.0,
    min_contrast=0.1,
    hysteresis=0.5,
    blur=1.0,
    reduce="max",
    open_radius=1,
    close_radius=2,
    fill_holes=True,
    min_area=20,
    dilate=0,
)


def _mask(env, anomaly, image=None, **kw):
    args = dict(MASK_ARGS, **kw)
    with torch.inference_mode():
        return env.mask.MaskFromAnomalyBranch.execute(anomaly=anomaly, image=image, **args).result


def test_mask_node_gives_exact_binary_masks_and_empty_for_a_blank_image(env):
    images, anomaly = _pairs()
    masks, overlay, report = _mask(env, anomaly, images)
    assert masks.shape == (3, S, S) and masks.dtype == torch.float32
    assert set(torch.unique(masks).tolist()) <= {0.0, 1.0} and torch.isfinite(masks).all()
    square = torch.zeros(S, S)
    square[10:22, 14:30] = 1
    iou = float((masks[0] * square).sum() / ((masks[0] + square) > 0).sum())
    assert iou > 0.9, iou
    assert masks[1].sum() == 0  # nothing drawn: an empty mask, not a normalised ghost
    assert masks[2][30:40, 5:15].mean() > 0.9 and masks[2].sum() < 1.3 * 100
    lines = report.splitlines()
    assert len(lines) == 3 and lines[1].startswith("1: empty mask") and "component" in lines[0]
    assert overlay.shape == (3, S, S, 3)
    # the overlay is drawn on the global image: identical outside the mask, tinted inside
    outside = masks[0] == 0
    assert (overlay[0][outside] - images[0][outside]).abs().max() <= 0.5 / 255 + 1e-6
    assert (overlay[0][10:22, 14:30] - images[0][10:22, 14:30]).abs().mean() > 0.05
    # the same masks as the core's extraction
    from dualanodiff_pack.dualanodiff_core.masks import extract_mask  # noqa: E402

    core = extract_mask(anomaly[0].numpy())
    assert np.array_equal(core.mask > 0, masks[0].numpy() > 0)


def test_mask_node_options_change_the_mask(env):
    _, anomaly = _pairs()
    base = _mask(env, anomaly)[0]
    dilated = _mask(env, anomaly, dilate=3)[0]
    assert dilated[0].sum() > base[0].sum() and torch.equal(dilated[0] * base[0], base[0])
    strict = _mask(env, anomaly, min_contrast=0.3)[0]
    assert strict[2].sum() == 0 and strict[0].sum() > 0  # the faint blob is under the floor
    assert "gray must be one of" in env.mask.MaskFromAnomalyBranch.validate_inputs(gray="white")


def test_mask_node_refuses_nan_images_clearly(env):
    _, anomaly = _pairs()
    anomaly[1, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"image\(s\) \[1\] contain NaN"):
        _mask(env, anomaly)


def _save(env, images, anomaly=None, mask=None, hidden=None, **kw):
    args = dict(dataset="gen", category="bottle", defect="crack", max_area=0.5, max_gray_offset=0.2, keep_rejected=True)
    args.update(kw)
    node = env.dataset.SaveDataset.PREPARE_CLASS_CLONE(hidden or {})
    with torch.inference_mode():
        return node.execute(images=images, anomaly=anomaly, mask=mask, **args)


def test_save_dataset_writes_an_anomalib_tree_and_appends(env, dirs):
    images, anomaly = _pairs()
    masks, _, _ = _mask(env, anomaly, images)
    prompt = {
        "3": {"class_type": "DualAnoDiffSampler", "inputs": {"seed": 42, "steps": 30, "model": ["2", 0]}},
        "2": {"class_type": "DualAnoDiffLoRALoader", "inputs": {"weights": "w.safetensors"}},
        "9": {"class_type": "DualAnoDiffSaveDataset", "inputs": {"images": ["3", 0]}},
    }
    out = _save(env, images, anomaly, masks, hidden={"PROMPT": prompt, "UNIQUE_ID": "9"})
    root = dirs.output / "gen"
    rows = load_mvtec(root, "bottle")
    assert [r["image_path"].rsplit("/", 1)[1] for r in rows] == ["0000.png", "0002.png"]
    pairs = load_folder(root / "bottle/test/crack", root / "bottle/ground_truth/crack")
    assert len(pairs) == 2
    records = [json.loads(x) for x in (root / "manifest.jsonl").read_text().splitlines()]
    assert [(r["index"], r["accepted"], r["reason"]) for r in records] == [
        (0, True, "ok"),
        (1, False, "empty_mask"),
        (2, True, "ok"),
    ]
    assert records[0]["seed"] == 42 and records[0]["workflow"]["2"]["inputs"]["weights"] == "w.safetensors"
    assert records[0]["mask_source"] == "MASK input" and records[0]["batch_size"] == 3
    assert (root / "rejected/bottle/crack/0001.png").is_file()
    # the saved mask is the mask input
    from PIL import Image

    with Image.open(root / "bottle/ground_truth/crack/0000_mask.png") as m:
        assert np.array_equal(np.asarray(m) > 0, masks[0].numpy() > 0)
    # the node shows the saved images (from ComfyUI's output folder)
    shown = out.ui.as_dict()["images"]
    assert [(s["subfolder"], s["filename"], s["type"]) for s in shown] == [
        ("gen/bottle/test/crack", "0000.png", "output"),
        ("gen/rejected/bottle/crack", "0001.png", "output"),
        ("gen/bottle/test/crack", "0002.png", "output"),
    ]

    # a second queue run appends after the existing samples; the anomaly image alone gives the mask
    _save(env, images[:1], anomaly[:1])
    records = [json.loads(x) for x in (root / "manifest.jsonl").read_text().splitlines()]
    assert records[-1]["index"] == 3 and records[-1]["accepted"]
    assert "extracted" in records[-1]["mask_source"]
    assert len(load_mvtec(root, "bottle")) == 3
    # other filter settings would mix two acceptance rules in one dataset: refused
    with pytest.raises(ValueError, match="other settings"):
        _save(env, images[:1], anomaly[:1], max_area=0.9)


def _records(root):
    return [json.loads(x) for x in (root / "manifest.jsonl").read_text().splitlines()]


def test_save_dataset_alignment_check_rejects_a_mask_the_image_does_not_show(env, dirs):
    images, anomaly = _pairs()
    masks, _, _ = _mask(env, anomaly, images)
    # pair 0: the image shows the dark square its mask marks; pair 1: the same mask on an image of plain noise
    shown = torch.stack([images[0], images[1]])
    square = torch.stack([masks[0], masks[0]])
    _save(env, shown, mask=square, dataset="aligned", min_alignment=0.57)
    root = dirs.output / "aligned"
    recs = _records(root)
    assert [(r["accepted"], r["reason"]) for r in recs] == [(True, "ok"), (False, "misaligned")]
    assert recs[0]["filter"]["alignment"] > 0.57 > recs[1]["filter"]["alignment"]
    assert "does not show the defect" in recs[1]["filter"]["detail"]
    assert all(r["settings"]["filter"]["min_alignment"] == 0.57 for r in recs)
    assert len(load_mvtec(root, "bottle")) == 1 and (root / "rejected/bottle/crack/0001.png").is_file()
    # the widget's default is the CLI's --min-alignment default
    from dualanodiff_pack.dualanodiff_core.dataset.acceptance import DEFAULT_MIN_ALIGNMENT

    spec = env.dataset.SaveDataset.INPUT_TYPES()["optional"]["min_alignment"]
    assert spec[0] == "FLOAT" and spec[1]["default"] == DEFAULT_MIN_ALIGNMENT
    # 0 turns the check off: both kept, the contrast still recorded
    _save(env, shown, mask=square, dataset="unchecked", min_alignment=0.0)
    recs = _records(dirs.output / "unchecked")
    assert [(r["accepted"], r["reason"]) for r in recs] == [(True, "ok"), (True, "ok")]
    assert recs[1]["filter"]["alignment"] < 0.57
    # a prompt saved before the widget existed (no min_alignment) runs without the check, as it did
    _save(env, shown, mask=square, dataset="old_prompt")
    recs = _records(dirs.output / "old_prompt")
    assert [r["accepted"] for r in recs] == [True, True] and recs[0]["settings"]["filter"]["min_alignment"] == 0.0


def test_save_dataset_with_a_mask_only_and_input_errors(env, dirs):
    images, anomaly = _pairs()
    masks, _, _ = _mask(env, anomaly)
    _save(env, images[:1], mask=masks[:1], dataset="only_mask")
    root = dirs.output / "only_mask"
    from PIL import Image

    with Image.open(root / "fg/bottle/crack/0000.png") as fg:  # the defect pixels on mid-gray
        arr = np.asarray(fg)
    assert (arr[0, 0] == 128).all() and len(load_mvtec(root, "bottle")) == 1
    with pytest.raises(ValueError, match="anomaly images, the mask, or both"):
        _save(env, images)
    with pytest.raises(ValueError, match="one mask per image"):
        _save(env, images, mask=masks[:1])
    v = env.dataset.SaveDataset.validate_inputs
    assert "output directory" in v(dataset="../elsewhere") and "output directory" in v(dataset="/abs")
    assert v(dataset="datasets/bottle_gen") is True
    # category and defect are refused when the node runs (validate_inputs takes only `dataset`, so that ComfyUI
    # marks one widget per problem), before anything is written
    with pytest.raises(ValueError, match="'good' means"):
        _save(env, images, mask=masks, defect="good")
    with pytest.raises(ValueError, match="letters, digits"):
        _save(env, images, mask=masks, category="a/b")
