"""sample(): the drafter draws exactly from qT with the DRAFT stream."""
import pytest
import torch

import speccascade_fast as sc
from speccascade_fast import rng
from speccascade_fast.probs import scaled

from .helpers import chi2_pvalue


@pytest.mark.parametrize("kw", [{}, {"top_k": 3}, {"top_p": 0.75}, {"temperature": 0.5},
                                {"min_p": 0.2}, {"min_p": 0.1, "top_k": 6, "temperature": 1.5}])
def test_sample_follows_qT(kw):
    torch.manual_seed(0)
    logits = torch.randn(10) * 1.5
    n = 6000
    toks = sc.sample(logits.expand(n, -1), seed=torch.arange(n), **kw)
    T = kw.get("temperature", 1.0)
    law = scaled(logits, torch.tensor(T, dtype=torch.float64), kw.get("top_k"), kw.get("top_p"),
                 kw.get("min_p"))
    assert chi2_pvalue(toks, law) > 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_min_p_draws_the_references_tokens(dtype):
    """The compiled kernel with min-p's keep bound draws what the reference draws."""
    torch.manual_seed(3)
    logits = (torch.randn(64, 300) * 3).to(dtype)
    T = torch.rand(64).double() * 2
    T[::7] = 0
    kw = dict(temperature=T, seed=torch.arange(64), positions=torch.arange(64), min_p=0.15)
    assert torch.equal(sc.sample(logits, **kw), sc.sample(logits, backend="reference", **kw))
    with pytest.raises(ValueError, match=r"min_p must be None or a number in \(0, 1\]"):
        sc.sample(logits, min_p=0)


def test_greedy_is_argmax_lowest_id_on_ties():
    logits = torch.tensor([[0.0, 3.0, 3.0, 1.0], [5.0, 5.0, 0.0, 0.0]])
    assert sc.sample(logits, temperature=0.0).tolist() == [1, 0]


def test_block_form_uses_consecutive_positions():
    torch.manual_seed(1)
    logits = torch.randn(3, 4, 50)
    seeds, pos = torch.tensor([4, 5, 6]), torch.tensor([0, 10, 20])
    block = sc.sample(logits, seed=seeds, positions=pos)
    for k in range(4):
        assert torch.equal(block[:, k], sc.sample(logits[:, k], seed=seeds, positions=pos + k))


def test_is_the_documented_race():
    torch.manual_seed(2)
    logits = torch.randn(5, 40)
    seeds, pos = torch.arange(5), torch.arange(5) * 3
    noise = rng.exponential_noise(seeds, pos, rng.DRAFT, 40)
    want = torch.argmax(torch.log_softmax(logits.double() / 0.8, -1) - torch.log(noise), -1)
    assert torch.equal(sc.sample(logits, temperature=0.8, seed=seeds, positions=pos), want)
