"""Defect training data: one defect type, a few (image, mask) pairs, optional object masks and normal images.

Layouts (:func:`find_defect_set` detects which one a path holds):

* **MVTec** -- a category folder and a defect name::

      <category>/test/<defect>/000.png ...            defect images
      <category>/ground_truth/<defect>/000_mask.png   their masks (white = defect)
      <category>/train/good/*.png                     normal images (optional; used for BCM backgrounds at inference)

* **flat, two folders** -- ``<folder>/images/x.png`` + ``<folder>/masks/x.png`` (or ``x_mask.png``), matched by stem;
* **flat, side by side** -- ``<folder>/x.png`` beside ``<folder>/x_mask.png``.

Flat folders may also hold ``normals/`` (or ``good/``) with normal images and ``object_masks/`` with object masks;
side-by-side folders may hold ``x_object.png`` beside ``x.png``.

**Object masks** (white = the object, black = background) are only needed for BCM training: the background of every
training image is that image with its object blacked out
(:func:`dualanodiff_core.training.backgrounds.make_background`),
exactly as the reference builds it from U2-Net masks (docs/method.md, "BCM: background compensation"). For MVTec data
pass a folder holding
``<stem>.png`` (or ``<stem>_mask.png``) per defect image.

Everything is sorted by file name (plain string order, like Python's ``sorted``), so splits and training order are
deterministic. Bad input raises :class:`DataError` naming the file and what to do. A mask that is not strictly
black/white is binarized at 50 % with a :class:`DataWarning`.

Training views (:class:`DefectDataset`): the image is resized so its shorter side equals the resolution (bilinear),
then cropped to a square (``center``; ``random``, the reference's RandomCrop, restricted to windows that keep part of
the defect; or ``stretch``: resized to a square ignoring the aspect ratio), then flipped at random (horizontal and
vertical, p = 0.5 each, the same flip for the image, its mask and its background). The anomaly-branch target is
``image * mask`` computed in [-1, 1], i.e. the defect on mid-gray (docs/method.md, "Training").
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from ..errors import DualAnoDiffError
from ..fileio import IMAGE_SUFFIXES, sha256_file
from .backgrounds import make_background

#: operating-system clutter that is skipped silently (besides dot-files)
IGNORED_FILES = frozenset({"thumbs.db", "desktop.ini"})
MASK_SUFFIX = "_mask"
OBJECT_SUFFIX = "_object"
NORMAL_FOLDERS = ("normals", "good")
OBJECT_MASK_FOLDER = "object_masks"

#: split modes (which sorted images are used for training)
SPLITS = ("all", "strict", "ceil", "reference")
SPLIT_HELP = {
    "all": "every image",
    "strict": "the first third, rounded down: n = len // 3 (the AnomalyDiffusion protocol; no test image leaks in)",
    "ceil": "the first third, rounded up: n = ceil(len / 3) (the reference BCM script's count, on sorted names)",
    "reference": "the reference dual script's exact count: n = len // 3, plus 1 when n % 3 != 0 (its buggy ceiling)",
}
FLIPS = ("hv", "h", "v", "none")
CROPS = ("center", "random", "stretch")


class DataError(DualAnoDiffError, ValueError):
    """The training data cannot be used as it is; the message names the file and the fix."""


class DataWarning(UserWarning):
    """Something in the training data was repaired (e.g. a gray-level mask binarized)."""


# ---------------------------------------------------------------------------------------------------------------------
# discovery


@dataclasses.dataclass(frozen=True)
class DefectSample:
    """One training image, its defect mask and (optional) its object mask."""

    image: Path
    mask: Path
    object_mask: Path | None = None

    @property
    def name(self) -> str:
        return self.image.stem


@dataclasses.dataclass
class DefectSet:
    """The files of one defect type, sorted by image name."""

    samples: list[DefectSample]
    normals: list[Path]
    root: Path
    layout: str  # "mvtec" | "flat" | "side-by-side"
    defect: str | None = None
    split: str = "all"
    total: int | None = None  # images before the split

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def has_object_masks(self) -> bool:
        return bool(self.samples) and all(s.object_mask is not None for s in self.samples)

    def select(self, mode: str) -> DefectSet:
        """The training images of a split mode (see :data:`SPLITS`)."""
        n = split_count(len(self.samples), mode)
        if n == 0:
            raise DataError(
                f"{self.root}: split {mode!r} keeps 0 of {len(self.samples)} image(s) ({SPLIT_HELP[mode]}); "
                "add images or use split 'all'."
            )
        return dataclasses.replace(self, samples=self.samples[:n], split=mode, total=len(self.samples))

    def require_object_masks(self) -> None:
        missing = [s.image for s in self.samples if s.object_mask is None]
        if missing:
            shown = ", ".join(str(p) for p in missing[:5]) + (
                f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
            )
            raise DataError(
                f"BCM training needs an object mask for every training image (white = object), to black the object "
                f"out of its background; none found for: {shown}. Put them in '{OBJECT_MASK_FOLDER}/' "
                f"(<name>.png or <name>_mask.png), pass an object-mask folder, or train without BCM."
            )

    def describe(self) -> str:
        split = f", split {self.split!r}: {len(self.samples)} of {self.total}" if self.total is not None else ""
        defect = f" defect {self.defect!r}" if self.defect else ""
        obj = ", object masks: yes" if self.has_object_masks else ""
        return (
            f"{self.root} ({self.layout}{defect}): {len(self.samples)} training image(s){split}, "
            f"{len(self.normals)} normal image(s){obj}"
        )

    def fingerprint(self) -> list[list[str]]:
        """``[[role, path relative to root, sha256], ...]`` of every training file (checked when resuming)."""
        out = []
        for s in self.samples:
            for role, p in (("image", s.image), ("mask", s.mask), ("object_mask", s.object_mask)):
                if p is not None:
                    out.append([role, _rel(p, self.root), sha256_file(p)])
        return out


def split_count(n: int, mode: str) -> int:
    """How many of ``n`` sorted images a split mode trains on."""
    if mode == "all":
        return n
    if mode == "strict":
        return n // 3
    if mode == "ceil":
        return math.ceil(n / 3)
    if mode == "reference":
        k = n // 3
        return min(n, k + 1) if k % 3 else k
    raise DataError(f"unknown split {mode!r}; choose one of {', '.join(SPLITS)}")


def _rel(p: Path, root: Path) -> str:
    try:
        return p.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(p)


def _is_ignored(p: Path) -> bool:
    return p.name.startswith(".") or p.name.lower() in IGNORED_FILES


def _is_image_name(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_SUFFIXES


def list_images(folder: Path, what: str, allow_empty: bool = False) -> list[Path]:
    """Sorted image files of a folder; any other (non-hidden) file is an error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder ({what}).")
    files, others = [], []
    for p in sorted(folder.iterdir(), key=lambda q: q.name):
        if p.is_dir() or _is_ignored(p):
            continue
        (files if _is_image_name(p) else others).append(p)
    if others:
        raise DataError(
            f"{others[0]}: not an image file ({what} may only hold images: {', '.join(IMAGE_SUFFIXES)}). "
            "Move it out of the folder or convert it to PNG."
            + (f" ({len(others) - 1} more such file(s))" if len(others) > 1 else "")
        )
    if not files and not allow_empty:
        raise DataError(
            f"{folder}: the folder holds no images ({what}); put {', '.join(IMAGE_SUFFIXES[:3])} files there."
        )
    return files


