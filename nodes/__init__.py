"""ComfyUI layer of DualAnoDiff (thin glue over ``dualanodiff_core``).

Importing this package does nothing: ComfyUI imports :mod:`.extension` through the pack's ``comfy_entrypoint``,
which imports the node modules (and with them ``comfy``). The module that does not need ComfyUI
(``conditioning``) can be imported and tested anywhere.

Layout:

* ``comfy_backend`` -- the mechanism: one object patch per attention module, settings per clone in
  ``transformer_options["dualanodiff"]``, the ``APPLY_MODEL`` wrapper (pair-layout check, BCM record pass), the
  text-encoder LoRA through ComfyUI's own CLIP patching;
* ``conditioning`` -- pairing two CONDITIONINGs into one batch-2 conditioning, splitting interleaved results
  (no ComfyUI imports);
* ``images`` -- IMAGE/MASK tensors <-> numpy/PIL (no ComfyUI imports); ``dataset_io`` -- appending generated pairs to
  an MVTec dataset with the core's DatasetWriter (no ComfyUI imports);
* ``comfy_train`` -- the core's ``TrainingBackbone`` on a ComfyUI MODEL/CLIP/VAE (training inside
  ``torch.inference_mode(False)``, a trainable text-encoder LoRA as CLIP weight wrappers);
* ``loaders``, ``patch``, ``background``, ``sampler``, ``mask``, ``dataset``, ``train`` -- the nodes;
* ``extension`` -- the V3 ``ComfyExtension`` listing every node module in :data:`extension.NODE_MODULES`.
"""
