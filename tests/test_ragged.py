"""verify_ragged: vLLM's flattened layout (per-request gamma) equals verify on each request's
padded block, on both backends; every malformed input is a ValueError naming the argument."""
from __future__ import annotations

import pytest
import torch

import speccascade_fast as sc
from speccascade_fast.ragged import verify_ragged
from speccascade_fast.rules import FUSED_RULES  # the rules the kernels implement

from .helpers import ALPHAS, RAGGED_GAMMAS, ragged_inputs

GAMMAS = RAGGED_GAMMAS  # the requests of ragged_inputs by default
B = len(GAMMAS)


def per_request(blocks, bonus, backend="reference", **kw):
    outs = []
    for b, (q, x, p) in enumerate(blocks):
        dq = q if bonus == "cascade" else q[:-1]
        one = {k: (v[b:b + 1] if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
        outs.append(sc.verify(dq[None], x[None], p[None], backend=backend, **one))
    return outs


@pytest.mark.parametrize("bonus", ["cascade", "verifier"])
@pytest.mark.parametrize("T", [0.0, 0.8])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("rule", FUSED_RULES)
def test_equals_padded_verify_per_request(rule, backend, T, bonus):
    blocks, flat = ragged_inputs(seed=sc.RULES.index(rule), T=T)
    if bonus == "verifier":
        flat["bonus_draft_logits"] = None
    alpha = ALPHAS[rule][-1]
    kw = dict(rule=rule, alpha=alpha, temperature=T, seed=torch.tensor([5, -6, 7]),
              positions=torch.tensor([0, 10, 2**35]))
    out = verify_ragged(**flat, backend=backend, **kw)
    assert out.tokens.shape == (B, max(GAMMAS) + 1) and out.deferred.shape == out.tokens.shape
    assert torch.equal(out.num_emitted, out.num_accepted + 1)
    for b, ref in enumerate(per_request(blocks, bonus, **kw)):
        n = GAMMAS[b] + 1
        assert torch.equal(out.tokens[b, :n], ref.tokens[0]), (b, out.tokens, ref.tokens)
        assert bool((out.tokens[b, n:] == -1).all())
        assert torch.equal(out.deferred[b, :n], ref.deferred[0])
        assert not bool(out.deferred[b, n:].any())
        assert int(out.num_accepted[b]) == int(ref.num_accepted[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_backends_agree_across_dtypes_and_per_request_knobs(dtype):
    blocks, flat = ragged_inputs(V=3000, dtype=dtype, seed=9)
    T = torch.tensor([0.0, 0.7, 1.3], dtype=torch.float64)
    for rule in ("spec", "token_v3", "opt_log", "lossy_star"):
        a = ALPHAS[rule][0]
        alpha = None if a is None else torch.tensor([a, a / 2, a / 3], dtype=torch.float64)
        kw = dict(rule=rule, alpha=alpha, temperature=T, seed=torch.tensor([1, 2, 3]))
        ref = verify_ragged(**flat, backend="reference", **kw)
        cpu = verify_ragged(**flat, backend="cpu", **kw)
        assert all(torch.equal(u, v) for u, v in zip(ref[:4], cpu[:4])), rule


@pytest.mark.parametrize("bonus", ["cascade", "verifier"])
def test_top_k_top_p_and_a_large_vocabulary(bonus):
    """Truncation reaches the fused op as keep bounds per flattened row (draft, target and bonus
    rows, each with its request's T)."""
    blocks, flat = ragged_inputs(V=30000, seed=3, gammas=[3, 1, 2])
    if bonus == "verifier":
        flat["bonus_draft_logits"] = None
    T = torch.tensor([0.7, 0.0, 1.0], dtype=torch.float64)
    for rule, alpha in (("diff", 0.1), ("token_v3", 0.3), ("lossy", 0.5), ("spec", None)):
        for kw in ({}, {"top_k": 50}, {"top_p": 0.9}, {"top_k": 3, "top_p": 0.5}):
            args = dict(rule=rule, alpha=alpha, temperature=T, seed=torch.tensor([3, 4, 5]), **kw)
            ref = verify_ragged(**flat, backend="reference", **args)
            cpu = verify_ragged(**flat, backend="cpu", **args)
            assert all(torch.equal(u, v) for u, v in zip(ref[:4], cpu[:4])), (rule, kw)


def test_auto_picks_the_fused_op_and_a_single_request_works():
    blocks, flat = ragged_inputs(gammas=[5])
    out = verify_ragged(**flat, rule="token_v3", alpha=0.3, seed=4)
    (ref,) = per_request(blocks, "cascade", rule="token_v3", alpha=0.3, seed=torch.tensor([4]))
    assert torch.equal(out.tokens, ref.tokens) and torch.equal(out.deferred, ref.deferred)


def test_the_op_takes_the_rule_by_id_or_by_name():
    _, flat = ragged_inputs()
    args = [flat["draft_logits"], flat["draft_tokens"], flat["target_logits"],
            flat["cu_num_draft_tokens"], flat["bonus_draft_logits"], torch.tensor([1, 2, 3]),
            torch.zeros(B, dtype=torch.int64), torch.ones(B, dtype=torch.float64),
            torch.full((B,), 0.5, dtype=torch.float64)]
    by_id = torch.ops.speccascade.verify_ragged(*args, sc.RULES.index("opt"))
    by_name = torch.ops.speccascade.verify_ragged(*args, "opt")
    assert all(torch.equal(u, v) for u, v in zip(by_id, by_name))
    with pytest.raises(RuntimeError, match="unknown rule"):
        torch.ops.speccascade.verify_ragged(*args, "nope")


def _small_flat(backend, bonus, seed, monkeypatch):
    """Flattened inputs of V = 32 for ``backend`` (triton: under the interpreter), without the
    bonus rows for ``bonus="verifier"``."""
    if backend == "triton":
        pytest.importorskip("triton")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    _, flat = ragged_inputs(V=32, seed=seed)
    if bonus == "verifier":
        flat["bonus_draft_logits"] = None
    return flat


@pytest.mark.parametrize("bonus", ["cascade", "verifier"])
@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_max_spec_len_fixes_the_output_width(backend, bonus, monkeypatch):
    """vLLM's ``max_spec_len``: the output is ``[B, max_spec_len + 1]`` whatever the requests'
    gammas; the tokens are those of the default width, then -1 / False."""
    flat = _small_flat(backend, bonus, 3, monkeypatch)
    kw = dict(rule="token_v3", alpha=0.3, temperature=0.8, seed=torch.tensor([5, 6, 7]),
              positions=torch.tensor([0, 9, 4]), backend=backend)
    want = verify_ragged(**flat, **kw)
    got = verify_ragged(**flat, max_spec_len=6, **kw)
    assert got.tokens.shape == got.deferred.shape == (B, 7)
    W = max(GAMMAS) + 1
    assert torch.equal(got.tokens[:, :W], want.tokens) and bool((got.tokens[:, W:] == -1).all())
    assert torch.equal(got.deferred[:, :W], want.deferred) and not bool(got.deferred[:, W:].any())
    assert torch.equal(got.num_accepted, want.num_accepted)
    same = verify_ragged(**flat, max_spec_len=max(GAMMAS), **kw)  # the tightest width
    assert torch.equal(same.tokens, want.tokens) and torch.equal(same.deferred, want.deferred)


@pytest.mark.parametrize("truncate", [{}, dict(top_k=5, top_p=0.8)], ids=["whole", "top"])
@pytest.mark.parametrize("bonus", ["cascade", "verifier"])
@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_max_spec_len_lets_cu_end_before_n(backend, bonus, truncate, monkeypatch):
    """With ``max_spec_len`` the buffers may be longer than ``cu`` says (a fixed-size buffer, as
    the Engine's CUDA graphs replay): rows after ``cu[B]`` / ``cu[B] + B`` are padding, never
    read, and the output is the unpadded call's. Without it, such a ``cu`` is an error."""
    flat = _small_flat(backend, bonus, 4, monkeypatch)
    kw = dict(rule="chow", alpha=0.4, temperature=torch.tensor([0.8, 0.0, 1.0]),
              seed=torch.tensor([5, 6, 7]), positions=torch.tensor([0, 9, 4]), backend=backend,
              max_spec_len=5, **truncate)
    want = verify_ragged(**flat, **kw)
    g = torch.Generator().manual_seed(9)
    padded = dict(flat)  # 3 padding rows of each: anything, but NaN-free and ids in range
    padded["draft_logits"] = torch.cat([flat["draft_logits"], torch.randn(3, 32, generator=g)])
    padded["draft_tokens"] = torch.cat([flat["draft_tokens"], torch.tensor([31, 0, 7])])
    padded["target_logits"] = torch.cat([flat["target_logits"], torch.randn(3, 32, generator=g)])
    got = verify_ragged(**padded, **kw)
    assert all(torch.equal(u, v) for u, v in zip(got[:4], want[:4]))
    with pytest.raises(ValueError, match="must end at N = draft_logits.shape\\[0\\] = 10"):
        verify_ragged(**padded, **{**kw, "max_spec_len": None})


def test_the_op_takes_padding_rows_only_with_max_spec_len():
    _, flat = ragged_inputs()
    pad = dict(draft_logits=torch.cat([flat["draft_logits"], flat["draft_logits"][:2]]),
               draft_tokens=torch.cat([flat["draft_tokens"], flat["draft_tokens"][:2]]),
               target_logits=torch.cat([flat["target_logits"], flat["target_logits"][:2]]))
    args = [pad["draft_logits"], pad["draft_tokens"], pad["target_logits"],
            flat["cu_num_draft_tokens"], flat["bonus_draft_logits"], torch.tensor([1, 2, 3]),
            torch.zeros(B, dtype=torch.int64), torch.ones(B, dtype=torch.float64),
            torch.full((B,), 0.5, dtype=torch.float64), "opt"]
    exact = [flat["draft_logits"], flat["draft_tokens"], flat["target_logits"], *args[3:]]
    want = torch.ops.speccascade.verify_ragged(*exact, max_spec_len=4)
    got = torch.ops.speccascade.verify_ragged(*args, max_spec_len=4)
    assert all(torch.equal(u, v) for u, v in zip(got, want))
    with pytest.raises(RuntimeError, match="end at N \\(at most N with max_spec_len > 0\\)"):
        torch.ops.speccascade.verify_ragged(*args)


@pytest.mark.parametrize("value", [3, 0, -1, True, 5.0])
def test_max_spec_len_below_a_gamma_or_not_an_int_is_named(value):
    with pytest.raises(ValueError, match=r"max_spec_len must be None or an int >= every "
                                         r"request's gamma \(here 4\)"):
        verify_ragged(**_bad(), rule="spec", max_spec_len=value)


def test_the_op_checks_max_spec_len():
    """The op itself (what a CUDA graph would capture on a GPU) takes max_spec_len; on the CPU
    it still checks cu against it."""
    _, flat = ragged_inputs()
    args = [flat["draft_logits"], flat["draft_tokens"], flat["target_logits"],
            flat["cu_num_draft_tokens"], flat["bonus_draft_logits"], torch.tensor([1, 2, 3]),
            torch.zeros(B, dtype=torch.int64), torch.ones(B, dtype=torch.float64),
            torch.full((B,), 0.5, dtype=torch.float64), "opt"]
    wide = torch.ops.speccascade.verify_ragged(*args, max_spec_len=9)
    assert wide[0].shape == (B, 10)
    with pytest.raises(RuntimeError, match="more than max_spec_len = 3"):
        torch.ops.speccascade.verify_ragged(*args, max_spec_len=3)
    with pytest.raises(RuntimeError, match="max_spec_len must be >= 0"):
        torch.ops.speccascade.verify_ragged(*args, max_spec_len=-2)


# --- bad inputs ---------------------------------------------------------------------------------
def _bad(**change):
    _, flat = ragged_inputs(V=16)
    flat.update(change)
    return flat


BAD = {
    "cu does not start at 0": (dict(cu_num_draft_tokens=torch.tensor([1, 2, 6, 7])),
                               "cu_num_draft_tokens must start at 0"),
    "cu not increasing": (dict(cu_num_draft_tokens=torch.tensor([0, 5, 1, 7])),
                          "strictly increasing"),
    "a request with gamma 0": (dict(cu_num_draft_tokens=torch.tensor([0, 1, 1, 7])),
                               "gamma >= 1"),
    "cu does not end at N": (dict(cu_num_draft_tokens=torch.tensor([0, 1, 5, 6])),
                             "must end at N"),
    "cu is float": (dict(cu_num_draft_tokens=torch.tensor([0.0, 1.0, 5.0, 7.0])),
                    "cu_num_draft_tokens must be an integer tensor"),
    "cu is 2-D": (dict(cu_num_draft_tokens=torch.tensor([[0, 1, 5, 7]])),
                  "cu_num_draft_tokens must have 1 dimension"),
    "cu too short": (dict(cu_num_draft_tokens=torch.tensor([0])), "B \\+ 1 >= 2"),
    "tokens too few": (dict(draft_tokens=torch.zeros(6, dtype=torch.int64)), "draft_tokens"),
    "token out of range": (dict(draft_tokens=torch.tensor([0, 1, 2, 16, 0, 1, 2])),
                           "draft_tokens must be token ids in \\[0, 16\\)"),
    "negative token": (dict(draft_tokens=torch.tensor([0, 1, 2, -1, 0, 1, 2])),
                       "draft_tokens must be token ids"),
    "float tokens": (dict(draft_tokens=torch.zeros(7)), "draft_tokens must be an integer"),
    "target rows": (dict(target_logits=torch.randn(9, 16)), "target_logits must have N \\+ B"),
    "vocab mismatch": (dict(target_logits=torch.randn(10, 17)), "vocabulary mismatch"),
    "bonus shape": (dict(bonus_draft_logits=torch.randn(2, 16)), "bonus_draft_logits must have"),
    "3-D draft logits": (dict(draft_logits=torch.randn(1, 7, 16)),
                         "draft_logits must have 2 dimensions"),
    "NaN": (dict(draft_logits=torch.full((7, 16), float("nan"))), "draft_logits contains NaN"),
    "+inf": (dict(target_logits=torch.full((10, 16), float("inf"))),
             "target_logits contains \\+inf"),
    "an all -inf row": (dict(bonus_draft_logits=torch.full((3, 16), float("-inf"))),
                        "bonus_draft_logits has a row where every logit is -inf"),
    "int logits": (dict(draft_logits=torch.zeros(7, 16, dtype=torch.int64)),
                   "draft_logits must be a floating-point tensor"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_inputs_are_named(case):
    change, message = BAD[case]
    for backend in ("reference", "cpu"):
        with pytest.raises(ValueError, match=message):
            verify_ragged(**_bad(**change), rule="spec", backend=backend)


@pytest.mark.parametrize("kw,message", [
    (dict(rule="nope"), "rule='nope' is not a known rule"),
    (dict(rule="token_v3"), "alpha is required"),
    (dict(rule="lossy", alpha=1.0), "outside the range"),
    (dict(rule="chow", alpha=torch.tensor([0.1, 2.0, 0.3])), "outside the range"),
    (dict(rule="chow", alpha=torch.tensor([0.1, 0.2])), "alpha of shape"),
    (dict(rule="spec", temperature=-1.0), "temperature must be finite and >= 0"),
    (dict(rule="spec", temperature=torch.tensor([1.0, 1.0])), "temperature of shape"),
    (dict(rule="spec", seed=torch.tensor([1, 2])), "seed must have shape \\[3\\]"),
    (dict(rule="spec", positions=torch.tensor([0, -1, 0])), "positions must be >= 0"),
    (dict(rule="spec", top_k=0), "top_k must be None or an int"),
    (dict(rule="spec", top_p=1.5), "top_p must be None or a number"),
    (dict(rule="spec", backend="nope"), "backend='nope' is not available"),
])
def test_bad_arguments_are_named(kw, message):
    with pytest.raises(ValueError, match=message):
        verify_ragged(**_bad(), **kw)
