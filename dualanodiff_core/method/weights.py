"""DualAnoDiffWeights: every trained tensor of a DualAnoDiff model under canonical names, and its file formats.

Canonical keys (also the keys of our ``.safetensors`` format)::

    unet.<layer>.to_{q,k,v,out}_lora.{0,1}.{down,up}.weight        per-branch LoRA (0 = global, 1 = anomaly)
    unet.<layer>.temporal_{n,i,q,k,v,o}.{weight,bias}              SAIM
    unet.<layer>.temporal_condition_mlp.{0,1}.{weight,bias}        BCM fusion MLP
    unet.<layer>.temporal_a                                        BCM fusion weight (shape [1])
    text_encoder.<clip attention>.to_{q,k,v,out}_lora.{down,up}.weight   shared text-encoder LoRA

``<layer>`` is the diffusers module path of an attention layer, e.g.
``down_blocks.0.attentions.0.transformer_blocks.0.attn1``; ``<clip attention>`` e.g.
``text_model.encoder.layers.0.self_attn``.

The official reference checkpoints (``pytorch_lora_weights.bin``, docs/method.md, "Weights format and the reference
checkpoint") use the same parameter names under
``unet.<layer>.processor.`` (``.processor.chained_proc.`` for the BCM model's attn1 layers); they import losslessly
and export back bit-exactly. ``.bin``/``.pt``/``.ckpt`` files are read only with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from ..errors import DualAnoDiffError
from ..fileio import atomic_path

FORMAT = "dualanodiff"
FORMAT_VERSION = 1
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
WEIGHT_SUFFIXES = (".safetensors",) + PICKLE_SUFFIXES

DEFAULT_PROMPT_GLOBAL = "a vfx with sks"
DEFAULT_PROMPT_ANOMALY = "sks"

UNET = "unet."
TEXT = "text_encoder."
PROJECTIONS = ("to_q", "to_k", "to_v", "to_out")
#: our projection name -> the base module it adapts (diffusers / kohya names)
UNET_PROJ_MODULE = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
TEXT_PROJ_MODULE = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}

_PARAM_RE = re.compile(
    r"^(?P<layer>.+?)\.(?P<param>(?:to_(?:q|k|v|out)_lora(?:\.\d)?\.(?:down|up)\.weight)"
    r"|(?:temporal_(?:n|i|q|k|v|o)\.(?:weight|bias))"
    r"|(?:temporal_condition_mlp\.\d\.(?:weight|bias))"
    r"|temporal_a)$"
)


class WeightsError(DualAnoDiffError, ValueError):
    """A weights file cannot be read or does not fit the model."""


class WeightsKeyError(WeightsError):
    """Keys do not match the model: lists what is missing and what is unknown."""

    def __init__(self, missing: Iterable[str], unknown: Iterable[str], what: str = "weights", hint: str = ""):
        self.missing = sorted(missing)
        self.unknown = sorted(unknown)
        lines = [f"{what} do not match the model: {len(self.missing)} missing and {len(self.unknown)} unknown keys."]
        for title, keys in (("missing", self.missing), ("unknown", self.unknown)):
            if keys:
                shown = ", ".join(keys[:8]) + (f", ... (+{len(keys) - 8} more)" if len(keys) > 8 else "")
                lines.append(f"  {title}: {shown}")
        if hint:
            lines.append(hint)
        super().__init__("\n".join(lines))


def split_param_key(key: str) -> tuple[str, str]:
    """``'<layer>.<param>'`` -> ``(layer, param)`` for a per-layer key (prefix already stripped)."""
    m = _PARAM_RE.match(key)
    if not m:
        raise WeightsError(f"not a DualAnoDiff parameter key: {key!r}")
    return m.group("layer"), m.group("param")


def _meta_str(v) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(v, sort_keys=True)


class DualAnoDiffWeights:
    """All tensors of a trained DualAnoDiff model plus metadata (strings)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, object] | None = None):
        bad = [k for k in tensors if not (k.startswith(UNET) or k.startswith(TEXT))]
        if bad:
            raise WeightsError(f"keys must start with 'unet.' or 'text_encoder.': {bad[:5]}")
        for k in tensors:
            split_param_key(k.split(".", 1)[1])
        self.tensors: dict[str, torch.Tensor] = dict(sorted(tensors.items()))
        meta = {k: _meta_str(v) for k, v in (metadata or {}).items()}
        meta.setdefault("format", FORMAT)
        meta.setdefault("format_version", str(FORMAT_VERSION))
        if self.tensors:
            meta.setdefault("rank", str(self.rank))
            meta.setdefault("alpha", meta["rank"])
        meta["saim"] = _meta_str(self.has_saim)
        meta["bcm"] = _meta_str(self.has_bcm)
        meta["text_encoder"] = _meta_str(self.has_text)
        self.metadata: dict[str, str] = meta

    # ---- structure ---------------------------------------------------------------------------------------------
    def _grouped(self, prefix: str) -> dict[str, dict[str, torch.Tensor]]:
        out: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
        for k, v in self.tensors.items():
            if k.startswith(prefix):
                layer, param = split_param_key(k[len(prefix) :])
                out[layer][param] = v
        return dict(out)

    def unet_layers(self) -> dict[str, dict[str, torch.Tensor]]:
        """``{layer: {param: tensor}}`` for the UNet attention layers."""
        return self._grouped(UNET)

    def text_layers(self) -> dict[str, dict[str, torch.Tensor]]:
        return self._grouped(TEXT)

    @property
    def rank(self) -> int:
        for k, v in self.tensors.items():
            if k.endswith(".down.weight"):
                return int(v.shape[0])
        raise WeightsError("these weights hold no LoRA tensors, so they have no rank")

    @property
    def alpha(self) -> float:
        return float(self.metadata.get("alpha", self.rank))

    @property
    def text_rank(self) -> int | None:
        for k, v in self.tensors.items():
            if k.startswith(TEXT) and k.endswith(".down.weight"):
                return int(v.shape[0])
        return None

    @property
    def has_saim(self) -> bool:
        return any(".temporal_n." in k for k in self.tensors)

    @property
    def has_bcm(self) -> bool:
        return any(k.endswith(".temporal_a") for k in self.tensors)

    @property
    def has_text(self) -> bool:
        return any(k.startswith(TEXT) for k in self.tensors)

    @property
    def prompts(self) -> tuple[str, str]:
        return (
            self.metadata.get("prompt_global", DEFAULT_PROMPT_GLOBAL),
            self.metadata.get("prompt_anomaly", DEFAULT_PROMPT_ANOMALY),
        )

    def __len__(self) -> int:
        return len(self.tensors)

    def __repr__(self) -> str:
        return (
            f"DualAnoDiffWeights({len(self.unet_layers())} UNet layers, rank {self.metadata.get('rank')}, "
            f"saim={self.has_saim}, bcm={self.has_bcm}, text_encoder={self.has_text}, {len(self.tensors)} tensors)"
        )

    def check_keys(self, expected: Iterable[str], what: str = "weights", hint: str = "") -> None:
        """Raise :class:`WeightsKeyError` unless the canonical keys equal ``expected`` exactly."""
        expected = set(expected)
        have = set(self.tensors)
        if have != expected:
            raise WeightsKeyError(expected - have, have - expected, what, hint)

    # ---- our format --------------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write our ``.safetensors`` format atomically (temp file + rename)."""
        from safetensors.torch import save_file

        path = Path(path)
        if path.suffix != ".safetensors":
            raise WeightsError(f"{path}: DualAnoDiff weights are written as .safetensors; change the file name.")
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.tensors.items()}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=dict(self.metadata))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> DualAnoDiffWeights:
        """Read our format or an official reference checkpoint (``.bin``/``.safetensors``), detected by content."""
        path = Path(path)
        tensors, metadata = read_tensor_file(path)
        try:
            return cls.from_state_dict(tensors, metadata)
        except WeightsError as e:
            e.args = (f"{path}: {e.args[0] if e.args else e}",) + tuple(e.args[1:])
            raise

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None):
        metadata = dict(metadata or {})
        if metadata.get("format") == FORMAT:
            version = int(metadata.get("format_version", "0"))
            if version > FORMAT_VERSION:
                raise WeightsError(
                    f"written by a newer DualAnoDiff (format version {version}, this one reads up to "
                    f"{FORMAT_VERSION}); update the package."
                )
            return cls(sd, metadata)
        if is_reference_layout(sd):
            return cls.from_reference(sd, metadata)
        keys = list(sd)[:5]
        hint = (
            " It looks like a plain LoRA: that belongs in ComfyUI's LoraLoader, not in the DualAnoDiff loader."
            if looks_like_lora(sd)
            else " Choose a file written by the DualAnoDiff trainer (<name>.safetensors) or the reference "
            "pytorch_lora_weights.bin."
        )
        raise WeightsError(
            "not a DualAnoDiff weights file: neither our format (metadata format=dualanodiff) nor the reference "
            f"layout ('unet.<layer>.processor.to_q_lora.0.down.weight', ...). First keys: {keys}.{hint}"
        )

    # ---- the reference layout -----------------------------------------------------------------------------------
    @classmethod
    def from_reference(cls, sd: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None):
        """Import the official layout: ``unet.<layer>.processor[.chained_proc].<param>`` and
        ``text_encoder.<clip attention>.to_q_lora.down.weight``."""
        tensors: dict[str, torch.Tensor] = {}
        unknown = []
        for key, value in sd.items():
            k = key
            if not (k.startswith(UNET) or k.startswith(TEXT)) and ".processor." in k:
                k = UNET + k  # the old diffusers layout without the "unet." prefix
            if k.startswith(UNET):
                body = k[len(UNET) :]
                m = re.match(r"^(?P<layer>.+?)\.processor\.(?:chained_proc\.)?(?P<param>.+)$", body)
                if not m or not _PARAM_RE.match(f"x.{m.group('param')}"):
                    unknown.append(key)
                    continue
                tensors[f"{UNET}{m.group('layer')}.{m.group('param')}"] = value
            elif k.startswith(TEXT):
                body = k[len(TEXT) :]
                m = _PARAM_RE.match(body)
                if not m or not re.fullmatch(r"to_(q|k|v|out)_lora\.(down|up)\.weight", m.group("param")):
                    unknown.append(key)
                    continue
                tensors[k] = value
            else:
                unknown.append(key)
        if unknown:
            raise WeightsKeyError(
                [],
                unknown,
                "reference checkpoint keys",
                "Expected 'unet.<layer>.processor.<param>' and 'text_encoder.<...>.to_q_lora...'.",
            )
        meta = {"source": "reference", "prompt_global": DEFAULT_PROMPT_GLOBAL, "prompt_anomaly": DEFAULT_PROMPT_ANOMALY}
        meta.update(dict(metadata or {}))
        meta.pop("format", None)
        meta.pop("format_version", None)
        w = cls(tensors, meta)
        w.metadata["alpha"] = w.metadata["rank"]  # the reference uses network_alpha=None: scale 1
        return w

    def to_reference(self) -> dict[str, torch.Tensor]:
        """Export to the official layout (what the reference ``load_lora_weights`` reads)."""
        out: dict[str, torch.Tensor] = {}
        bcm = self.has_bcm
        for k, v in self.tensors.items():
            if k.startswith(UNET):
                layer, param = split_param_key(k[len(UNET) :])
                proc = ".processor.chained_proc." if bcm and layer.endswith("attn1") else ".processor."
                out[f"{UNET}{layer}{proc}{param}"] = v
            else:
                out[k] = v
        return out

    # ---- stock-LoRA export ----------------------------------------------------------------------------------------
    def branch_lora(self, branch: int, include_text: bool = True) -> dict[str, torch.Tensor]:
        """One branch's LoRA in kohya style (``lora_unet_<diffusers path>.lora_down/lora_up/alpha``), which ComfyUI's
        stock LoraLoader (and A1111/kohya tools) accept. SAIM and BCM have no stock-LoRA equivalent and are left out:
        this is the branch's LoRA alone, e.g. to inspect one branch with ordinary tools."""
        if branch not in (0, 1):
            raise ValueError("branch must be 0 (global) or 1 (anomaly)")
        out: dict[str, torch.Tensor] = {}
        groups = [("lora_unet_", self.unet_layers(), UNET_PROJ_MODULE, f".{branch}")]
        if include_text:
            groups.append(("lora_te_", self.text_layers(), TEXT_PROJ_MODULE, ""))
        for prefix, layers, modules, index in groups:
            for layer, params in layers.items():
                for proj in PROJECTIONS:
                    down = params.get(f"{proj}_lora{index}.down.weight")
                    up = params.get(f"{proj}_lora{index}.up.weight")
                    if down is None or up is None:
                        continue
                    name = prefix + f"{layer}.{modules[proj]}".replace(".", "_")
                    out[f"{name}.lora_down.weight"] = down
                    out[f"{name}.lora_up.weight"] = up
                    out[f"{name}.alpha"] = torch.tensor(self.alpha)
        return out

    def save_branch_lora(self, branch: int, path: str | os.PathLike, include_text: bool = True) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.branch_lora(branch, include_text).items()}
        meta = {"source": "dualanodiff", "branch": ("global", "anomaly")[branch], "rank": self.metadata.get("rank", "")}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        return path


