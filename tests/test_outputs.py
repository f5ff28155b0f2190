"""outputs: the one emit rule both decoding loops use, the per-call hooks, HF-style sequences."""
from __future__ import annotations

import pytest
import torch

from speccascade_fast.outputs import Hooks, emit, sequences


def test_emit_rule():
    assert emit([1, 2, 3], 5, eos=set()) == ([1, 2, 3], False)
    assert emit([1, 2, 3], 3, eos=set()) == ([1, 2, 3], True)  # the budget is spent
    assert emit([1, 2, 3], 2, eos=set()) == ([1, 2], True)  # cut at the budget
    assert emit([1, 9, 3], 5, eos={9}) == ([1, 9], True)  # EOS kept, nothing after it
    assert emit([1, 2, 3], 5, eos=set(), stop=lambda kept: kept[-1] == 2) == ([1, 2], True)
    assert emit([], 5, eos=set()) == ([], False)


def test_hooks_see_each_sequence_in_order():
    seen, new = [], [7]
    hooks = Hooks(on_tokens=lambda b, t: seen.append((b, t)),
                  stop=lambda b, toks: toks[-2:] == [7, 3])
    kept, done = hooks.emit(4, new, [3, 5], remaining=10, eos=set())
    assert (kept, done) == ([3], True) and new == [7, 3] and seen == [(4, [3])]
    kept, done = hooks.emit(4, new, [], remaining=10, eos=set())
    assert kept == [] and seen == [(4, [3])]  # nothing emitted: not told
    with pytest.raises(ValueError, match="on_tokens"):
        Hooks(on_tokens=3)


def test_sequences_are_right_padded():
    ids = torch.tensor([[0, 1, 2], [3, 4, 5]])
    out = sequences(ids, [[9], [8, 7]], pad=0)
    assert out.tolist() == [[0, 1, 2, 9, 0], [3, 4, 5, 8, 7]]
    dec = sequences(ids, [[9], [8, 7]], pad=-1, decoder_outputs=[torch.tensor([0, 9]),
                                                                 torch.tensor([0, 8, 7])])
    assert dec.tolist() == [[0, 9, -1], [0, 8, 7]]
