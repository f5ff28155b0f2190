"""Bad inputs get a ValueError naming the argument and the allowed range (never a crash deep in a
kernel, never a silent change): temperatures that would overflow, int64 seeds and positions,
token ids outside the vocabulary, masks with holes, meta tensors, ragged padding rows."""
from __future__ import annotations

import pytest
import torch

import speccascade_fast as sc
from speccascade_fast import Engine, generate

from .helpers import PROMPTS, left_padded, ragged_inputs, tiny_pair


@pytest.fixture(scope="module")
def pair():
    return tiny_pair()


def test_tiny_temperatures_are_refused_not_overflowed(pair):
    ids = torch.tensor([PROMPTS[0]])
    for t in (1e-308, 1e-9):
        with pytest.raises(ValueError, match=r"temperature must be 0 \(greedy\) or >= 1e-06"):
            generate(*pair, ids, temperature=t, max_new_tokens=2)
    with pytest.raises(ValueError, match="temperature"):
        sc.sample(torch.randn(2, 8), temperature=1e-300)
    generate(*pair, ids, temperature=1e-6, max_new_tokens=2)  # the smallest allowed


def test_seeds_and_positions_are_int64(pair):
    ids = torch.tensor([PROMPTS[0]])
    for seed in (2**63, -(2**63) - 1):
        with pytest.raises(ValueError, match="seed"):
            generate(*pair, ids, seed=seed, max_new_tokens=2)
    with pytest.raises(ValueError, match=r"seed must be an int in \[-2\*\*63, 2\*\*63 - 2\]"):
        generate(*pair, torch.tensor([[1, 2], [3, 4]]), seed=2**63 - 1, max_new_tokens=2)
    with pytest.raises(ValueError, match="seed values"):
        generate(*pair, torch.tensor([[1, 2], [3, 4]]), seed=[0, 2**64], max_new_tokens=2)
    with pytest.raises(ValueError, match="seed"):
        sc.sample(torch.randn(2, 8), seed=2**63)
    q, x, p = torch.randn(1, 2, 8), torch.tensor([[1, 2]]), torch.randn(1, 3, 8)
    with pytest.raises(ValueError, match="positions"):
        sc.verify(q, x, p, rule="spec", positions=2**63 - 2)


def test_token_ids_outside_the_vocabulary(pair):
    with pytest.raises(ValueError, match=r"input_ids row 0 holds token 64, outside the vocabulary"):
        generate(*pair, torch.tensor([[1, 64]]), max_new_tokens=2)
    with pytest.raises(ValueError, match="input_ids row 0 holds token -1"):
        Engine(*pair).generate(torch.tensor([[1, -1]]), max_new_tokens=2)
    with pytest.raises(ValueError, match="eos_token_id 99"):
        generate(*pair, torch.tensor([[1, 2]]), eos_token_id=[3, 99], max_new_tokens=2)
    for engine in ("static", "sequential"):
        with pytest.raises(ValueError, match="pad_token_id -7"):
            generate(*pair, torch.tensor([[1, 2]]), pad_token_id=-7, max_new_tokens=2,
                     engine=engine)


def test_masks_with_holes_and_meta_tensors(pair):
    ids, mask = left_padded(PROMPTS)
    mask[2, 3] = 0  # a hole inside row 2's prompt
    with pytest.raises(ValueError, match="attention_mask row 2 has a 0 between 1s"):
        generate(*pair, ids, attention_mask=mask, max_new_tokens=2)
    with pytest.raises(ValueError, match="0 .padding. and 1 .prompt. only"):
        generate(*pair, ids, attention_mask=mask * 2, max_new_tokens=2)
    with pytest.raises(ValueError, match="meta tensor"):
        generate(*pair, torch.empty(1, 3, dtype=torch.long, device="meta"), max_new_tokens=2)


def test_ragged_padding_rows_are_never_read():
    """With max_spec_len the rows after cu[B] are padding: NaN there (uninitialised memory) is
    not an error, and the result is the unpadded call's."""
    _, flat = ragged_inputs()
    q, x, p = flat["draft_logits"], flat["draft_tokens"], flat["target_logits"]
    cu = flat["cu_num_draft_tokens"]
    N, B = q.shape[0], cu.numel() - 1
    pad = 3
    qp = torch.cat([q, torch.full((pad, q.shape[1]), float("nan"))])
    xp = torch.cat([x, torch.zeros(pad, dtype=x.dtype)])
    pp = torch.cat([p[: N + B], torch.full((pad, p.shape[1]), float("nan"))])
    kw = dict(rule="token_v3", alpha=0.3, temperature=1.0, seed=4)
    want = sc.verify_ragged(q, x, p, cu, **kw)
    got = sc.verify_ragged(qp, xp, pp, cu, max_spec_len=int((cu[1:] - cu[:-1]).max()) + 1,
                           **kw)
    width = want.tokens.shape[1]
    assert torch.equal(got.num_accepted, want.num_accepted)
    assert torch.equal(got.tokens[:, :width], want.tokens)


def test_sample_takes_the_backends_verify_takes():
    logits = torch.randn(3, 40)
    want = sc.sample(logits, temperature=0.8, seed=1, backend="reference")
    assert torch.equal(sc.sample(logits, temperature=0.8, seed=1, backend="cpu"), want)
    with pytest.raises(ValueError, match="backend='nope'"):
        sc.sample(logits, backend="nope")
