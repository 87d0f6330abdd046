"""Samplers for the SD1.5 backbone: the reference's scheduler configuration and the three samplers we offer.

diffusers is imported inside :func:`make_scheduler`: importing it takes seconds, and the rest of this module (the
constants) is needed by code that never samples.
"""

from __future__ import annotations

SAMPLERS = ("pndm", "ddim", "dpmpp")


def make_scheduler(name: str, config: dict):
    """``pndm`` (the SD1.5 default and the reference's), ``ddim`` or ``dpmpp`` (DPM-Solver++ 2M)."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, PNDMScheduler

    config = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    if name == "pndm":
        return PNDMScheduler.from_config({**config, "skip_prk_steps": True})
    if name == "ddim":
        return DDIMScheduler.from_config(config)
    if name == "dpmpp":
        return DPMSolverMultistepScheduler.from_config({**config, "algorithm_type": "dpmsolver++"})
    raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")


SD15_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    set_alpha_to_one=False,
    skip_prk_steps=True,
    steps_offset=1,
    clip_sample=False,
    prediction_type="epsilon",
)
