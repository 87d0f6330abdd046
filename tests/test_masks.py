"""Mask extraction from the anomaly branch and the quality filter, on synthetic images with known masks."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from dualanodiff_core.dataset.acceptance import FilterOptions, alignment_contrast, check_pair, mask_change_agreement
from dualanodiff_core.dataset.masks import (
    MaskOptions,
    change_mask,
    dilate,
    erode,
    extract_mask,
    fill_holes,
    label_components,
    otsu_threshold,
    refine_visible,
    refine_with_change,
)

H, W = 96, 128
YY, XX = np.mgrid[:H, :W]
DISK = (YY - 40) ** 2 + (XX - 50) ** 2 < 15**2
RECT = (YY > 60) & (YY < 80) & (XX > 80) & (XX < 120)
LINE = (np.abs(YY - (0.5 * XX + 10)) < 2.5) & (XX > 10) & (XX < 110)  # ~4.5 px wide diagonal scratch
TWO = DISK | RECT
SHAPES = {"disk": DISK, "rect": RECT, "line": LINE, "two": TWO}
COLORS = {"dark": (0.1, 0.1, 0.1), "bright": (0.9, 0.85, 0.8), "blue_only": (0.5, 0.5, 0.9), "brown": (0.35, 0.2, 0.1)}


def render(mask, color, bg=(0.5, 0.5, 0.5), noise=0.0, seed=0):
    rng = np.random.default_rng(seed)
    im = np.empty((*mask.shape, 3), np.float32)
    im[:] = bg
    im[mask] = color
    if noise:
        im += rng.normal(0, noise, im.shape).astype(np.float32)
    return (np.clip(im, 0, 1) * 255).round().astype(np.uint8)


def iou(a, b):
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    return (a & b).sum() / max(1, (a | b).sum())


def assert_valid(res, shape):
    assert res.mask.dtype == np.uint8 and res.mask.shape == shape
    assert set(np.unique(res.mask).tolist()) <= {0, 255}
    rec = res.to_record()
    json.dumps(rec, allow_nan=False)  # no NaN / inf anywhere
    for v in (res.area_fraction, res.threshold, res.low_threshold, res.max_contrast, *res.gray_level):
        assert math.isfinite(v)
    assert res.empty == (res.area == 0)
    assert res.area_fraction == pytest.approx(res.area / (shape[0] * shape[1]))


# ---- extraction ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("color", COLORS)
def test_clean_shapes_on_gray(shape, color):
    truth = SHAPES[shape]
    res = extract_mask(render(truth, COLORS[color]))
    assert_valid(res, truth.shape)
    assert not res.empty
    assert iou(res.mask, truth) >= 0.95
    assert res.components == (2 if shape == "two" else 1)


@pytest.mark.parametrize("shape", ["disk", "line", "two"])
def test_noisy_background(shape):
    truth = SHAPES[shape]
    res = extract_mask(render(truth, COLORS["dark"], noise=0.03, seed=1))
    assert_valid(res, truth.shape)
    assert iou(res.mask, truth) >= 0.95


@pytest.mark.parametrize("bg", [(0.45, 0.45, 0.45), (0.56, 0.5, 0.46)])
@pytest.mark.parametrize("gray", ["median", "border"])
def test_background_off_mid_gray_is_estimated(bg, gray):
    res = extract_mask(render(TWO, COLORS["dark"], bg=bg, noise=0.02), gray=gray)
    assert iou(res.mask, TWO) >= 0.95
    assert np.allclose(res.gray_level, bg, atol=0.02)


def test_fixed_gray_level():
    res = extract_mask(render(DISK, COLORS["bright"]), gray=0.5)
    assert res.gray_level == (0.5, 0.5, 0.5)
    assert iou(res.mask, DISK) >= 0.95


@pytest.mark.parametrize(
    "image",
    [
        np.full((H, W, 3), 128, np.uint8),
        np.full((H, W, 3), 127, np.uint8),
        np.full((H, W), 0.5, np.float32),
        torch.full((3, H, W), 0.5),
        Image.new("RGB", (W, H), (128, 128, 128)),
    ],
    ids=["u8-128", "u8-127", "float-gray", "tensor", "pil"],
)
def test_empty_anomaly_image_gives_empty_mask_and_flag(image):
    res = extract_mask(image)
    assert_valid(res, (H, W))
    assert res.empty and res.area == 0 and res.components == 0
    assert "min_contrast" in res.note


def test_noise_only_is_empty_not_a_ghost_mask():
    # a min-max normalised map would turn this noise into a full-contrast "mask"; the absolute floor does not
    res = extract_mask(render(np.zeros((H, W), bool), COLORS["dark"], noise=0.03, seed=3))
    assert_valid(res, (H, W))
    assert res.empty and res.area == 0


def test_faint_defect_is_judged_against_an_absolute_floor():
    img = render(DISK, (0.45, 0.45, 0.45))  # differs from gray by ~0.05
    res = extract_mask(img)
    assert res.empty and res.max_contrast < 0.1
    res2 = extract_mask(img, min_contrast=0.03)
    assert not res2.empty and iou(res2.mask, DISK) >= 0.95


def test_fixed_threshold_level():
    img = render(DISK, (0.3, 0.3, 0.3))  # distance 0.2 from gray
    assert iou(extract_mask(img, threshold=0.1).mask, DISK) >= 0.95
    res = extract_mask(img, threshold=0.3, hysteresis=1.0)
    assert res.empty and res.threshold == pytest.approx(0.3)


def test_min_area_drops_specks_and_dilate_grows():
    speck = (np.abs(YY - 10) <= 1) & (np.abs(XX - 10) <= 1)  # 3x3
    img = render(DISK | speck, COLORS["dark"])
    res = extract_mask(img)  # default min_area 20 px drops the speck
    assert res.components == 1 and iou(res.mask, DISK) >= 0.95
    kept = extract_mask(img, min_area=5, open_radius=0)
    assert kept.components == 2
    grown = extract_mask(img, dilate=3)
    assert grown.area > res.area and np.all(grown.mask[res.mask > 0] == 255)


def test_hairline_needs_open_radius_zero():
    hair = (YY == 50) & (XX > 10) & (XX < 110)
    img = render(hair, COLORS["dark"])
    assert extract_mask(img).empty  # the default opening removes 1-px lines ...
    res = extract_mask(img, open_radius=0, min_area=5)  # ... so they can be kept explicitly
    assert not res.empty and iou(res.mask, hair) >= 0.9


def test_holes_are_filled_by_default():
    ring = ((YY - 48) ** 2 + (XX - 64) ** 2 < 25**2) & ((YY - 48) ** 2 + (XX - 64) ** 2 >= 12**2)
    filled = (YY - 48) ** 2 + (XX - 64) ** 2 < 25**2
    img = render(ring, COLORS["dark"])
    assert iou(extract_mask(img).mask, filled) >= 0.95
    assert iou(extract_mask(img, fill_holes=False).mask, ring) >= 0.95


def test_hysteresis_keeps_a_faint_rim_of_a_strong_defect():
    halo = (YY - 48) ** 2 + (XX - 64) ** 2 < 30**2
    core = (YY - 48) ** 2 + (XX - 64) ** 2 < 14**2
    im = np.full((H, W, 3), 0.5, np.float32)
    im[halo] = 0.63  # faint (0.13 from gray), above the floor
    im[core] = 0.05  # strong, *darker* than gray: smoothing averages the junction towards gray
    img = (im * 255).round().astype(np.uint8)
    assert iou(extract_mask(img).mask, halo) >= 0.95
    assert iou(extract_mask(img, hysteresis=1.0).mask, core) >= 0.9  # Otsu alone takes the core only


def test_soft_edges():
    from dualanodiff_core.dataset.masks import gaussian_blur

    im = render(DISK, COLORS["dark"]).astype(np.float32) / 255
    soft = (np.clip(gaussian_blur(im, 1.0), 0, 1) * 255).round().astype(np.uint8)
    assert iou(extract_mask(soft).mask, DISK) >= 0.9


def test_input_types_agree():
    arr = render(TWO, COLORS["brown"], noise=0.02)
    ref = extract_mask(arr).mask
    variants = [
        Image.fromarray(arr),
        arr.astype(np.float32) / 255,
        torch.from_numpy(arr).permute(2, 0, 1).float() / 255,
        np.dstack([arr, np.full((H, W), 255, np.uint8)]),
    ]
    for v in variants:
        assert np.array_equal(extract_mask(v).mask, ref)


def test_non_square_sizes_and_to_pil():
    m = np.zeros((40, 72), bool)
    m[10:25, 20:50] = True
    res = extract_mask(render(m, COLORS["dark"]))
    pil = res.to_pil()
    assert pil.mode == "L" and pil.size == (72, 40)
    assert iou(res.mask, m) >= 0.95


@pytest.mark.parametrize(
    "kw, word",
    [
        (dict(gray="grey"), "gray"),
        (dict(gray=1.5), "gray"),
        (dict(reduce="sum"), "reduce"),
        (dict(threshold="auto"), "threshold"),
        (dict(threshold=1.5), "threshold"),
        (dict(min_contrast=0), "min_contrast"),
        (dict(hysteresis=0), "hysteresis"),
        (dict(open_radius=-1), "open_radius"),
        (dict(min_area=2.5), "min_area"),
        (dict(connectivity=6), "connectivity"),
        (dict(blur_sigma=-1), "blur_sigma"),
    ],
)
def test_bad_options_name_the_parameter(kw, word):
    with pytest.raises(ValueError, match=word):
        MaskOptions(**kw)


def test_bad_inputs_are_clear():
    bad = np.full((8, 8, 3), 0.5, np.float32)
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        extract_mask(bad)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        extract_mask(np.full((8, 8, 3), 3.0, np.float32))
    with pytest.raises(ValueError, match="batch"):
        extract_mask(torch.zeros(2, 3, 8, 8))


# ---- building blocks -------------------------------------------------------------------------------------------------
def test_components_connectivity_by_hand():
    m = np.zeros((5, 5), bool)
    m[0, 0] = m[1, 1] = True  # diagonal neighbours
    m[3:5, 3:5] = True
    assert label_components(m, 8)[1] == 2
    labels, n = label_components(m, 4)
    assert n == 3 and labels[0, 0] == 1 and labels[1, 1] == 2 and set(labels[3:, 3:].ravel()) == {3}
    assert label_components(np.zeros((3, 3), bool))[1] == 0


def test_components_morphology_and_holes_match_scipy():
    ndi = pytest.importorskip("scipy.ndimage")  # reference only; scipy is not a dependency of the package
    rng = np.random.default_rng(0)
    cross = ndi.generate_binary_structure(2, 1)
    for _ in range(60):
        h, w = rng.integers(1, 30, 2)
        m = rng.random((h, w)) < rng.random()
        for conn in (4, 8):
            ref, n = ndi.label(m, ndi.generate_binary_structure(2, 1 if conn == 4 else 2))
            lab, n2 = label_components(m, conn)
            assert n == n2 and np.array_equal(ref, lab)
        assert np.array_equal(dilate(m, 1), ndi.binary_dilation(m, cross))
        assert np.array_equal(erode(m, 1), ndi.binary_erosion(m, cross, border_value=1))
        assert np.array_equal(fill_holes(m), ndi.binary_fill_holes(m))


def test_otsu_separates_two_modes():
    v = np.concatenate([np.full(900, 0.02), np.full(100, 0.4)])
    t = otsu_threshold(v)
    assert 0.02 <= t < 0.4
    assert otsu_threshold(np.full(10, 0.3)) == pytest.approx(0.3)


# ---- refinement with a known normal image ----------------------------------------------------------------------------
def _normal_and_global():
    rng = np.random.default_rng(5)
    normal = (rng.random((H, W, 3)) * 0.4 + 0.3).astype(np.float32)
    normal = np.repeat(np.repeat(normal[::8, ::8], 8, 0), 8, 1)[:H, :W]  # blocky texture
    glob = normal.copy()
    glob[DISK] = 0.05  # the defect shows in the image at DISK only
    to8 = lambda a: (a * 255).round().astype(np.uint8)  # noqa: E731
    return to8(normal), to8(glob)


def test_change_mask_and_refinement_drop_unsupported_components():
    normal, glob = _normal_and_global()
    change = change_mask(glob, normal)
    assert iou(change, DISK) >= 0.9
    fg = render(TWO, COLORS["dark"])  # the anomaly branch claims DISK and RECT; the image shows DISK only
    plain = extract_mask(fg)
    refined = extract_mask(fg, global_image=glob, normal_image=normal)
    assert plain.components == 2 and refined.components == 1
    assert iou(refined.mask, DISK) >= 0.95 and "refinement dropped 1" in refined.note
    # where the normal image is unknown (e.g. on the object), components are kept
    region = np.ones((H, W), bool)
    region[RECT] = False
    kept, dropped = refine_with_change(plain.mask, change, region)
    assert dropped == 0 and iou(kept, TWO) >= 0.95
    with pytest.raises(ValueError, match="both"):
        extract_mask(fg, global_image=glob)


# ---- refinement by what the generated global image shows ------------------------------------------------------------
DISK_HALO = (YY - 40) ** 2 + (XX - 50) ** 2 < 19**2  # what a halo-drawing anomaly branch marks around DISK
VISIBLE = MaskOptions(visible_min_deviation=2.0)


def _textured(*shown):
    """A fine woven-like texture (gray, +-0.06) with a dark defect at every mask in ``shown``, uint8."""
    rng = np.random.default_rng(7)
    tex = 0.5 + 0.04 * np.sin(XX * 1.9)[..., None] * np.cos(YY * 1.7)[..., None]
    tex = tex + rng.normal(0, 0.02, (H, W, 3))
    for m in shown:
        tex[m] = 0.12
    return (np.clip(tex, 0, 1) * 255).round().astype(np.uint8)


def test_visible_refinement_cuts_a_halo_back_to_what_the_image_shows():
    glob = _textured(DISK)
    fg = render(DISK_HALO, COLORS["dark"])  # the anomaly branch drew the hole 4 px too large
    plain = extract_mask(fg)
    assert iou(plain.mask, DISK_HALO) > 0.9 and iou(plain.mask, DISK) < 0.7
    res = extract_mask(fg, VISIBLE, global_image=glob)
    assert_valid(res, (H, W))
    assert iou(res.mask, DISK) >= 0.9
    # the image shows about (15/19)^2 = 0.62 of what was drawn (texture pixels at the hole's rim may join it)
    assert DISK.sum() / res.drawn.sum() - 0.03 < res.visible_share < DISK.sum() / res.drawn.sum() + 0.1
    assert iou(res.drawn, DISK_HALO) > 0.9  # the mask as drawn is kept for the alignment check
    assert res.to_record()["visible_share"] == pytest.approx(res.visible_share, abs=1e-6)
    # the final dilation comes after the refinement
    grown = extract_mask(fg, VISIBLE.replace(dilate=2), global_image=glob)
    assert np.array_equal(grown.mask > 0, dilate(res.mask > 0, 2))


def test_visible_refinement_drops_parts_the_image_does_not_show_and_reaches_a_little_beyond():
    glob = _textured(DISK)
    res = extract_mask(render(TWO, COLORS["dark"]), VISIBLE, global_image=glob)  # drawn: DISK and RECT
    assert res.components == 1 and iou(res.mask, DISK) >= 0.9
    assert DISK.sum() / res.drawn.sum() - 0.03 < res.visible_share < DISK.sum() / res.drawn.sum() + 0.1
    assert iou(res.drawn, TWO) > 0.9
    # drawn 2 px too small: the refinement looks up to visible_search (2) px beyond the mask
    small = erode(DISK, 2)
    res = extract_mask(render(small, COLORS["dark"]), VISIBLE, global_image=glob)
    assert iou(small, DISK) < 0.8 and iou(res.mask, DISK) >= 0.9
    # a second defect in the image that the anomaly branch did not draw is not picked up
    glob2 = _textured(DISK, RECT)
    assert iou(refine_visible(glob2, DISK, VISIBLE), DISK) >= 0.9
    assert not (refine_visible(glob2, DISK, VISIBLE) & RECT).any()


def test_visible_refinement_of_a_defect_the_image_does_not_show_is_misaligned():
    glob = _textured()  # texture only
    res = extract_mask(render(DISK, COLORS["dark"]), VISIBLE, global_image=glob)
    assert res.empty and res.area == 0 and res.visible_share == 0.0
    assert "does not show the defect" in res.note
    d = check_pair(res, global_image=glob)
    assert not d.accepted and d.reason == "misaligned"
    # without the refinement the same pair fails the alignment check instead (the image shows nothing there)
    d0 = check_pair(extract_mask(render(DISK, COLORS["dark"])), global_image=glob)
    assert d0.reason == "misaligned"


def test_alignment_check_runs_on_the_mask_as_drawn():
    glob = _textured(DISK)
    res = extract_mask(render(DISK_HALO, COLORS["dark"]), VISIBLE, global_image=glob)
    d = check_pair(res, global_image=glob)
    assert d.accepted
    assert d.alignment == pytest.approx(alignment_contrast(glob, res.drawn))
    assert d.alignment < alignment_contrast(glob, res.mask)  # the refined mask would score higher (chosen so)


def test_visible_refinement_options_and_errors():
    with pytest.raises(ValueError, match="visible_min_deviation"):
        MaskOptions(visible_min_deviation=-1)
    with pytest.raises(ValueError, match="visible_ring"):
        MaskOptions(visible_ring=0)
    with pytest.raises(ValueError, match="visible_search"):
        MaskOptions(visible_search=-1)
    fg = render(DISK, COLORS["dark"])
    with pytest.raises(ValueError, match="both"):
        extract_mask(fg, global_image=_textured(DISK))  # the refinement is off: a global image alone is a mistake
    # off by default: the mask is the anomaly branch's
    assert extract_mask(fg).visible_share is None and extract_mask(fg).drawn is None


# ---- quality filter ------------------------------------------------------------------------------------------------
def test_filter_accepts_a_good_pair_and_records_numbers():
    res = extract_mask(render(DISK, COLORS["dark"]))
    d = check_pair(res)
    assert d.accepted and d.reason == "ok"
    assert d.area_fraction == pytest.approx(DISK.mean(), rel=0.05) and d.gray_offset < 0.01
    rec = d.to_record()
    assert rec["accepted"] is True and rec["reason"] == "ok" and rec["agreement"] is None
    json.dumps(rec, allow_nan=False)


def test_filter_rejects_empty_masks():
    d = check_pair(extract_mask(np.full((H, W, 3), 128, np.uint8)))
    assert not d.accepted and d.reason == "empty_mask" and "min_contrast" in d.detail


def test_filter_rejects_too_large_and_too_small():
    res = extract_mask(render(DISK, COLORS["dark"]))  # ~5.8 % of the image
    d = check_pair(res, FilterOptions(max_area=0.05))
    assert not d.accepted and d.reason == "mask_too_large" and "limit 5%" in d.detail
    d = check_pair(res, FilterOptions(min_area=0.1))
    assert not d.accepted and d.reason == "mask_too_small"


def test_filter_rejects_a_non_gray_anomaly_image():
    big = YY < 70  # a "defect" over 73 % of the image: the median is the defect colour, not gray
    res = extract_mask(render(big, COLORS["dark"]))
    d = check_pair(res)
    assert not d.accepted and d.reason == "background_not_gray" and d.gray_offset > 0.3
    # the same check catches a product photo passed instead of the anomaly-branch image
    photo = render(DISK, COLORS["dark"], bg=(0.85, 0.7, 0.25))
    assert check_pair(extract_mask(photo)).reason == "background_not_gray"
    assert check_pair(extract_mask(photo), FilterOptions(max_gray_offset=1.0)).reason == "ok"


def test_filter_against_the_normal_image():
    normal, glob = _normal_and_global()
    good = extract_mask(render(DISK, COLORS["dark"]))
    d = check_pair(good, global_image=glob, normal_image=normal)
    assert d.accepted and d.agreement > 0.9 and 0 < d.change_fraction < 0.1
    wrong_place = extract_mask(render(RECT, COLORS["dark"]))
    d = check_pair(wrong_place, global_image=glob, normal_image=normal)
    assert not d.accepted and d.reason == "disagrees_with_normal" and d.agreement < 0.1
    # background corruption: the image changed far from the mask
    corrupted = glob.copy()
    corrupted[RECT] = 250
    d = check_pair(good, global_image=corrupted, normal_image=normal, known_region=None)
    assert d.agreement < 0.9
    # outside the known region nothing is compared
    region = np.ones((H, W), bool)
    region[DISK | RECT] = False
    d = check_pair(wrong_place, global_image=glob, normal_image=normal, known_region=region)
    assert d.agreement == 1.0 and d.reason == "misaligned"  # ... but the image shows no defect under the mask
    d = check_pair(
        wrong_place, FilterOptions(min_alignment=0), global_image=glob, normal_image=normal, known_region=region
    )
    assert d.accepted and d.agreement == 1.0


def test_agreement_metric():
    m = np.zeros((20, 20), bool)
    m[5:10, 5:10] = True
    assert mask_change_agreement(m, m) == 1.0
    assert mask_change_agreement(np.zeros_like(m), np.zeros_like(m)) == 1.0
    shifted = np.roll(m, 2, axis=1)
    assert mask_change_agreement(m, shifted, tolerance=3) == 1.0
    assert mask_change_agreement(m, shifted, tolerance=0) == pytest.approx(0.6)
    far = np.roll(m, 10, axis=0)
    assert mask_change_agreement(m, far) == 0.0


def test_filter_option_errors():
    with pytest.raises(ValueError, match="max_area"):
        FilterOptions(max_area=1.5)
    with pytest.raises(ValueError, match="min_area"):
        FilterOptions(min_area=0.6, max_area=0.5)