def _match_by_stem(stem: str, candidates: dict[str, list[Path]], suffixes: Sequence[str]) -> list[Path]:
    found = []
    for suf in suffixes:
        found.extend(candidates.get(stem + suf, []))
    return found


def _index_by_stem(files: Iterable[Path]) -> dict[str, list[Path]]:
    out: dict[str, list[Path]] = {}
    for p in files:
        out.setdefault(p.stem, []).append(p)
    return out


def match_masks(
    images: Sequence[Path],
    mask_files: Sequence[Path],
    what: str = "mask",
    suffixes: Sequence[str] = ("", MASK_SUFFIX),
    required: bool = True,
) -> list[Path | None]:
    """For each image the file in ``mask_files`` named ``<stem><suffix>.<any image ext>``."""
    index = _index_by_stem(mask_files)
    out: list[Path | None] = []
    for img in images:
        found = _match_by_stem(img.stem, index, suffixes)
        if len(found) > 1:
            raise DataError(
                f"{img}: several {what} files match it ({', '.join(str(f) for f in found)}); keep only one."
            )
        if not found:
            if required:
                folder = mask_files[0].parent if mask_files else None
                names = " or ".join(f"{img.stem}{s}.png" for s in suffixes)
                raise DataError(
                    f"{img}: image without {what}. Expected {names}"
                    + (f" in {folder}" if folder else "")
                    + f"; add the {what} or remove the image."
                )
            out.append(None)
        else:
            out.append(found[0])
    return out


