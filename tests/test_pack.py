"""pack.Layout: the engine's packed host reads, packed on the device and unpacked by name."""
from __future__ import annotations

import pytest
import torch

from speccascade_fast.pack import BlockResult, Layout, nonfinite


def test_pack_unpack_get_by_name():
    layout = Layout("Block", accepted=1, tokens=[3], drafts=[1], flag=1)
    assert layout.width == 6
    packed = layout.pack(accepted=torch.tensor([2, 0]), tokens=torch.tensor([[4, 5, 6], [7, -1, -1]]),
                         drafts=torch.tensor([[9], [8]]), flag=torch.tensor([True, False]))
    assert packed.dtype == torch.int64 and packed.shape == (2, 6)
    rows = layout.unpack(packed)
    assert rows[0] == (2, [4, 5, 6], [9], 1)
    assert rows[1].tokens == [7, -1, -1] and rows[1].drafts == [8] and rows[1].flag == 0
    assert layout.unpack(packed, 1) == rows[:1]
    assert torch.equal(layout.get(packed, "tokens"), torch.tensor([[4, 5, 6], [7, -1, -1]]))
    assert torch.equal(layout.get(packed, "accepted"), torch.tensor([2, 0]))
    assert torch.equal(layout.get(packed, "drafts"), torch.tensor([[9], [8]]))  # a vector of 1


def test_pack_takes_exactly_its_fields():
    layout = Layout("Step", token=1, nonfinite=1)
    with pytest.raises(TypeError, match="token, nonfinite"):
        layout.pack(token=torch.tensor([1]))
    with pytest.raises(ValueError, match="scalar field"):
        Layout("Bad", tokens=3)


def test_nonfinite_and_block_result():
    x = torch.zeros(3, 2, 4)
    x[1, 1, 2] = float("nan")
    x[2, 0] = float("-inf")  # a position where every token is masked
    assert nonfinite(x).tolist() == [0, 1, 1]
    r = BlockResult(2, [5, 6, 7], [1, 0, 0], 3)
    assert r.deferred == [True, False, False] and r.drafted == 3


def test_float_fields_travel_bit_exact():
    layout = Layout("Block", accepted=1, spent=[3], cost=1, floats=("spent", "cost"))
    spent = torch.tensor([[0.1, 1e-300, float("inf")], [0.0, -0.0, 2.5]], dtype=torch.float64)
    packed = layout.pack(accepted=torch.tensor([1, 2]), spent=spent,
                         cost=torch.tensor([0.3, 1 / 3], dtype=torch.float64))
    assert packed.dtype == torch.int64
    rows = layout.unpack(packed)
    assert rows[0].spent == [0.1, 1e-300, float("inf")] and rows[1].spent == [0.0, 0.0, 2.5]
    assert rows[1].cost == 1 / 3 and rows[0].accepted == 1
    assert torch.equal(layout.get(packed, "spent"), spent)
    with pytest.raises(ValueError, match="floats names fields the layout lacks: nope"):
        Layout("Bad", accepted=1, floats=("nope",))
