"""The Triton verification backend against the reference: same tokens, num_accepted, deferred.

Without a GPU the kernels run in Triton's CPU interpreter: ``tests/conftest.py`` imports triton and
the kernels with ``TRITON_INTERPRET=1`` set (they are decorated at import, and stay interpreted for
the whole session) and unsets it; the fixture below sets it again around each test of this module
only (the interpreter also reads it while running), so that ``backend="auto"`` in the other test
modules does not switch to the (slow) interpreter. With a GPU the same tests run compiled on CUDA.
Shapes stay small (V <= 128, B <= 4, gamma <= 3): the interpreter runs every program in Python.

If triton is not installed this module fails (ImportError), it does not skip.

Equality is exact. The kernels accumulate in float32 and the reference in float64, so a decision
sitting within ~1e-6 of its threshold (a genuine floating-point near-tie) may legitimately go the
other way; :func:`assert_same` allows a differing row only when perturbing the logits by 1e-6
(relative) changes the reference's own output for that row, and reports it. None of the fixed
inputs below has such a near-tie.
"""
import math
import os
import subprocess
import sys

import pytest
import torch
import triton  # noqa: F401  (a missing triton must fail this module, not skip it)

import speccascade_fast as sc
from speccascade_fast import backends, checks, kernels, rng  # kernels: decorated by conftest.py
from speccascade_fast.backends import reference
from speccascade_fast.backends import triton as tb
from speccascade_fast.kernels import accept_resample_insert, launch
from speccascade_fast.kernels import keep_bounds as keep_search
from speccascade_fast.rules import FUSED_RULES  # the rules the kernels implement
from speccascade_fast.truncation import keep_bounds_torch, keep_mask

from .helpers import ALPHAS, assert_same_up_to_near_ties, ragged_inputs, truncation_case

_CUDA = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    if not _CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")

DEVICE = torch.device("cuda" if _CUDA else "cpu")
B, G, V = 4, 3, 100
# two vocabulary slices of one chunk each (the cross-slice merge and the atomic race merge); the
# main matrix uses the default slicing (here one slice per row), the other groups this
SMALL = dict(slice_width=64, block=64)
TEMPS = [0.0, 0.8, 1.0, 1.7]  # mixed per row: greedy and sampled rows in one batch

# numpy's "divide by zero encountered in log" from the interpreter (log 0 = -inf is intended)
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")