def _warn_orphans(masks: Sequence[Path], used: Iterable[Path | None], what: str = "mask") -> None:
    used = set(used)
    orphans = [m for m in masks if m not in used]
    if orphans:
        warnings.warn(
            f"{orphans[0]}: {what} without a matching image; ignored (is an image missing or named differently?)"
            + (f" ({len(orphans) - 1} more such file(s))" if len(orphans) > 1 else ""),
            DataWarning,
            stacklevel=3,
        )


def object_mask_files(folder: str | os.PathLike) -> list[Path]:
    return list_images(Path(folder), "object masks", allow_empty=False)


def find_mvtec(category: str | os.PathLike, defect: str, object_masks: str | os.PathLike | None = None) -> DefectSet:
    """``<category>/test/<defect>`` images, ``ground_truth/<defect>/<stem>_mask.png`` masks, ``train/good`` normals."""
    root = Path(category)
    if not defect:
        raise DataError(
            f"{root}: an MVTec category folder needs a defect name (one of {', '.join(mvtec_defects(root))})."
        )
    if defect == "good":
        raise DataError(
            f"{root}: 'good' holds the normal images; name a defect type to train "
            f"({', '.join(mvtec_defects(root)) or 'none found'})."
        )
    test = root / "test" / defect
    if not test.is_dir():
        avail = mvtec_defects(root)
        raise DataError(
            f"{test}: no such defect folder. "
            + (f"Defects in {root}: {', '.join(avail)}." if avail else f"{root / 'test'} holds no defect folders.")
        )
    images = list_images(test, f"defect images of {defect!r}")
    gt = root / "ground_truth" / defect
    if not gt.is_dir():
        raise DataError(f"{gt}: no such folder; MVTec masks go in ground_truth/{defect}/<name>_mask.png.")
    mask_files = list_images(gt, f"masks of {defect!r}")
    masks = match_masks(images, mask_files, suffixes=(MASK_SUFFIX, ""))
    _warn_orphans(mask_files, masks)
    objs = _object_masks_for(images, object_masks)
    normals = (
        list_images(root / "train" / "good", "normal images", allow_empty=True)
        if (root / "train" / "good").is_dir()
        else []
    )
    samples = [DefectSample(i, m, o) for i, m, o in zip(images, masks, objs)]
    return DefectSet(samples, normals, root, "mvtec", defect)


def mvtec_defects(root: Path) -> list[str]:
    test = Path(root) / "test"
    if not test.is_dir():
        return []
    return sorted(p.name for p in test.iterdir() if p.is_dir() and p.name != "good" and not p.name.startswith("."))


def _object_masks_for(images: Sequence[Path], folder: str | os.PathLike | None) -> list[Path | None]:
    if folder is None:
        return [None] * len(images)
    return match_masks(
        images, object_mask_files(folder), "object mask", suffixes=("", MASK_SUFFIX, OBJECT_SUFFIX), required=False
    )


