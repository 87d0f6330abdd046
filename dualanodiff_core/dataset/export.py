"""Writing a generated defect dataset: MVTec/anomalib layout, research layout, manifest, contact sheets.

Layout under ``out`` (``NAME`` = zero-padded index, 3 digits up to 1000 samples, more beyond)::

    <category>/test/<defect>/NAME.png               accepted images  (MVTec AD / anomalib MVTec + Folder)
    <category>/ground_truth/<defect>/NAME_mask.png  their masks: single-channel 8-bit PNG, values exactly 0 and 255
    fg/<category>/<defect>/NAME.png                 anomaly-branch output of accepted samples (masks derive from it)
    rejected/<category>/<defect>/NAME.png           rejected samples (unless keep_rejected=False):
                                NAME_fg.png, NAME_mask.png      image, anomaly part, mask as extracted
    research/<category>/<defect>/{image,mask,fg}/NAME.png   (research_layout=True) the layout read by the
                                                    DualAnoDiff / AnomalyDiffusion eval scripts
    contact_sheets/<category>/<defect>/sheet_000.png   image | anomaly part | mask overlay, 32 samples a page
    manifest.jsonl                                  one JSON record per sample, accepted or rejected

Only accepted samples enter the MVTec tree, so anomalib sees nothing but consistent image/mask pairs; everything
else lives outside ``<category>/`` (anomalib's MVTec parser reads every PNG under the category folder).

Safety: each sample is written to ``.staging/`` first, a commit note lists its destinations, the files are renamed
into place with the image last (its mask is always there first, so a reader never sees an image without its mask),
then its manifest line is appended (flushed and fsynced). A sample whose manifest line is missing is not done: on the
next :meth:`DatasetWriter.open` its files are removed (image first) and it is generated again. An OS-level lock
(``flock`` on ``.dualanodiff.lock``; ``msvcrt.locking`` on Windows) held for the whole run keeps two runs from
writing into the same folder; the operating system releases it when the process dies, so a lock is never "stale".
Files this writer did not make are never overwritten or deleted (opening fails with a clear message instead).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import os
import shutil
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .. import _testhook
from ..errors import DualAnoDiffError
from ..fileio import (
    IMAGE_SUFFIXES,
    SAFE_NAME_RE,
    save_image_atomic,
    sha256_file,  # noqa: F401  (re-exported: it used to live here)
    sweep_temp_files,
    write_text_atomic,
)
from .acceptance import FilterDecision
from .masks import MaskResult, erode, mask_to_pil

MANIFEST = "manifest.jsonl"
LOCK = ".dualanodiff.lock"
STAGING = ".staging"
SIDE_DIRS = ("fg", "rejected", "research", "contact_sheets")


class DatasetError(DualAnoDiffError, ValueError):
    """The output folder or a name cannot be used as asked."""


class DatasetBusyError(DatasetError):
    """Another run (or another writer in this process) holds the dataset's lock."""


#: publish order of a sample's files: everything else first, the images last (a reader that finds an image finds
#: its mask); removal goes the other way round
_PUBLISH_LAST = ("research_image", "rejected_image", "image")


def _publish_order(keys) -> list:
    keys = list(keys)
    return [k for k in keys if k not in _PUBLISH_LAST] + [k for k in _PUBLISH_LAST if k in keys]


def check_name(value: str, what: str) -> str:
    """A category or defect name: one safe path component (letters, digits, ``._+-``), not a reserved word."""
    value = str(value)
    if not SAFE_NAME_RE.match(value) or value in (".", ".."):
        raise DatasetError(
            f"{what} {value!r}: use letters, digits and . _ + - only (e.g. 'bottle', 'broken_large'); "
            "it becomes a folder name"
        )
    if what == "defect" and value == "good":
        raise DatasetError(
            "defect 'good' means *normal* in the MVTec layout; give the defect type instead (e.g. 'crack')"
        )
    if what == "category" and value in SIDE_DIRS + (MANIFEST,):
        raise DatasetError(
            f"category {value!r} collides with the {value}/ folder this tool writes; choose another name"
        )
    return value


