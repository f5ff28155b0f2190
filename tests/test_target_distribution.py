"""target_distribution: sums to one, matches the closed forms, and the identities of SEMANTICS §4."""
import math

import numpy as np
import pytest
import torch

import speccascade_fast as sc
from speccascade_fast import rules
from speccascade_fast.probs import scaled

from .helpers import ALPHAS, closed_form, logits_pair

V = 12
TEMPS = [0.0, 0.7, 1.0]
CASES = [(rule, a) for rule in sc.RULES for a in ALPHAS[rule]]


def test_rules_tuple_is_exactly_the_papers():
    """The paper's 14 rules (the kernels' rule ids are their positions), then the additions of
    docs/semantics.md §9 that only the reference implements."""
    assert sc.RULES == ("spec", "drafter", "chow", "chow_log", "diff", "diff_log", "opt", "opt_log",
                        "token_v1", "token_v2", "token_v3", "lossy", "lossy_star", "bild",
                        "ensemble")
    assert rules.FUSED_RULES == sc.RULES[:14]


@pytest.mark.parametrize("T", TEMPS)
@pytest.mark.parametrize("rule,alpha", CASES)
def test_sums_to_one_and_matches_closed_form(rule, alpha, T):
    q, p = logits_pair(V, seed=11, rows=16)
    law = sc.target_distribution(q, p, rule=rule, alpha=alpha, temperature=T)
    assert law.dtype == torch.float64 and law.shape == (16, V)
    assert torch.allclose(law.sum(-1), torch.ones(16, dtype=torch.float64), atol=1e-12)
    assert bool((law >= 0).all())
    for i in range(16):
        want = closed_form(rule, alpha, q[i], p[i], T)
        if want is None:  # lossy_star: checked by its defining equation
            continue
        np.testing.assert_allclose(law[i].numpy(), want, atol=1e-12)


@pytest.mark.parametrize("T", [0.7, 1.0])
@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.5, 0.9])
def test_lossy_star_solves_lemma_2(alpha, T):
    q, p = logits_pair(V, seed=5, rows=32)
    law = sc.target_distribution(q, p, rule="lossy_star", alpha=alpha, temperature=T)
    qT, pT = scaled(q, torch.tensor(T, dtype=torch.float64)), scaled(p, torch.tensor(T, dtype=torch.float64))
    assert torch.allclose(law.sum(-1), torch.ones(32, dtype=torch.float64), atol=1e-12)
    m = torch.minimum(qT, pT / (1 - alpha))
    for i in range(32):
        lifted = law[i] > m[i] + 1e-12
        if not lifted.any():  # beta -> infinity: pi = qT
            assert torch.allclose(law[i], qT[i], atol=1e-9)
            continue
        inv_beta = (law[i][lifted] / pT[i][lifted])
        assert torch.allclose(inv_beta, inv_beta[0].expand_as(inv_beta), rtol=1e-9)
        beta = 1 / inv_beta[0].item()
        assert beta >= 1 - alpha - 1e-9
        lhs = torch.clamp(qT[i] - pT[i] / (1 - alpha), min=0).sum()
        rhs = torch.clamp(pT[i] / beta - qT[i], min=0).sum()
        assert abs(lhs - rhs) < 1e-9
        expected = torch.maximum(m[i], pT[i] / beta)
        assert torch.allclose(law[i], expected, atol=1e-9)


# --- identities: the lenience that gives exact spec (pi = pT) and exact drafter (pi = qT) -------
SPEC_ALPHA = {"lossy": 0.0, "lossy_star": 0.0, "chow": 0.0, "chow_log": 0.0, "diff": -1.0,
              "token_v1": -1.0, "token_v2": -1.0, "opt": -1e12, "opt_log": -1e12,
              "token_v3": -0.01, "bild": 0.0, "diff_log": -1e3}
DRAFTER_ALPHA = {"chow": 1.0, "chow_log": math.log(V), "diff": 1.0, "token_v1": 1.0,
                 "token_v2": 1.0, "opt": 1e12, "opt_log": 1e12, "token_v3": 1.0, "bild": 1e6,
                 "diff_log": 1e3}


@pytest.mark.parametrize("T", TEMPS)
@pytest.mark.parametrize("rule", sorted(SPEC_ALPHA))
def test_lossless_alpha_gives_the_verifier_exactly(rule, T):
    q, p = logits_pair(V, seed=3, rows=16)
    law = sc.target_distribution(q, p, rule=rule, alpha=SPEC_ALPHA[rule], temperature=T)
    assert torch.equal(law, sc.target_distribution(q, p, rule="spec", temperature=T)) or \
        torch.allclose(law, scaled(p, torch.tensor(T, dtype=torch.float64)), atol=1e-15)


@pytest.mark.parametrize("T", TEMPS)
@pytest.mark.parametrize("rule", sorted(DRAFTER_ALPHA))
def test_drafter_alpha_gives_the_drafter_exactly(rule, T):
    q, p = logits_pair(V, seed=4, rows=16)
    law = sc.target_distribution(q, p, rule=rule, alpha=DRAFTER_ALPHA[rule], temperature=T)
    assert torch.allclose(law, scaled(q, torch.tensor(T, dtype=torch.float64)), atol=1e-15)


