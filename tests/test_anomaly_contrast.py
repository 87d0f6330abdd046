"""Amplified anomaly-branch targets for defects whose colours lie near mid-gray (``TrainConfig.anomaly_contrast``)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from defect_data import make_flat, save

from dualanodiff_core.minidefect.bench import RunSettings, train_config
from dualanodiff_core.minidefect.tiny import tiny_components
from dualanodiff_core.sd15.training import DiffusersTrainingBackbone
from dualanodiff_core.training.data import DefectDataset, Draw, anomaly_target, defect_contrast, find_defect_set
from dualanodiff_core.training.trainer import MAX_ANOMALY_GAIN, TrainConfig, Trainer, anomaly_gain

RES = 16
FAINT = (140, 120, 127)  # a defect 12.5/255 = 0.049 from mid-gray at most (red channel)


def make_faint(root, n=3):
    """Gray metal-like images with a faint gray-brown square defect (its colour differs little from mid-gray)."""
    for i in range(n):
        img = np.full((RES, RES, 3), 128, np.uint8)
        img[:, :, 1] = 126
        mask = np.zeros((RES, RES), np.uint8)
        y, x = 3 + i, 5
        img[y : y + 5, x : x + 5] = FAINT
        mask[y : y + 5, x : x + 5] = 255
        save(img, root / "images" / f"{i:03d}.png")
        save(mask, root / "masks" / f"{i:03d}.png")
    return root


def test_gain_one_is_the_reference_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 8, 8, generator=g) * 2 - 1
    masks = (torch.rand(2, 1, 8, 8, generator=g) > 0.5).float()
    assert torch.equal(anomaly_target(images, masks), images * masks)
    amp = anomaly_target(images, masks, 3.0)
    assert torch.equal(amp, (images * masks * 3.0).clamp(-1, 1))
    assert amp.abs().max() <= 1.0 and amp.abs().max() > (images * masks).abs().max()  # amplified, then clipped
    assert torch.equal(amp[masks.expand_as(amp) == 0], torch.zeros_like(amp[masks.expand_as(amp) == 0]))  # still gray


def test_defect_contrast_is_the_median_defect_pixel_distance_from_mid_gray():
    img = np.full((4, 4, 3), 128, np.uint8)
    img[0, :2] = (128, 179, 128)  # 51.5 / 255 from mid-gray in green
    img[1, :1] = (0, 128, 128)  # 127.5 / 255 in red
    mask = np.zeros((4, 4), bool)
    mask[0, :2] = mask[1, :1] = True
    assert defect_contrast([img], [mask]) == pytest.approx(51.5 / 255, abs=1e-6)
    assert defect_contrast([img], [np.zeros((4, 4), bool)]) == 0.0  # no defect pixel: not NaN


def test_anomaly_gain():
    assert anomaly_gain(0.05, 0.0) == 1.0  # off: the reference
    assert anomaly_gain(0.35, 0.3) == 1.0  # a visible defect is left as it is
    assert anomaly_gain(0.1, 0.3) == pytest.approx(3.0)
    assert anomaly_gain(0.01, 0.3) == MAX_ANOMALY_GAIN  # capped: a nearly invisible defect is not blown up to noise
    assert anomaly_gain(0.0, 0.3) == MAX_ANOMALY_GAIN
    for bad in (-0.1, 0.6, math.nan):
        with pytest.raises(ValueError, match="anomaly contrast"):
            TrainConfig(anomaly_contrast=bad).validate()


class _Spy:
    """Records the images a backbone is asked to encode."""

    def __init__(self, bb):
        self.bb, self.images = bb, []

    def __getattr__(self, name):
        return getattr(self.bb, name)

    def encode_images(self, images, generator):
        self.images.append(images.detach().clone())
        return self.bb.encode_images(images, generator)


@pytest.mark.parametrize("target", [0.0, 0.1])
def test_trainer_amplifies_the_faint_anomaly_rows_only(tmp_path, target):
    root = make_faint(tmp_path / "faint")
    config = TrainConfig(
        steps=1, batch_size=2, rank=4, resolution=RES, checkpoint_every=0, anomaly_contrast=target
    ).validate()
    ds = DefectDataset(find_defect_set(root), RES, flips="none")
    contrast = ds.defect_contrast()
    assert contrast == pytest.approx(12.5 / 255, abs=1e-6)
    spy = _Spy(DiffusersTrainingBackbone.build(tiny_components(0), config, base_model="tiny"))
    tr = Trainer(spy, ds, config, tmp_path / "work")
    expected = 1.0 if target == 0 else target / contrast
    assert tr.anomaly_gain == pytest.approx(expected)
    batch = ds.batch([Draw(0, False, False, 0.5), Draw(1, False, False, 0.5)])
    with torch.no_grad():
        tr._loss(batch, torch.Generator().manual_seed(7), torch.tensor([500, 900]))
    rows = torch.cat(spy.images)
    assert torch.equal(rows[0::2], batch.images)  # the global rows: the images as they are
    assert torch.allclose(rows[1::2], (batch.images * batch.masks * expected).clamp(-1, 1))
    meta = tr.weights_metadata()
    assert meta["training"]["anomaly_contrast"] == target
    if target:
        assert meta["anomaly_gain"] == pytest.approx(expected, rel=1e-5)
    else:
        assert "anomaly_gain" not in meta  # the reference's metadata gains no key


def test_a_visible_defect_keeps_gain_one(tmp_path):
    root = make_flat(tmp_path / "red", n=2, size=RES)  # red squares: 0.38 from mid-gray
    config = TrainConfig(steps=1, batch_size=2, rank=4, resolution=RES, checkpoint_every=0, anomaly_contrast=0.3)
    ds = DefectDataset(find_defect_set(root), RES)
    tr = Trainer(DiffusersTrainingBackbone.build(tiny_components(0), config, base_model="tiny"), ds, config, tmp_path)
    assert tr.anomaly_gain == 1.0


def test_benchmark_runs_name_and_pass_the_setting():
    """None = the recipe's (the default recipe: 0.4); a value other than the recipe's names its own weights."""
    assert RunSettings().suffix(RunSettings.TRAINING) == ""
    assert RunSettings(anomaly_contrast=0.4).suffix(RunSettings.TRAINING) == ""  # the default recipe's own value
    assert train_config(RunSettings(), "metal", 64).anomaly_contrast == 0.4
    off = RunSettings(anomaly_contrast=0.0)
    assert off.suffix(off.TRAINING) == "-anomaly_contrast=0" and train_config(off, "metal", 64).anomaly_contrast == 0
    ref = RunSettings(recipe="reference")
    assert train_config(ref, "metal", 64).anomaly_contrast == 0.0 and ref.to_dict()["anomaly_contrast"] == 0.0
    ref4 = RunSettings(recipe="reference", anomaly_contrast=0.4)
    assert ref4.suffix(ref4.TRAINING) == "-anomaly_contrast=0.4"


def test_train_dry_run_says_what_the_anomaly_contrast_does(tmp_path, capsys):
    from dualanodiff_core.cli import main

    root = make_faint(tmp_path / "faint")
    base = ["train", str(root), "--model", str(tmp_path / "nowhere"), "-o", str(tmp_path / "o.safetensors")]
    assert main(base + ["--dry-run", "--resolution", "16"]) == 0  # the default recipe: 0.4
    err = capsys.readouterr().err
    assert "defects differ from mid-gray by 0.049 (median); amplified 4.00x" in err
    assert main(base + ["--dry-run", "--resolution", "16", "--anomaly-contrast", "0"]) == 0
    assert "not amplified (--anomaly-contrast 0)" in capsys.readouterr().err
    assert main(base + ["--dry-run", "--resolution", "16", "--anomaly-contrast", "0.9"]) == 2
    err = capsys.readouterr().err
    assert "anomaly contrast must lie in [0, 0.5]" in err and "Traceback" not in err