def digits_for(n: int) -> int:
    """Zero-padding: 3 digits like MVTec (000.png) up to 1000 samples, more beyond (sorted order must match)."""
    return max(3, len(str(max(0, n - 1))))


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _try_lock(fd: int) -> bool:
    """Non-blocking exclusive lock on an open file; False if someone else holds it."""
    if os.name == "nt":
        import msvcrt

        try:
            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as e:  # e.g. a file system without locks
        raise DatasetError(f"cannot lock {LOCK} in the output folder ({e.strerror}); use a local folder.") from None


def _unlock(fd: int) -> None:
    with contextlib.suppress(OSError):
        if os.name == "nt":
            import msvcrt

            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
        else:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_UN)


def _read_owner(path: Path) -> int:
    try:
        return int(path.read_text(encoding="ascii").strip() or 0)
    except (OSError, ValueError):
        return 0


# ---- manifest ------------------------------------------------------------------------------------------------------
def read_manifest(path: str | os.PathLike) -> tuple[list[dict], bool]:
    """Records of a ``manifest.jsonl`` and whether it needs rewriting: a torn last line (an interrupted append) was
    dropped, or the last line lacks its newline.

    A broken line anywhere else is an error: the file was edited by hand and needs fixing, not silent repair."""
    path = Path(path)
    if not path.is_file():
        return [], False
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    complete_end = text.endswith("\n")
    records: list[dict] = []
    repair = bool(text) and not complete_end
    last = max((i for i, ln in enumerate(lines) if ln.strip()), default=-1)
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise ValueError("not an object")
        except ValueError:
            if i == last and not complete_end:  # an append that was cut short
                repair = True
                continue
            raise DatasetError(f"{path}: line {i + 1} is not a JSON record; fix or delete that line") from None
        records.append(rec)
    return records, repair


def _dump(rec: dict) -> str:
    return json.dumps(rec, sort_keys=True, ensure_ascii=False, allow_nan=False)


# ---- samples -------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class ExportSample:
    """One generated pair ready to write: images as PIL (RGB), the mask result, the filter decision, and
    provenance (``info``: seed, sampler, steps, ... merged into the manifest record)."""

    index: int
    image: Image.Image
    anomaly: Image.Image
    mask: MaskResult
    decision: FilterDecision
    info: dict[str, Any] = dataclasses.field(default_factory=dict)


