"""The divergence budget (docs/semantics.md §9): the per-position cost, the scan along a block,
the law of what `verify` emits under it, and every path's spending in `generate` and the Engine."""
import math

import pytest
import torch

import speccascade_fast as sc
from speccascade_fast import Engine
from speccascade_fast.rules import budget_scan, divergence, position_targets

from .helpers import chi2_pvalue, logits_pair, tiny_pair

V = 8
P_MIN = 1e-4
LOSSY = [("token_v3", 0.4), ("token_v1", 0.2), ("opt", 0.5), ("chow", 0.6), ("lossy", 0.3),
         ("lossy_star", 0.3), ("drafter", None), ("ensemble", 0.4), ("diff", 0.1)]


def _targets(rule, alpha, q, p, T=1.0):
    lead = q.shape[:-1]
    return position_targets(q, p, rule=rule, alpha=torch.full(lead, alpha or 0.0,
                                                               dtype=torch.float64),
                            temperature=torch.full(lead, T, dtype=torch.float64))


# ---- the cost of a position and the scan --------------------------------------------------------
@pytest.mark.parametrize("rule,alpha", LOSSY + [("spec", None)])
def test_cost_is_the_total_variation_of_the_law_from_pT(rule, alpha):
    q, p = logits_pair(V, seed=3, rows=4)
    t = _targets(rule, alpha, q, p)
    want = 0.5 * (t.law - t.pT).abs().sum(-1)
    assert torch.allclose(divergence(rule, t), want, atol=1e-12)


def test_prefix_rules_cost_one_minus_delta_times_tv():
    q, p = logits_pair(V, seed=4, rows=6)
    t = _targets("chow", 0.5, q, p)
    assert t.delta.any() and (~t.delta).any(), "the case needs both decisions"
    tv = 0.5 * (t.qT - t.pT).abs().sum(-1)
    assert torch.equal(divergence("chow", t), torch.where(t.delta, 0.0, tv))
    assert torch.equal(divergence("spec", t), torch.zeros(6, dtype=torch.float64))


def test_scan_charges_a_position_only_while_the_budget_holds():
    cost = torch.tensor([[0.2, 0.3, 0.1, 0.4], [0.5, 0.1, 0.1, 0.0], [0.0, 0.0, 0.0, 0.0]],
                        dtype=torch.float64)
    budget = torch.tensor([0.35, 0.3, 0.0], dtype=torch.float64)
    exact, charged = budget_scan(cost, budget)
    # row 0: 0.2 fits, 0.3 would make 0.5 > 0.35 (exact), 0.1 fits (0.3), 0.4 does not
    assert exact.tolist()[0] == [False, True, False, True]
    assert charged.tolist()[0] == pytest.approx([0.2, 0.0, 0.1, 0.0])
    # row 1: the first position alone is over the budget; later cheaper ones still spend
    assert exact.tolist()[1] == [True, False, False, False]
    assert charged.tolist()[1] == pytest.approx([0.0, 0.1, 0.1, 0.0])
    # a free position fits a zero budget
    assert exact.tolist()[2] == [False] * 4


# ---- verify: the law of each position under the budget ------------------------------------------
N = 6000


def _block(rule, alpha, budget, T=1.0, gamma=1, bonus="cascade", backend="reference"):
    q, p = logits_pair(V, seed=21, rows=gamma + 1)
    ql = q.unsqueeze(0).expand(N, -1, -1).float()
    pl = p.unsqueeze(0).expand(N, -1, -1).float()
    seeds = torch.arange(N)
    drafts = sc.sample(ql[:, :gamma], temperature=T, seed=seeds,
                       positions=torch.zeros(N, dtype=torch.int64))
    if bonus == "verifier":
        ql = ql[:, :gamma]
    out = sc.verify(ql, drafts, pl, rule=rule, alpha=alpha, temperature=T, seed=seeds,
                    divergence_budget=budget, backend=backend)
    law = sc.target_distribution(q.float(), p.float(), rule=rule, alpha=alpha, temperature=T)
    pT = sc.target_distribution(q.float(), p.float(), rule="spec", temperature=T)
    cost = 0.5 * (law - pT).abs().sum(-1)
    return out, law, pT, cost


