"""File and image helpers shared by the whole package, each defined once: atomic writes (temp file in the same
folder, then rename), temp-file hygiene, output checks, image conversions between PIL, numpy and torch, the image
suffixes we read and the pixel limit, the rule for safe file and folder names, and the sha256 of a file.

Temp files have one recognisable name, ``.<target name>.<pid>-<8 hex>.dualanodiff-tmp<target suffix>``, beside their
target. They are removed on every exit path Python sees (an exception, Ctrl-C, ``sys.exit``, interpreter exit);
after a ``kill -9`` or a power cut, :func:`sweep_temp_files` removes them at the start of the next run in that folder
(only names of this pattern whose process is gone, and those of the older pattern
``.<target>.<8 chars>.tmp<suffix>``). Files are created with the usual mode (``0666`` minus the umask).
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import hashlib
import json
import os
import re
import secrets
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import _testhook
from .errors import DualAnoDiffError, RunError

TEMP_MARK = ".dualanodiff-tmp"
TEMP_RE = re.compile(r"^\.(?P<target>.+)\.(?P<pid>\d+)-[0-9a-f]{8}" + re.escape(TEMP_MARK) + r"(?P<suffix>\.[^.]*)?$")
#: the pattern of versions before 0.1.1 (tempfile.mkstemp): ``.<target>.<8 chars>.tmp<target suffix>``
LEGACY_TEMP_RE = re.compile(r"^\.(?P<target>.+)\.[a-z0-9_]{8}\.tmp(?P<suffix>\.[^.]*)?$")

_live: set[str] = set()  # temp files this process is writing now
_live_lock = threading.Lock()
_swept: set[str] = set()  # folders swept by this process

#: image files we read (training images, backgrounds, files already in a dataset folder)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

#: a name that is safe as one file or folder name everywhere: letters, digits and ``._+-``, not starting with a dot
SAFE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


def _cleanup_live() -> None:
    with _live_lock:
        paths = list(_live)
        _live.clear()
    for p in paths:
        with contextlib.suppress(OSError):
            os.unlink(p)


atexit.register(_cleanup_live)


def temp_path_for(path: str | os.PathLike, suffix: str | None = None) -> Path:
    """A fresh temp-file name beside ``path`` (the file is not created)."""
    path = Path(path)
    suffix = path.suffix if suffix is None else suffix
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}{TEMP_MARK}{suffix}")


def is_temp_name(name: str) -> bool:
    """Whether ``name`` is one of our temp files (this version's pattern or the older one)."""
    if TEMP_RE.match(name):
        return True
    m = LEGACY_TEMP_RE.match(name)
    return bool(m) and (m.group("suffix") or "") == Path(m.group("target")).suffix


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process on Windows
        import ctypes

        kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined]
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return False
        code = ctypes.c_ulong()
        ok = kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
        kernel32.CloseHandle(handle)
        return bool(ok) and code.value == 259  # STILL_ACTIVE
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Remove our temp files left in ``folder`` by processes that are gone (``kill -9``, power cut); returns them.

    Only names of our pattern are touched: those of a live process (another run writing here now) are kept, and
    so are this process's own files in flight."""
    folder = Path(folder)
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    me = os.getpid()
    for e in entries:
        if not e.name.startswith(".") or not is_temp_name(e.name):
            continue
        with contextlib.suppress(OSError):
            if not e.is_file(follow_symlinks=False):
                continue
        m = TEMP_RE.match(e.name)
        if m:
            pid = int(m.group("pid"))
            with _live_lock:
                mine = e.path in _live
            if mine or (pid != me and _pid_alive(pid)):
                continue
        try:
            os.unlink(e.path)
            removed.append(Path(e.path))
        except OSError:
            pass
    _swept.add(os.path.abspath(folder))
    return removed


def _create(tmp: Path) -> None:
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_BINARY", 0), 0o666)
    os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``, on error it is removed.

    Readers never see a half-written file, and an interrupted write leaves the previous file untouched. The first
    write into a folder also sweeps that folder's leftover temp files (see :func:`sweep_temp_files`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if os.path.abspath(path.parent) not in _swept:
        sweep_temp_files(path.parent)
    tmp = temp_path_for(path, suffix)
    _create(tmp)
    key = str(tmp)
    with _live_lock:
        _live.add(key)
    try:
        yield tmp
        _testhook.pause("atomic_write")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    finally:
        with _live_lock:
            _live.discard(key)


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