def find_flat(folder: str | os.PathLike, object_masks: str | os.PathLike | None = None) -> DefectSet:
    """``images/`` + ``masks/`` matched by stem, or ``x.png`` beside ``x_mask.png``."""
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder. Give a folder of defect images with masks (see `--help`).")
    normals: list[Path] = []
    for name in NORMAL_FOLDERS:
        if (root / name).is_dir():
            normals = list_images(root / name, "normal images", allow_empty=True)
            break
    if object_masks is None and (root / OBJECT_MASK_FOLDER).is_dir():
        object_masks = root / OBJECT_MASK_FOLDER

    if (root / "images").is_dir():
        images = list_images(root / "images", "defect images")
        if not (root / "masks").is_dir():
            raise DataError(
                f"{root}: has images/ but no masks/ folder; put one mask per image in {root / 'masks'} "
                "(same name as the image, or <name>_mask.png)."
            )
        mask_files = list_images(root / "masks", "masks")
        masks = match_masks(images, mask_files)
        _warn_orphans(mask_files, masks)
        objs = _object_masks_for(images, object_masks)
        return DefectSet([DefectSample(i, m, o) for i, m, o in zip(images, masks, objs)], normals, root, "flat")

    files = list_images(root, "defect images with masks beside them")
    masks_ = [p for p in files if p.stem.endswith(MASK_SUFFIX)]
    objects_ = [p for p in files if p.stem.endswith(OBJECT_SUFFIX)]
    images = [p for p in files if not p.stem.endswith((MASK_SUFFIX, OBJECT_SUFFIX))]
    if not images:
        raise DataError(f"{root}: only mask files, no defect images (x.png beside x_mask.png).")
    masks = match_masks(images, masks_, suffixes=(MASK_SUFFIX,))
    _warn_orphans(masks_, masks)
    if object_masks is not None:
        objs = _object_masks_for(images, object_masks)
    else:
        objs = match_masks(images, objects_, "object mask", suffixes=(OBJECT_SUFFIX,), required=False)
    return DefectSet([DefectSample(i, m, o) for i, m, o in zip(images, masks, objs)], normals, root, "side-by-side")


def find_defect_set(
    path: str | os.PathLike, defect: str | None = None, object_masks: str | os.PathLike | None = None
) -> DefectSet:
    """Detect the layout: an MVTec category (``path/test/`` and a defect name) or a flat folder."""
    root = Path(path)
    if not root.exists():
        raise DataError(f"{root}: no such folder.")
    if (root / "test").is_dir() and (root / "ground_truth").is_dir():
        if not defect:
            raise DataError(
                f"{root} is an MVTec category folder; name the defect to train (one of "
                f"{', '.join(mvtec_defects(root)) or 'none found'})."
            )
        return find_mvtec(root, defect, object_masks)
    if defect:
        if (root / defect / "test").is_dir():
            raise DataError(f"{root}: this looks like the MVTec root; give the category folder, e.g. {root / defect}.")
        raise DataError(
            f"{root}: a defect name ({defect!r}) was given but this is not an MVTec category folder "
            "(no test/ and ground_truth/ inside). Drop the defect name for a flat folder."
        )
    return find_flat(root, object_masks)


# ---------------------------------------------------------------------------------------------------------------------
# reading and checking files


def read_image(path: Path, what: str = "image") -> Image.Image:
    """Open and fully decode an image (so truncated files fail here), apply its EXIF orientation."""
    old = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # some hosts (ComfyUI) turn this on; a half image must not train
    from ..fileio import open_image

    try:
        with open_image(path, what) as im:
            im.load()
            return ImageOps.exif_transpose(im)
    except DualAnoDiffError:
        raise
    except UnidentifiedImageError:
        raise DataError(
            f"{path}: not a readable {what} (unknown or corrupt format); re-export it as PNG or remove it."
        ) from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(
            f"{path}: cannot read the {what} ({e}); the file is truncated or damaged, re-export it as PNG or remove it."
        ) from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = old


