"""Quality filter for generated (image, mask) pairs: every decision is kept with its reason and the numbers behind it.

Checks, in this order (the first failing one is the reason):

``background_not_gray``
    the anomaly-branch image's median is far from mid-gray (``max_gray_offset``): the branch did not draw "defect on
    gray" (a failed sample, or the global image was passed by mistake), so no mask from it can be trusted;
``empty_mask``
    nothing in the anomaly image stands out from gray (see :class:`~dualanodiff_core.dataset.masks.MaskResult.note`);
``mask_too_large``
    the mask covers more than ``max_area`` of the image (a defect rarely does; usually a failed anomaly branch);
``mask_too_small``
    the mask covers less than ``min_area`` of the image (off by default);
``disagrees_with_normal``
    only when a normal image aligned with the generated one is known (BCM with ``--filter-against-background``):
    where the generated image differs from the normal image and where the mask is must agree (a symmetric,
    tolerance-based overlap, ``agreement`` below), inside the region where the normal image is known;
``misaligned``
    only when the generated global image is given: the image does not differ, inside the mask, from a ring of
    ``alignment_ring`` pixels around it (:func:`alignment_contrast` below ``min_alignment``): the anomaly branch drew a
    defect that the global image does not show, and such a mask would teach a detector to fire on normal texture.
    When the mask was refined by the global image (``MaskOptions.visible_min_deviation``) the contrast is measured
    on the mask as drawn (``MaskResult.drawn``), and a pair whose refined mask is empty is ``misaligned`` too (this
    check then comes before ``empty_mask``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from .masks import GRAY_LEVEL, MaskOptions, MaskResult, change_mask, dilate, to_bool_mask, to_float_image

REASONS = (
    "ok",
    "background_not_gray",
    "empty_mask",
    "mask_too_large",
    "mask_too_small",
    "disagrees_with_normal",
    "misaligned",
)
#: default of ``FilterOptions.min_alignment``: on MiniDefect (seed 0, all six defect types, 180 real defects) real
#: defects score 0.30-12 (3 of 180 below it, all faint metal stains), the same masks on normal images or moved by
#: 20 px mostly below it
DEFAULT_MIN_ALIGNMENT = 0.57


@dataclasses.dataclass(frozen=True)
class FilterOptions:
    #: reject masks covering more than this share of the image
    max_area: float = 0.5
    #: reject masks covering less than this share of the image (0 = off; ``MaskOptions.min_area`` already drops specks)
    min_area: float = 0.0
    #: reject when the anomaly image's per-channel median is further than this from mid-gray (1 = off)
    max_gray_offset: float = 0.2
    #: with a known normal image: reject when the mask/change agreement is below this (0 = off)
    min_agreement: float = 0.5
    #: with a known normal image: how far (px) mask and change may be apart and still agree
    agreement_tolerance: int = 3
    #: with the generated global image: reject when its alignment contrast is below this (0 = off)
    min_alignment: float = DEFAULT_MIN_ALIGNMENT
    #: width (px) of the ring around the mask that the alignment contrast compares the inside with
    alignment_ring: int = 3

    def __post_init__(self):
        for name in ("max_area", "min_area", "min_agreement"):
            v = getattr(self, name)
            if not (0.0 <= v <= 1.0):
                raise ValueError(f"filter option {name}={v}: must be a share in [0, 1]")
        if self.min_area > self.max_area:
            raise ValueError(f"filter options: min_area {self.min_area} is above max_area {self.max_area}")
        if not (0.0 < self.max_gray_offset <= 1.0):
            raise ValueError(
                f"filter option max_gray_offset={self.max_gray_offset}: must lie in (0, 1]; 1 turns it off"
            )
        if int(self.agreement_tolerance) != self.agreement_tolerance or self.agreement_tolerance < 0:
            raise ValueError(f"filter option agreement_tolerance={self.agreement_tolerance}: a whole number of pixels")
        if not (0.0 <= self.min_alignment <= 100.0) or self.min_alignment != self.min_alignment:
            raise ValueError(
                f"filter option min_alignment={self.min_alignment}: must lie in [0, 100] "
                f"(0 = off; default {DEFAULT_MIN_ALIGNMENT})"
            )
        if int(self.alignment_ring) != self.alignment_ring or self.alignment_ring < 1:
            raise ValueError(f"filter option alignment_ring={self.alignment_ring}: a whole number of pixels >= 1")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class FilterDecision:
    accepted: bool
    #: one of :data:`REASONS` ("ok" when accepted)
    reason: str
    #: a sentence with the numbers, for people
    detail: str
    area_fraction: float
    #: largest per-channel distance of the anomaly image's median from mid-gray
    gray_offset: float
    #: mask/change agreement in [0, 1], None when no normal image was given
    agreement: float | None = None
    #: share of the known region where the generated image differs from the normal image (None without one)
    change_fraction: float | None = None
    #: alignment contrast of the mask on the generated global image (None without the image)
    alignment: float | None = None

    def to_record(self) -> dict[str, Any]:
        r = lambda x: None if x is None else round(float(x), 6)  # noqa: E731
        return {
            "accepted": self.accepted,
            "reason": self.reason,
            "detail": self.detail,
            "area_fraction": r(self.area_fraction),
            "gray_offset": r(self.gray_offset),
            "agreement": r(self.agreement),
            "change_fraction": r(self.change_fraction),
            "alignment": r(self.alignment),
        }


def mask_change_agreement(
    mask: np.ndarray, change: np.ndarray, region: np.ndarray | None = None, tolerance: int = 3
) -> float:
    """Symmetric overlap with tolerance, in [0, 1]: ``(|M ∩ dil(C)| + |C ∩ dil(M)|) / (|M| + |C|)`` counted inside
    ``region``; 1.0 when neither has a pixel there (both agree that nothing changed)."""
    m = np.asarray(mask) > 0
    c = np.asarray(change) > 0
    if region is not None:
        m = m & region
        c = c & region
    total = int(m.sum()) + int(c.sum())
    if total == 0:
        return 1.0
    hit = int((m & dilate(c, tolerance)).sum()) + int((c & dilate(m, tolerance)).sum())
    return hit / total


def alignment_contrast(image, mask, ring: int = 3) -> float:
    """How much ``image`` differs inside ``mask`` from a ring of ``ring`` pixels around it, in units of the ring's
    own spread: ``|mean_in - mean_ring| / (rms_std_ring * sqrt(C))`` over the colour channels (C = 3 for RGB), in
    [0, inf). A visible defect scores well above 1; a mask over texture that looks like its surroundings scores
    about 0-0.5. 0.0 for an empty mask or one without a ring (it covers the whole image)."""
    img = to_float_image(image, "image")
    m = to_bool_mask(mask, "mask", img.shape[:2])
    around = dilate(m, ring) & ~m
    if not m.any() or not around.any():
        return 0.0
    inside, outside = img[m], img[around]
    diff = inside.mean(0) - outside.mean(0)
    spread = float(np.sqrt((outside.var(0)).mean())) + 1e-3
    return float(np.linalg.norm(diff) / spread / np.sqrt(img.shape[2]))


def check_pair(
    mask: MaskResult,
    options: FilterOptions | None = None,
    *,
    global_image=None,
    normal_image=None,
    known_region=None,
    mask_options: MaskOptions | None = None,
) -> FilterDecision:
    """Accept or reject one generated pair. ``global_image`` (the generated image) enables the alignment check;
    ``normal_image`` (with ``global_image``) also the agreement check, restricted to ``known_region`` (True = the
    normal image is valid there, e.g. outside the object) if given."""
    o = options or FilterOptions()
    area = float(mask.area_fraction)
    offset = float(max(abs(v - GRAY_LEVEL) for v in mask.image_median)) if mask.image_median else 0.0
    agreement = change_fraction = aligned = None
    if normal_image is not None and global_image is None:
        raise ValueError("the agreement check needs global_image as well as normal_image")
    if global_image is not None and not mask.empty:
        # on the mask as the anomaly branch drew it when the mask was refined by the global image (see MaskResult)
        shown = mask.mask if mask.drawn is None else mask.drawn
        aligned = alignment_contrast(global_image, shown, o.alignment_ring)
    if normal_image is not None:
        h, w = mask.mask.shape
        region = None if known_region is None else to_bool_mask(known_region, "known_region", (h, w))
        change = change_mask(global_image, normal_image, mask_options, known_region=region)
        if change.shape != (h, w):
            raise ValueError(f"the generated image is {change.shape[1]}x{change.shape[0]} but the mask is {w}x{h}")
        agreement = mask_change_agreement(mask.mask, change, region, o.agreement_tolerance)
        n_known = h * w if region is None else int(region.sum())
        change_fraction = float(change.sum()) / max(1, n_known)

    def decide(reason: str, detail: str) -> FilterDecision:
        return FilterDecision(reason == "ok", reason, detail, area, offset, agreement, change_fraction, aligned)

    if offset > o.max_gray_offset:
        med = ", ".join(f"{v:.2f}" for v in mask.image_median)
        return decide(
            "background_not_gray",
            f"anomaly image median ({med}) is {offset:.2f} from mid-gray 0.5 "
            f"(limit {o.max_gray_offset:.2f}): "
            "the anomaly branch did not draw the defect on gray",
        )
    if mask.empty and mask.visible_share is not None:
        # the anomaly branch drew a defect, but the refinement by the global image found none of it in the image
        return decide("misaligned", f"empty mask: {mask.note}")
    if mask.empty:
        return decide("empty_mask", f"empty mask: {mask.note or 'no defect found in the anomaly image'}")
    if area > o.max_area:
        return decide("mask_too_large", f"mask covers {area:.1%} of the image (limit {o.max_area:.0%})")
    if area < o.min_area:
        return decide("mask_too_small", f"mask covers {area:.3%} of the image (minimum {o.min_area:.3%})")
    if agreement is not None and agreement < o.min_agreement:
        return decide(
            "disagrees_with_normal",
            f"mask and the change from the normal image agree {agreement:.0%} "
            f"(minimum {o.min_agreement:.0%}; "
            f"{change_fraction:.1%} of the known region changed)",
        )
    if aligned is not None and o.min_alignment > 0 and aligned < o.min_alignment:
        return decide(
            "misaligned",
            f"the generated image barely differs inside the mask from its surroundings (alignment contrast "
            f"{aligned:.2f}, minimum {o.min_alignment:.2f}): it does not show the defect the mask marks",
        )
    extra = "" if aligned is None else f", alignment contrast {aligned:.2f}"
    extra += "" if agreement is None else f", agreement with the normal image {agreement:.0%}"
    return decide("ok", f"mask covers {area:.2%} of the image in {mask.components} component(s){extra}")