def test_lossy_approaches_drafter_as_alpha_goes_to_one():
    q, p = logits_pair(V, seed=6, rows=8)
    qT = scaled(q, torch.tensor(1.0, dtype=torch.float64))
    far = (sc.target_distribution(q, p, rule="lossy", alpha=0.5) - qT).abs().max()
    near = (sc.target_distribution(q, p, rule="lossy", alpha=1 - 1e-9) - qT).abs().max()
    assert near < 1e-6 < far


def test_token_v3_at_zero_is_not_exact_spec():
    q, p = logits_pair(V, seed=7, rows=16)
    law = sc.target_distribution(q, p, rule="token_v3", alpha=0.0)
    assert not torch.allclose(law, scaled(p, torch.tensor(1.0, dtype=torch.float64)), atol=1e-6)


def test_chow_zero_keeps_a_certain_drafter():
    q = torch.tensor([[0.0, -math.inf, -math.inf, -math.inf]])  # max q1 = 1
    p = torch.randn(1, 4, dtype=torch.float64)
    law = sc.target_distribution(q, p, rule="chow", alpha=0.0)
    assert torch.equal(law, torch.tensor([[1.0, 0.0, 0.0, 0.0]], dtype=torch.float64))


@pytest.mark.parametrize("T", [0.7, 1.0])
@pytest.mark.parametrize("rule,alpha", [c for c in CASES if c[0] != "lossy"])
def test_lemma3_rejection_probability(rule, alpha, T):
    """P(reject x ~ qT) = sum max(0, pi - qT); for prefix rules delta * TV(pT, qT)."""
    q, p = logits_pair(V, seed=8, rows=16)
    a = torch.full((16,), 0.0 if alpha is None else alpha, dtype=torch.float64)
    t = rules.position_targets(q, p, rule=rule, alpha=a, temperature=torch.full((16,), T, dtype=torch.float64))
    reject = 1 - torch.minimum(t.qT, t.accept).sum(-1)
    law = sc.target_distribution(q, p, rule=rule, alpha=alpha, temperature=T)
    assert torch.allclose(reject, torch.clamp(law - t.qT, min=0).sum(-1), atol=1e-12)
    if t.delta is not None:
        tv = torch.clamp(t.pT - t.qT, min=0).sum(-1)
        assert torch.allclose(reject, t.delta.double() * tv, atol=1e-12)


@pytest.mark.parametrize("rule,alpha", [("spec", None), ("drafter", None), ("token_v3", 0.4),
                                        ("diff", 0.0), ("lossy", 0.3), ("lossy_star", 0.3)])
def test_top_k_top_p_truncate_both_models_alike(rule, alpha):
    q, p = logits_pair(V, seed=9, rows=8)
    for kw in ({"top_k": 3}, {"top_p": 0.6}, {"top_k": 5, "top_p": 0.8}):
        law = sc.target_distribution(q, p, rule=rule, alpha=alpha, temperature=0.8, **kw)
        qT = scaled(q, torch.tensor(0.8, dtype=torch.float64), kw.get("top_k"), kw.get("top_p"))
        pT = scaled(p, torch.tensor(0.8, dtype=torch.float64), kw.get("top_k"), kw.get("top_p"))
        support = (qT > 0) | (pT > 0)
        assert bool((law[~support] == 0).all()), "law leaves the truncated supports"
        if rule == "spec":
            assert torch.allclose(law, pT, atol=1e-15)
        if rule == "drafter":
            assert torch.allclose(law, qT, atol=1e-15)


def test_top_k_and_top_p_conventions():
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]], dtype=torch.float64))
    one = torch.tensor(1.0, dtype=torch.float64)
    assert scaled(logits, one, top_k=2).tolist() == [[0.4 / 0.7, 0.3 / 0.7, 0.0, 0.0]]
    # smallest prefix whose mass reaches top_p: 0.4 + 0.3 >= 0.65
    assert torch.allclose(scaled(logits, one, top_p=0.65),
                          torch.tensor([[0.4 / 0.7, 0.3 / 0.7, 0.0, 0.0]], dtype=torch.float64))
    assert torch.allclose(scaled(logits, one, top_p=0.7 + 1e-9),
                          torch.tensor([[4 / 9, 3 / 9, 2 / 9, 0.0]], dtype=torch.float64))
    ties = torch.zeros(1, 4, dtype=torch.float64)
    assert scaled(ties, one, top_k=2).tolist() == [[0.25] * 4]  # boundary ties are kept (as HF)
    assert scaled(ties, torch.tensor(0.0, dtype=torch.float64)).tolist() == [[1.0, 0.0, 0.0, 0.0]]  # greedy: lowest id


def test_masked_tokens_get_zero_probability():
    q, p = logits_pair(V, seed=10, rows=4)
    q[:, 3] = -math.inf
    p[:, 3] = -math.inf
    for rule, a in CASES:
        law = sc.target_distribution(q, p, rule=rule, alpha=a, temperature=0.9)
        assert bool((law[:, 3] == 0).all()), rule
        assert torch.isfinite(law).all()


def test_alpha_and_temperature_tensors_per_row():
    q, p = logits_pair(V, seed=12, rows=3)
    alphas, temps = torch.tensor([0.1, 0.5, 0.9]), torch.tensor([0.0, 0.7, 1.0])
    law = sc.target_distribution(q, p, rule="token_v3", alpha=alphas, temperature=temps)
    for i in range(3):
        one = sc.target_distribution(q[i], p[i], rule="token_v3", alpha=alphas[i].item(),
                                     temperature=temps[i].item())
        assert torch.equal(law[i], one)
