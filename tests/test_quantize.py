"""Weight-only int8 drafters: close to the original model, and decoding stays exact."""
from __future__ import annotations

import copy

import pytest
import torch

from speccascade_fast import generate
from speccascade_fast.quantize import Int8Linear, int8_weight_only

from .helpers import PROMPTS, left_padded, tiny_pair


def test_int8_linear_matches_the_dequantized_weights():
    torch.manual_seed(0)
    lin = torch.nn.Linear(48, 20, bias=True)
    q = Int8Linear(lin)
    assert q.weight.dtype == torch.int8 and q.weight.shape == (20, 48)
    x = torch.randn(2, 3, 48)
    w = q.weight.float() * q.scales[:, None]
    assert torch.allclose(q(x), x @ w.T + lin.bias, atol=1e-4)
    # quantization error: at most half a step per weight
    assert bool(((w - lin.weight).abs() <= q.scales[:, None] / 2 + 1e-6).all())


def test_int8_model_is_close_and_decoding_stays_lossless():
    drafter, verifier = tiny_pair()
    q8 = int8_weight_only(copy.deepcopy(drafter))
    assert not any(isinstance(m, torch.nn.Linear) for m in q8.modules())
    ids = torch.tensor([PROMPTS[2]])
    a, b = drafter(ids).logits, q8(ids).logits
    assert (a - b).abs().max() < 0.05 * a.abs().max()
    ids, mask = left_padded(PROMPTS)
    kw = dict(attention_mask=mask, temperature=0, max_new_tokens=16, eos_token_id=[])
    ref = generate(None, verifier, ids, method="autoregressive", **kw).new_tokens
    out = generate(q8, verifier, ids, rule="spec", gamma=3, **kw)
    assert out.new_tokens == ref  # the guarantee holds for whatever q the drafter reports
    assert out.stats["accepted"] > 0


def test_int8_rejects_a_model_without_linears():
    with pytest.raises(ValueError, match="nn.Linear"):
        int8_weight_only(torch.nn.Sequential(torch.nn.ReLU()))
