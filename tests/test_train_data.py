"""Defect data for training: layouts, splits, augmentation, and a clear error for every kind of bad input."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from defect_data import defect_pair, make_flat, make_mvtec, make_side_by_side, save
from PIL import Image

from dualanodiff_core.training.data import (
    DataError,
    DataWarning,
    DefectDataset,
    Draw,
    PairSampler,
    check_defect_set,
    find_defect_set,
    split_count,
)

# ---- layouts --------------------------------------------------------------------------------------------------------


def test_mvtec_layout_sorted_with_masks_and_normals(tmp_path):
    cat = make_mvtec(tmp_path / "widget", n=5, normals=3)
    # a file added out of order still comes back sorted
    img, mask, _ = defect_pair(9)
    save(img, cat / "test" / "scratch" / "0000.png")
    save(mask, cat / "ground_truth" / "scratch" / "0000_mask.png")
    ds = find_defect_set(cat, "scratch")
    assert ds.layout == "mvtec" and ds.defect == "scratch"
    assert [s.image.name for s in ds.samples] == ["000.png", "0000.png", "001.png", "002.png", "003.png", "004.png"]
    assert all(s.mask.name == s.image.stem + "_mask.png" for s in ds.samples)
    assert [p.name for p in ds.normals] == ["000.png", "001.png", "002.png"]


def test_mvtec_unknown_defect_lists_the_available_ones(tmp_path):
    cat = make_mvtec(tmp_path / "widget", other_defects=("hole", "crack"))
    with pytest.raises(DataError, match=r"no such defect folder.*crack, hole, scratch"):
        find_defect_set(cat, "dent")
    with pytest.raises(DataError, match="name the defect"):
        find_defect_set(cat)


def test_flat_folders_match_by_stem_with_or_without_mask_suffix(tmp_path):
    a = find_defect_set(make_flat(tmp_path / "a", n=3, object_masks=True, normals=2))
    b = find_defect_set(make_flat(tmp_path / "b", n=3, mask_suffix="_mask"))
    assert a.layout == b.layout == "flat"
    assert [s.mask.name for s in a.samples] == ["000.png", "001.png", "002.png"]
    assert [s.mask.name for s in b.samples] == ["000_mask.png", "001_mask.png", "002_mask.png"]
    assert a.has_object_masks and not b.has_object_masks
    assert len(a.normals) == 2


def test_side_by_side_layout(tmp_path):
    ds = find_defect_set(make_side_by_side(tmp_path / "d", n=3, objects=True))
    assert ds.layout == "side-by-side"
    assert [(s.image.name, s.mask.name, s.object_mask.name) for s in ds.samples] == [
        (f"img{i}.png", f"img{i}_mask.png", f"img{i}_object.png") for i in range(3)
    ]


@pytest.mark.parametrize(
    "n, strict, ceil, reference",
    [
        (1, 0, 1, 0),
        (5, 1, 2, 2),
        (6, 2, 2, 3),
        (9, 3, 3, 3),
        (10, 3, 4, 3),
        (12, 4, 4, 5),
        (17, 5, 6, 6),
        (19, 6, 7, 6),
        (30, 10, 10, 11),
    ],
)
def test_split_counts(n, strict, ceil, reference):
    # reference = the dual script's `n = len // 3; if n % 3: n += 1` (tests n % 3, not len % 3)
    assert split_count(n, "all") == n
    assert split_count(n, "strict") == strict
    assert split_count(n, "ceil") == ceil
    assert split_count(n, "reference") == reference


def test_split_selects_the_first_sorted_images(tmp_path):
    ds = find_defect_set(make_mvtec(tmp_path / "w", n=6), "scratch")
    assert [s.name for s in ds.select("strict").samples] == ["000", "001"]
    assert [s.name for s in ds.select("reference").samples] == ["000", "001", "002"]
    with pytest.raises(DataError, match="keeps 0 of 2"):
        find_defect_set(make_flat(tmp_path / "f", n=2)).select("strict")


# ---- bad input ------------------------------------------------------------------------------------------------------


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty.*holds no images"):
        find_defect_set(tmp_path / "empty")
    (tmp_path / "f" / "images").mkdir(parents=True)
    (tmp_path / "f" / "masks").mkdir()
    with pytest.raises(DataError, match=r"images.*holds no images"):
        find_defect_set(tmp_path / "f")


def test_image_without_mask_names_the_image_and_the_expected_mask(tmp_path):
    root = make_flat(tmp_path / "f", n=3)
    (root / "masks" / "001.png").unlink()
    with pytest.raises(DataError, match=r"001\.png: image without mask\. Expected 001\.png or 001_mask\.png"):
        find_defect_set(root)
    cat = make_mvtec(tmp_path / "m", n=3)
    (cat / "ground_truth" / "scratch" / "002_mask.png").unlink()
    with pytest.raises(DataError, match=r"002\.png: image without mask.*002_mask\.png"):
        find_defect_set(cat, "scratch")
    side = make_side_by_side(tmp_path / "s", n=2)
    (side / "img1_mask.png").unlink()
    with pytest.raises(DataError, match=r"img1\.png: image without mask.*img1_mask\.png"):
        find_defect_set(side)


def test_images_folder_without_masks_folder(tmp_path):
    root = make_flat(tmp_path / "f", n=2)
    for p in (root / "masks").iterdir():
        p.unlink()
    (root / "masks").rmdir()
    with pytest.raises(DataError, match="no masks/ folder"):
        find_defect_set(root)


def test_mask_size_differs_from_image(tmp_path):
    root = make_flat(tmp_path / "f", n=2)
    Image.fromarray(np.full((8, 12), 255, np.uint8)).save(root / "masks" / "001.png")
    with pytest.raises(DataError, match=r"001\.png: the mask is 12x8 but its image 001\.png is 16x16"):
        check_defect_set(find_defect_set(root))


def test_truncated_image(tmp_path):
    root = make_flat(tmp_path / "f", n=2, size=32)
    p = root / "images" / "001.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(p)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"001\.png: cannot read the image .*truncated or damaged"):
        check_defect_set(find_defect_set(root))


def test_truncated_image_is_refused_even_when_the_host_allows_truncated_images(tmp_path):
    from PIL import ImageFile

    root = make_flat(tmp_path / "f", n=1, size=32)
    p = root / "images" / "000.png"
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(p)
    p.write_bytes(p.read_bytes()[:200])
    old = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = True  # ComfyUI sets this
    try:
        with pytest.raises(DataError, match="truncated or damaged"):
            check_defect_set(find_defect_set(root))
        assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = old


def test_non_image_files(tmp_path):
    root = make_flat(tmp_path / "f", n=2)
    (root / "images" / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match=r"notes\.txt: not an image file.*Move it out of the folder"):
        find_defect_set(root)
    (root / "images" / "notes.txt").unlink()
    (root / "images" / "001.png").write_bytes(b"this is not a png at all")
    with pytest.raises(DataError, match=r"001\.png: not a readable image.*re-export it as PNG or remove it"):
        check_defect_set(find_defect_set(root))


def test_hidden_and_os_files_are_ignored(tmp_path):
    root = make_flat(tmp_path / "f", n=2)
    (root / "images" / ".DS_Store").write_bytes(b"\0\1")
    (root / "images" / "Thumbs.db").write_bytes(b"\0\1")
    assert len(find_defect_set(root)) == 2


def test_all_zero_mask(tmp_path):
    root = make_flat(tmp_path / "f", n=2)
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(root / "masks" / "000.png")
    with pytest.raises(DataError, match=r"000\.png: the mask is empty: no defect pixel.*fix the mask or remove"):
        check_defect_set(find_defect_set(root))
    faint = np.zeros((16, 16), np.uint8)
    faint[2:5, 2:5] = 40
    Image.fromarray(faint).save(root / "masks" / "000.png")
    with pytest.raises(DataError, match="faint non-zero pixels, at most 16% gray"):
        check_defect_set(find_defect_set(root))


def test_gray_mask_is_binarized_at_half_with_a_warning(tmp_path):
    root = make_flat(tmp_path / "f", n=1)
    soft = np.zeros((16, 16), np.uint8)
    soft[4:8, 4:8] = 200  # defect
    soft[10:12, 10:12] = 100  # below 50 %: background
    soft[0, 0] = 128  # exactly at the threshold: defect
    Image.fromarray(soft).save(root / "masks" / "000.png")
    with pytest.warns(DataWarning, match=r"000\.png: the mask is not strictly black/white.*binarized at 50 %"):
        ds = DefectDataset(find_defect_set(root), resolution=16, flips="none")
    m = ds.items[0].mask
    assert m[4:8, 4:8].all() and not m[10:12, 10:12].any() and m[0, 0]
    assert m.sum() == 17


def test_binary_masks_give_no_warning_in_any_storage(tmp_path):
    root = make_flat(tmp_path / "f", n=3)
    _, mask, _ = defect_pair(1)
    Image.fromarray(np.stack([mask] * 3, -1)).save(root / "masks" / "001.png")  # RGB mask
    Image.fromarray(mask > 0).save(root / "masks" / "002.png")  # 1-bit mask
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        ds = DefectDataset(find_defect_set(root), resolution=16)
    for item, i in zip(ds.items, (0, 1, 1)):
        assert (item.mask == (defect_pair(i)[1] > 0)).all()


def test_bcm_needs_object_masks(tmp_path):
    ds = find_defect_set(make_flat(tmp_path / "f", n=2))
    with pytest.raises(DataError, match=r"BCM training needs an object mask.*000\.png.*object_masks/"):
        DefectDataset(ds, resolution=16, backgrounds=True)


def test_object_mask_size_mismatch(tmp_path):
    root = make_flat(tmp_path / "f", n=2, object_masks=True)
    Image.fromarray(np.full((10, 10), 255, np.uint8)).save(root / "object_masks" / "001.png")
    with pytest.raises(DataError, match=r"001\.png: the object mask is 10x10 but its image 001\.png is 16x16"):
        DefectDataset(find_defect_set(root), resolution=16, backgrounds=True)


def test_defect_lost_by_center_crop(tmp_path):
    root = tmp_path / "f"
    img = np.full((16, 48, 3), 90, np.uint8)
    mask = np.zeros((16, 48), np.uint8)
    mask[4:8, 1:5] = 255  # at the far left: a center square crop removes it
    save(img, root / "images" / "a.png")
    save(mask, root / "masks" / "a.png")
    with pytest.raises(DataError, match=r"a\.png: the center crop to a square cuts the whole defect away.*random"):
        DefectDataset(find_defect_set(root), resolution=16, crop="center")
    ds = DefectDataset(find_defect_set(root), resolution=16, crop="random", flips="none")
    for u in np.linspace(0, 0.999, 9):
        _, m, _ = ds.view(Draw(0, False, False, float(u)))
        assert m.shape == (16, 16) and m.any()  # every random window keeps part of the defect
    st = DefectDataset(find_defect_set(root), resolution=16, crop="stretch")
    assert st.items[0].image.shape == (16, 16, 3)


# ---- training views -------------------------------------------------------------------------------------------------


def test_anomaly_target_is_the_defect_on_mid_gray(tmp_path):
    ds = DefectDataset(find_defect_set(make_flat(tmp_path / "f", n=2)), resolution=16, flips="none")
    b = ds.batch([Draw(0, False, False, 0.5), Draw(1, False, False, 0.5)])
    img, mask, _ = defect_pair(0)
    assert b.images.shape == (2, 3, 16, 16) and b.masks.shape == (2, 1, 16, 16)
    assert torch.allclose(b.images[0], torch.from_numpy(img).permute(2, 0, 1).float() / 127.5 - 1)
    a = b.anomaly[0]
    inside = torch.from_numpy(mask > 0)
    assert torch.equal(a[:, inside], b.images[0][:, inside])
    assert torch.equal(a[:, ~inside], torch.zeros_like(a[:, ~inside]))  # 0 in [-1, 1] = mid-gray


def test_flips_are_shared_by_image_mask_and_background(tmp_path):
    root = make_flat(tmp_path / "f", n=1, object_masks=True)
    ds = DefectDataset(find_defect_set(root), resolution=16, backgrounds=True)
    base = ds.batch([Draw(0, False, False, 0.5)])
    for h, v in ((True, False), (False, True), (True, True)):
        b = ds.batch([Draw(0, h, v, 0.5)])
        dims = [d for d, on in ((3, h), (2, v)) if on]
        for name in ("images", "masks", "backgrounds"):
            assert torch.equal(getattr(b, name), torch.flip(getattr(base, name), dims)), name
    # the background is the image with the object blacked out (-1), the rest unchanged
    img, _, obj = defect_pair(0)
    bg = base.backgrounds[0]
    assert torch.equal(bg[:, torch.from_numpy(obj > 0)], -torch.ones_like(bg[:, torch.from_numpy(obj > 0)]))
    out = torch.from_numpy(obj == 0)
    assert torch.equal(bg[:, out], base.images[0][:, out])
    none = DefectDataset(find_defect_set(root), resolution=16, flips="none")
    assert torch.equal(none.batch([Draw(0, True, True, 0.5)]).images, base.images)
    honly = DefectDataset(find_defect_set(root), resolution=16, flips="h")
    assert torch.equal(honly.batch([Draw(0, True, True, 0.5)]).images, torch.flip(base.images, [3]))


def test_resize_to_training_resolution(tmp_path):
    root = tmp_path / "f"
    img = np.full((32, 32, 3), 80, np.uint8)
    mask = np.zeros((32, 32), np.uint8)
    mask[8:16, 12:20] = 255
    img[mask > 0] = (250, 0, 0)
    save(img, root / "images" / "a.png")
    save(mask, root / "masks" / "a.png")
    ds = DefectDataset(find_defect_set(root), resolution=16)
    assert ds.items[0].image.shape == (16, 16, 3)
    expected = np.zeros((16, 16), bool)
    expected[4:8, 6:10] = True
    assert (ds.items[0].mask == expected).all()


def test_sampler_is_seeded_balanced_and_resumable():
    a, b = PairSampler(5, 4, seed=7), PairSampler(5, 4, seed=7)
    seq_a = [a.next_batch() for _ in range(5)]
    assert seq_a == [b.next_batch() for _ in range(5)]
    flat = [d.index for batch in seq_a for d in batch]
    assert sorted(flat) == sorted(list(range(5)) * 4)  # 20 draws = 4 full epochs
    assert {d.hflip for batch in seq_a for d in batch} == {True, False}
    assert [d.index for d in PairSampler(5, 4, seed=8).next_batch()] != [d.index for d in seq_a[0]] or [
        d.hflip for d in PairSampler(5, 4, seed=8).next_batch()
    ] != [d.hflip for d in seq_a[0]]
    c = PairSampler(5, 4, seed=7)
    c.next_batch()
    state = c.state_dict()
    rest = [c.next_batch() for _ in range(3)]
    d = PairSampler(5, 4, seed=123)
    d.load_state_dict(state)
    assert [d.next_batch() for _ in range(3)] == rest


def test_fingerprint_changes_with_file_content(tmp_path):
    root = make_flat(tmp_path / "f", n=2)
    fp = find_defect_set(root).fingerprint()
    assert [r[:2] for r in fp] == [
        ["image", "images/000.png"],
        ["mask", "masks/000.png"],
        ["image", "images/001.png"],
        ["mask", "masks/001.png"],
    ]
    img, _, _ = defect_pair(5)
    save(img, root / "images" / "001.png")
    assert find_defect_set(root).fingerprint() != fp


def test_orphan_masks_warn_and_good_is_not_a_defect(tmp_path):
    root = make_flat(tmp_path / "f", n=2)
    _, mask, _ = defect_pair(0)
    save(mask, root / "masks" / "007.png")
    with pytest.warns(DataWarning, match=r"007\.png: mask without a matching image; ignored"):
        assert len(find_defect_set(root)) == 2
    cat = make_mvtec(tmp_path / "m", n=2)
    with pytest.raises(DataError, match="'good' holds the normal images; name a defect type"):
        find_defect_set(cat, "good")


def test_16_bit_images_are_scaled_not_clipped(tmp_path):
    root = tmp_path / "f"
    g = np.full((16, 16), 30000, np.uint16)  # ~46 % gray in 16 bits
    g[4:8, 4:8] = 65535
    (root / "images").mkdir(parents=True)
    Image.fromarray(g).save(root / "images" / "a.png")
    _, mask, _ = defect_pair(0)
    save(mask, root / "masks" / "a.png")
    with Image.open(root / "images" / "a.png") as im:
        assert im.mode.startswith("I")
    ds = DefectDataset(find_defect_set(root), resolution=16, flips="none")
    img = ds.items[0].image
    assert img[0, 0].tolist() == [117, 117, 117] and img[5, 5].tolist() == [255, 255, 255]
