"""A small reader that follows anomalib's rules for the MVTec AD and Folder layouts (as anomalib documents them), to
check that what we export is read unchanged. Written from the documented behaviour, independent of our export code:

* MVTec: every ``.png``/``.PNG`` under ``root/<category>`` counts; ``(split, label, file)`` are the last three path
  parts; ``ground_truth`` files are masks, sorted by path and assigned in order to the sorted abnormal test images
  (label != "good"); each image stem must be contained in its mask's stem.
* Folder: abnormal images and masks are paired by sorted path order with the same stem check.
* Masks: single-channel 8-bit, same size as the image, values exactly {0, 255} (older anomalib turns anything
  < 255 into 0).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

EXTENSIONS = (".png", ".PNG")


class MisMatchError(AssertionError):
    pass


def _check_mask(image_path: str, mask_path: str) -> None:
    with Image.open(mask_path) as m:
        if m.mode != "L":
            raise MisMatchError(f"{mask_path}: mask mode {m.mode}, expected single-channel 8-bit ('L')")
        arr = np.asarray(m)
        msize = m.size
    with Image.open(image_path) as im:
        isize = im.size
    if msize != isize:
        raise MisMatchError(f"{mask_path}: mask {msize} vs image {isize}")
    values = set(np.unique(arr).tolist())
    if not values <= {0, 255}:
        raise MisMatchError(f"{mask_path}: mask values {sorted(values)[:8]} not in {{0, 255}}")
    if 255 not in values:
        raise MisMatchError(f"{mask_path}: an abnormal sample with an empty mask")


def load_mvtec(root: str | Path, category: str) -> list[dict]:
    """Rows ``{split, label, image_path, mask_path, label_index}`` like anomalib's ``make_mvtec_dataset``."""
    base = Path(root) / category
    rows = []
    for f in base.glob("**/*"):
        if f.suffix in EXTENSIONS:
            split, label, name = f.parts[-3:]
            rows.append({"split": split, "label": label, "image_path": str(base / split / label / name)})
    if not rows:
        raise RuntimeError(f"Found 0 images in {base}")
    masks = sorted((r for r in rows if r["split"] == "ground_truth"), key=lambda r: r["image_path"])
    samples = sorted((r for r in rows if r["split"] != "ground_truth"), key=lambda r: r["image_path"])
    for r in samples:
        r["label_index"] = 0 if r["label"] == "good" else 1
        r["mask_path"] = ""
    abnormal_test = [r for r in samples if r["split"] == "test" and r["label_index"] == 1]
    if len(abnormal_test) != len(masks):
        raise MisMatchError(f"{len(abnormal_test)} abnormal test images but {len(masks)} masks")
    for r, m in zip(abnormal_test, masks):
        r["mask_path"] = m["image_path"]
    for r in samples:
        if r["label_index"] == 1:
            if not r["mask_path"] or Path(r["image_path"]).stem not in Path(r["mask_path"]).stem:
                raise MisMatchError(f"image {r['image_path']} paired with mask {r['mask_path']!r}")
            _check_mask(r["image_path"], r["mask_path"])
    return samples


def load_folder(abnormal_dir: str | Path, mask_dir: str | Path) -> list[tuple[str, str]]:
    """(image, mask) pairs like anomalib's Folder dataset (sorted pairing, stem check)."""
    images = sorted(str(p) for p in Path(abnormal_dir).glob("**/*") if p.suffix in EXTENSIONS)
    masks = sorted(str(p) for p in Path(mask_dir).glob("**/*") if p.suffix in EXTENSIONS)
    if len(images) != len(masks):
        raise MisMatchError(f"{len(images)} images but {len(masks)} masks")
    pairs = list(zip(images, masks))
    for img, m in pairs:
        if Path(img).stem not in Path(m).stem:
            raise MisMatchError(f"image {img} paired with mask {m}")
        _check_mask(img, m)
    return pairs
