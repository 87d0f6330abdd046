"""The Stable Diffusion 1.5 backbone (diffusers/transformers): model loading (:mod:`.loading`, :mod:`.single_file`),
the dual-branch UNet, text-encoder LoRA and pipeline (:mod:`.pipeline`), and the diffusers training backbone
(:mod:`.training`)."""
