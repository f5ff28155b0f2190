"""verify / sample: shapes, determinism, batch invariance, masking, dtypes, and every bad input."""
import math

import pytest
import torch

import speccascade_fast as sc

from .helpers import ALPHAS

B, G, V = 6, 4, 32


def block(seed=0, dtype=torch.float32, gamma=G, rows=B):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(rows, gamma + 1, V, generator=g) * 2
    p = q + torch.randn(rows, gamma + 1, V, generator=g)
    x = sc.sample(q[:, :gamma], temperature=1.0, seed=torch.arange(rows))
    return q.to(dtype), x, p.to(dtype)


@pytest.mark.parametrize("rule", sc.RULES)
def test_output_structure(rule):
    q, x, p = block()
    out = sc.verify(q, x, p, rule=rule, alpha=ALPHAS[rule][0], seed=torch.arange(B) + 5)
    assert out.tokens.shape == (B, G + 1) and out.tokens.dtype == torch.int64
    assert out.deferred.shape == (B, G + 1) and out.deferred.dtype == torch.bool
    assert torch.equal(out.num_emitted, out.num_accepted + 1)
    for b in range(B):
        n = int(out.num_accepted[b])
        assert torch.equal(out.tokens[b, :n], x[b, :n])
        assert 0 <= int(out.tokens[b, n]) < V
        assert bool((out.tokens[b, n + 1:] == -1).all())


@pytest.mark.parametrize("T", [0.0, 0.7, 1.0])
@pytest.mark.parametrize("rule", sc.RULES)
def test_deterministic_and_batch_invariant(rule, T):
    q, x, p = block(seed=1)
    a = ALPHAS[rule][-1]
    seeds, pos = torch.arange(B) * 7 + 3, torch.arange(B) * 11
    full = sc.verify(q, x, p, rule=rule, alpha=a, temperature=T, seed=seeds, positions=pos)
    again = sc.verify(q, x, p, rule=rule, alpha=a, temperature=T, seed=seeds, positions=pos)
    assert all(torch.equal(u, v) for u, v in zip(full[:4], again[:4]))
    for b in (0, 3, 5):
        alone = sc.verify(q[b:b + 1], x[b:b + 1], p[b:b + 1], rule=rule, alpha=a, temperature=T,
                          seed=seeds[b:b + 1], positions=pos[b:b + 1])
        for u, v in zip(full[:4], alone[:4]):
            assert torch.equal(u[b:b + 1], v)
    # reversing the batch permutes the outputs and nothing else
    rev = sc.verify(q.flip(0), x.flip(0), p.flip(0), rule=rule, alpha=a, temperature=T,
                    seed=seeds.flip(0), positions=pos.flip(0))
    assert torch.equal(rev.tokens, full.tokens.flip(0))


