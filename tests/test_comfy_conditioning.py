"""The pack's ComfyUI-free helpers (nodes/conditioning.py): paired prompts and interleaved results.

They run without ComfyUI; the pack is imported as ComfyUI imports it (a package whose ``nodes`` subpackage imports
``dualanodiff_core`` relatively).
"""

import importlib
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _pack_module(name):
    pack = "dualanodiff_pack"
    if pack not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            pack, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[pack] = module
        spec.loader.exec_module(module)
    return importlib.import_module(f"{pack}.{name}")


cond = _pack_module("nodes.conditioning")
LayoutError = _pack_module("dualanodiff_core.method.layout").LayoutError


def _c(batch, tokens=77, dim=8, value=None, **opts):
    t = torch.randn(batch, tokens, dim) if value is None else torch.full((batch, tokens, dim), float(value))
    return [[t, dict(opts)]]


def test_importing_the_pack_and_nodes_needs_no_comfyui():
    assert "comfy" not in sys.modules
    _pack_module("nodes")
    assert "comfy" not in sys.modules


def test_pair_is_global_then_anomaly_and_keeps_the_global_options():
    g, a = _c(1, value=1.0, pooled_output="g"), _c(1, value=2.0, pooled_output="a")
    (pair,) = cond.pair_conditioning(g, a)
    assert pair[0].shape == (2, 77, 8)
    assert torch.equal(pair[0][0], g[0][0][0]) and torch.equal(pair[0][1], a[0][0][0])
    assert pair[1] == {"pooled_output": "g"}
    cond.check_paired([pair])


def test_pair_tiles_over_the_batch_to_interleaved_rows():
    # what comfy.utils.repeat_to_batch_size does with it for a latent batch of 3 pairs
    (pair,) = cond.pair_conditioning(_c(1, value=1.0), _c(1, value=2.0))
    rows = pair[0].repeat(3, 1, 1)
    assert rows[:, 0, 0].tolist() == [1.0, 2.0, 1.0, 2.0, 1.0, 2.0]


def test_prompts_of_different_lengths_are_padded_by_repetition():
    (pair,) = cond.pair_conditioning(_c(1, tokens=154), _c(1, tokens=77, value=3.0))
    assert pair[0].shape == (2, 154, 8) and bool((pair[0][1] == 3.0).all())


@pytest.mark.parametrize(
    "g, a, match",
    [
        (_c(2), _c(1), "global-branch positive has a batch of 2"),
        (_c(1), _c(3), "anomaly-branch positive has a batch of 3"),
        (_c(1) + _c(1), _c(1), "Conditioning Combine"),
        (_c(1, dim=8), _c(1, dim=16), "different widths"),
        ([], _c(1), "empty"),
    ],
)
def test_bad_pairs_are_refused_clearly(g, a, match):
    with pytest.raises(cond.ConditioningError, match=match):
        cond.pair_conditioning(g, a)


def test_negative_may_be_shared_or_per_branch():
    cond.check_negative(_c(1))
    cond.check_negative(_c(2))
    with pytest.raises(cond.ConditioningError, match="batch 1"):
        cond.check_negative(_c(3))


def test_pair_latent_and_split_round_trip():
    samples = torch.randn(3, 4, 8, 8)
    paired = cond.pair_latent({"samples": samples, "noise_mask": torch.zeros(1, 8, 8)})
    assert paired["samples"].shape == (6, 4, 8, 8)
    assert torch.equal(paired["samples"][0::2], samples) and torch.equal(paired["samples"][1::2], samples)
    mask = paired["noise_mask"]
    assert mask.shape == (6, 1, 8, 8) and bool((mask[0::2] == 0).all()) and bool((mask[1::2] == 1).all())
    g, a = cond.split_latent({"samples": paired["samples"], "noise_mask": mask, "batch_index": [0, 1, 2, 3, 4, 5]})
    assert torch.equal(g["samples"], samples) and g["batch_index"] == [0, 2, 4] and a["batch_index"] == [1, 3, 5]
    assert torch.equal(a["noise_mask"], mask[1::2])


def test_split_refuses_odd_batches():
    with pytest.raises(LayoutError, match="even number"):
        cond.split_latent({"samples": torch.zeros(3, 4, 8, 8)})
    with pytest.raises(LayoutError, match="even number"):
        cond.split_images(torch.zeros(5, 8, 8, 3))
    g, a = cond.split_images(torch.arange(4.0).view(4, 1, 1, 1).expand(4, 2, 2, 3))
    assert g[:, 0, 0, 0].tolist() == [0.0, 2.0] and a[:, 0, 0, 0].tolist() == [1.0, 3.0]