# ---- checking an output location before heavy work ----------------------------------------------------------------
def check_output_dir(folder: str | os.PathLike, option: str, create: bool = True) -> Path:
    """Make sure files can be written in ``folder`` (created if missing and ``create``), before any heavy work;
    raises :class:`DualAnoDiffError` naming ``option`` and the reason. Also sweeps its leftover temp files."""
    folder = Path(folder)
    probe_from = folder
    while not probe_from.exists() and probe_from.parent != probe_from:
        probe_from = probe_from.parent
    if probe_from.exists() and not probe_from.is_dir():
        what = "is a file" if probe_from == folder else f"lies under {probe_from}, which is a file"
        raise DualAnoDiffError(f"{option} {folder}: {what}, not a folder; choose another {option}.")
    if not folder.is_dir():
        if not create:
            raise DualAnoDiffError(f"{option} {folder}: no such folder.")
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DualAnoDiffError(
                f"{option} {folder}: cannot create it ({e.strerror or e}); choose a folder you can write to."
            ) from None
    probe = temp_path_for(folder / "write-check")
    try:
        _create(probe)
        probe.unlink()
    except OSError as e:
        with contextlib.suppress(OSError):
            probe.unlink()
        raise DualAnoDiffError(
            f"{option} {folder}: cannot write there ({e.strerror or e}); choose a folder you can write to."
        ) from None
    sweep_temp_files(folder)
    return folder


def check_output_file(path: str | os.PathLike, option: str) -> Path:
    """An output file's folder must be writable (and the path not a folder)."""
    path = Path(path)
    if path.is_dir():
        raise DualAnoDiffError(f"{option} {path}: is a folder; give a file name.")
    check_output_dir(path.parent if str(path.parent) else Path("."), option)
    return path


def os_error_message(e: OSError) -> str:
    """One line for an OS error during a run, with what to do."""
    where = f" ({e.filename})" if getattr(e, "filename", None) else ""
    if e.errno == errno.ENOSPC or e.errno == getattr(errno, "EDQUOT", -1):
        return f"no space left on the device{where}; free some space (or choose another output folder) and run again."
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"permission denied{where}: {e.strerror}; choose a location you can write to."
    return f"{e.strerror or e}{where}."


def run_error_from(e: OSError, resume_hint: str = "") -> RunError:
    err = RunError(os_error_message(e) + (f" {resume_hint}" if resume_hint else ""))
    err.__cause__ = e
    return err


def masks_for(images: Iterable[Path], masks: Iterable[Path]) -> list[Path | None]:
    """For each image, its mask among ``masks``: same stem, or the stem plus ``_mask`` (the first in order); None where
    there is none."""
    by_stem: dict[str, Path] = {}
    for m in masks:
        by_stem.setdefault(m.stem, m)
    return [by_stem.get(img.stem) or by_stem.get(f"{img.stem}_mask") for img in images]


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


#: largest input image read (pixels): 8192 x 8192. Bigger photos are downscaled to 512 px anyway, and decoding one
#: costs gigabytes; PIL's own guard ("decompression bomb") is replaced by this clearer limit.
MAX_IMAGE_PIXELS = 8192 * 8192


def open_image(path, what: str = "image", max_pixels: int | None = None) -> Image.Image:
    """Open an image lazily (header only) and refuse one over ``max_pixels`` with a clear
    :class:`~dualanodiff_core.errors.InputError` (naming the file, its size and the limit) before decoding it."""
    import warnings

    from .errors import InputError

    limit = MAX_IMAGE_PIXELS if max_pixels is None else int(max_pixels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(path)
        except Image.DecompressionBombError:
            raise InputError(
                f"{path}: the {what} is far too large to read safely (over {2 * Image.MAX_IMAGE_PIXELS // 10**6} "
                f"megapixels); downscale it (at most {limit // 10**6} megapixels)."
            ) from None
    w, h = im.size
    if w * h > limit:
        im.close()
        raise InputError(
            f"{path}: the {what} is {w}x{h} = {w * h / 1e6:.0f} megapixels, over the limit of {limit / 1e6:.0f}; "
            "downscale it (DualAnoDiff works at 512 px)."
        )
    return im