class DatasetWriter:
    """Writes the samples of one ``<category>/<defect>`` into ``out``; resumable and crash-safe.

    Use as a context manager (``with DatasetWriter(...) as w:``) or call :meth:`open` / :meth:`close`.
    ``settings`` (JSON-able) are stored with every record; reopening with different settings fails, so one folder
    never mixes samples made differently.
    """

    def __init__(
        self,
        out: str | os.PathLike,
        category: str,
        defect: str,
        *,
        digits: int = 3,
        research_layout: bool = False,
        keep_rejected: bool = True,
        settings: dict | None = None,
        lock_wait: float = 0.0,
    ):
        self.out = Path(out)
        self.category = check_name(category, "category")
        self.defect = check_name(defect, "defect")
        if digits < 3:
            raise DatasetError("digits must be at least 3")
        self.digits = int(digits)
        self.research_layout = bool(research_layout)
        self.keep_rejected = bool(keep_rejected)
        self.settings = json.loads(json.dumps(settings)) if settings is not None else None
        self.records: dict[int, dict] = {}
        self._others: list[dict] = []
        self._lock_held = False
        self._lock_fd: int | None = None
        self.lock_wait = float(lock_wait)  # seconds open() waits for another writer's lock (0 = fail at once)
        self.recovered: list[str] = []  # what open() repaired, for the log

    # ---- paths -------------------------------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.out / MANIFEST

    @property
    def staging_dir(self) -> Path:
        return self.out / STAGING / self.category / self.defect

    @property
    def test_dir(self) -> Path:
        return self.out / self.category / "test" / self.defect

    @property
    def ground_truth_dir(self) -> Path:
        return self.out / self.category / "ground_truth" / self.defect

    @property
    def contact_dir(self) -> Path:
        return self.out / "contact_sheets" / self.category / self.defect

    def name(self, index: int) -> str:
        return f"{index:0{self.digits}d}"

    def sample_paths(self, index: int, accepted: bool) -> dict[str, Path]:
        """Where sample ``index`` goes (keys: image, mask, fg, research_*, or rejected_*)."""
        n, c, d, o = self.name(index), self.category, self.defect, self.out
        if accepted:
            p = {
                "image": self.test_dir / f"{n}.png",
                "mask": self.ground_truth_dir / f"{n}_mask.png",
                "fg": o / "fg" / c / d / f"{n}.png",
            }
            if self.research_layout:
                r = o / "research" / c / d
                p.update(
                    research_image=r / "image" / f"{n}.png",
                    research_mask=r / "mask" / f"{n}.png",
                    research_fg=r / "fg" / f"{n}.png",
                )
            return p
        if not self.keep_rejected:
            return {}
        r = o / "rejected" / c / d
        return {
            "rejected_image": r / f"{n}.png",
            "rejected_fg": r / f"{n}_fg.png",
            "rejected_mask": r / f"{n}_mask.png",
        }

    def _owned_dirs(self) -> list[Path]:
        c, d, o = self.category, self.defect, self.out
        dirs = [self.test_dir, self.ground_truth_dir, o / "fg" / c / d, o / "rejected" / c / d]
        dirs += [o / "research" / c / d / s for s in ("image", "mask", "fg")]
        return dirs

    def _rel(self, p: Path) -> str:
        return p.relative_to(self.out).as_posix()

    # ---- open / close ------------------------------------------------------------------------------------------
    def __enter__(self) -> DatasetWriter:
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def done(self) -> set[int]:
        return set(self.records)

    def open(self) -> DatasetWriter:
        if self.out.exists() and not self.out.is_dir():
            raise DatasetError(f"{self.out}: exists and is not a folder; give a folder for --out")
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DatasetError(
                f"{self.out}: cannot create the output folder ({e.strerror}); give a folder you can write to."
            ) from None
        self._acquire_lock()
        try:
            self._recover()
        except BaseException:
            self._release_lock()
            raise
        return self

    def close(self) -> None:
        # empty staging folders are noise; a crashed run leaves them non-empty for open() to clean
        for d in (self.staging_dir, self.staging_dir.parent, self.staging_dir.parent.parent):
            try:
                d.rmdir()
            except FileNotFoundError:
                continue
            except OSError:
                break
        self._release_lock()

    @property
    def lock_path(self) -> Path:
        return self.out / LOCK

    def _acquire_lock(self) -> None:
        """Take the folder's OS-level lock (held until :meth:`close`), or raise :class:`DatasetBusyError`."""
        path = self.lock_path
        deadline = time.monotonic() + max(0.0, float(self.lock_wait))
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as e:
                raise DatasetError(
                    f"{self.out}: cannot create the lock file {path.name} ({e.strerror}); "
                    "give a folder you can write to."
                ) from None
            if _try_lock(fd):
                # the lock file may have been removed and re-created by a writer that just finished: the lock
                # only counts if it is on the file now at that path
                try:
                    same = os.path.samestat(os.fstat(fd), os.stat(path))
                except OSError:
                    same = False
                if same:
                    break
                _unlock(fd)
                os.close(fd)
                continue
            os.close(fd)
            if time.monotonic() < deadline:
                time.sleep(0.05)
                continue
            owner = _read_owner(path)
            if owner == os.getpid():
                who = "this process (another DatasetWriter)"
            else:
                who = f"process {owner}" if owner else "another process"
            raise DatasetBusyError(
                f"{self.out} is being written by {who} (it holds {path}). Wait for that run to finish, or use "
                "another output folder. The lock goes away with its process; there is nothing to delete."
            )
        _testhook.pause("lock")
        with contextlib.suppress(OSError):  # who holds it, for a second run's message (the OS lock decides)
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd
        self._lock_held = True

    def _release_lock(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is None:
            self._lock_held = False
            return
        try:
            if os.name != "nt":  # remove the file while still holding the lock (see _acquire_lock's check)
                with contextlib.suppress(OSError):
                    if os.path.samestat(os.fstat(fd), os.stat(self.lock_path)):
                        self.lock_path.unlink()
            _unlock(fd)
        finally:
            os.close(fd)
            self._lock_held = False

    def _ours(self, rec: dict) -> bool:
        return rec.get("category") == self.category and rec.get("defect") == self.defect

    def _recover(self) -> None:
        records, torn = read_manifest(self.manifest_path)
        dirty = torn
        if torn:
            self.recovered.append(f"{self.manifest_path}: repaired the last line (interrupted run)")
        self._others = [r for r in records if not self._ours(r)]
        ours: dict[int, dict] = {}
        for r in records:
            if not self._ours(r):
                continue
            idx = r.get("index")
            if not isinstance(idx, int) or idx in ours:
                raise DatasetError(
                    f"{self.manifest_path}: a record of {self.category}/{self.defect} has a missing or "
                    f"repeated index ({idx!r}); fix or delete that line"
                )
            ours[idx] = r
        # 1. samples caught between "files renamed into place" and "manifest line written"
        if self.staging_dir.is_dir():
            for note in sorted(self.staging_dir.glob("*.commit.json")):
                try:
                    info = json.loads(note.read_text(encoding="utf-8"))
                    idx, files = int(info["index"]), list(info["files"])
                except (OSError, ValueError, KeyError, TypeError):
                    continue
                if idx not in ours:
                    for rel in reversed(files):  # published image last, so removed first
                        (self.out / rel).unlink(missing_ok=True)
                    self.recovered.append(f"removed the partly written sample {self.name(idx)} (interrupted run)")
            shutil.rmtree(self.staging_dir, ignore_errors=True)
        # 2. records whose files are gone (deleted by hand): forget them, they are generated again
        for idx in sorted(ours):
            named = ours[idx].get("files") or {}
            files = [self.out / named[k] for k in reversed(_publish_order(named))]  # images first
            if not all(f.is_file() for f in files):
                for f in files:
                    f.unlink(missing_ok=True)
                del ours[idx]
                dirty = True
                self.recovered.append(f"sample {self.name(idx)} had missing files; it will be generated again")
        # leftovers of interrupted atomic writes (manifest rewrite, contact sheets)
        for d in (self.out, self.contact_dir):
            for p in sweep_temp_files(d):
                self.recovered.append(f"removed the temp file {p.name} (interrupted run)")
        # 3. never mix with or overwrite files this writer did not make
        known = {(self.out / rel).resolve() for r in ours.values() for rel in (r.get("files") or {}).values()}
        for d in self._owned_dirs():
            if not d.is_dir():
                continue
            foreign = sorted(
                p
                for p in d.iterdir()
                if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and p.resolve() not in known
            )
            if foreign:
                raise DatasetError(
                    f"{d} holds {len(foreign)} image file(s) that {self.manifest_path.name} does not list "
                    f"(e.g. {foreign[0].name}): they were not written by this tool, or the manifest was deleted. "
                    "Generating here would mix or overwrite them; use an empty output folder, or move those files away."
                )
        # 4. one naming width per dataset (sorted pairing of images and masks depends on it)
        widths = {len(str(r.get("name", ""))) for r in ours.values()}
        if widths and widths != {self.digits}:
            have = widths.pop()
            raise DatasetError(
                f"{self.out}: {self.category}/{self.defect} already uses {have}-digit names (e.g. "
                f"{'0' * have}.png) but this run needs {self.digits} digits; anomalib pairs images and masks by sorted "
                f"name, so widths cannot be mixed. Keep the sample count at or under {10**have} or use a new folder."
            )
        # 5. one set of settings per dataset
        if self.settings is not None:
            for idx in sorted(ours):
                old = ours[idx].get("settings")
                if old != self.settings:
                    diffs = _diff(old or {}, self.settings)
                    raise DatasetError(
                        f"{self.out}: the {len(ours)} existing samples of {self.category}/{self.defect} were made "
                        f"with other settings ({'; '.join(diffs[:6])}). Resume with the same settings, or write to a "
                        "new output folder (or another --defect name)."
                    )
        self.records = dict(sorted(ours.items()))
        if dirty:
            self._rewrite_manifest()

    def _rewrite_manifest(self) -> None:
        lines = [_dump(r) for r in self._others] + [_dump(r) for r in self.records.values()]
        write_text_atomic(self.manifest_path, "".join(line + "\n" for line in lines))

    # ---- writing -----------------------------------------------------------------------------------------------
    def write(self, sample: ExportSample) -> dict:
        """Write one sample (files, then its manifest line); returns the manifest record."""
        if not self._lock_held:
            raise DatasetError("DatasetWriter.write: call open() first (or use it as a context manager)")
        idx = int(sample.index)
        if idx < 0 or len(str(idx)) > self.digits:
            raise DatasetError(f"sample index {idx} does not fit {self.digits}-digit names")
        if idx in self.records:
            raise DatasetError(f"sample {self.name(idx)} of {self.category}/{self.defect} is already written")
        accepted = bool(sample.decision.accepted)
        m = sample.mask.mask
        if m.dtype != np.uint8 or m.ndim != 2:
            raise DatasetError("mask must be a uint8 [H, W] array")
        image = sample.image.convert("RGB")
        anomaly = sample.anomaly.convert("RGB")
        if image.size != (m.shape[1], m.shape[0]) or anomaly.size != image.size:
            raise DatasetError(
                f"sample {idx}: image {image.size}, anomaly part {anomaly.size} and mask "
                f"{(m.shape[1], m.shape[0])} must have the same size"
            )
        mask_img = mask_to_pil(m)
        paths = self.sample_paths(idx, accepted)
        paths = {k: paths[k] for k in _publish_order(paths)}
        content = {
            "image": image,
            "mask": mask_img,
            "fg": anomaly,
            "research_image": image,
            "research_mask": mask_img,
            "research_fg": anomaly,
            "rejected_image": image,
            "rejected_fg": anomaly,
            "rejected_mask": mask_img,
        }
        name = self.name(idx)
        stage = self.staging_dir / name
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir(parents=True, exist_ok=True)
        staged = {}
        note = self.staging_dir / f"{name}.commit.json"
        try:
            for key in paths:
                tmp = stage / f"{key}.png"
                with open(tmp, "wb") as fh:
                    content[key].save(fh, format="PNG")
                    fh.flush()
                    os.fsync(fh.fileno())  # on disk before its manifest line can be
                staged[key] = tmp
            write_text_atomic(note, json.dumps({"index": idx, "files": [self._rel(p) for p in paths.values()]}))
        except BaseException:  # nothing is in place yet: drop the staged files (e.g. the disk filled up)
            shutil.rmtree(stage, ignore_errors=True)
            raise
        for key, dest in paths.items():  # images last: a reader never finds an image without its mask
            dest.parent.mkdir(parents=True, exist_ok=True)
            if key in _PUBLISH_LAST:
                _testhook.pause("sample_commit")
            os.replace(staged[key], dest)
        _testhook.pause("manifest_line")
        record = dict(sample.info)
        record.update(
            category=self.category,
            defect=self.defect,
            index=idx,
            name=name,
            accepted=accepted,
            reason=sample.decision.reason,
            detail=sample.decision.detail,
            mask_area=round(float(sample.mask.area_fraction), 6),
            mask=sample.mask.to_record(),
            filter=sample.decision.to_record(),
            files={k: self._rel(p) for k, p in paths.items()},
            height=image.size[1],
            width=image.size[0],
            created=_now(),
        )
        if self.settings is not None:
            record["settings"] = self.settings
        line = _dump(record) + "\n"
        with open(self.manifest_path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        note.unlink(missing_ok=True)
        shutil.rmtree(stage, ignore_errors=True)
        self.records[idx] = record
        return record

    # ---- contact sheets ----------------------------------------------------------------------------------------
    def write_contact_sheets(self, per_page: int = 32, columns: int = 4, thumb: int = 128) -> list[Path]:
        """image | anomaly part | mask overlay for every sample with files on disk (accepted; rejected if kept),
        ``per_page`` a sheet, captions with the index and the decision (green = accepted, red = rejected)."""
        if per_page < 1 or columns < 1 or thumb < 16:
            raise DatasetError("contact sheets: per_page and columns must be >= 1, thumb >= 16")
        items = []
        for _idx, rec in sorted(self.records.items()):
            files = rec.get("files") or {}
            keys = (
                ("image", "fg", "mask") if rec.get("accepted") else ("rejected_image", "rejected_fg", "rejected_mask")
            )
            if all(k in files for k in keys):
                items.append((rec, [self.out / files[k] for k in keys]))
        pages = [items[i : i + per_page] for i in range(0, len(items), per_page)]
        written = []
        for p, page in enumerate(pages):
            path = self.contact_dir / f"sheet_{p:03d}.png"
            save_image_atomic(_contact_sheet(page, columns, thumb), path)
            written.append(path)
        if self.contact_dir.is_dir():  # pages left from a larger earlier sheet set
            for old in self.contact_dir.glob("sheet_*.png"):
                if old not in written:
                    old.unlink(missing_ok=True)
        return written


def _diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k, "<missing>"), new.get(k, "<missing>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} before, {b!r} now")
    return out


# ---- drawing -------------------------------------------------------------------------------------------------------
def mask_overlay(
    image: Image.Image, mask: np.ndarray | Image.Image, color=(255, 32, 32), alpha: float = 0.45
) -> Image.Image:
    """The image with the mask tinted and outlined (for looking, not for training)."""
    img = np.asarray(image.convert("RGB"), dtype=np.float32)
    m = (np.asarray(mask.convert("L")) if isinstance(mask, Image.Image) else np.asarray(mask)) > 0
    if m.shape != img.shape[:2]:
        raise ValueError(f"mask {m.shape[::-1]} and image {img.shape[1::-1]} differ in size")
    col = np.array(color, dtype=np.float32)
    out = img.copy()
    out[m] = img[m] * (1 - alpha) + col * alpha
    edge = m & ~erode(m, 1)
    out[edge] = col
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), mode="RGB")


