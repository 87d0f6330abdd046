import pytest
import torch

from dualanodiff_core.method import layout
from dualanodiff_core.method.layout import LayoutError


def test_interleave_and_split_round_trip():
    g = torch.arange(3).float().reshape(3, 1) * 10
    a = g + 1
    x = layout.interleave(g, a)
    assert x.flatten().tolist() == [0, 1, 10, 11, 20, 21]
    g2, a2 = layout.split(x)
    assert torch.equal(g2, g) and torch.equal(a2, a)


def test_odd_batch_is_a_clear_error():
    with pytest.raises(LayoutError, match="even number"):
        layout.split(torch.zeros(3, 4))
    with pytest.raises(LayoutError, match="even number"):
        layout.validate_pairs(0)


def test_mismatched_branches_rejected():
    with pytest.raises(LayoutError, match="same shape"):
        layout.interleave(torch.zeros(2, 3), torch.zeros(3, 3))


def test_misaligned_cfg_chunk_is_a_clear_error():
    assert layout.validate_chunks(8, 4) == 2
    assert layout.validate_chunks(8, [4, 4]) == 2
    with pytest.raises(LayoutError, match="whole .global, anomaly. pairs"):
        layout.validate_chunks(6, 3)
    with pytest.raises(LayoutError, match="do not add up"):
        layout.validate_chunks(8, [4, 2])
