"""End to end on MiniDefect, for one defect type: train on the few-shot third, generate, evaluate.

Used by ``bench/quality.py --all`` (every defect type, one command). Each stage's output is kept under ``work``
and reused when it is already there (weights file, generated folder with its summary), so an interrupted run
continues where it stopped. The settings are the demo's defaults (``dualanodiff demo``) under a recipe
(:mod:`dualanodiff_core.method.recipes`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..method.recipes import DEFAULT_RECIPE


@dataclasses.dataclass(frozen=True)
class RunSettings:
    recipe: str = DEFAULT_RECIPE
    train_steps: int = 800
    rank: int = 8
    lr: float = 3e-4
    batch_size: int = 4
    train_seed: int = 0
    samples: int = 48
    sampler: str = "ddim"
    sampling_steps: int = 25
    #: None = the recipe's MiniDefect guidance scale
    cfg: float | None = None
    gen_seed: int = 0
    #: refine each mask by what the global image shows (``MaskOptions.visible_min_deviation``; 0 = off)
    mask_visible: float = 0.0
    #: generate more samples (in steps, up to 4 x ``samples``) until this many are accepted (0 = exactly ``samples``)
    accept_target: int = 0
    #: correlation of the anomaly branch's starting noise with the global branch's (``SamplingOptions``; 0 = the
    #: reference's independent noise); None = the recipe's
    noise_share: float | None = None
    #: the same in training (``TrainConfig.anomaly_noise_share``)
    train_noise_share: float = 0.0
    #: None = the recipe's (``ours``: zero-mean anomaly starting noise; ``reference``: plain)
    zero_mean_noise: bool | None = None
    #: the mask's contrast floor (``MaskOptions.min_contrast``); None = the MiniDefect default (:func:`mask_options`)
    mask_min_contrast: float | None = None
    #: amplify faint defects on the anomaly branch in training (``TrainConfig.anomaly_contrast``; 0 = off); None =
    #: the recipe's
    anomaly_contrast: float | None = None

    #: settings that change the trained weights / the generated set: a run that differs from the defaults in any of
    #: them gets its own weights file / generated folder (:meth:`suffix`), so variants never overwrite each other
    TRAINING = ("train_steps", "rank", "lr", "batch_size", "train_seed", "train_noise_share", "anomaly_contrast")
    SAMPLING = (
        "samples",
        "sampler",
        "sampling_steps",
        "cfg",
        "gen_seed",
        "mask_visible",
        "accept_target",
        "noise_share",
        "zero_mean_noise",
        "mask_min_contrast",
    )

    def suffix(self, fields: tuple[str, ...]) -> str:
        """``""`` when ``fields`` hold their defaults, else ``-name=value...`` of those that differ."""
        d = RunSettings(recipe=self.recipe)

        def text(v) -> str:
            return v if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else format(v, "g")

        def value(s: RunSettings, k: str):
            # the noise share compares resolved: the recipe's own value is no variant of it (the folders are per recipe)
            if k == "noise_share":
                return s.resolved_noise_share()
            if k == "anomaly_contrast":
                return s.resolved_anomaly_contrast()
            return getattr(s, k)

        return "".join(f"-{k}={text(getattr(self, k))}" for k in fields if value(self, k) != value(d, k))

    def resolved_cfg(self) -> float:
        from ..method.recipes import get_recipe

        return get_recipe(self.recipe).minidefect_cfg if self.cfg is None else float(self.cfg)

    def resolved_noise_share(self) -> float:
        from ..method.recipes import get_recipe

        return get_recipe(self.recipe).sampling_noise(share=self.noise_share)[1]

    def resolved_anomaly_contrast(self) -> float:
        from ..method.recipes import get_recipe

        r = get_recipe(self.recipe).anomaly_contrast
        return r if self.anomaly_contrast is None else float(self.anomaly_contrast)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["cfg"] = self.resolved_cfg()
        d["noise_share"] = self.resolved_noise_share()
        d["anomaly_contrast"] = self.resolved_anomaly_contrast()
        return d

    def mask_options(self):
        from . import procedural as md

        floor = {} if self.mask_min_contrast is None else {"min_contrast": float(self.mask_min_contrast)}
        return md.mask_options(visible_min_deviation=self.mask_visible, **floor)


def train_config(settings: RunSettings, product: str, size: int):
    """The :class:`~dualanodiff_core.train.TrainConfig` of a MiniDefect run (the demo's) under its recipe."""
    from ..method.recipes import get_recipe, minidefect_prompts
    from ..training.trainer import TrainConfig
    from . import procedural as md

    recipe = get_recipe(settings.recipe)
    pg, pa = minidefect_prompts(md.normal_prompt(product), recipe)
    train = {**recipe.train_settings(), "anomaly_contrast": settings.resolved_anomaly_contrast()}
    return TrainConfig(
        steps=settings.train_steps,
        batch_size=settings.batch_size,
        learning_rate=settings.lr,
        rank=settings.rank,
        seed=settings.train_seed,
        resolution=size,
        split="strict",
        checkpoint_every=0,
        keep_checkpoints=1,
        checkpoint_weights=False,
        prompt_global=pg,
        prompt_anomaly=pa,
        anomaly_noise_share=settings.train_noise_share,
        **train,
    ).validate()


def sampling_options(settings: RunSettings, size: int):
    from ..dataset.generate import SamplingOptions
    from ..method.recipes import get_recipe

    zero_mean, share = get_recipe(settings.recipe).sampling_noise(settings.zero_mean_noise, settings.noise_share)
    return SamplingOptions(
        sampler=settings.sampler,
        steps=settings.sampling_steps,
        cfg=settings.resolved_cfg(),
        height=size,
        width=size,
        zero_mean_anomaly_noise=zero_mean,
        anomaly_noise_share=share,
    )


def _check_reused_weights(path: Path, config) -> None:
    """A weights file kept in the work folder is reused only when it was trained with ``config``: the file name
    carries only the settings that differ from the defaults, so weights written before a default changed (e.g. the
    recipe's anomaly contrast) have the name of weights trained with the new one."""
    from ..errors import InputError
    from ..method.weights import DualAnoDiffWeights
    from ..training.trainer import TrainConfig

    raw = DualAnoDiffWeights.load(path).metadata.get("training")
    try:
        recorded = TrainConfig.from_dict(json.loads(raw)).training_settings() if raw else None
    except (ValueError, TypeError):
        recorded = None
    want = config.training_settings()
    if recorded != want:
        diff = (
            ", ".join(f"{k} {recorded.get(k)!r} (now {v!r})" for k, v in want.items() if recorded.get(k) != v)
            if recorded
            else "no readable training settings"
        )
        raise InputError(
            f"{path}: these weights were trained with other settings ({diff}); delete the file (and its _train "
            "folder) to train them again, or give another --work folder"
        )


def train_and_generate(
    data: str | Path,
    product: str,
    defect: str,
    work: str | Path,
    settings: RunSettings,
    *,
    model: str | Path | None = None,
    device: str = "cpu",
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train weights on ``data/<product>/test/<defect>``'s few-shot third and generate ``settings.samples`` pairs
    into ``work/generated/<product>_<defect>``; returns what was done (paths, seconds, filter summary). ``model``:
    the base model folder (default: the shipped MiniDefect model)."""
    from ..dataset.generate import generate_dataset
    from ..evaluation.benchmark import read_rgb
    from ..fileio import write_json_atomic
    from ..sd15.training import train_from_folder
    from ..training.data import find_defect_set
    from . import procedural as md

    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    data, work = Path(data), Path(work)
    name = f"{product}_{defect}"
    weights = work / "weights" / f"{name}{settings.suffix(settings.TRAINING)}.safetensors"
    generated = work / "generated" / f"{name}{settings.suffix(settings.TRAINING + settings.SAMPLING)}"
    done_file = generated / "run.json"
    size = int(read_rgb(next(iter(sorted((data / product / "train" / "good").glob("*.png"))))).shape[0])
    model = md.base_model_dir() if model is None else model
    info: dict[str, Any] = {"settings": settings.to_dict(), "weights": str(weights), "generated": str(generated)}
    if done_file.is_file():
        prev = json.loads(done_file.read_text())
        if prev.get("settings") == info["settings"]:
            log(f"{name}: reusing {generated}")
            return prev
    tc = train_config(settings, product, size)
    t0 = time.time()
    if weights.is_file():
        _check_reused_weights(weights, tc)
    else:
        log(f"{name}: training {settings.train_steps} steps ({settings.recipe} recipe, prompt {tc.prompt_global!r})")
        work_dir = weights.with_name(weights.stem + "_train")
        res = train_from_folder(
            find_defect_set(data / product, defect),
            model,
            weights,
            tc,
            work_dir=work_dir,
            device=device,
            resume=True if (work_dir / "checkpoints").is_dir() else None,
        )
        if not res.completed:
            raise RuntimeError(f"training {name} stopped at step {res.step}; run again to continue")
    info["train_seconds"] = round(time.time() - t0, 1)
    t0 = time.time()
    from ..sd15.pipeline import DualAnoDiffPipeline

    def load():
        return DualAnoDiffPipeline.from_pretrained(model, weights, device=device)

    pipe = None

    def load_once():
        nonlocal pipe
        if pipe is None:
            pipe = load()
        return pipe

    n = settings.samples
    while True:
        summary = generate_dataset(
            load_once,
            generated,
            n,
            category=product,
            defect=defect,
            seed=settings.gen_seed,
            batch_size=8,
            sampling=sampling_options(settings, size),
            mask_options=settings.mask_options(),
            weights_path=weights,
            base_model=str(model),
            progress=False,
            log=log,
        )
        missing = settings.accept_target - summary.accepted
        if missing <= 0 or n >= 4 * settings.samples:
            break
        # the next samples at the acceptance rate seen so far (at least one batch), never more than 4 x samples
        rate = max(summary.accepted, 1) / n
        n = min(4 * settings.samples, n + max(8, math.ceil(missing / rate)))
    info.update(
        generated_samples=n,
        generate_seconds=round(time.time() - t0, 1),
        accepted=summary.accepted,
        rejected=summary.rejected,
        reasons=summary.reasons,
    )
    write_json_atomic(done_file, info)
    log(f"{name}: {summary.accepted} accepted, {summary.rejected} rejected ({dict(summary.reasons)})")
    return info
