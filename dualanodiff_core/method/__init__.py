"""The DualAnoDiff method, independent of any backbone: the interleaved two-branch batch (:mod:`.layout`), per-branch
LoRA, SAIM and BCM (:mod:`.attention`, with its fast paths in :mod:`.fused`), and the weights file (:mod:`.weights`).

See ``docs/method.md`` for the method as this code implements it.
"""
