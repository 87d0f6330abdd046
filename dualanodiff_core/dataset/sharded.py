"""Generation by several processes (``torchrun`` / ``accelerate launch``), merged into one dataset.

How it works (see :func:`generate_sharded`):

1. process 0 opens the :class:`~.export.DatasetWriter` (it takes the dataset lock and repairs what an interrupted
   run left) and holds it until the end; it lists the samples still missing: neither in the dataset nor staged;
2. the missing samples are grouped into the batches one uninterrupted process makes (batch ``b`` = samples
   ``b*batch_size .. (b+1)*batch_size-1``, :func:`~.generate.grid_batches`), and the ``k``-th batch with something
   missing goes to process ``k mod N``; a process generates each of its batches whole (the same partners and batch
   size, also when a killed run staged part of it) and stages only the missing samples; every sample keeps its own
   seed, so a process computes the same sample as a single-process run would;
3. each process stages its finished samples under ``OUT/.shards/<category>/<defect>/<NAME>/`` (lossless PNGs plus a
   JSON of the mask and filter results and the provenance), written to a temp folder and renamed, so a staged
   sample is either complete or absent;
4. process 0 merges staged samples into the dataset **in index order** through ``DatasetWriter.write`` -- the same
   code, hence the same bytes and records, as a single-process run -- as soon as the next index is staged, and the
   rest once every process is done; then it writes the contact sheets and removes the staging folder.

A process that dies leaves at most staged samples, never a partial sample in the dataset (the launcher stops the
others). Running the same command again, with any number of processes, merges what was staged with the same
settings and generates only what is missing. ``OUT`` must be one folder all processes see (a shared file system
when the processes run on several machines); this is checked at the start.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from .. import _testhook
from .. import distributed as dist
from .acceptance import FilterDecision
from .export import DatasetError, DatasetWriter, ExportSample
from .generate import grid_batches
from .masks import MaskResult, mask_to_pil

SHARDS = ".shards"
SAMPLE_JSON = "sample.json"


def settings_key(settings: dict | None) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def _jsonable(v):
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (np.floating, float)):
        return float(v)
    if isinstance(v, (np.integer, int)) and not isinstance(v, bool):
        return int(v)
    if isinstance(v, (tuple, list)):
        return [_jsonable(x) for x in v]
    return v


class ShardStager:
    """Stages finished samples of one category/defect for the merging process. Has the ``write`` method of a
    :class:`DatasetWriter`, so the generation loop does not know which one it feeds."""

    def __init__(self, writer: DatasetWriter, settings: dict | None, provenance: dict | None = None):
        self.writer = writer
        self.key = settings_key(settings)
        self.provenance = dict(provenance or {})
        self.dir = writer.out / SHARDS / writer.category / writer.defect
        self.written: list[int] = []

    def path(self, index: int) -> Path:
        return self.dir / self.writer.name(index)

    def write(self, sample: ExportSample) -> None:
        idx = int(sample.index)
        final = self.path(idx)
        tmp = self.dir / f".{final.name}.tmp-{dist.rank()}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name, im in (("image", sample.image.convert("RGB")), ("anomaly", sample.anomaly.convert("RGB"))):
            im.save(tmp / f"{name}.png", format="PNG")
        mask_to_pil(sample.mask.mask).save(tmp / "mask.png", format="PNG")
        mask_fields = {f.name: _jsonable(getattr(sample.mask, f.name)) for f in dataclasses.fields(MaskResult)}
        del mask_fields["mask"], mask_fields["drawn"]  # pixels: the mask is stored as a PNG, drawn is not needed
        decision = {f.name: _jsonable(getattr(sample.decision, f.name)) for f in dataclasses.fields(FilterDecision)}
        meta = {
            "index": idx,
            "settings_key": self.key,
            "info": dict(sample.info, **self.provenance),
            "mask": mask_fields,
            "decision": decision,
        }
        with open(tmp / SAMPLE_JSON, "w", encoding="utf-8") as f:
            json.dump(meta, f, sort_keys=True, allow_nan=False)
            f.flush()
            os.fsync(f.fileno())
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _testhook.pause("shard_staged")
        self.written.append(idx)

    # ---- reading back (the merging process) ------------------------------------------------------------------
    def staged(self) -> dict[int, Path]:
        """Complete staged samples made with these settings; others (another run's settings, torn temp folders)
        are removed."""
        out: dict[int, Path] = {}
        if not self.dir.is_dir():
            return out
        for p in sorted(self.dir.iterdir()):
            if p.name.startswith("."):
                continue  # a temp folder of a process that may still be writing; swept at the end
            try:
                meta = json.loads((p / SAMPLE_JSON).read_text(encoding="utf-8"))
                ok = meta["settings_key"] == self.key and p.name == self.writer.name(int(meta["index"]))
            except (OSError, ValueError, KeyError, TypeError):
                ok = False
            if ok:
                out[int(meta["index"])] = p
            else:
                shutil.rmtree(p, ignore_errors=True)
        return out

    def load(self, index: int) -> ExportSample:
        p = self.path(index)
        meta = json.loads((p / SAMPLE_JSON).read_text(encoding="utf-8"))

        def img(name: str, mode: str) -> Image.Image:
            with Image.open(p / f"{name}.png") as im:
                return im.convert(mode)

        mask = np.asarray(img("mask", "L"), dtype=np.uint8).copy()
        mf = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["mask"].items()}
        return ExportSample(
            int(meta["index"]),
            img("image", "RGB"),
            img("anomaly", "RGB"),
            MaskResult(mask=mask, **mf),
            FilterDecision(**meta["decision"]),
            meta["info"],
        )

    def remove(self, index: int) -> None:
        shutil.rmtree(self.path(index), ignore_errors=True)

    def clean(self) -> None:
        """Remove the staging folder (and its parents when empty)."""
        shutil.rmtree(self.dir, ignore_errors=True)
        for d in (self.dir.parent, self.dir.parent.parent):
            try:
                d.rmdir()
            except OSError:
                break


class _Merger:
    """Process 0: writes staged samples into the dataset in index order."""

    def __init__(self, writer: DatasetWriter, stager: ShardStager, wanted: list[int]):
        self.writer, self.stager = writer, stager
        self.queue = sorted(wanted)  # indices to merge, in order
        self.merged = 0

    def merge_ready(self) -> int:
        """Merge the staged samples at the head of the queue (stops at the first index not staged yet)."""
        k = 0
        while self.queue and (self.stager.path(self.queue[0]) / SAMPLE_JSON).is_file():
            idx = self.queue.pop(0)
            self.writer.write(self.stager.load(idx))
            self.stager.remove(idx)
            k += 1
        self.merged += k
        return k


def generate_sharded(
    writer: DatasetWriter,
    settings: dict | None,
    n: int,
    batch_size: int,
    provenance: dict,
    run_batches: Callable[[object, list[int], int], int],
    load_pipe: Callable[[], object],
    contact_sheets: bool,
    log: Callable[[str], None],
) -> tuple[int, int, list[Path]]:
    """Generate the missing samples ``0..n-1`` of ``writer``'s category/defect with all processes of the group.

    ``run_batches(sink, indices, n_done)`` generates ``indices`` (in whole batches of ``batch_size``) into ``sink``;
    ``load_pipe()`` loads the model (only on processes with something to do). Returns (already done, generated now
    by all processes, contact sheets) on process 0, (0, generated by this process, []) elsewhere."""
    r, world = dist.rank(), dist.world_size()
    stager = ShardStager(writer, settings, provenance=dict(provenance, process={"rank": r, "world_size": world}))
    plan: dict = {}
    if r == 0:
        try:
            writer.open()
        except Exception as e:  # noqa: BLE001 - told to every process, raised on each
            plan = {"error": str(e), "type": "dataset"}
        else:
            try:
                for line in writer.recovered:
                    log(f"recovered: {line}")
                done = {i for i in writer.done if i < n}
                staged = {i for i in stager.staged() if i < n and i not in done}
                pending = [i for i in range(n) if i not in done and i not in staged]
                token = f"{os.getpid()}-{os.urandom(8).hex()}"
                stager.dir.mkdir(parents=True, exist_ok=True)
                (stager.dir / ".shared-check").write_text(token)
                plan = {"done": sorted(done), "staged": sorted(staged), "pending": pending, "token": token}
            except BaseException:
                writer.close()
                raise
    plan = dist.broadcast(plan)
    if "error" in plan:
        raise DatasetError(plan["error"])
    # every process must see the folder process 0 writes into
    try:
        seen = (stager.dir / ".shared-check").read_text() == plan["token"]
    except OSError:
        seen = False
    if not all(dist.all_gather(seen)):
        if r == 0:
            writer.close()
        raise DatasetError(
            f"{writer.out}: not every process sees the same output folder (process 0 wrote a file there that some "
            "processes cannot read). With processes on several machines, --out must be on a file system they share."
        )
    pending: list[int] = plan["pending"]
    batches = grid_batches(pending, batch_size)
    mine = [i for b in batches[r::world] for i in b]
    if r == 0 and plan["staged"]:
        log(f"{len(plan['staged'])} sample(s) staged by an earlier run are merged, not generated again")
    if r == 0:
        log(f"{len(pending)} sample(s) to generate over {world} processes ({len(plan['done'])} already in the dataset)")
    merger = _Merger(writer, stager, plan["staged"] + pending) if r == 0 else None
    generated = 0
    try:
        if mine:
            pipe = load_pipe()
            if merger is not None:
                # merge what is ready between own batches (index order kept): results appear during a long run
                class _Sink:
                    def write(self, sample):
                        stager.write(sample)
                        merger.merge_ready()

                generated = run_batches(pipe, _Sink(), mine, len(plan["done"]))
            else:
                generated = run_batches(pipe, stager, mine, len(plan["done"]))
        dist.barrier()  # everybody has staged everything
        if merger is None:
            return 0, generated, []
        merger.merge_ready()
        if merger.queue:
            raise DatasetError(
                f"{len(merger.queue)} sample(s) were not staged (first: {writer.name(merger.queue[0])}); "
                "run the same command again to generate them"
            )
        sheets = writer.write_contact_sheets() if contact_sheets else []
        stager.clean()
    finally:
        if merger is not None:
            writer.close()
    return len(plan["done"]), len(pending) + len(plan["staged"]), sheets
