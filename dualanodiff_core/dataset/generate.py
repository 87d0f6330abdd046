"""Generate a defect dataset with a :class:`~dualanodiff_core.sd15.pipeline.DualAnoDiffPipeline`:
sample pairs, extract masks, filter, export (MVTec layout + manifest + contact sheets). Resumable.

Determinism: sample ``i`` is drawn from its own seed ``sample_seed(seed, i)`` (its initial noise for both
branches, and with BCM its background encoding and background noise), so a resumed run, or one with another
``batch_size``, draws the same noise for sample ``i``. The images are then the same up to floating-point
differences between batched kernels (bit-identical with the same batch size on the same machine and software).

Batches: sample ``i`` is always generated in batch ``i // batch_size`` with the same partners (:func:`grid_batches`),
also when a run was interrupted in the middle of a batch, or when several processes share the work: the rest of a
cut batch is generated again with it and only the missing samples are written. Cutting the missing indices into
consecutive batches instead would change the partners and the size of later batches (and the ``batch_size`` in
their records), so a resumed run would no longer equal an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import sys
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .. import __version__
from .. import distributed as _dist
from ..errors import InputError, MissingInputError
from ..fileio import IMAGE_SUFFIXES, masks_for, open_image, pil_to_tensor, sha256_file, tensor_to_pil
from ..method.layout import share_anomaly_noise, zero_mean_anomaly_rows  # noqa: F401  (also served here)
from ..method.recipes import DEFAULT_RECIPE, get_recipe
from ..method.weights import DEFAULT_PROMPT_ANOMALY, DEFAULT_PROMPT_GLOBAL
from ..sd15.scheduler import SAMPLERS
from ..training.backgrounds import make_background
from .acceptance import FilterOptions, check_pair
from .export import DatasetWriter, ExportSample, check_name, digits_for
from .masks import MaskOptions, extract_mask
from .placement import PlacementSet, check_region

#: reference settings (docs/method.md, "Inference"): dual model PNDM / 100 steps / CFG 2.5; the BCM reference uses
#: 50 / 2.0. The recipes are the one place that sets the schedules: ``reference`` keeps the paper's, the default
#: recipe (``shared-noise``) samples DDIM 50, which matched PNDM 100's mean usefulness on MiniDefect at half the
#: steps (``bench/sampler_cost.py``, docs/quality.md "Cost at equal quality")
REFERENCE_SAMPLER, REFERENCE_STEPS = get_recipe("reference").schedule()
DEFAULT_SAMPLER, DEFAULT_STEPS = get_recipe(DEFAULT_RECIPE).schedule()
DEFAULT_CFG = 2.5
BCM_REFERENCE_STEPS, BCM_REFERENCE_CFG = 50, 2.0
DEFAULT_SWITCH_EVERY = 50  # the reference switches the BCM background every 50 samples (10 for screw)
#: largest image side generated unless raised (``max_side``, ``--max-size``): SD1.5 is made for 512 px, and memory
#: grows with the square of the side (a 100000 px request would try to allocate tens of GB at once)
MAX_SIDE = 2048


def check_size(width: int, height: int, max_side: int = MAX_SIDE, option: str = "--size") -> None:
    """Refuse sizes beyond ``max_side`` before anything is allocated."""
    if max(width, height) > max_side:
        raise InputError(
            f"{option} {width}x{height}: larger than the maximum side of {max_side} px (SD1.5 is made for 512; "
            f"memory grows with the square of the side); use a smaller size, or raise the maximum "
            f"(--max-size / max_side) if your device has the memory."
        )


def sample_seed(base_seed: int, index: int) -> int:
    """The seed of sample ``index``: a hash of (base seed, index), so runs with neighbouring base seeds do not
    share samples, and sample ``i`` does not depend on which other samples are generated with it."""
    h = hashlib.sha256(f"dualanodiff-sample:{int(base_seed)}:{int(index)}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def grid_batches(indices, batch_size: int) -> list[list[int]]:
    """``indices`` grouped by the batch an uninterrupted run generates them in (batch ``k`` = samples
    ``k*batch_size .. (k+1)*batch_size-1``), in index order. A batch whose other samples are already done keeps only
    its missing ones here; :func:`_run` generates the whole batch again and writes those."""
    groups: dict[int, list[int]] = {}
    for i in sorted(set(int(i) for i in indices)):
        groups.setdefault(i // batch_size, []).append(i)
    return list(groups.values())


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    sampler: str = DEFAULT_SAMPLER
    steps: int = DEFAULT_STEPS
    cfg: float = DEFAULT_CFG
    height: int = 512
    width: int = 512
    #: None = the prompts stored in the weights (else "a vfx with sks" / "sks")
    prompt_global: str | None = None
    prompt_anomaly: str | None = None
    negative_prompt: str = ""
    lora_strength: tuple[float, float] = (1.0, 1.0)
    saim_strength: float = 1.0
    bcm_strength: float = 1.0
    text_strength: float = 1.0
    #: remove the per-channel spatial mean of each anomaly-branch starting latent (not the reference: on a small
    #: latent the noise's mean tints the anomaly branch's gray background; see dualanodiff_core.method.recipes)
    zero_mean_anomaly_noise: bool = True
    #: correlation of each anomaly-branch starting latent with its pair's global-branch one (0 = independent, the
    #: reference; 1 = the same noise, the default: recipe ``shared-noise``). Not the reference: the two branches
    #: decide where a defect goes largely from their own starting noise, and the same noise makes them decide alike;
    #: measured on MiniDefect it doubles the generated pairs' usefulness (docs/quality.md, "Diagnosis")
    anomaly_noise_share: float = 1.0

    def __post_init__(self):

        if self.sampler not in SAMPLERS:
            raise InputError(f"sampler {self.sampler!r}: choose one of {', '.join(SAMPLERS)}")
        if int(self.steps) != self.steps or self.steps < 1:
            raise InputError(f"steps={self.steps}: must be a whole number >= 1 (reference: 100, BCM reference: 50)")
        if not (0.0 <= self.cfg <= 30.0):
            raise InputError(f"cfg={self.cfg}: must lie in [0, 30] (reference: 2.5; <= 1 turns guidance off)")
        for k in ("height", "width"):
            v = getattr(self, k)
            if int(v) != v or v < 8 or v % 8:
                raise InputError(f"{k}={v}: must be a positive multiple of 8 (512 for SD1.5)")
        object.__setattr__(self, "lora_strength", tuple(float(x) for x in self.lora_strength))
        if len(self.lora_strength) != 2:
            raise InputError("lora_strength: give two values (global branch, anomaly branch)")
        for k in ("lora_strength", "saim_strength", "bcm_strength", "text_strength", "cfg"):
            v = getattr(self, k)
            if not all(math.isfinite(float(x)) for x in (v if isinstance(v, tuple) else (v,))):
                raise InputError(f"{k}={v}: must be a finite number (1.0 is the trained strength)")
        if not (0.0 <= float(self.anomaly_noise_share) <= 1.0):
            raise InputError(
                f"anomaly_noise_share={self.anomaly_noise_share}: must lie in [0, 1] (0 = independent noise, the "
                "reference; 1 = the global branch's noise)"
            )
        for k in ("prompt_global", "prompt_anomaly"):
            v = getattr(self, k)
            if v is not None and not str(v).strip():
                raise InputError(
                    f"{k} is empty: give the prompt the weights were trained with, or leave it unset to use the one "
                    "stored in the weights"
                )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["lora_strength"] = list(self.lora_strength)
        if not self.anomaly_noise_share:  # 0 is left out: datasets from before the option recorded none (= 0)
            del d["anomaly_noise_share"]
        return d


@dataclasses.dataclass
class BackgroundItem:
    background: Image.Image  # what BCM sees: the normal image with the object blacked out
    normal: Image.Image  # the normal image itself (for the agreement check)
    object_mask: Image.Image | None
    path: Path
    mask_path: Path | None


class BackgroundSet:
    """BCM backgrounds: normal images (sorted by file name) with optional object masks (white = object), switched
    every ``switch_every`` samples: sample ``i`` uses image ``(i // switch_every) % len(images)``.

    The reference takes the first third of ``train/good`` in unsorted ``os.listdir`` order and switches every 50
    samples (10 for screw); here the order is sorted, hence reproducible, and you choose the images."""

    def __init__(
        self,
        images: Sequence[str | os.PathLike],
        object_masks: Sequence[str | os.PathLike | None] | None = None,
        switch_every: int = DEFAULT_SWITCH_EVERY,
    ):
        self.images = [Path(p) for p in images]
        if not self.images:
            raise InputError("BackgroundSet: no background images given")
        if object_masks is not None and len(object_masks) != len(self.images):
            raise InputError("BackgroundSet: give one object mask per background image (or none)")
        self.masks = (
            [None if m is None else Path(m) for m in object_masks]
            if object_masks is not None
            else [None] * len(self.images)
        )
        if int(switch_every) != switch_every or switch_every < 1:
            raise InputError(f"switch_every={switch_every}: must be a whole number >= 1 (reference: 50, screw: 10)")
        self.switch_every = int(switch_every)
        self._cache: dict[tuple[int, tuple[int, int]], BackgroundItem] = {}

    @classmethod
    def from_folder(
        cls,
        folder: str | os.PathLike,
        mask_folder: str | os.PathLike | None = None,
        switch_every: int = DEFAULT_SWITCH_EVERY,
    ) -> BackgroundSet:
        folder = Path(folder)
        if not folder.is_dir():
            raise MissingInputError(
                f"backgrounds folder {folder} does not exist; give a folder of normal "
                "(defect-free) images, e.g. <mvtec>/<category>/train/good"
            )
        images = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise MissingInputError(f"backgrounds folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        masks = None
        if mask_folder is not None:
            mask_folder = Path(mask_folder)
            if not mask_folder.is_dir():
                raise MissingInputError(f"object-mask folder {mask_folder} does not exist")
            found = sorted(p for p in mask_folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            masks = []
            for img, m in zip(images, masks_for(images, found)):
                if m is None:
                    raise MissingInputError(
                        f"no object mask for background {img.name} in {mask_folder} (looked for {img.stem}.* and "
                        f"{img.stem}_mask.*); give one mask per background image, white = object"
                    )
                masks.append(m)
        out = cls(images, masks, switch_every)
        out.check_sizes()
        return out

    def check_sizes(self) -> None:
        """Read every image's header (not its pixels): unreadable or oversized files fail here, before any model
        is loaded."""
        for p in [*self.images, *(m for m in self.masks if m is not None)]:
            try:
                open_image(p, "background" if p in self.images else "object mask").close()
            except OSError as e:
                raise InputError(f"cannot read {p}: {e}; re-export it as PNG or remove it") from None

    def position(self, index: int) -> int:
        return (index // self.switch_every) % len(self.images)

    def get(self, index: int, size: tuple[int, int]) -> BackgroundItem:
        """Background of sample ``index``, resized to ``size`` = (width, height)."""
        k = self.position(index)
        key = (k, tuple(size))
        if key not in self._cache:
            if len(self._cache) > 8:
                self._cache.clear()
            path, mpath = self.images[k], self.masks[k]
            try:
                with open_image(path, "background") as im:
                    normal = im.convert("RGB")
                obj = None
                if mpath is not None:
                    with open_image(mpath, "object mask") as mm:
                        obj = mm.convert("L")
            except OSError as e:
                what = path if mpath is None else f"{path} / {mpath}"
                raise InputError(f"cannot read background {what}: {e}") from None
            if obj is not None and obj.size != normal.size:
                raise InputError(
                    f"object mask {mpath} is {obj.size[0]}x{obj.size[1]} but {path} is "
                    f"{normal.size[0]}x{normal.size[1]}; they must match"
                )
            if normal.size != tuple(size):
                normal = normal.resize(size, Image.BICUBIC)
                if obj is not None:
                    obj = obj.resize(size, Image.BILINEAR)
            self._cache[key] = BackgroundItem(make_background(normal, obj), normal, obj, path, mpath)
        return self._cache[key]

    def describe(self) -> dict[str, Any]:
        masks = None if all(m is None for m in self.masks) else [m.name if m else None for m in self.masks]
        return {"images": [p.name for p in self.images], "object_masks": masks, "switch_every": self.switch_every}


@dataclasses.dataclass
class GenerateSummary:
    out: Path
    category: str
    defect: str
    requested: int
    already_done: int
    generated: int
    accepted: int  # over all samples 0..n-1 now on disk
    rejected: int
    reasons: dict[str, int]
    contact_sheets: list[Path]
    recovered: list[str]

    def text(self) -> str:
        c, d = self.category, self.defect
        lines = [
            f"{c}/{d}: {self.generated} generated now, {self.already_done} already there; "
            f"{self.accepted} accepted, {self.rejected} rejected of {self.requested}"
        ]
        if self.rejected:
            lines.append("  rejected: " + ", ".join(f"{k} {v}" for k, v in sorted(self.reasons.items()) if k != "ok"))
        lines.append(f"  images : {self.out / c / 'test' / d}")
        lines.append(f"  masks  : {self.out / c / 'ground_truth' / d}")
        lines.append(f"  records: {self.out / 'manifest.jsonl'}")
        if self.contact_sheets:
            lines.append(f"  look   : {self.contact_sheets[0].parent} ({len(self.contact_sheets)} sheet(s))")
        return "\n".join(lines)


def weights_fingerprint(pipe) -> str:
    """sha256 over the pipeline's DualAnoDiff tensors (names and bytes), for pipelines not loaded from a file."""
    h = hashlib.sha256()
    w = pipe.to_weights()
    for k in sorted(w.tensors):
        t = w.tensors[k].detach().to("cpu").contiguous()
        h.update(k.encode())
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _bg_noise(gens: list[torch.Generator]):
    """BCM background noise for each UNet call, drawn per sample: rows ``[uncond x N, cond x N]`` (or ``[cond x N]``
    without CFG); sample j owns rows j and N + j."""
    n = len(gens)

    def noise(call: int, shape: tuple) -> torch.Tensor:
        per = shape[0] // n
        draws = [torch.randn((per, *shape[1:]), generator=g, dtype=torch.float32) for g in gens]
        return torch.cat([torch.stack([d[r] for d in draws]) for r in range(per)])

    return noise


def generate_dataset(
    pipe,
    out: str | os.PathLike,
    n: int,
    *,
    category: str = "object",
    defect: str = "defect",
    seed: int = 0,
    batch_size: int = 1,
    sampling: SamplingOptions | None = None,
    backgrounds: BackgroundSet | None = None,
    filter_against_background: bool = False,
    refine_mask: bool = False,
    mask_options: MaskOptions | None = None,
    filter_options: FilterOptions | None = None,
    research_layout: bool = False,
    keep_rejected: bool = True,
    contact_sheets: bool = True,
    weights_path: str | os.PathLike | None = None,
    weights_sha256: str | None = None,
    base_model: str | None = None,
    dtype: str | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    max_side: int = MAX_SIDE,
    placement: PlacementSet | None = None,
    shard: bool | None = None,
) -> GenerateSummary:
    """Generate samples ``0..n-1`` of ``category/defect`` into ``out`` (see
    :mod:`dualanodiff_core.dataset.export` for the layout); samples already there are kept and skipped.

    ``pipe``: a :class:`DualAnoDiffPipeline`, or a function returning one (called only if something is left to
    generate). ``backgrounds`` turns on BCM (weights with BCM layers needed). ``filter_against_background`` /
    ``refine_mask`` compare the generated image with the background's normal image (outside the object when object
    masks are given) to reject pairs / drop mask parts that the image does not show. ``placement`` (a
    :class:`~dualanodiff_core.dataset.placement.PlacementSet`) confines defects to a region and/or generates onto
    normal photos (docs/placement.md); every file is checked before anything is written. Returns a summary.

    ``shard``: share the samples with the other processes of a torchrun / accelerate launch run (see
    :mod:`.sharded`); None = when started as several processes. False: this process generates everything alone.
    """
    if int(n) != n or n < 1:
        raise InputError(f"n={n}: generate at least one sample")
    if int(batch_size) != batch_size or batch_size < 1:
        raise InputError(f"batch_size={batch_size}: must be a whole number >= 1")
    category, defect = check_name(category, "category"), check_name(defect, "defect")
    sampling = sampling or SamplingOptions()
    check_size(sampling.width, sampling.height, max_side)
    mask_options = mask_options or MaskOptions()
    filter_options = filter_options or FilterOptions()
    if (filter_against_background or refine_mask) and backgrounds is None:
        raise InputError(
            "filter_against_background / refine_mask compare with the BCM background's normal image: "
            "give backgrounds (--backgrounds)"
        )
    log = log or (lambda s: print(s, file=sys.stderr))
    if placement is not None:
        if backgrounds is not None and placement.normals is not None:
            raise InputError(
                "--backgrounds and --normal: with --normal the BCM background is the normal photo itself; "
                "drop --backgrounds"
            )
        placement.check((sampling.width, sampling.height))

    loaded = None if callable(pipe) and not hasattr(pipe, "generate") else pipe
    if weights_sha256 is None and weights_path is not None:
        weights_sha256 = sha256_file(weights_path)
    if weights_sha256 is None:
        if loaded is None:
            loaded = pipe()
        weights_sha256 = weights_fingerprint(loaded)
    if base_model is None and loaded is not None:
        base_model = getattr(loaded, "base_model", None)
    base_model_id = None if base_model is None else os.path.abspath(str(base_model))
    settings = {
        "seed": int(seed),
        "sampling": sampling.to_dict(),
        "weights_sha256": weights_sha256,
        "base_model": base_model_id,
        "dtype": dtype,
        "backgrounds": None if backgrounds is None else backgrounds.describe(),
        "filter_against_background": bool(filter_against_background),
        "refine_mask": bool(refine_mask),
        "mask_options": mask_options.to_dict(),
        "filter_options": filter_options.to_dict(),
        "research_layout": bool(research_layout),
        "keep_rejected": bool(keep_rejected),
    }
    if placement is not None:
        settings["placement"] = placement.describe()
    writer = DatasetWriter(
        out,
        category,
        defect,
        digits=digits_for(n),
        research_layout=research_layout,
        keep_rejected=keep_rejected,
        settings=settings,
    )
    provenance = dict(
        weights=None if weights_path is None else str(weights_path),
        weights_sha256=weights_sha256,
        base_model=base_model_id,
        dtype=dtype,
    )

    def run_batches(pipe_, sink, indices: list[int], n_done: int) -> int:
        return _run(
            pipe_,
            sink,
            indices,
            n,
            n_done,
            seed,
            batch_size,
            sampling,
            backgrounds,
            filter_against_background,
            refine_mask,
            mask_options,
            filter_options,
            provenance,
            progress and (not shard or _dist.is_main()),
            log,
            category,
            defect,
            placement,
        )

    if shard is None:
        shard = _dist.is_distributed()
    if shard:  # one of several processes (torchrun / accelerate launch): see .sharded
        from .sharded import generate_sharded

        def load_pipe():
            return loaded if loaded is not None else pipe()

        already_n, generated, sheets = generate_sharded(
            writer, settings, n, batch_size, provenance, run_batches, load_pipe, contact_sheets, log
        )
        recs = [r for i, r in writer.records.items() if i < n] if _dist.is_main() else []
        return _summary(out, category, defect, n, already_n, generated, recs, sheets, writer.recovered)

    with writer:
        for line in writer.recovered:
            log(f"recovered: {line}")
        already = {i for i in writer.done if i < n}
        pending = [i for i in range(n) if i not in already]
        generated = 0
        if pending:
            if loaded is None:
                loaded = pipe()
            pipe = loaded
            generated = run_batches(loaded, writer, pending, len(already))
        sheets = writer.write_contact_sheets() if contact_sheets else []
        recs = [r for i, r in writer.records.items() if i < n]
    return _summary(out, category, defect, n, len(already), generated, recs, sheets, writer.recovered)


def _summary(out, category, defect, n, already_n, generated, recs, sheets, recovered) -> GenerateSummary:
    """What a run did, counted from the manifest records of samples ``0..n-1``."""
    reasons = Counter(r.get("reason", "?") for r in recs)
    acc = sum(1 for r in recs if r.get("accepted"))
    return GenerateSummary(
        Path(out),
        category,
        defect,
        int(n),
        already_n,
        generated,
        acc,
        len(recs) - acc,
        dict(reasons),
        sheets,
        list(recovered),
    )


def _run(
    pipe,
    writer: DatasetWriter,
    pending: list[int],
    n: int,
    n_done: int,
    seed: int,
    batch_size: int,
    sampling: SamplingOptions,
    backgrounds: BackgroundSet | None,
    filter_against_background: bool,
    refine_mask: bool,
    mask_options: MaskOptions,
    filter_options: FilterOptions,
    provenance: dict,
    progress: bool,
    log,
    category: str,
    defect: str,
    placement: PlacementSet | None = None,
) -> int:
    from tqdm.auto import tqdm

    has_bcm = bool(getattr(pipe, "dual", None) is not None and pipe.dual.config.get("bcm"))
    if backgrounds is not None and not has_bcm:
        raise InputError(
            "backgrounds were given, but these weights have no BCM layers (they were trained without "
            "background compensation): drop --backgrounds, or use weights trained with BCM"
        )
    if has_bcm and backgrounds is None and (placement is None or placement.normals is None):
        warnings.warn(
            "these weights have BCM layers but no backgrounds were given: generating without background "
            "compensation (give --backgrounds DIR of normal images to use it)",
            stacklevel=2,
        )
    f = pipe.vae_scale_factor
    W, H = sampling.width, sampling.height
    if H % f or W % f:
        raise InputError(f"--size {W}x{H}: height and width must be multiples of {f} for this model")
    channels = pipe.unet.config.in_channels
    meta = getattr(pipe, "metadata", {}) or {}

    prompt_g = sampling.prompt_global
    if prompt_g is None:
        prompt_g = meta.get("prompt_global") or DEFAULT_PROMPT_GLOBAL
    prompt_a = sampling.prompt_anomaly
    if prompt_a is None:
        prompt_a = meta.get("prompt_anomaly") or DEFAULT_PROMPT_ANOMALY
    gray_seed = sample_seed(seed, -1)  # the unconditional (gray) BCM background: one encoding for the whole run
    counts = Counter()
    bar = tqdm(
        total=n, initial=n_done, desc=f"{category}/{defect}", unit="img", disable=not progress, dynamic_ncols=True
    )
    generated = 0
    wanted = set(pending)
    try:
        for group in grid_batches(pending, batch_size):
            # the whole batch as an uninterrupted run makes it: the same partners and batch size, hence the same
            # bytes and records, also after a run was stopped between two samples of this batch
            first = group[0] // batch_size * batch_size
            batch = list(range(first, min(first + batch_size, n)))
            seeds = [sample_seed(seed, i) for i in batch]
            gens = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
            latents = torch.cat([torch.randn((2, channels, H // f, W // f), generator=g) for g in gens])
            if sampling.anomaly_noise_share:
                latents = share_anomaly_noise(latents, sampling.anomaly_noise_share)
            if sampling.zero_mean_anomaly_noise:
                latents = zero_mean_anomaly_rows(latents)
            kwargs: dict[str, Any] = {}
            items = [None] * len(batch)
            if backgrounds is not None:
                items = [backgrounds.get(i, (W, H)) for i in batch]
                with torch.no_grad():
                    bg_lat = torch.cat(
                        [
                            pipe.encode_background(pil_to_tensor(it.background, signed=True), g)
                            for it, g in zip(items, gens)
                        ]
                    )
                kwargs.update(background_latents=bg_lat, bcm_noise=_bg_noise(gens))
            pitems = [None] * len(batch)
            if placement is not None:
                pitems = _placement_kwargs(pipe, placement, batch, gens, (W, H), has_bcm, kwargs)
                kwargs["placement_seeds"] = seeds
            result = pipe.generate(
                len(batch),
                prompt_global=prompt_g,
                prompt_anomaly=prompt_a,
                negative_prompt=sampling.negative_prompt,
                steps=sampling.steps,
                cfg=sampling.cfg,
                sampler=sampling.sampler,
                generator=torch.Generator(device="cpu").manual_seed(gray_seed),
                height=H,
                width=W,
                latents=latents,
                lora_strength=sampling.lora_strength,
                saim_strength=sampling.saim_strength,
                bcm_strength=sampling.bcm_strength,
                text_strength=sampling.text_strength,
                **kwargs,
            )
            images = tensor_to_pil(result.global_images)
            parts = tensor_to_pil(result.anomaly_images)
            for j, i in enumerate(batch):
                if i not in wanted:
                    continue  # already in the dataset (or staged): generated again only to keep the batch whole
                it = items[j]
                compare = {}
                if it is not None and (filter_against_background or refine_mask):
                    region = None
                    if it.object_mask is not None:
                        region = Image.eval(it.object_mask, lambda v: 255 if v < 128 else 0)
                    compare = dict(global_image=images[j], normal_image=it.normal, known_region=region)
                refine = dict(compare) if refine_mask else {}
                if mask_options.visible_min_deviation > 0:  # cut the mask down to what the global image shows
                    refine["global_image"] = images[j]
                mres = extract_mask(parts[j], mask_options, **refine)
                against = compare if filter_against_background else {"global_image": images[j]}
                decision = check_pair(mres, filter_options, mask_options=mask_options, **against)
                placed = {}
                if pitems[j] is not None:
                    steered = result.steering[j] if result.steering is not None else None
                    decision, placed = _placement_record(pitems[j], decision, mres.mask, placement, steered)
                info = dict(
                    seed=seeds[j],
                    base_seed=int(seed),
                    sampler=sampling.sampler,
                    steps=int(sampling.steps),
                    cfg=float(sampling.cfg),
                    prompt_global=prompt_g,
                    prompt_anomaly=prompt_a,
                    negative_prompt=sampling.negative_prompt,
                    lora_strength=list(sampling.lora_strength),
                    saim_strength=sampling.saim_strength,
                    bcm_strength=sampling.bcm_strength,
                    text_strength=sampling.text_strength,
                    zero_mean_anomaly_noise=sampling.zero_mean_anomaly_noise,
                    anomaly_noise_share=float(sampling.anomaly_noise_share),
                    batch_size=len(batch),
                    background=None if it is None else str(it.path),
                    object_mask=None if it is None or it.mask_path is None else str(it.mask_path),
                    version=__version__,
                    **provenance,
                    **placed,
                )
                writer.write(ExportSample(i, images[j], parts[j], mres, decision, info))
                counts[decision.reason] += 1
                generated += 1
                bar.update(1)
            bar.set_postfix(ok=counts["ok"], rejected=sum(v for k, v in counts.items() if k != "ok"))
    finally:
        bar.close()
    return generated


def _placement_kwargs(pipe, placement: PlacementSet, batch, gens, size, has_bcm: bool, kwargs: dict) -> list:
    """The batch's photos / regions as :meth:`DualAnoDiffPipeline.generate` arguments (into ``kwargs``); with BCM
    weights (and no ``--backgrounds``) each photo is also its sample's BCM background. Returns the items."""
    items = [placement.get(i, size) for i in batch]
    kwargs.update(guide_placement=placement.guide, feather=placement.feather, steering=placement.steering)
    if placement.regions is not None:
        kwargs["placement"] = torch.stack([torch.from_numpy(it.region.astype("float32"))[None] for it in items])
    if placement.normals is not None:
        kwargs["normal"] = pil_to_tensor([it.normal for it in items], signed=True)
        if has_bcm and "background_latents" not in kwargs:
            with torch.no_grad():
                bg_lat = torch.cat(
                    [pipe.encode_background(pil_to_tensor(it.normal, signed=True), g) for it, g in zip(items, gens)]
                )
            kwargs.update(background_latents=bg_lat, bcm_noise=_bg_noise(gens))
    return items


def _placement_record(item, decision, mask, placement: PlacementSet, steered: dict | None = None):
    """Region check of one pair and its manifest fields (which photo and region it used, and how it was steered:
    ``placement_steering`` is the probe's shift of the starting noise in pixels and the share of the forming defect
    it predicted inside the region before and after, or null when not steered)."""
    info: dict[str, Any] = dict(
        normal=None if item.normal_path is None else str(item.normal_path),
        placement=None if item.region_path is None else str(item.region_path),
        placement_guidance=placement.guide,
        placement_steering=steered,
        feather=placement.feather if item.normal_path is not None else None,
        outside_region=None,
    )
    if item.region is not None:
        decision, outside = check_region(decision, mask, item.region, placement.max_outside)
        info["outside_region"] = round(outside, 6)
    return decision, info
