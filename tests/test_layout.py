"""vLLM's flattened row layout (speccascade_fast/layout.py): which request owns a row, each row's
temperature, and what a valid ``cu_num_draft_tokens`` is."""
from __future__ import annotations

import pytest
import torch

from speccascade_fast.layout import check_cu, row_owners, row_temperatures

from .helpers import NoHostReads


def test_row_owners_of_draft_and_target_rows_with_padding():
    cu = torch.tensor([0, 2, 3, 6])  # gamma 2, 1, 3
    with NoHostReads():
        b, j = row_owners(cu, 8)  # two padding rows after cu[B] = 6
        bt, jt = row_owners(cu, 10, target=True)  # target rows: gamma_b + 1 each, then padding
    assert b.tolist() == [0, 0, 1, 2, 2, 2, 2, 2] and j.tolist() == [0, 1, 0, 0, 1, 2, 3, 4]
    assert bt.tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 2, 2]
    assert jt.tolist() == [0, 1, 2, 0, 1, 0, 1, 2, 3, 4]


def test_row_temperatures():
    cu = torch.tensor([0, 1, 3])
    T = torch.tensor([0.5, 2.0], dtype=torch.float64)
    t_draft, t_target = row_temperatures(cu, T, 3, 5)
    assert t_draft.tolist() == [0.5, 2.0, 2.0]
    assert t_target.tolist() == [0.5, 0.5, 2.0, 2.0, 2.0]


def test_check_cu():
    assert check_cu(torch.tensor([0, 2, 5]), 5, padded=False) == [0, 2, 5]
    assert check_cu(torch.tensor([0, 2, 4]), 5, padded=True) == [0, 2, 4]
    for cu, msg in (([0], "B \\+ 1 >= 2"), ([1, 5], "start at 0"),
                    ([0, 2, 2, 5], "strictly increasing"), ([0, 2, 4], "end at N")):
        with pytest.raises(ValueError, match=msg):
            check_cu(torch.tensor(cu), 5, padded=False)
    with pytest.raises(ValueError, match="at most N"):
        check_cu(torch.tensor([0, 6]), 5, padded=True)