def test_seed_and_position_change_the_draws():
    q, x, p = block(seed=2)
    a = sc.verify(q, x, p, rule="spec", seed=1).tokens
    b = sc.verify(q, x, p, rule="spec", seed=2).tokens
    c = sc.verify(q, x, p, rule="spec", seed=1, positions=torch.full((B,), 40)).tokens
    assert not torch.equal(a, b) or not torch.equal(a, c)
    s1 = sc.sample(torch.zeros(500, V), seed=1)
    assert not torch.equal(s1, sc.sample(torch.zeros(500, V), seed=2))
    assert torch.equal(s1, sc.sample(torch.zeros(500, V), seed=1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_low_precision_logits(dtype):
    q, x, p = block(seed=3, dtype=dtype)
    out = sc.verify(q, x, p, rule="token_v3", alpha=0.3)
    ref = sc.verify(q.double(), x, p.double(), rule="token_v3", alpha=0.3)
    assert all(torch.equal(u, v) for u, v in zip(out[:4], ref[:4]))  # upcast is exact


def test_masked_tokens_are_never_emitted():
    q, x, p = block(seed=4)
    q[..., :8] = -math.inf
    p[..., :8] = -math.inf
    x = sc.sample(q[:, :G], seed=torch.arange(B))
    assert bool((x >= 8).all())
    for rule in sc.RULES:
        for T in (0.0, 1.0):
            out = sc.verify(q, x, p, rule=rule, alpha=ALPHAS[rule][0], temperature=T,
                            seed=torch.arange(B))
            emitted = out.tokens[out.tokens >= 0]
            assert bool((emitted >= 8).all()), rule


def test_per_row_alpha_and_temperature():
    q, x, p = block(seed=5)
    alphas = torch.linspace(0.0, 1.0, B, dtype=torch.float64)
    temps = torch.tensor([0.0, 0.5, 1.0, 0.0, 0.7, 1.2], dtype=torch.float64)
    out = sc.verify(q, x, p, rule="token_v3", alpha=alphas, temperature=temps, seed=torch.arange(B))
    for b in range(B):
        one = sc.verify(q[b:b + 1], x[b:b + 1], p[b:b + 1], rule="token_v3",
                        alpha=alphas[b].item(), temperature=temps[b].item(), seed=b)
        assert torch.equal(out.tokens[b:b + 1], one.tokens)


def test_deferred_flags():
    q, x, p = block(seed=6)
    assert bool(sc.verify(q, x, p, rule="spec").deferred.all())
    assert not bool(sc.verify(q, x, p, rule="drafter").deferred.any())
    assert bool(sc.verify(q, x, p, rule="diff", alpha=-1.0).deferred.all())
    assert not bool(sc.verify(q, x, p, rule="diff", alpha=1.0).deferred.any())
    assert not bool(sc.verify(q, x, p, rule="token_v3", alpha=1.0).deferred.any())  # A = all
    tv3 = sc.verify(q, x, p, rule="token_v3", alpha=-0.5)  # A empty: every draft is outside A
    assert bool(tv3.deferred[:, :G].all())
    assert bool(sc.verify(q[:, :G], x, p, rule="chow", alpha=1.0).deferred[:, G].all())


def test_drafter_rule_accepts_everything_and_greedy_spec_matches_verifier_argmax():
    q, x, p = block(seed=7)
    assert bool((sc.verify(q, x, p, rule="drafter").num_accepted == G).all())
    xg = sc.sample(q[:, :G], temperature=0.0)
    out = sc.verify(q, xg, p, rule="spec", temperature=0.0)
    for b in range(B):
        n = int(out.num_accepted[b])
        assert torch.equal(out.tokens[b, :n + 1], torch.cat([xg[b, :n], p[b, n].argmax()[None]]))
        if n < G:
            assert int(xg[b, n]) != int(p[b, n].argmax())


# --- bad input ---------------------------------------------------------------------------------
BAD_ALPHA = [("chow", 1.5), ("chow", -0.1), ("chow_log", -1.0), ("diff", 1.01), ("diff", -2.0),
             ("token_v1", 3.0), ("token_v2", -1.5), ("lossy", 1.0), ("lossy_star", -0.1),
             ("bild", -0.5), ("opt", math.inf), ("token_v3", math.nan), ("diff", None)]


@pytest.mark.parametrize("rule,alpha", BAD_ALPHA)
def test_alpha_out_of_range(rule, alpha):
    q, x, p = block()
    with pytest.raises(ValueError, match="alpha"):
        sc.verify(q, x, p, rule=rule, alpha=alpha)
    with pytest.raises(ValueError, match="alpha"):
        sc.target_distribution(q, p, rule=rule, alpha=alpha)


def test_alpha_tensor_out_of_range_names_the_value():
    q, x, p = block()
    with pytest.raises(ValueError, match=r"alpha=1\.5.*\[0, 1\]"):
        sc.verify(q, x, p, rule="chow", alpha=torch.tensor([0.1, 0.2, 1.5, 0.3, 0.0, 1.0]))


def bad(match, **overrides):
    q, x, p = block()
    kw = {"draft_logits": q, "draft_tokens": x, "target_logits": p, "rule": "token_v3",
          "alpha": 0.3}
    kw.update(overrides)
    with pytest.raises(ValueError, match=match):
        sc.verify(**kw)


def test_bad_inputs():
    q, x, p = block()
    bad("rule='nope'", rule="nope")
    bad("temperature", temperature=-0.1)
    bad("temperature", temperature=math.nan)
    bad("temperature", temperature=math.inf)
    bad("gamma", draft_tokens=x[:, :0], draft_logits=q[:, :1], target_logits=p[:, :1])
    bad("target_logits must have shape", target_logits=p[:, :G])
    bad("draft_logits must have shape", draft_logits=q[:, :G - 1])
    bad("vocabulary mismatch", draft_logits=q[..., :V - 1])
    bad("draft_logits must have shape", draft_logits=q[:B - 1])
    bad("integer", draft_tokens=x.float())
    bad("integer", draft_tokens=x.bool())
    bad(r"\[0, 32\)", draft_tokens=torch.where(x == x[0, 0], V, x))
    bad(r"\[0, 32\)", draft_tokens=torch.where(x == x[0, 0], -1, x))
    bad("3 dimensions", draft_logits=q[0])
    bad("NaN", target_logits=torch.where(p > 2, math.nan, p))
    bad(r"\+inf", draft_logits=torch.where(q > 2, math.inf, q))
    bad("every logit is -inf", target_logits=torch.cat([p[:, :1], torch.full_like(p[:, 1:], -math.inf)], 1))
    bad("floating-point", draft_logits=q.long())
    bad("top_k", top_k=0)
    bad("top_k", top_k=V + 1)
    bad("top_p", top_p=0.0)
    bad("top_p", top_p=1.5)
    bad("seed", seed=torch.zeros(B + 1, dtype=torch.int64))
    bad("seed", seed=1.5)
    bad("positions", positions=torch.full((B,), -1))
    bad("positions", positions=torch.zeros(B))
    bad("backend", backend="cuda-that-is-not-here")


def test_sample_and_target_distribution_bad_inputs():
    with pytest.raises(ValueError, match="same shape"):
        sc.target_distribution(torch.zeros(2, 5), torch.zeros(2, 6), rule="spec")
    with pytest.raises(ValueError, match="rule"):
        sc.target_distribution(torch.zeros(5), torch.zeros(5), rule="speculative")
    with pytest.raises(ValueError, match="temperature"):
        sc.sample(torch.zeros(2, 5), temperature=-1)
    with pytest.raises(ValueError, match="NaN"):
        sc.sample(torch.full((2, 5), math.nan))
    with pytest.raises(ValueError, match=r"\[B, V\]"):
        sc.sample(torch.zeros(5))