def is_reference_layout(sd: Mapping[str, object]) -> bool:
    return any(".processor." in k and ("_lora." in k or ".temporal" in k) for k in sd)


_LORA_KEY = re.compile(r"(lora|\.alpha$|lora_up|lora_down|lora_[AB]\b)", re.IGNORECASE)


def looks_like_lora(sd: Mapping[str, torch.Tensor]) -> bool:
    """True when most tensor names are LoRA names (``...lora_up.weight``, ``...lora_A.weight``, ``....alpha``)."""
    names = list(sd)
    return bool(names) and sum(1 for k in names if _LORA_KEY.search(k)) * 2 >= len(names)


def read_tensor_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a flat ``{name: tensor}`` file safely: safetensors, or a pickle through ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such file. Give the path of a .safetensors (or reference .bin) weights file.")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                metadata = dict(f.metadata() or {})
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types
            raise WeightsError(f"{path}: not a readable .safetensors file ({e}). Is the file complete?") from None
        return tensors, metadata
    if suffix in PICKLE_SUFFIXES:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:
            raise WeightsError(_pickle_failure(path, e)) from None
        if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise WeightsError(f"{path}: not a weights file (it holds a {type(obj).__name__}, not named tensors).")
        other = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
        if other:
            what = (
                "a training checkpoint (it holds the optimizer and training state); use the .safetensors "
                "weights written beside it"
                if {"step", "optimizer"} & set(map(str, obj))
                else "not a weights file"
            )
            raise WeightsError(f"{path}: {what} (entries that are not tensors: {', '.join(map(str, other[:4]))}).")
        return dict(obj), {}
    raise WeightsError(f"{path}: unsupported weights file type {suffix!r}; use one of {', '.join(WEIGHT_SUFFIXES)}.")


def _pickle_failure(path: Path, e: Exception) -> str:
    """Why a ``.bin``/``.pt``/``.ckpt`` was not read, without repeating PyTorch's advice to turn the safety off."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as oe:
        return f"{path}: cannot read the file ({oe.strerror}); check the path and its permissions."
    is_zip = head[:4] == b"PK\x03\x04"
    is_pickle = len(head) >= 2 and head[0] == 0x80 and 1 <= head[1] <= 5
    if not head:
        return f"{path}: the file is empty; copy it again."
    if not (is_zip or is_pickle):
        return (
            f"{path}: not a PyTorch weights file (neither a zip archive nor a pickle: random or damaged bytes, or "
            "another kind of file); give a .safetensors (or reference .bin) DualAnoDiff weights file."
        )
    text = f"{type(e).__name__}: {e}"
    if "Weights only load failed" in text or "UnpicklingError" in text or "Unsupported global" in text:
        return (
            f"{path}: refused: it holds Python objects besides tensors, and loading those could run code. Only plain "
            "tensor dictionaries are read from .bin/.pt/.ckpt files; get or make a .safetensors version of it."
        )
    return (
        f"{path}: the file is truncated or damaged ({type(e).__name__}); copy it again, or give a .safetensors "
        "weights file."
    )