def _font():
    try:
        return ImageFont.load_default()
    except OSError:  # pragma: no cover
        return None


def _contact_sheet(page: list[tuple[dict, list[Path]]], columns: int, thumb: int) -> Image.Image:
    def load(p: Path, mode: str) -> Image.Image:
        with Image.open(p) as im:
            return im.convert(mode)

    first = load(page[0][1][0], "RGB")
    w0, h0 = first.size
    scale = thumb / max(w0, h0)
    tw, th = max(1, round(w0 * scale)), max(1, round(h0 * scale))
    gap, cap, border = 4, 14, 2
    cell_w = 3 * tw + 2 * gap + 2 * border
    cell_h = th + cap + 2 * border
    cols = min(columns, len(page))
    rows = (len(page) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * cell_w + (cols + 1) * gap, rows * cell_h + (rows + 1) * gap), (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    font = _font()
    for k, (rec, (img_p, fg_p, mask_p)) in enumerate(page):
        r, c = divmod(k, cols)
        x0, y0 = gap + c * (cell_w + gap), gap + r * (cell_h + gap)
        ok = bool(rec.get("accepted"))
        draw.rectangle([x0, y0, x0 + cell_w - 1, y0 + cell_h - 1], fill=(40, 140, 60) if ok else (170, 40, 40))
        img, fg, mask = load(img_p, "RGB"), load(fg_p, "RGB"), load(mask_p, "L")
        if mask.size != img.size:
            mask = mask.resize(img.size, Image.NEAREST)
        tiles = [img, fg, mask_overlay(img, mask)]
        for j, t in enumerate(tiles):
            t = t.resize((tw, th), Image.BILINEAR)
            sheet.paste(t, (x0 + border + j * (tw + gap), y0 + border))
        label = f"{rec.get('name', '?')} " + (f"ok {rec.get('mask_area', 0):.1%}" if ok else str(rec.get("reason")))
        draw.text((x0 + border + 2, y0 + border + th + 1), label, fill=(255, 255, 255), font=font)
    return sheet


def iter_records(out: str | os.PathLike, category: str | None = None, defect: str | None = None) -> Iterable[dict]:
    """Records of ``out/manifest.jsonl``, optionally of one category/defect."""
    records, _ = read_manifest(Path(out) / MANIFEST)
    for r in records:
        if (category is None or r.get("category") == category) and (defect is None or r.get("defect") == defect):
            yield r
