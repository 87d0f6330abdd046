"""Recipes: named sets of training and sampling settings, so that the reference recipe stays one option away.

``shared-noise`` (the default of ``dualanodiff train``, ``generate`` and ``demo``; below) is ``reference`` with the
anomaly branch started from its global branch's noise (and ``generate`` sampling with DDIM 50). ``reference`` is the
paper's published code. ``ours`` adds three changes to it, each aimed at a failure seen on MiniDefect and measured
with ``bench/quality.py`` (see docs/quality.md; it is not the default because it did not make the generated data
more useful there):

* **offset noise on the anomaly rows in training** (``anomaly_offset_noise``, 0.1): the training noise of each
  anomaly-branch latent gets a random per-channel constant added, so the branch learns to put its background back to
  mid-gray even when the noise it starts from has a non-zero mean (on a small latent the sampled noise's mean leaks
  colour into the anomaly branch's background: tinted instead of gray);
* **a mask-weighted global-branch loss** (``mask_loss_weight``, 20): the global branch's loss counts 20x inside the
  (latent-resolution) defect mask, so the few defect pixels are not drowned by the texture around them and the global
  image shows the defect where the anomaly branch draws it;
* **zero-mean starting noise on the anomaly rows at sampling** (``zero_mean_anomaly_noise``): each anomaly-branch
  starting latent has its per-channel spatial mean removed (background tint on MiniDefect: 0.063 -> 0.015).

``reference`` is the paper's published code: none of the three. On the demo and the benchmark (MiniDefect), ``ours``
also trains with product prompts (``woven fabric with sks`` instead of ``a vfx with sks``: the base model knows the
product words) and samples without classifier-free guidance (cfg 1.0 aligned masks and images better than 2.5);
``reference`` keeps ``a vfx with sks`` / ``sks`` and cfg 2.5.

``shared-noise`` is ``reference`` (same prompts and guidance) with one training change and two sampling changes.
In training, faint defects are amplified on the anomaly branch's target (``anomaly_contrast`` 0.4,
``TrainConfig.anomaly_contrast``): a defect whose colours lie near mid-gray (a gray stain on gray metal) is otherwise
drawn so faintly that its mask comes out empty or too small; defects that already differ from mid-gray by 0.4 are
trained exactly as in the reference (on MiniDefect: a higher mean usefulness on both dataset seeds, docs/quality.md
"Faint defects"). Each pair's
anomaly row starts from the same noise as its global row (``anomaly_noise_share`` 1): the two branches then place the
defect at the same spot; with independent starting noise the global image's defect follows the global branch's own
noise and the anomaly branch draws its defect somewhere else (SAIM couples them too weakly to move it; measured with
``bench/diagnose.py``, docs/quality.md). And it samples with DDIM, 50 steps, instead of PNDM, 100: half the
denoising steps for the same mean usefulness on MiniDefect (two types, two dataset seeds; worse on one of the four;
``bench/sampler_cost.py``, docs/quality.md "Cost at equal quality"). With ``--anomaly-contrast 0`` its weights are
the reference recipe's.
"""

from __future__ import annotations

import dataclasses

RECIPES = ("ours", "reference", "shared-noise")
DEFAULT_RECIPE = "shared-noise"


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str
    #: training: std of the per-channel constant added to the anomaly rows' noise (0 = the reference)
    anomaly_offset_noise: float
    #: training: weight of the global branch's loss inside the defect mask (1 = the reference, uniform)
    mask_loss_weight: float
    #: sampling: remove the per-channel mean of the anomaly rows' starting noise
    zero_mean_anomaly_noise: bool
    #: MiniDefect (demo, benchmark): prompt the product name (``woven fabric with sks``) instead of ``a vfx with sks``
    product_prompts: bool
    #: MiniDefect (demo, benchmark): classifier-free guidance scale
    minidefect_cfg: float
    #: sampling: correlation of each anomaly row's starting noise with its global row's (0 = independent, the
    #: reference; 1 = the same noise)
    anomaly_noise_share: float = 0.0
    #: sampling: scheduler and denoising steps of ``dualanodiff generate`` when not given (the reference: PNDM, 100)
    sampler: str = "pndm"
    steps: int = 100
    #: training: amplify faint defects on the anomaly branch's target (``TrainConfig.anomaly_contrast``; 0 = the
    #: reference)
    anomaly_contrast: float = 0.0

    def schedule(self, sampler: str | None = None, steps: int | None = None) -> tuple[str, int]:
        """(sampler, steps): each value given, else this recipe's (the CLI's ``None`` defaults)."""
        return (self.sampler if sampler is None else sampler, int(self.steps if steps is None else steps))

    def sampling_noise(self, zero_mean: bool | None = None, share: float | None = None) -> tuple[bool, float]:
        """(zero-mean anomaly starting noise, anomaly noise share): each value given, else this recipe's.

        The one place where an option left unset (the CLI's ``None`` defaults, the benchmark's ``RunSettings``)
        falls back to the recipe, so ``generate`` and the benchmark cannot resolve it differently."""
        return (
            bool(self.zero_mean_anomaly_noise if zero_mean is None else zero_mean),
            float(self.anomaly_noise_share if share is None else share),
        )

    def train_settings(self) -> dict:
        """The :class:`~dualanodiff_core.train.TrainConfig` fields this recipe sets."""
        return {
            "anomaly_offset_noise": self.anomaly_offset_noise,
            "mask_loss_weight": self.mask_loss_weight,
            "anomaly_contrast": self.anomaly_contrast,
        }


#: the anomaly contrast of the default recipe (measured on MiniDefect, docs/quality.md "Faint defects")
SHARED_NOISE_ANOMALY_CONTRAST = 0.4

_RECIPES = {
    "ours": Recipe("ours", 0.1, 20.0, True, True, 1.0),
    "reference": Recipe("reference", 0.0, 1.0, False, False, 2.5),
    "shared-noise": Recipe(
        "shared-noise",
        0.0,
        1.0,
        False,
        False,
        2.5,
        anomaly_noise_share=1.0,
        sampler="ddim",
        steps=50,
        anomaly_contrast=SHARED_NOISE_ANOMALY_CONTRAST,
    ),
}


def get_recipe(name: str) -> Recipe:
    if name not in _RECIPES:
        raise ValueError(f"--recipe {name!r}: choose one of {', '.join(RECIPES)}")
    return _RECIPES[name]


def minidefect_prompts(product_prompt: str, recipe: Recipe) -> tuple[str, str]:
    """(global prompt, anomaly prompt) for a MiniDefect product under ``recipe``."""
    from .weights import DEFAULT_PROMPT_ANOMALY, DEFAULT_PROMPT_GLOBAL

    if recipe.product_prompts:
        return f"{product_prompt} with sks", DEFAULT_PROMPT_ANOMALY
    return DEFAULT_PROMPT_GLOBAL, DEFAULT_PROMPT_ANOMALY