def make_block(seed, *, dtype=torch.float32, cascade=True, T=0.8, rows=B, gamma=G, vocab=V,
               mask=False, random_drafts=False):
    """Drafter/verifier logits that partly agree, drafts drawn from the drafter's qT."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(rows, gamma + 1, vocab, generator=g, dtype=torch.float64) * 2
    p = q + torch.randn(rows, gamma + 1, vocab, generator=g, dtype=torch.float64)
    if mask:  # some tokens masked in both models, some in one only
        q[..., :5] = -math.inf
        p[..., :5] = -math.inf
        q[:, :, 5:8] = -math.inf
        p[:, :, 8:11] = -math.inf
    q, p = q.to(dtype), p.to(dtype)
    if random_drafts:
        x = torch.randint(0, vocab, (rows, gamma), generator=g)
    else:
        temps = torch.as_tensor(T, dtype=torch.float64).expand(rows)
        x = sc.sample(q[:, :gamma], temperature=temps, seed=torch.arange(rows) + 100 * seed)
    if not cascade:
        q = q[:, :gamma]
    return q.to(DEVICE), x.to(DEVICE), p.to(DEVICE)


def call_args(rule, alpha, T, rows, seed):
    return dict(
        rule=rule,
        alpha=checks.alpha_tensor(alpha, (rows,), DEVICE),
        temperature=checks.temperature(torch.as_tensor(T, dtype=torch.float64), (rows,), DEVICE),
        seed=(torch.arange(rows, dtype=torch.int64) * 7919 + seed - 3).to(DEVICE),
        positions=(torch.arange(rows, dtype=torch.int64) * 13 + (seed % 5) * 2**33).to(DEVICE),
    )


def assert_same(q, x, p, args, **launch_kw):
    got = tb.launch(q, x, p, **args, **launch_kw)
    want = reference.verify(q, x, p, top_k=None, top_p=None, **args)
    assert got.spent is None and want.spent is None  # no divergence budget
    for name, a, b in zip(want._fields[:4], got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, name
    assert_same_up_to_near_ties(got, want, q, x, p, args)
    return got


# ---- the RNG ------------------------------------------------------------------------------------
@pytest.mark.parametrize("stream", [rng.DRAFT, rng.ACCEPT, rng.RESIDUAL])
def test_rng_bits_equal_uniform_int(stream):
    cases = [(s, pos, i) for s in [0, 1, -1, 2**62, -(2**63), 123456789, 2**63 - 1]
             for pos in [0, 1, 7, 2**40, 2**63 - 1] for i in [0, 1, 5, 99, 262143]]
    seed, pos, idx = (torch.tensor(c, dtype=torch.int64, device=DEVICE) for c in zip(*cases))
    out = torch.empty(len(cases), dtype=torch.float64, device=DEVICE)
    kernels.uniform_kernel[(triton.cdiv(len(cases), 64),)](seed, pos, idx, out, len(cases),
                                                           STREAM=stream, BLOCK=64)
    want = [rng.uniform_int(s, ps, stream, i) for s, ps, i in cases]
    assert out.tolist() == want  # bit for bit


# ---- every rule, T in {0, 0.8}, fp32 and bf16 ----------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("T", [0.0, 0.8])
@pytest.mark.parametrize("rule", FUSED_RULES)
def test_matches_reference(rule, T, dtype):
    seed = sc.RULES.index(rule) * 10 + int(T * 10)
    q, x, p = make_block(seed, dtype=dtype, T=T)
    assert_same(q, x, p, call_args(rule, ALPHAS[rule][-1], T, B, seed))


@pytest.mark.parametrize("rule", FUSED_RULES)
def test_verifier_bonus_and_mixed_temperatures(rule):
    """bonus="verifier" (draft_logits [B, gamma, V]); T = 0, 0.8, 1, 1.7 in one batch."""
    seed = 500 + sc.RULES.index(rule)
    q, x, p = make_block(seed, cascade=False, T=1.0)
    assert_same(q, x, p, call_args(rule, ALPHAS[rule][0], TEMPS, B, seed), **SMALL)


@pytest.mark.parametrize("rule", ["spec", "chow_log", "opt_log", "token_v1", "lossy", "bild"])
def test_multi_chunk_online_merge_fp16(rule):
    """4 slices of 2 chunks each (the online max/Σexp merge inside a program), fp16 logits."""
    seed = 700 + sc.RULES.index(rule)
    q, x, p = make_block(seed, dtype=torch.float16, T=1.0)
    assert_same(q, x, p, call_args(rule, ALPHAS[rule][0], TEMPS, B, seed),
                slice_width=32, block=16)


@pytest.mark.parametrize("rule", ["spec", "drafter", "chow", "opt", "bild", "token_v1",
                                  "token_v2", "lossy", "lossy_star"])
def test_masked_tokens_and_arbitrary_drafts(rule):
    """-inf logits (in both models or in one: bild's cross-entropy becomes +inf), drafts not drawn
    from qT (some masked, qT(x) = 0: the 1e-10 floor of the acceptance ratio)."""
    seed = 900 + sc.RULES.index(rule)
    q, x, p = make_block(seed, mask=True, random_drafts=True)
    x[:, 0] = torch.tensor([0, 6, 9, 50])[: x.shape[0]].to(x.device)  # masked in q / p / both
    assert_same(q, x, p, call_args(rule, ALPHAS[rule][-1], TEMPS, B, seed), **SMALL)


EXTREMES = [("chow", 0.0), ("chow", 1.0), ("chow_log", 0.0), ("diff", -1.0), ("diff", 1.0),
            ("opt", -1e9), ("opt", 1e9), ("token_v1", -1.0), ("token_v1", 1.0),
            ("token_v2", -1.0), ("token_v2", 0.0), ("token_v3", 0.0), ("token_v3", 1.0),
            ("token_v3", -0.5), ("lossy", 0.0), ("lossy_star", 0.0), ("lossy_star", 0.9),
            ("bild", 0.0)]


@pytest.mark.parametrize("rule,alpha", EXTREMES)
def test_alpha_at_the_ends_of_its_range(rule, alpha):
    """Where the rules reduce to spec / drafter, and exact ties (token_v3 at alpha = 0: A is the
    argmax of p; token_v2 at 0 likewise)."""
    seed = 1100 + EXTREMES.index((rule, alpha))
    q, x, p = make_block(seed, T=1.0)
    assert_same(q, x, p, call_args(rule, alpha, TEMPS, B, seed), **SMALL)


@pytest.mark.parametrize("rule", ["spec", "opt", "token_v3", "lossy"])
def test_identical_models_and_all_zero_residual(rule):
    """q == p: every residual is exactly zero. Drafts of improbable tokens (qT < 1e-10) are still
    rejected, and the token then comes from the position's law (the reference's fallback).
    (Not lossy_star: there the reference's bisection ends at 1/beta = 1 + O(1e-15), so its
    residual (1/beta) pT - qT is rounding noise rather than zero: a near-tie by construction.)"""
    seed = 1300 + sc.RULES.index(rule)
    q, x, _ = make_block(seed, random_drafts=True)
    q[..., 10:20] = -40.0
    x[:, 0] = 12
    assert_same(q, x, q.clone(), call_args(rule, ALPHAS[rule][0], TEMPS, B, seed), **SMALL)


# ---- lossy_star's 1/beta (the k-section of the targets stage) -----------------------------------
def _exact_inv_beta(qT, pT, alpha):
    """1/beta of Lemma 2 exactly (float64): the root of sum max(m, s pT) = 1 on [0, c], m =
    min(qT, c pT), c = 1/(1 - alpha); 0 where sum m >= 1. The sum is piecewise linear in s with
    breakpoints m / pT: walk them in order."""
    c = 1.0 / (1.0 - alpha)
    m = torch.minimum(qT, c * pT)
    if m.sum() >= 1.0:
        return 0.0
    live = pT > 0
    bp, order = torch.sort(m[live] / pT[live])  # where s pT overtakes m
    pl, ml = pT[live][order], m[live][order]
    base = m.sum() - ml.cumsum(0)  # sum of m over the tokens not yet overtaken
    slope = pl.cumsum(0)  # sum of pT over those overtaken
    for k in range(len(bp)):  # on [bp_k, bp_k+1]: g(s) = base_k + s slope_k
        s = (1.0 - base[k]) / slope[k]
        if s <= (bp[k + 1] if k + 1 < len(bp) else math.inf) and s >= bp[k]:
            return float(s)
    raise AssertionError("no root")


@pytest.mark.parametrize("alpha", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("small", [False, True])
def test_lossy_star_inv_beta_is_the_root(monkeypatch, alpha, small):
    """The k-section's 1/beta (read off the accept kernel's arguments) is the exact root of
    Lemma 2's equation to float32-sum accuracy, for every drafter row incl. the bonus row, with
    the row read in one chunk or in several (SMALL)."""
    real = accept_resample_insert.accept_resample_insert_kernel
    seen = []

    class Spy:
        def __getitem__(self, grid):
            def run(*args, **kw):
                seen.append(args)
                return real[grid](*args, **kw)
            return run

    monkeypatch.setattr(accept_resample_insert, "accept_resample_insert_kernel", Spy())
    q, x, p = make_block(21, T=0.8, vocab=200)
    args = call_args("lossy_star", alpha, 0.8, B, 21)
    tb.launch(q, x, p, **args, **(SMALL if small else {}))
    n_rows = B * (G + 1)
    sst = [a for a in seen[0] if torch.is_tensor(a) and a.dtype == torch.float64
           and a.shape == (n_rows,)]
    assert len(sst) == 1
    qT = torch.softmax(q.double().cpu() / 0.8, -1)
    pT = torch.softmax(p.double().cpu() / 0.8, -1)
    got = sst[0].cpu().view(B, G + 1)
    for b in range(B):
        for j in range(G + 1):
            want = _exact_inv_beta(qT[b, j], pT[b, j], alpha)
            assert abs(float(got[b, j]) - want) <= 1e-6 * max(want, 1.0), (b, j, got[b, j], want)


# ---- the public entry points --------------------------------------------------------------------
def test_public_verify_uses_triton_backend():
    assert "triton" in backends.available(DEVICE)
    q, x, p = make_block(1500)
    kw = dict(rule="opt", alpha=0.5, temperature=0.7, seed=torch.arange(B).to(DEVICE))
    got = sc.verify(q, x, p, backend="triton", **kw)
    want = sc.verify(q, x, p, backend="reference", **kw)
    assert all(torch.equal(a, b) for a, b in zip(got[:4], want[:4]))


@pytest.mark.parametrize("rule", FUSED_RULES)
def test_top_k_top_p_in_the_kernels(rule):
    """Truncation as per-row keep bounds read by every kernel: equal to the reference for mixed
    per-row T, both bonus modes, ties at the boundary (rounded logits), two slices."""
    seed = 900 + sc.RULES.index(rule)
    for k, (trunc, cascade) in enumerate([((5, None), True), ((None, 0.7), False),
                                          ((12, 0.9), True)]):
        q, x, p = make_block(seed + 50 * k, cascade=cascade, T=1.0)
        if k == 2:
            q, p = (q * 2).round() / 2, (p * 2).round() / 2
        top_k, top_p = trunc
        args = call_args(rule, ALPHAS[rule][k % len(ALPHAS[rule])], TEMPS, B, seed)
        got = tb.launch(q, x, p, top_k=top_k, top_p=top_p, **args, **SMALL)
        want = reference.verify(q, x, p, top_k=top_k, top_p=top_p, **args)
        for name, a, b in zip(want._fields[:4], got, want):
            assert torch.equal(a, b), (rule, trunc, name, a, b)
    # as the public API runs it: with the dispatch's keep bounds (here the C++ op's, on CUDA the
    # Triton search's), not the torch ones the backend falls back on when called on its own
    got = backends.verify("triton", q, x, p, top_k=12, top_p=0.9, **args)
    assert torch.equal(got.tokens, want.tokens)


# ---- vLLM's flattened layout: per-request gamma, rows read where they lie ------------------------
def ragged_case(seed, *, dtype=torch.float32, bonus="cascade", gammas=(1, 4, 2), vocab=64):
    _, flat = ragged_inputs(V=vocab, dtype=dtype, seed=seed, T=1.0, gammas=list(gammas))
    if bonus == "verifier":
        flat["bonus_draft_logits"] = None
    return {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in flat.items()}


def assert_ragged_same(flat, rule, alpha, T, seed, **kw):
    """The kernels on the flattened rows equal the reference (each request's own padded block):
    tokens, -1 padding, deferred (False past a request's block), counts; through the public
    ``verify_ragged`` (default slicing) and straight into the backend with two vocabulary slices
    of two chunks each."""
    from speccascade_fast.ragged import verify_ragged

    n = flat["cu_num_draft_tokens"].numel() - 1
    args = dict(rule=rule, alpha=alpha, temperature=torch.tensor(T, dtype=torch.float64),
                seed=torch.arange(n) * 31 + seed, positions=torch.arange(n) * 2**33 + seed)
    args = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    want = verify_ragged(**flat, backend="reference", **args, **kw)
    cu = flat["cu_num_draft_tokens"]
    sliced = tb.verify_ragged(
        *(flat[k] for k in ("draft_logits", "draft_tokens", "target_logits")), cu,
        flat["bonus_draft_logits"], max_gamma=int((cu[1:] - cu[:-1]).max()), rule=rule,
        alpha=checks.alpha_tensor(alpha, (n,), DEVICE), temperature=args["temperature"],
        seed=args["seed"], positions=args["positions"], top_k=kw.get("top_k"),
        top_p=kw.get("top_p"), slice_width=32, block=16)
    for got in (verify_ragged(**flat, backend="triton", **args, **kw), sliced):
        for name, a, b in zip(want._fields[:4], got, want):
            assert a.dtype == b.dtype and a.shape == b.shape, name
            assert torch.equal(a, b), (rule, kw, name, a, b)


@pytest.mark.parametrize("bonus", ["cascade", "verifier"])
@pytest.mark.parametrize("rule", FUSED_RULES)
def test_ragged_layout_matches_reference(rule, bonus):
    """Every rule, both bonus modes, requests of gamma 1, 4 and 2 with T = 0, 0.8 and 1.3 (the
    ragged layout's offsets, the bonus rows read from their own tensor, the rows past a short
    request's block never read)."""
    seed = 1700 + sc.RULES.index(rule) + 50 * (bonus == "verifier")
    a = ALPHAS[rule][-1]
    alpha = None if a is None else torch.tensor([a, a / 2, a], dtype=torch.float64)
    assert_ragged_same(ragged_case(seed, bonus=bonus), rule, alpha, [0.0, 0.8, 1.3], seed)


@pytest.mark.parametrize("rule", ["spec", "diff", "opt", "token_v3", "lossy", "lossy_star", "bild"])
def test_ragged_layout_top_k_top_p_and_mixed_dtypes(rule):
    """Keep bounds per flattened row gathered to the padded rows (the bonus rows' from their own
    tensor); bf16 drafts with an fp32 bonus tensor; a single request; gamma 1 everywhere."""
    seed = 1900 + sc.RULES.index(rule)
    a = ALPHAS[rule][0]
    alpha = None if a is None else torch.tensor([a] * 3, dtype=torch.float64)
    for bonus in ("cascade", "verifier"):
        flat = ragged_case(seed, bonus=bonus, gammas=(3, 1, 2))
        for kw in ({"top_k": 5}, {"top_p": 0.8}, {"top_k": 9, "top_p": 0.9}):
            assert_ragged_same(flat, rule, alpha, [0.7, 0.0, 1.0], seed, **kw)
    flat = ragged_case(seed + 1, dtype=torch.bfloat16)
    flat["bonus_draft_logits"] = flat["bonus_draft_logits"].float()
    assert_ragged_same(flat, rule, alpha, [1.0, 1.0, 0.5], seed)
    assert_ragged_same(ragged_case(seed + 2, gammas=(5,)), rule,
                       None if alpha is None else alpha[:1], [0.9], seed)
    assert_ragged_same(ragged_case(seed + 3, gammas=(1, 1, 1)), rule, alpha, [0.9, 0.0, 2.0],
                       seed)


def test_is_available(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not tb.is_available("cpu")
    assert not tb.is_available(None)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert tb.is_available("cpu")
    assert tb.is_available("cuda") == _CUDA
    assert not tb.is_available("meta")


def test_slice_size():
    assert launch.slice_size(262144) == 8192 and -(-262144 // 8192) == 32
    assert launch.slice_size(151936) == 8192
    assert launch.slice_size(32000) == 1024
    assert launch.slice_size(100) == 128


def test_race_slice():
    """The race (accept + resample + insert) keeps the targets stage's slices once B of their
    rows give every multiprocessor a program; below that it narrows to about 2 programs per
    multiprocessor, never below 1024."""
    race_slice = accept_resample_insert.race_slice
    H100 = 132
    assert race_slice(151936, 1, 8192, H100) == 1024  # 149 programs
    assert race_slice(151936, 2, 8192, H100) == 2048  # 75 per sequence
    assert race_slice(151936, 4, 8192, H100) == 4096
    assert race_slice(151936, 6, 8192, H100) == 4096  # 6 x 19 = 114 < 132
    assert race_slice(151936, 7, 8192, H100) == 8192  # 7 x 19 = 133: the targets' slices
    assert race_slice(262144, 1, 8192, H100) == 1024
    assert race_slice(262144, 8, 8192, H100) == 8192
    assert race_slice(32000, 1, 1024, H100) == 1024  # already 1024
    assert race_slice(100, 1, 128, H100) == 128  # never wider than the targets' slice
    assert race_slice(151936, 1, 8192, 1) == 8192  # the interpreter: one "multiprocessor"
    widths = {race_slice(151936, b, 8192, H100) for b in range(1, 65)}
    assert widths == {1024, 2048, 4096, 8192}  # a runtime argument: no compile per width


@pytest.mark.parametrize("rule", ["spec", "token_v3", "lossy"])
def test_race_slicing_does_not_change_the_outputs(rule):
    """The race over slices narrower or wider than the targets stage's (as ``race_slice`` picks
    at small B on a GPU), in one chunk or several: the same tokens, counts and flags, bit for
    bit, since the winner of the race over the whole row does not depend on the cut (ties to the
    lowest id). Padded and ragged layouts."""
    seed = 2100 + sc.RULES.index(rule)
    q, x, p = make_block(seed, T=1.0, rows=6)
    args = call_args(rule, ALPHAS[rule][0], TEMPS[:3] * 2, 6, seed)
    want = assert_same(q, x, p, args, **SMALL)
    for race, block in ((16, None), (64, 16), (128, None)):
        got = tb.launch(q, x, p, **args, slice_width=64, block=block, race_width=race)
        for name, a, b in zip(want._fields[:4], got, want):
            assert torch.equal(a, b), (rule, race, block, name)
    flat = ragged_case(seed, gammas=(3, 1, 2))
    ragged = dict(max_gamma=3, rule=rule, alpha=checks.alpha_tensor(ALPHAS[rule][0], (3,), DEVICE),
                  temperature=checks.temperature(torch.tensor([0.0, 0.8, 1.3],
                                                              dtype=torch.float64), (3,), DEVICE),
                  seed=torch.tensor([5, 6, 7], device=DEVICE),
                  positions=torch.tensor([0, 9, 2**40], device=DEVICE))
    rows = [flat[k] for k in ("draft_logits", "draft_tokens", "target_logits",
                              "cu_num_draft_tokens", "bonus_draft_logits")]
    want = tb.verify_ragged(*rows, **ragged, slice_width=64)
    got = tb.verify_ragged(*rows, **ragged, slice_width=64, block=16, race_width=32)
    for name, a, b in zip(want._fields[:4], got, want):
        assert torch.equal(a, b), (rule, "ragged", name)


# ---- the drafter's sampler (kernels/sample.py) ---------------------------------------------------
SAMPLE_T = [0.0, 0.3, 1.0, 2.5]  # a greedy row and three sampled ones, in one call


def _sample_case(trial):
    """4 rows of random logits (ties every 3rd trial, masked tokens every 4th), fp32/bf16/fp16,
    and top-k / top-p settings (none, one or both)."""
    g = torch.Generator().manual_seed(trial)
    V = int(torch.randint(2, 300, (), generator=g))
    x = torch.randn(4, V, generator=g) * 3
    if trial % 3 == 0:
        x = (x * 2).round() / 2
    if trial % 4 == 1:
        x[:, ::3] = -math.inf
    x = x.to((torch.float32, torch.bfloat16, torch.float16)[trial % 3])
    top_k = None if trial % 4 == 0 else int(torch.randint(1, V + 1, (), generator=g))
    top_p = None if trial % 4 == 3 else float(torch.rand((), generator=g) * 0.98 + 0.01)
    return x.to(DEVICE), top_k, top_p


@pytest.mark.parametrize("trial", range(24))
def test_sampler_draws_the_reference_tokens(trial):
    """``sample(backend="triton")`` (one slice here) and the kernels on several slices of several
    chunks each (the cross-chunk and cross-slice merges) draw the reference's tokens."""
    x, top_k, top_p = _sample_case(trial)
    T = torch.tensor(SAMPLE_T, dtype=torch.float64, device=DEVICE)
    seed = torch.arange(4, device=DEVICE) * 31 + trial
    pos = torch.arange(4, device=DEVICE) * 7 + 2**40
    kw = dict(temperature=T, top_k=top_k, top_p=top_p, seed=seed, positions=pos)
    want = sc.sample(x, backend="reference", **kw)
    assert torch.equal(sc.sample(x, backend="triton", **kw), want)
    keep = backends.keep_bounds_or_none(x, T, checks.top_k(top_k, x.shape[-1]), top_p)
    assert torch.equal(tb.sample(x, T, seed, pos, keep, slice_width=32, block=16), want)


def test_sampler_on_blocks_strided_rows_and_many_seeds():
    """``[B, n, V]`` (row b's k-th token at positions[b] + k), and one row broadcast to 64 seeds
    (row stride 0): the reference's tokens, and the draws do vary with the seed."""
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(2, 3, 50, generator=g) * 2).to(DEVICE)
    kw = dict(temperature=0.9, seed=torch.tensor([5, 6], device=DEVICE),
              positions=torch.tensor([0, 100], device=DEVICE))
    got = sc.sample(x, backend="triton", **kw)
    assert got.shape == (2, 3) and torch.equal(got, sc.sample(x, backend="reference", **kw))
    row = x[:1, 0].expand(64, 50)
    seeds = torch.arange(64, device=DEVICE)
    got = sc.sample(row, temperature=1.0, seed=seeds, backend="triton")
    assert torch.equal(got, sc.sample(row, temperature=1.0, seed=seeds, backend="reference"))
    assert got.unique().numel() > 3


def test_sampler_greedy_ties_go_to_the_lowest_id():
    """T = 0 with the max at ids 5, 20 (one slice, two chunks) and 40, 90 (other slices): 5."""
    x = torch.zeros(2, 100)
    x[:, [5, 20, 40, 90]] = 1.0
    x[1, 5] = 0.5  # the second row's first max is 20
    x = x.to(DEVICE)
    T = torch.zeros(2, dtype=torch.float64, device=DEVICE)
    s = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    assert tb.sample(x, T, s, s, slice_width=32, block=16).tolist() == [5, 20]


def test_sampler_reads_nothing_on_the_host():
    """The sampler's launches (greedy and sampled rows mixed, with top-k) make no host read,
    so the engine's drafter graphs can capture them."""
    from speccascade_fast.sampling import draw

    from .helpers import NoHostReads

    x = torch.randn(3, 40).to(DEVICE)
    T = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64, device=DEVICE)
    s = torch.arange(3, device=DEVICE)
    want = sc.sample(x, temperature=T, seed=s, positions=s, top_k=5, backend="reference")
    with NoHostReads():
        got = draw(x, T, s, s, top_k=5, backend="triton")
    assert torch.equal(got, want)


def test_sampler_refuses_what_it_cannot_run(monkeypatch):
    x = torch.randn(2, 10, device=DEVICE)
    with pytest.raises(ValueError, match="float32, bfloat16 or float16 logits, got torch.float64"):
        sc.sample(x.double(), backend="triton")
    with pytest.raises(ValueError, match="backend='cuda' is not available here; choose 'auto' or one of "):
        sc.sample(x, backend="cuda")
    if not _CUDA:
        monkeypatch.delenv("TRITON_INTERPRET")
        with pytest.raises(ValueError, match="backend='triton' is not available for cpu"):
            sc.sample(x, backend="triton")


# ---- top-p's keep bound by the search over the logits' bits (kernels/keep_bounds.py) -------------
# several slices of several chunks (the cross-slice sums, ties counted across slices), and the
# default slicing (one slice per row here)
KEEP_SLICINGS = [dict(slice_width=128, block=64), dict(slice_width=64, block=32), {}]


def _searched(x, T, top_k, top_p, slicing):
    return tb.keep_bounds(x.to(DEVICE), T.double().to(DEVICE), top_k, top_p, **slicing).cpu()


@pytest.mark.parametrize("trial", range(16))
def test_keep_bound_search_equals_the_torch_bounds(trial):
    """Bit for bit against the torch bounds (fp64 over a sort) on random rows: ties, masked
    tokens, fp32 / bf16 / fp16, T = 0 rows, with and without top-k first. (fp32 weights summed in
    fp64 could differ only where a cumulative mass lies within ~1e-7 of the target.)"""
    x, T, top_k, top_p = truncation_case(3000 + trial, max_vocab=500)
    top_p = 0.5 if top_p is None else top_p
    want = keep_bounds_torch(x, T, top_k, top_p)
    assert torch.equal(_searched(x, T, top_k, top_p, KEEP_SLICINGS[trial % 3]), want), trial


def _edge_cases():
    """(name, logits, T, top_k, top_p): the boundary among ties, far from the first slice."""
    T = torch.tensor([0.0, 0.3, 1.0, 2.5])
    g = torch.Generator().manual_seed(5)
    flat = torch.zeros(4, 400)
    two = flat.clone()
    two[:, [5, 300]] = 1.0
    zeros = torch.full((4, 300), -5.0)
    zeros[:, ::7], zeros[:, 3::7] = -0.0, 0.0  # -0.0 and +0.0 tie
    x = torch.randn(4, 500, generator=g) * 3
    huge = torch.randn(4, 500, generator=g) * 1e4
    neg = (torch.randn(4, 500, generator=g) * 2 - 20).round().to(torch.bfloat16)
    # 300 consecutive values of each half type (the search stops at one value of the dtype),
    # around 1 and around -1, shuffled over the vocabulary
    perm = torch.randperm(600, generator=g)
    adjacent = {dt: torch.cat([torch.arange(start, start + 300, dtype=torch.int16).view(dt)
                               for start in starts])[perm].repeat(4, 1)
                for dt, starts in ((torch.float16, (0x3C00, -0x4400)),
                                   (torch.bfloat16, (0x3F80, -0x4080)))}
    return [("all tied", flat, T, None, 0.5), ("all tied, top-k", flat, T, 3, 0.5),
            ("two maxima in two slices", two, T, None, 0.3),
            ("two maxima, then the tied rest", two, T, None, 0.99),
            ("signed zeros", zeros, T, None, 0.6), ("tiny top_p", x, T, None, 1e-9),
            ("top_k = 1", x, T, 1, 0.5), ("top_k = V", x, T, 500, 0.7),
            ("huge logits, extreme T", huge, torch.tensor([0.01, 0.3, 1e-3, 100.0]), None, 0.9),
            ("V = 1", x[:, :1], T, None, 0.5), ("V = 2", x[:, :2], T, None, 0.5),
            ("V = 2, top_k", x[:, :2], T, 1, 0.5), ("negative bf16 ties", neg, T, None, 0.7),
            ("negative bf16 ties, top-k", neg, T, 50, 0.7),
            ("adjacent fp16 values", adjacent[torch.float16], T, None, 0.5),
            ("adjacent bf16 values", adjacent[torch.bfloat16], T, None, 0.5)]


@pytest.mark.parametrize("slicing", KEEP_SLICINGS[::2], ids=["128x64", "default"])
def test_keep_bound_search_edge_cases(slicing):
    for name, x, T, top_k, top_p in _edge_cases():
        want = keep_bounds_torch(x, T, top_k, top_p)
        assert torch.equal(_searched(x, T, top_k, top_p, slicing), want), name


@pytest.mark.parametrize("slicing", KEEP_SLICINGS[:2], ids=["128x64", "64x32"])
def test_keep_bound_search_where_only_rounding_decides(slicing):
    """top_p = 1: every implementation keeps the tokens before the cumulative mass reaches 1 by
    rounding, so the kept sets may differ, by tokens of negligible mass only; a row with no
    finite logit keeps everything (the C++ op's convention; the checks refuse such rows)."""
    from speccascade_fast.probs import scaled

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 500, generator=g) * 3
    T = torch.tensor([0.0, 0.3, 1.0, 2.5])
    got = keep_mask(x, _searched(x, T, None, 1.0, slicing))
    want = keep_mask(x, keep_bounds_torch(x, T, None, 1.0))
    law = scaled(x, T.double(), None, None)
    assert float((law * (got ^ want)).sum(-1).max()) < 1e-12
    assert float((law * got).sum(-1).min()) > 1 - 1e-12
    masked = torch.full((2, 300), -math.inf)
    masked[1, 10] = 1.0
    b = _searched(masked, torch.tensor([1.0, 1.0]), None, 0.9, slicing)
    assert b.tolist() == [[-math.inf, 299.0], [1.0, 10.0]]


@pytest.mark.parametrize("top_k", [None, 7])
def test_keep_bound_search_over_two_tensors(top_k):
    """``second=``: the rows of a second tensor (a verification's target rows) searched in the
    same launches give the bounds each tensor gets alone, in order; either part may be empty."""
    x, T, _, _ = truncation_case(11, max_vocab=300)
    y, U = (x[1:] * 1.5).flip(-1), T[1:].flip(0)  # 3 other rows, one greedy
    x, T, y, U = x.to(DEVICE), T.double().to(DEVICE), y.to(DEVICE), U.double().to(DEVICE)
    alone = [tb.keep_bounds(a, t, top_k, 0.7, slice_width=64, block=32) for a, t in ((x, T),
                                                                                   (y, U))]
    both = tb.keep_bounds(x, T, top_k, 0.7, second=(y, U), slice_width=64, block=32)
    assert torch.equal(both, torch.cat(alone))
    only_second = tb.keep_bounds(x[:0], T[:0], top_k, 0.7, second=(y, U), slice_width=64,
                                 block=32)
    assert torch.equal(only_second, alone[1])
    with pytest.raises(ValueError, match="one dtype and vocabulary"):
        tb.keep_bounds(x, T, top_k, 0.7, second=(y.double(), U))


def test_keep_bound_search_reads_nothing_on_the_host():
    """The search's launches (and torch's top-k before them) make no host read: the engine's
    CUDA graphs capture them."""
    from .helpers import NoHostReads

    x, T, _, _ = truncation_case(7, max_vocab=300)
    want = keep_bounds_torch(x, T, 5, 0.8)
    x, T = x.to(DEVICE), T.double().to(DEVICE)
    with NoHostReads():
        got = tb.keep_bounds(x, T, 5, 0.8, slice_width=64, block=32)
    assert torch.equal(got.cpu(), want)


def test_keep_slice():
    # R rows of V / width programs, about 2 per multiprocessor, widths 1024..8192
    assert keep_search.keep_slice(151936, 1, 132) == 1024
    assert keep_search.keep_slice(151936, 6, 132) == 4096
    assert keep_search.keep_slice(151936, 48, 132) == 8192
    assert keep_search.keep_slice(300, 1, 132) == 512  # never wider than the vocabulary's power of two
    assert keep_search.keep_slice(151936, 1, 1) == 8192


# ---- the kernels also compile for a GPU (no GPU needed: Triton compiles to a cubin) ----------------
_COMPILE = r"""
import inspect, os, sys
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from speccascade_fast import kernels as K
from speccascade_fast.kernels.targets import LOSSY_STAR_K, LOSSY_STAR_PASSES
from speccascade_fast.rules import RULES

PTR = dict(q_ptr="*bf16", p_ptr="*bf16", t_ptr="*fp64", alpha_ptr="*fp64", seed_ptr="*i64",
           pos_ptr="*i64", x_ptr="*i64", stf_ptr="*fp32", sti_ptr="*i32", ws_ptr="*i64",
           p2_ptr="*fp32", sst_ptr="*fp64", out_ptr="*fp32", tok_ptr="*i64", nacc_ptr="*i64",
           nem_ptr="*i64", def_ptr="*i1", sq_b="i64", sq_j="i64", sp_b="i64", sp_j="i64",
           kq_ptr="*fp64", kp_ptr="*fp64", qb_ptr="*bf16", sqb="i64", qoff_ptr="*i64",
           poff_ptr="*i64", g_ptr="*i64")


def build(fn, warps, **constexprs):
    params = inspect.signature(fn.fn).parameters
    for n, p in params.items():  # constexpr flags left out: their defaults (the path without)
        if n not in constexprs and p.default is not inspect.Parameter.empty:
            constexprs[n] = p.default
    sig = {n: "constexpr" if n in constexprs else PTR.get(n, "i32") for n in params}
    triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs),
                   target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})


# KEEP: top-k / top-p keep bounds read by every kernel (off, and on for one build of each);
# PER_ROW: the ragged layout (per-request gamma and row offsets, bonus rows in their own tensor)
build(K.targets_kernel, 16, SLICE=8192, BLOCK=8192, NEED_Z1=True, NEED_H=True, NEED_X=False,
      KEEP=False, PER_ROW=False)
build(K.targets_kernel, 4, SLICE=1024, BLOCK=512, NEED_Z1=True, NEED_H=False, NEED_X=True, KEEP=True,
      PER_ROW=True)
for keep, rule, per_row in ((False, "opt_log", False), (True, "token_v1", True),
                            (False, "lossy", True)):
    build(K.targets_sums_kernel, 16, RULE=RULES.index(rule), SLICE=8192, BLOCK=8192, S_PAD=32,
          KEEP=keep, BONUS_ONLY=rule == "lossy", PER_ROW=per_row)
# the divergence budget's cost passes over the sums (float32): TV(pT, qT) (drafter, prefix
# rules), a token rule's cost after eta
build(K.targets_sums_kernel, 16, RULE=RULES.index("chow"), SLICE=8192, BLOCK=8192, S_PAD=32,
      KEEP=True, BONUS_ONLY=False, PER_ROW=False, TV=True)
build(K.targets_sums_kernel, 16, RULE=RULES.index("token_v3"), SLICE=8192, BLOCK=8192, S_PAD=32,
      KEEP=False, BONUS_ONLY=False, PER_ROW=False, COST=True)
PTR["out_ptr"] = "*fp64"
PTR["qb_ptr"] = "*fp32"  # from here on: a ragged bonus tensor of another dtype than the drafts
build(K.targets_kernel, 4, SLICE=1024, BLOCK=512, NEED_Z1=True, NEED_H=False, NEED_X=True, KEEP=True,
      PER_ROW=True)
for per_row in (False, True):
    build(K.targets_lossy_star_kernel, 8, PASSES=LOSSY_STAR_PASSES, K=LOSSY_STAR_K, BLOCK=1024,
          S_PAD=32, KEEP=True, PER_ROW=per_row)
# the divergence budget: lossy_star's cost once 1/beta is known
PTR.update(cost_ptr="*fp64", bud_ptr="*fp64", spent_ptr="*fp64")
build(K.targets_lossy_star_kernel, 8, PASSES=LOSSY_STAR_PASSES, K=LOSSY_STAR_K, BLOCK=1024,
      S_PAD=32, KEEP=True, PER_ROW=False, COST=True)
for i, rule in enumerate(sys.argv[1:]):  # both race geometries: the targets' block, and 1024
    build(K.accept_resample_insert_kernel, 16 if i % 2 else 4, RULE=RULES.index(rule),
          BLOCK=8192 if i % 2 else 1024, S_PAD=32, G_PAD=16, KEEP=i % 2 == 1,
          PER_ROW=i % 3 == 0, BUDGET=i % 2 == 0)
# the drafter's sampler (kernels/sample.py)
PTR.update(x_ptr="*bf16", sx="i64", k_ptr="*fp64", best_ptr="*fp64", arg_ptr="*i32",
           out_ptr="*i64")
for keep in (False, True):
    build(K.sample_slices_kernel, 16, SLICE=8192, BLOCK=8192, KEEP=keep)
PTR["x_ptr"] = "*fp16"
build(K.sample_slices_kernel, 4, SLICE=1024, BLOCK=512, KEEP=True)
build(K.sample_merge_kernel, 4, S_PAD=32)
# top-p's keep-bound search (kernels/keep_bounds.py)
PTR.update(x_ptr="*bf16", x2_ptr="*bf16", sx2="i64", t_ptr="*fp64", tk_ptr="*fp32", tp_ptr="*fp64", mx_ptr="*fp32",
           h_ptr="*fp64", lo_ptr="*i64", acc_ptr="*fp64", tgt_ptr="*fp64", cnt_ptr="*i32",
           val_ptr="*fp32", out_ptr="*fp64")
for fn in (K.keep_max_kernel, K.keep_pass_kernel, K.keep_ties_kernel, K.keep_final_kernel):
    build(fn, 4, BLOCK=256)
print("compiled")
"""


def test_kernels_compile_for_sm90():
    """Compiles (without running) the targets and accept + resample + insert kernels, the
    drafter's sampler and the keep-bound search for sm_90 in a fresh process, so that a
    CPU-only CI still catches code the interpreter accepts but the compiler does not."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    rules = ["spec", "opt_log", "token_v2", "lossy", "lossy_star", "bild"]
    res = subprocess.run([sys.executable, "-c", _COMPILE, *rules], env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0 and "compiled" in res.stdout, res.stderr[-4000:]