def to_rgb8(im: Image.Image) -> Image.Image:
    """Any image as 8-bit RGB; 16-bit and float grayscale (industrial cameras) are scaled, not clipped."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        g = _gray01(im)
        return Image.fromarray(np.clip(np.rint(g * 255), 0, 255).astype(np.uint8)).convert("RGB")
    return im.convert("RGB")


def _gray01(im: Image.Image) -> np.ndarray:
    """A mask image as float in [0, 1] (any bit depth; alpha-only masks use their alpha)."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
        if im.mode == "F" and arr.max() <= 1.0:
            top = 1.0
        return np.clip(arr / top, 0, 1)
    if im.mode == "1":
        return np.asarray(im, dtype=np.float64)
    if im.mode in ("LA", "RGBA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        gray = np.asarray(rgba.convert("L"), dtype=np.float64) / 255.0
        alpha = np.asarray(rgba.getchannel("A"), dtype=np.float64) / 255.0
        if gray.max() == gray.min() and alpha.min() < 1.0:  # mask drawn only in the alpha channel
            return alpha
        return gray * alpha
    return np.asarray(im.convert("L"), dtype=np.float64) / 255.0


def read_training_mask(path: Path, size: tuple[int, int], image_path: Path, what: str = "mask") -> np.ndarray:
    """A defect mask as bool ``[H, W]``: checked against the image size, binarized at 50 %, never empty."""
    im = read_image(path, what)
    if im.size != size:
        raise DataError(
            f"{path}: the {what} is {im.size[0]}x{im.size[1]} but its image {image_path.name} is {size[0]}x{size[1]}; "
            f"a {what} must have the image's exact size (re-export it, or resize it with nearest-neighbour)."
        )
    g = _gray01(im)
    binary = g >= 0.5
    if not binary.any():
        hint = _empty_mask_hint(im, g)
        raise DataError(
            f"{path}: the {what} is empty{hint}: no defect pixel. Every training image must show the defect, "
            "marked white (255) in its mask; fix the mask or remove the image."
        )
    levels = np.unique(g)
    if not (len(levels) <= 2 and set(levels.tolist()) <= {0.0, 1.0}):
        warnings.warn(
            f"{path}: the {what} is not strictly black/white ({len(levels)} gray levels); binarized at 50 % "
            f"({int(binary.sum())} defect pixels). Save masks as 0/255 PNG to silence this.",
            DataWarning,
            stacklevel=2,
        )
    return binary


def _empty_mask_hint(im: Image.Image, g: np.ndarray) -> str:
    """Why a mask with some non-zero pixels has no pixel at 50 % or more."""
    if g.max() <= 0:
        return ""
    if im.mode in ("RGB", "RGBA", "P", "PA"):
        rgb = np.asarray(im.convert("RGB"))
        if rgb.max() >= 128:
            return (
                " (it is colored, e.g. red on black, which is dark once made gray: masks are white (255) on black; "
                "make the defect pixels white)"
            )
    if g.max() * 255 <= 1.5:
        return " (its values are only 0 and 1, a 0/1 mask saved as 8-bit: multiply it by 255 so the defect is white)"
    return f" (it has faint non-zero pixels, at most {g.max():.0%} gray; the defect must be at least 50 % white)"


def read_object_mask(path: Path, size: tuple[int, int], image_path: Path) -> Image.Image:
    """An object mask as a soft ``L`` image (kept soft, like the reference's U2-Net saliency masks)."""
    im = read_image(path, "object mask")
    if im.size != size:
        raise DataError(
            f"{path}: the object mask is {im.size[0]}x{im.size[1]} but its image {image_path.name} is "
            f"{size[0]}x{size[1]}; give a mask of the image's exact size."
        )
    g = _gray01(im)
    if not (g > 0).any():
        raise DataError(f"{path}: the object mask is empty (all black); it must mark the object white.")
    return Image.fromarray(np.clip(np.rint(g * 255), 0, 255).astype(np.uint8))


def check_defect_set(ds: DefectSet, backgrounds: bool = False) -> None:
    """Open every file and check it (sizes, empty masks, truncation) without keeping anything."""
    if backgrounds:
        ds.require_object_masks()
    for s in ds.samples:
        img = read_image(s.image)
        read_training_mask(s.mask, img.size, s.image)
        if backgrounds and s.object_mask is not None:
            read_object_mask(s.object_mask, img.size, s.image)


# ---------------------------------------------------------------------------------------------------------------------
# training views


def anomaly_target(images: torch.Tensor, masks: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
    """The anomaly-branch image: ``image * mask`` in [-1, 1], i.e. the defect on mid-gray (docs/method.md,
    "Training").

    ``gain`` > 1 (not the reference; ``TrainConfig.anomaly_contrast``) amplifies the defect's difference from mid-gray,
    clipped to [-1, 1]: a defect whose colours lie close to mid-gray (a gray stain on gray metal) is then drawn with
    enough contrast for its mask to be extracted. 1 is the reference, bit for bit."""
    target = images * masks.to(images.dtype)
    return target if gain == 1.0 else (target * gain).clamp(-1.0, 1.0)


def defect_contrast(images: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> float:
    """The median, over every defect pixel of the given images, of its difference from mid-gray (the largest over
    the colour channels), in image units [0, 0.5]: how visible the defect is on the anomaly branch's background.
    0.0 when there is no defect pixel. ``images``: uint8 ``[H, W, 3]``; ``masks``: bool ``[H, W]``."""
    values = [
        (np.abs(img.astype(np.float32) - 127.5).max(axis=-1) / 255.0)[np.asarray(m, dtype=bool)]
        for img, m in zip(images, masks)
    ]
    values = [v for v in values if v.size]
    return float(np.median(np.concatenate(values))) if values else 0.0


@dataclasses.dataclass
class _Item:
    image: np.ndarray  # uint8 [H, W, 3], shorter side = resolution (or exactly R x R for stretch)
    mask: np.ndarray  # bool [H, W]
    background: np.ndarray | None  # uint8 [H, W, 3]
    name: str
    valid_offsets: np.ndarray  # crop offsets along the long side that keep part of the defect


@dataclasses.dataclass
class Draw:
    """One item of a batch: which image and how it is augmented."""

    index: int
    hflip: bool
    vflip: bool
    crop: float  # in [0, 1): picks a random-crop window among the valid ones


@dataclasses.dataclass
class Batch:
    images: torch.Tensor  # [B, 3, R, R] in [-1, 1]
    masks: torch.Tensor  # [B, 1, R, R] in {0, 1}
    backgrounds: torch.Tensor | None  # [B, 3, R, R] in [-1, 1]
    names: list[str]

    @property
    def anomaly(self) -> torch.Tensor:
        return anomaly_target(self.images, self.masks)


class DefectDataset:
    """The training images of one defect, decoded once, resized to the training resolution and kept in memory.

    ``backgrounds=True`` builds each image's BCM background (object blacked out) and needs object masks.
    """

    def __init__(
        self,
        defect_set: DefectSet,
        resolution: int = 512,
        flips: str = "hv",
        crop: str = "center",
        backgrounds: bool = False,
        multiple_of: int = 8,
    ):
        if flips not in FLIPS:
            raise DataError(f"unknown flips {flips!r}; choose one of {', '.join(FLIPS)}")
        if crop not in CROPS:
            raise DataError(f"unknown crop {crop!r}; choose one of {', '.join(CROPS)}")
        if resolution < multiple_of or resolution % multiple_of:
            raise DataError(f"resolution {resolution} must be a positive multiple of {multiple_of} (the VAE's factor).")
        if not defect_set.samples:
            raise DataError(f"{defect_set.root}: no training images.")
        if backgrounds:
            defect_set.require_object_masks()
        self.defect_set = defect_set
        self.resolution = resolution
        self.flips = flips
        self.crop = crop
        self.backgrounds = backgrounds
        self.items = [self._load(s) for s in defect_set.samples]

    def __len__(self) -> int:
        return len(self.items)

    def defect_contrast(self) -> float:
        """:func:`defect_contrast` of the training images at the training resolution (before any crop or flip)."""
        return defect_contrast([it.image for it in self.items], [it.mask for it in self.items])

    @property
    def names(self) -> list[str]:
        return [it.name for it in self.items]

    def _load(self, s: DefectSample) -> _Item:

        R = self.resolution
        img = to_rgb8(read_image(s.image))
        mask = read_training_mask(s.mask, img.size, s.image)
        bg = None
        if self.backgrounds:
            obj = read_object_mask(s.object_mask, img.size, s.image)
            bg = make_background(img, obj)
        w, h = img.size
        if min(w, h) * 4 < R:
            warnings.warn(
                f"{s.image}: the image is only {w}x{h} px; it is upscaled to {R} px and will be blurry. Use photos of "
                f"at least {R} px on the short side (or a smaller --resolution).",
                DataWarning,
                stacklevel=2,
            )
        if self.crop == "stretch":
            size = (R, R)
        else:
            scale = R / min(w, h)
            size = (max(R, round(w * scale)), max(R, round(h * scale)))
        img_r = np.asarray(img.resize(size, Image.BILINEAR), dtype=np.uint8)
        mask_f = Image.fromarray(mask.astype(np.float32)).resize(size, Image.BILINEAR)
        mask_r = np.asarray(mask_f) >= 0.5
        bg_r = None if bg is None else np.asarray(bg.resize(size, Image.BILINEAR), dtype=np.uint8)
        if not mask_r.any():
            raise DataError(
                f"{s.mask}: the defect ({int(mask.sum())} pixels) disappears when the image is resized to {R} px; "
                "use a larger resolution, or crop the photo closer around the defect."
            )
        long_axis = 1 if mask_r.shape[1] > R else 0
        L = mask_r.shape[long_axis]
        cols = mask_r.any(axis=1 - long_axis).astype(np.int64)  # defect present at each position of the long side
        csum = np.concatenate([[0], np.cumsum(cols)])
        offsets = np.arange(0, L - R + 1)
        valid = offsets[(csum[offsets + R] - csum[offsets]) > 0]
        if self.crop == "center" and L > R:
            c = (L - R) // 2
            if c not in set(valid.tolist()):
                raise DataError(
                    f"{s.image}: the center crop to a square cuts the whole defect away (the photo is "
                    f"{w}x{h}); use crop 'random' (keeps the defect in view), 'stretch', or crop the photo yourself."
                )
        return _Item(img_r, mask_r, bg_r, s.name, valid)

    def _offset(self, item: _Item, u: float) -> int:
        L = max(item.mask.shape)
        R = self.resolution
        if L == R:
            return 0
        if self.crop == "center":
            return (L - R) // 2
        return int(item.valid_offsets[min(int(u * len(item.valid_offsets)), len(item.valid_offsets) - 1)])

    def view(self, draw: Draw) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """The augmented (image, mask, background) arrays of one draw."""
        item = self.items[draw.index]
        R = self.resolution
        o = self._offset(item, draw.crop)
        if item.mask.shape[1] > R:
            sl = (slice(None), slice(o, o + R))
        else:
            sl = (slice(o, o + R), slice(None))
        img, mask = item.image[sl], item.mask[sl]
        bg = None if item.background is None else item.background[sl]
        for flip, axis in ((draw.hflip and "h" in self.flips, 1), (draw.vflip and "v" in self.flips, 0)):
            if flip:
                img, mask = np.flip(img, axis), np.flip(mask, axis)
                bg = None if bg is None else np.flip(bg, axis)
        return img, mask, bg

    def batch(self, draws: Sequence[Draw]) -> Batch:
        imgs, masks, bgs = [], [], []
        for d in draws:
            img, mask, bg = self.view(d)
            imgs.append(np.ascontiguousarray(img))
            masks.append(np.ascontiguousarray(mask))
            if bg is not None:
                bgs.append(np.ascontiguousarray(bg))

        def to_signed(arrs):
            t = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).float()
            return t / 127.5 - 1.0

        return Batch(
            images=to_signed(imgs),
            masks=torch.from_numpy(np.stack(masks)).unsqueeze(1).float(),
            backgrounds=to_signed(bgs) if bgs else None,
            names=[self.items[d.index].name for d in draws],
        )


class PairSampler:
    """The order in which training images are drawn, and their random augmentation: epochs of random permutations
    (every image is seen equally often; a batch may run across an epoch boundary, and with fewer images than the
    batch size an image appears more than once per batch, with its own flips). Seeded; its whole state is saved in
    checkpoints, so a resumed run continues the same sequence."""

    def __init__(self, n_items: int, batch_size: int, seed: int):
        if n_items < 1:
            raise DataError("no training images to sample from")
        if batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {batch_size}")
        self.n_items, self.batch_size = n_items, batch_size
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(int(seed))
        self.order: list[int] = []
        self.epoch = 0

    def next_batch(self) -> list[Draw]:
        draws = []
        for _ in range(self.batch_size):
            if not self.order:
                self.order = torch.randperm(self.n_items, generator=self.generator).tolist()
                self.epoch += 1
            idx = self.order.pop(0)
            u = torch.rand(3, generator=self.generator, dtype=torch.float64).tolist()
            draws.append(Draw(idx, u[0] < 0.5, u[1] < 0.5, u[2]))
        return draws

    def state_dict(self) -> dict:
        return {
            "generator": self.generator.get_state(),
            "order": list(self.order),
            "epoch": self.epoch,
            "n_items": self.n_items,
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state: dict) -> None:
        if int(state["n_items"]) != self.n_items:
            raise ValueError(f"sampler state is for {state['n_items']} images, the data holds {self.n_items}")
        self.generator.set_state(state["generator"])
        self.order = [int(i) for i in state["order"]]
        self.epoch = int(state["epoch"])