@pytest.mark.parametrize("rule,alpha", [("token_v3", 0.4), ("lossy", 0.3), ("drafter", None),
                                        ("ensemble", 0.5)])
def test_each_position_follows_the_rule_or_pT_as_the_scan_says(rule, alpha):
    _, _, _, cost = _block(rule, alpha, None)
    c0, c1 = cost.tolist()
    assert c0 > c1 > 1e-3, "the case needs two positions with a cost, the first the dearer"
    # room for position 0 only: it follows the rule, the bonus position pT
    out, law, pT, _ = _block(rule, alpha, c0 + 0.5 * c1)
    full = out.num_accepted == 1
    assert int(full.sum()) > 500
    assert chi2_pvalue(out.tokens[:, 0], law[0]) > P_MIN
    assert chi2_pvalue(out.tokens[full, 1], pT[1]) > P_MIN
    assert torch.allclose(out.spent[:, 0], torch.tensor(c0, dtype=torch.float64))
    assert bool((out.spent[:, 1] == 0).all()) and bool(out.deferred[:, 1].all())
    # room for the cheaper second one only: position 0 exact (charged 0), position 1 the rule
    # (a budget a hair above c1: the engine's cost and this one are fp64 sums of different
    # kernels, and a budget of exactly c1 left it to their last bit whether c1 fits)
    out, law, pT, _ = _block(rule, alpha, c1 * (1 + 1e-9))
    full = out.num_accepted == 1
    assert int(full.sum()) > 500
    assert chi2_pvalue(out.tokens[:, 0], pT[0]) > P_MIN
    assert chi2_pvalue(out.tokens[full, 1], law[1]) > P_MIN
    assert bool((out.spent[:, 0] == 0).all()) and bool(out.deferred[:, 0].all())
    assert torch.allclose(out.spent[:, 1], torch.tensor(c1, dtype=torch.float64))


@pytest.mark.parametrize("rule,alpha", LOSSY)
def test_no_budget_is_lossless_and_an_infinite_one_is_the_rule(rule, alpha):
    out0, _, pT, _ = _block(rule, alpha, 0.0)
    assert chi2_pvalue(out0.tokens[:, 0], pT[0]) > P_MIN
    assert bool((out0.spent == 0).all()) and bool(out0.deferred.all())
    spec = _block("spec", None, None)[0]
    assert torch.equal(out0.tokens[:, 0], spec.tokens[:, 0])
    plain, inf = _block(rule, alpha, None)[0], _block(rule, alpha, math.inf)[0]
    assert torch.equal(plain.tokens, inf.tokens)
    assert torch.equal(plain.num_accepted, inf.num_accepted)


