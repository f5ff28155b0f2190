"""The law of what `verify` emits equals `target_distribution` (chi-squared), for every rule."""
import pytest
import torch

import speccascade_fast as sc

from .helpers import ALPHAS, chi2_pvalue, logits_pair

V = 8
N = 6000
P_MIN = 1e-4  # fixed seeds make each test deterministic; the threshold guards against bad luck
CASES = [(rule, a) for rule in sc.RULES for a in ALPHAS[rule]]


def run_block(rule, alpha, T, gamma=1, seed_offset=0, bonus="cascade", **trunc):
    q, p = logits_pair(V, seed=21, rows=gamma + 1)
    draft_logits = q.unsqueeze(0).expand(N, -1, -1).float()
    target_logits = p.unsqueeze(0).expand(N, -1, -1).float()
    seeds = torch.arange(N) + seed_offset
    drafts = sc.sample(draft_logits[:, :gamma], temperature=T, seed=seeds,
                       positions=torch.zeros(N, dtype=torch.int64), **trunc)
    if bonus == "verifier":
        draft_logits = draft_logits[:, :gamma]
    out = sc.verify(draft_logits, drafts, target_logits, rule=rule, alpha=alpha, temperature=T,
                    seed=seeds, backend="reference", **trunc)
    law = sc.target_distribution(q.float(), p.float(), rule=rule, alpha=alpha, temperature=T,
                                 **trunc)
    return out, law


@pytest.mark.parametrize("T", [0.7, 1.0])
@pytest.mark.parametrize("rule,alpha", CASES)
def test_first_token_and_bonus_follow_the_target(rule, alpha, T):
    out, law = run_block(rule, alpha, T)
    assert chi2_pvalue(out.tokens[:, 0], law[0]) > P_MIN
    full = out.num_accepted == 1
    assert int(full.sum()) > 500, "too few fully accepted blocks to test the bonus token"
    assert chi2_pvalue(out.tokens[full, 1], law[1]) > P_MIN


@pytest.mark.parametrize("rule,alpha", CASES)
def test_greedy_emits_the_argmax_of_the_target(rule, alpha):
    out, law = run_block(rule, alpha, 0.0)
    assert bool((law.max(-1).values == 1).all()), "at T = 0 every target is one-hot"
    assert bool((out.tokens[:, 0] == law[0].argmax()).all())
    full = out.num_accepted == 1
    assert bool((out.tokens[full, 1] == law[1].argmax()).all())


@pytest.mark.parametrize("rule,alpha", [("spec", None), ("token_v3", 0.4), ("opt", 0.5),
                                        ("lossy", 0.3), ("chow", 0.6)])
def test_later_block_positions_keep_the_first_tokens_law(rule, alpha):
    """With gamma = 3 the first emitted token still follows pi at position 0."""
    out, law = run_block(rule, alpha, 1.0, gamma=3, seed_offset=10**6)
    assert chi2_pvalue(out.tokens[:, 0], law[0]) > P_MIN


@pytest.mark.parametrize("rule,alpha", [("diff", 0.0), ("token_v3", 0.4), ("lossy_star", 0.3)])
def test_bonus_from_the_verifier(rule, alpha):
    out, _ = run_block(rule, alpha, 1.0, bonus="verifier")
    _, p = logits_pair(V, seed=21, rows=2)
    full = out.num_accepted == 1
    pT = torch.softmax(p[1].float().double(), -1)
    assert chi2_pvalue(out.tokens[full, 1], pT) > P_MIN
    assert bool(out.deferred[:, 1].all())


@pytest.mark.parametrize("trunc", [{"top_k": 3}, {"top_p": 0.7}])
@pytest.mark.parametrize("rule,alpha", [("spec", None), ("token_v3", 0.4), ("diff", 0.0),
                                        ("lossy", 0.3)])
def test_truncated_sampling_follows_the_truncated_target(rule, alpha, trunc):
    out, law = run_block(rule, alpha, 0.9, **trunc)
    assert chi2_pvalue(out.tokens[:, 0], law[0]) > P_MIN
    full = out.num_accepted == 1
    assert chi2_pvalue(out.tokens[full, 1], law[1]) > P_MIN


def test_the_chi_squared_check_has_power():
    """Sanity: the same samples are rejected against a wrong law (drafter vs verifier)."""
    out, _ = run_block("spec", None, 1.0)
    q, _ = logits_pair(V, seed=21, rows=2)
    assert chi2_pvalue(out.tokens[:, 0], torch.softmax(q[0].float().double(), -1)) < 1e-6


@pytest.mark.parametrize("rule,alpha", [("diff", 0.0), ("opt", 0.5), ("token_v3", 0.4),
                                        ("lossy", 0.3), ("bild", 1.0)])
def test_empirical_rejection_rate_is_lemma_3(rule, alpha):
    from speccascade_fast import rules
    out, _ = run_block(rule, alpha, 1.0, seed_offset=777)
    q, p = logits_pair(V, seed=21, rows=2)
    t = rules.position_targets(q[:1].float(), p[:1].float(), rule=rule,
                               alpha=torch.tensor([alpha], dtype=torch.float64),
                               temperature=torch.ones(1, dtype=torch.float64))
    expected = (1 - torch.minimum(t.qT, t.accept).sum(-1)).item()
    observed = (out.num_accepted == 0).double().mean().item()
    se = (expected * (1 - expected) / N) ** 0.5
    assert abs(observed - expected) < 5 * se + 1e-9


@pytest.mark.parametrize("alpha", [-0.5, 0.0, 0.3, 0.9])
def test_lemma_8_opt_equals_diff_at_greedy(alpha):
    torch.manual_seed(0)
    B, g, Vb = 64, 4, 16
    q, p = torch.randn(B, g + 1, Vb) * 2, torch.randn(B, g + 1, Vb) * 2
    p[:B // 2] = q[:B // 2] + 0.3 * torch.randn(B // 2, g + 1, Vb)  # half the rows agree a lot
    x = sc.sample(q[:, :g], temperature=0.0)
    a = sc.verify(q, x, p, rule="opt", alpha=alpha, temperature=0.0, seed=torch.arange(B))
    b = sc.verify(q, x, p, rule="diff", alpha=alpha, temperature=0.0, seed=torch.arange(B))
    assert torch.equal(a.tokens, b.tokens)
