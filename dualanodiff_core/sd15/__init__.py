"""The Stable Diffusion 1.5 backbone (diffusers/transformers): model loading (:mod:`.loading`, :mod:`.single_file`),
the dual-branch UNet and pipeline (:mod:`.pipeline`), the text-encoder LoRA and prompts (:mod:`.text`), the
samplers (:mod:`.scheduler`), and the diffusers training backbone (:mod:`.training`).

diffusers and transformers are imported inside the functions that use them: importing them takes seconds, and the
ComfyUI nodes and the light commands import these modules without ever needing them.
"""