@pytest.mark.parametrize("bonus", ["cascade", "verifier"])
@pytest.mark.parametrize("rule,alpha", [("token_v3", 0.4), ("lossy", 0.3), ("chow", 0.6)])
def test_every_path_spends_at_most_the_budget(rule, alpha, bonus):
    gamma, B = 4, 0.25
    q, p = logits_pair(V, seed=5, rows=gamma + 1)
    g = torch.Generator().manual_seed(0)
    ql = (q.unsqueeze(0) + torch.randn(N // 4, gamma + 1, V, generator=g, dtype=q.dtype)).float()
    pl = (p.unsqueeze(0) + torch.randn(N // 4, gamma + 1, V, generator=g, dtype=p.dtype)).float()
    seeds = torch.arange(N // 4)
    drafts = sc.sample(ql[:, :gamma], temperature=1.0, seed=seeds,
                       positions=torch.zeros(N // 4, dtype=torch.int64))
    if bonus == "verifier":
        ql = ql[:, :gamma]
    budget = torch.rand(N // 4, generator=g, dtype=torch.float64) * 2 * B
    out = sc.verify(ql, drafts, pl, rule=rule, alpha=alpha, seed=seeds,
                    divergence_budget=budget, backend="reference")
    cols = torch.arange(gamma + 1)
    emitted = cols[None] <= out.num_accepted[:, None]
    spent = torch.where(emitted, out.spent, 0.0).sum(1)
    assert bool((spent <= budget + 1e-12).all())
    assert bool((spent > 0).any()), "the case needs paths that spend"
    assert bool((out.spent >= 0).all())
    if bonus == "verifier":
        assert bool((out.spent[:, gamma] == 0).all())


# ---- generate and the Engine ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def pair():
    return tiny_pair()


def _ids(B=3, P=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 60, (B, P), generator=g)


@pytest.mark.parametrize("T", [0.0, 1.0])
def test_engine_equals_the_sequential_loops_and_spends_at_most_the_budget(pair, T):
    q, p = pair
    for B in (0.05, 0.4):
        kw = dict(rule="token_v3", alpha=0.6, temperature=T, max_new_tokens=24, seed=3,
                  divergence_budget=B)
        e = sc.generate(q, p, _ids(), engine="static", **kw)
        s = sc.generate(q, p, _ids(), engine="sequential", **kw)
        assert torch.equal(e.sequences, s.sequences)
        spent = [r["divergence_spent"] for r in e.stats["per_sequence"]]
        assert spent == pytest.approx([r["divergence_spent"] for r in s.stats["per_sequence"]])
        assert all(0 <= x <= B + 1e-12 for x in spent)
        assert e.stats["divergence_spent"] == pytest.approx(sum(spent))
    if T:
        assert max(spent) > 0, "the case needs sequences that spend"


def test_budget_zero_is_spec_and_infinite_is_the_plain_rule(pair):
    q, p = pair
    kw = dict(temperature=1.0, max_new_tokens=24, seed=7, engine="static")
    spec = sc.generate(q, p, _ids(), rule="spec", **kw)
    zero = sc.generate(q, p, _ids(), rule="lossy", alpha=0.5, divergence_budget=0, **kw)
    assert torch.equal(spec.sequences, zero.sequences)
    assert zero.stats["divergence_spent"] == 0
    plain = sc.generate(q, p, _ids(), rule="lossy", alpha=0.5, **kw)
    inf = sc.generate(q, p, _ids(), rule="lossy", alpha=0.5, divergence_budget=math.inf, **kw)
    assert torch.equal(plain.sequences, inf.sequences)
    assert plain.stats["divergence_spent"] == 0  # no budget: nothing measured
    assert inf.stats["divergence_spent"] > 0  # inf: no limit, the spending measured


def test_a_rows_tokens_do_not_depend_on_the_budgets_beside_it(pair):
    q, p = pair
    ids = _ids(B=4, seed=2)
    eng = Engine(q, p, max_batch_size=4, max_seq_len=64, rule="token_v3", alpha=0.6)
    mixed = eng.generate(ids, max_new_tokens=20, seed=[1, 2, 3, 4],
                         rule=["token_v3", "spec", "lossy", "token_v3"],
                         alpha=[0.6, None, 0.4, 0.6], divergence_budget=[0.1, 0.3, math.inf, 0.0])
    for b, (rule, alpha, budget) in enumerate([("token_v3", 0.6, 0.1), ("spec", None, 0.3),
                                               ("lossy", 0.4, math.inf), ("token_v3", 0.6, 0.0)]):
        alone = eng.generate(ids[b:b + 1], max_new_tokens=20, seed=[b + 1], rule=rule,
                             alpha=alpha, divergence_budget=budget)
        assert alone.new_tokens[0] == mixed.new_tokens[b], b
        assert alone.stats["divergence_spent"] == pytest.approx(
            mixed.stats["per_sequence"][b]["divergence_spent"])
    assert mixed.stats["per_sequence"][3]["divergence_spent"] == 0
    assert mixed.stats["per_sequence"][1]["divergence_spent"] == 0  # spec costs nothing
    # the statistics report what the call used, per sequence and for the call
    own = [{k: r[k] for k in ("rule", "alpha", "divergence_budget", "exact_prefix")}
           for r in mixed.stats["per_sequence"]]
    assert own == [dict(rule="token_v3", alpha=0.6, divergence_budget=0.1, exact_prefix=0),
                   dict(rule="spec", alpha=None, divergence_budget=0.3, exact_prefix=0),
                   dict(rule="lossy", alpha=0.4, divergence_budget=math.inf, exact_prefix=0),
                   dict(rule="token_v3", alpha=0.6, divergence_budget=0.0, exact_prefix=0)]
    assert mixed.stats["rule"] == ["token_v3", "spec", "lossy", "token_v3"]
    assert mixed.stats["divergence_budget"] == [0.1, 0.3, math.inf, 0.0]
    assert mixed.stats["exact_prefix"] == 0  # the same for every sequence: one value


def test_engine_budget_per_call_or_from_the_engine(pair):
    q, p = pair
    eng = Engine(q, p, max_batch_size=3, max_seq_len=64, rule="lossy", alpha=0.5,
                 divergence_budget=0.2)
    a = eng.generate(_ids(), max_new_tokens=16, seed=0)
    b = eng.generate(_ids(), max_new_tokens=16, seed=0, divergence_budget=0.2)
    assert torch.equal(a.sequences, b.sequences)
    assert a.stats["divergence_budget"] == 0.2
    c = eng.generate(_ids(), max_new_tokens=16, seed=0, divergence_budget=0.05)
    assert c.stats["divergence_budget"] == 0.05  # the call's budget, not the engine's
    assert all(r["divergence_budget"] == 0.05 for r in c.stats["per_sequence"])
    assert all(r["divergence_spent"] <= 0.2 + 1e-12 for r in a.stats["per_sequence"])


@pytest.mark.parametrize("budget,needle", [
    (-0.1, ">= 0"), (math.nan, ">= 0"), ("a", "divergence_budget"), ([0.1, 0.2], "3 numbers"),
    (True, "divergence_budget"),
])
def test_bad_budgets_are_refused_by_name(pair, budget, needle):
    q, p = pair
    eng = Engine(q, p, max_batch_size=3, max_seq_len=64)
    with pytest.raises(ValueError, match="divergence_budget") as e:
        eng.generate(_ids(), max_new_tokens=4, divergence_budget=budget)
    assert needle in str(e.value)


@pytest.mark.parametrize("kw", [dict(method="autoregressive"), dict(draft_confidence=0.5),
                                dict(method="token_cascade", rule="chow")])
def test_budget_applies_to_spec_cascade_blocks_only(pair, kw):
    q, p = pair
    with pytest.raises(ValueError, match="divergence_budget applies to method='spec_cascade'"):
        sc.generate(q, p, _ids(), max_new_tokens=4, divergence_budget=0.1, **kw)
    with pytest.raises(ValueError, match="divergence_budget"):
        sc.DecodeConfig(divergence_budget=-1)
    with pytest.raises(ValueError, match=r"divergence_budget must be a number, got shape \(2,\)"):
        sc.DecodeConfig(divergence_budget=[0.1, 0.2])  # one budget per config; per row in Engine


def test_verify_refuses_a_bad_budget():
    q, p = logits_pair(V, seed=1, rows=2)
    x = torch.zeros(1, 1, dtype=torch.int64)
    for bad in (-1.0, math.nan, torch.zeros(2)):
        with pytest.raises(ValueError, match="divergence_budget"):
            sc.verify(q[None].float(), x, p[None].float(), rule="token_v3", alpha=0.3,
                      divergence_budget=bad)
