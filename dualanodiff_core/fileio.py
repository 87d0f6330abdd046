"""File and image helpers shared by the whole package, each defined once: atomic writes (temp file in the same
folder, then rename), image conversions between PIL, numpy and torch, the image suffixes we read, the rule for safe
file and folder names, and the sha256 of a file."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

#: image files we read (training images, backgrounds, files already in a dataset folder)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

#: a name that is safe as one file or folder name everywhere: letters, digits and ``._+-``, not starting with a dot
SAFE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``, on error it is removed.

    Readers never see a half-written file, and an interrupted write leaves the previous file untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = suffix if suffix is not None else path.suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_image_atomic(image, path: str | os.PathLike, **kwargs) -> None:
    """Save a PIL image atomically; the format comes from ``path``'s extension."""
    path = Path(path)
    fmt = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}.get(path.suffix.lower())
    with atomic_path(path) as tmp:
        image.save(tmp, format=fmt, **kwargs)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


# ---- image conversions (``[N, 3, H, W]`` float tensors) ------------------------------------------------------------


def tensor_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """``[N, C, H, W]`` in [0, 1] -> list of PIL images (RGB for C=3, L for C=1)."""
    if images.ndim == 3:
        images = images.unsqueeze(0)
    arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    out = []
    for a in arr:
        if a.shape[0] == 1:
            out.append(Image.fromarray(a[0], mode="L"))
        else:
            out.append(Image.fromarray(np.ascontiguousarray(a.transpose(1, 2, 0)), mode="RGB"))
    return out


def pil_to_tensor(images: Image.Image | Iterable[Image.Image], signed: bool = False) -> torch.Tensor:
    """PIL image(s) -> ``[N, 3, H, W]`` float in [0, 1] (or [-1, 1] with ``signed``)."""
    if isinstance(images, Image.Image):
        images = [images]
    arrs = [np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images]
    t = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous()
    return t * 2 - 1 if signed else t
