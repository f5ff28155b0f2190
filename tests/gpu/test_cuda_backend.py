"""The CUDA backend (csrc/cuda/verify.cu) on a GPU, against the reference backend.

* every rule, T in {0, 0.7, 1}, fp32 / bf16 / fp16 logits, V = 151,936 (Qwen), gamma = 5,
  B in {1, 8}: tokens, num_accepted and deferred equal the reference's (float64, same GPU), up to
  genuine floating-point near-ties (:func:`tests.helpers.assert_same_up_to_near_ties`);
* V = 262,144 (B in {1, 8}), small and odd vocabularies (one slice, a partial last slice),
  bonus="verifier", masked (-inf) tokens, per-request mixed temperatures including greedy rows;
* top-k / top-p (keep bounds) for the rules whose kernels form qT / pT differently;
* captured in a CUDA graph and replayed: the eager tokens, then the reference's for new inputs.
"""

import pytest
import torch

import speccascade_fast as sc
from speccascade_fast.backends import reference

from .. import helpers
from ..helpers import assert_same_up_to_near_ties, graph_replay_check, verify_args

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DEV = "cuda"
GAMMA = 5
ALPHA = {
    "spec": None, "drafter": None, "chow": 0.3, "chow_log": 1.0, "diff": 0.05, "diff_log": 0.2,
    "opt": 0.5, "opt_log": 0.5, "token_v1": 0.05, "token_v2": 0.1, "token_v3": 0.3,
    "lossy": 0.3, "lossy_star": 0.3, "bild": 1.5,
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def llm_block(B, V, seed, *, T=0.7, **kw):
    """:func:`tests.helpers.llm_block` on the GPU, gamma = GAMMA."""
    return helpers.llm_block(B, V, seed, gamma=GAMMA, T=T, device=DEV, **kw)


def args_for(rule, T, B, seed):
    return verify_args(rule, ALPHA[rule], T, B, seed, DEV)


def check(q, x, p, args):
    from speccascade_fast.backends import cuda

    assert cuda.is_available(DEV), "the CUDA extension is not built (setup.py with a CUDA torch)"
    got = cuda.verify(q, x, p, top_k=None, top_p=None, **args)
    torch.cuda.synchronize()
    want = reference.verify(q, x, p, top_k=None, top_p=None, **args)
    assert_same_up_to_near_ties(got, want, q, x, p, args, who="cuda", trials=8)
    return got


def test_auto_offers_cuda_for_cuda_tensors():
    from speccascade_fast import backends

    assert "cuda" in backends.available(torch.device(DEV))
    assert "cuda" not in backends.available(torch.device("cpu"))


@pytest.mark.parametrize("B", [1, 8])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("T", [0.0, 0.7, 1.0])
@pytest.mark.parametrize("rule", sc.RULES)
def test_qwen_vocabulary_matches_reference(rule, T, dtype, B):
    seed = 100 * sc.RULES.index(rule) + 10 * list(DTYPES).index(dtype) + B
    q, x, p = llm_block(B, 151936, seed, T=T, dtype=DTYPES[dtype])
    check(q, x, p, args_for(rule, T, B, seed))


@pytest.mark.parametrize("B", [1, 8])
@pytest.mark.parametrize("T", [0.0, 0.7, 1.0])
@pytest.mark.parametrize("rule", sc.RULES)
def test_largest_vocabulary(rule, T, B):
    seed = 7 + sc.RULES.index(rule) + B
    q, x, p = llm_block(B, 262144, seed, T=T, dtype=torch.bfloat16)
    check(q, x, p, args_for(rule, T, B, seed))


@pytest.mark.parametrize("V", [1, 5, 1000, 32000, 50257])
@pytest.mark.parametrize("rule", sc.RULES)
def test_small_and_odd_vocabularies_with_masked_tokens(rule, V):
    q, x, p = llm_block(3, V, V + 1, T=1.0, dtype=torch.float32, mask=V > 1)
    check(q, x, p, args_for(rule, 1.0, 3, V))


@pytest.mark.parametrize("rule", sc.RULES)
def test_verifier_bonus_mixed_temperatures_fp16(rule):
    B = 8
    q, x, p = llm_block(B, 151936, 99, T=1.0, cascade=False, dtype=torch.float16)
    check(q, x, p, args_for(rule, [0.0, 0.5, 0.7, 1.0, 1.0, 1.3, 0.0, 2.0], B, 99))


@pytest.mark.parametrize("rule", ["spec", "opt", "token_v3", "lossy_star", "bild"])
def test_public_api_and_mixed_dtypes(rule):
    B = 4
    q, x, p = llm_block(B, 151936, 5, T=0.7, dtype=torch.float32)
    p = p.to(torch.bfloat16)
    args = args_for(rule, 0.7, B, 5)
    got = sc.verify(q, x, p, backend="cuda", **args)
    want = reference.verify(q, x, p, top_k=None, top_p=None, **args)
    assert_same_up_to_near_ties(got, want, q, x, p, args, who="cuda", trials=8)


@pytest.mark.parametrize("trunc", [(50, None), (None, 0.9), (50, 0.9)])
@pytest.mark.parametrize("rule", ["spec", "chow", "opt", "token_v3", "lossy", "lossy_star",
                                  "bild"])
def test_qwen_vocabulary_top_k_top_p(rule, trunc):
    """Keep bounds computed on the GPU by the dispatch (top-k by torch, top-p by the Triton
    search when triton imports), read by every kernel; greedy rows mixed in (they keep every
    token)."""
    from speccascade_fast import backends

    B, (top_k, top_p) = 4, trunc
    q, x, p = llm_block(B, 151936, 77 + sc.RULES.index(rule), T=0.8, dtype=torch.bfloat16)
    args = args_for(rule, [0.0, 0.8, 1.0, 1.3], B, 77)
    got = backends.verify("cuda", q, x, p, top_k=top_k, top_p=top_p, **args)
    want = reference.verify(q, x, p, top_k=top_k, top_p=top_p, **args)
    bad = [name for name, a, b in zip(want._fields[:4], got, want) if not torch.equal(a, b)]
    assert not bad, (rule, trunc, bad)


@pytest.mark.parametrize("rule", ["spec", "opt", "token_v3", "lossy_star"])
def test_cuda_graph_capture_and_replay(rule):
    from speccascade_fast.backends import cuda

    B = 8
    q, x, p = llm_block(B, 151936, 7)
    args = args_for(rule, 0.7, B, 7)

    def run():
        return cuda.verify(q, x, p, top_k=None, top_p=None, **args)

    graph_replay_check(run, q, x, p, args, llm_block(B, 151936, 8), reference.verify,
                       who="cuda", trials=8)


# ---- the divergence budget (docs/semantics.md §9) ---------------------------------------------------
@pytest.mark.parametrize("cascade", [True, False], ids=["cascade", "verifier"])
@pytest.mark.parametrize("rule", ["spec", "token_v3", "chow", "opt", "lossy", "lossy_star",
                                  "drafter"])
def test_divergence_budget_matches_reference(rule, cascade):
    """The cases of tests/test_triton_budget.py (budgets 0 / a third / two thirds / inf per
    row, scan ties left out by name) on the real CUDA kernels, T = 0 and 1, with top-p."""
    from speccascade_fast.backends import cuda

    from ..test_triton_budget import RULES, check

    def run(q, x, p, args, top_p, budget):
        return cuda.verify(q, x, p, **args, top_k=None, top_p=top_p, budget=budget)

    seed = 10 * list(RULES).index(rule) + int(cascade)
    for T in (0.0, 1.0):
        check(rule, T, cascade, seed + 3 * int(T), run=run, device=DEV)
    check(rule, 1.0, cascade, 300 + seed, top_p=0.8, run=run, device=DEV)


@pytest.mark.parametrize("rule", ["token_v3", "lossy", "lossy_star"])
def test_divergence_budget_in_a_cuda_graph(rule):
    """A budget call at the Qwen vocabulary, captured and replayed (the engine's use): the
    replay equals the eager call, spent included, and every path spends at most its budget."""
    from speccascade_fast.backends import cuda

    B = 8
    q, x, p = llm_block(B, 151936, 11)
    args = args_for(rule, 0.7, B, 11)
    budget = torch.linspace(0.0, 0.5, B, dtype=torch.float64, device=DEV)

    def run():
        return cuda.verify(q, x, p, top_k=None, top_p=None, **args, budget=budget)

    eager = run()
    graph, static_out = helpers.capture(run)
    graph.replay()
    torch.cuda.synchronize()
    for name, a, b in zip(eager._fields, static_out, eager):
        assert torch.equal(a, b), name
    emitted = torch.arange(GAMMA + 1, device=DEV)[None] <= eager.num_accepted[:, None]
    spent = torch.where(emitted, eager.spent, 0.0).sum(1)
    assert bool((spent <= budget + 1e-6).all()), (spent, budget)
