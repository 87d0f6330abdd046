"""The text side of the SD1.5 backbone: the shared text-encoder LoRA (:class:`TextEncoderLoRA`), prompt encoding and
the tokenizer check (docs/method.md, "Per-branch LoRA")."""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import nn

from ..method.attention import LoRALinear
from ..method.weights import TEXT, DualAnoDiffWeights, WeightsError


class TextEncoderLoRA(nn.Module):
    """The shared text-encoder LoRA on ``q_proj``/``k_proj``/``v_proj``/``out_proj`` of every CLIP self-attention,
    applied by forward hooks: ``y = W x + strength * lora(x)``."""

    _PROJ = {"to_q_lora": "q_proj", "to_k_lora": "k_proj", "to_v_lora": "v_proj", "to_out_lora": "out_proj"}

    def __init__(self, text_encoder: nn.Module, rank: int = 32, alpha: float | None = None):
        super().__init__()
        self.strength = 1.0
        self.names: list[str] = []
        self.blocks = nn.ModuleList()
        self._handles = []
        ref = next(text_encoder.parameters())
        for module_name, mod in text_encoder.named_modules():
            if all(hasattr(mod, p) for p in self._PROJ.values()) and isinstance(mod.q_proj, nn.Linear):
                m = re.search(r"layers\.(\d+)\.self_attn$", module_name)
                if not m:
                    raise TypeError(f"unexpected CLIP attention module name {module_name!r}")
                # canonical (transformers-version independent) name, as the reference checkpoints spell it
                name = f"text_model.encoder.layers.{m.group(1)}.self_attn"
                block = nn.ModuleDict(
                    {
                        lora: LoRALinear(getattr(mod, proj).in_features, getattr(mod, proj).out_features, rank, alpha)
                        for lora, proj in self._PROJ.items()
                    }
                )
                self.names.append(name)
                self.blocks.append(block.to(ref.device))
                for lora, proj in self._PROJ.items():
                    self._handles.append(getattr(mod, proj).register_forward_hook(self._hook(block[lora])))
        if not self.names:
            raise TypeError(
                f"{type(text_encoder).__name__}: no CLIP self-attention (q_proj/k_proj/v_proj/out_proj) found"
            )

    def _hook(self, lora: LoRALinear):
        def hook(module, args, output):
            if self.strength == 0.0:
                return output
            delta = lora(args[0])
            return output + (delta if self.strength == 1.0 else delta * self.strength)

        return hook

    def uninstall(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def canonical_state_dict(self) -> dict[str, torch.Tensor]:
        return {
            f"{TEXT}{name}.{k}": v
            for name, block in zip(self.names, self.blocks)
            for k, v in block.state_dict().items()
        }

    def load_weights(self, weights: DualAnoDiffWeights | dict[str, torch.Tensor], strict: bool = True) -> None:
        sd = weights.tensors if isinstance(weights, DualAnoDiffWeights) else weights
        sd = {k: v for k, v in sd.items() if k.startswith(TEXT)}
        expected = self.canonical_state_dict()
        if strict:
            DualAnoDiffWeights(sd).check_keys(expected, "text-encoder weights")
        with torch.no_grad():
            for k, v in sd.items():
                if k in expected:
                    if expected[k].shape != v.shape:
                        raise WeightsError(
                            f"{k}: shape {tuple(v.shape)} in the weights, {tuple(expected[k].shape)} in the model"
                        )
                    expected[k].copy_(v.to(expected[k].dtype))


def check_tokenizer(tokenizer) -> None:
    """transformers 5 returns a 2-token tokenizer instead of failing when the files are missing."""
    if tokenizer is None or len(tokenizer) < 100:
        raise ValueError(
            f"the tokenizer has {0 if tokenizer is None else len(tokenizer)} tokens: its vocabulary files are missing "
            "or unreadable (a real CLIP tokenizer has 49408). Check the model folder's tokenizer/ directory."
        )


def encode_prompts(tokenizer, text_encoder, prompts: Sequence[str]) -> torch.Tensor:
    """CLIP embeddings ``[len(prompts), tokens, dim]`` as Stable Diffusion 1.x uses them (last hidden state)."""
    ids = tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    device = next(text_encoder.parameters()).device
    return text_encoder(ids.to(device))[0]
