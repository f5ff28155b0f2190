"""The Triton backend on a GPU: real vocabularies against the reference, and CUDA graphs.

* V = 151,936 (Qwen), gamma = 5, B in {1, 8}, bf16 logits, every rule, T in {0, 0.8}: tokens,
  num_accepted and deferred equal the reference's (float64, on the same GPU), up to genuine
  floating-point near-ties (a row may differ only if a 1e-6 relative perturbation of the logits
  changes the reference's own output there);
* the whole backend captured in a CUDA graph and replayed gives the eager tokens, and, after new
  inputs are copied into the captured buffers, the reference's tokens for those inputs;
* the race over narrower slices at small B (``race_slice``) emits the tokens of the race over
  the targets stage's slices, bit for bit, at V = 151,936 and 262,144;
* changing B does not compile new kernel variants (beyond the race's two geometries);
* the drafter's sampler (`sample` on CUDA runs kernels/sample.py): the reference's tokens at
  V = 151,936, and inside a CUDA graph capture;
* top-p's keep bound by the Triton search (kernels/keep_bounds.py): the torch bounds at
  V = 151,936 up to rounding at the boundary, eager and replayed from a CUDA graph.

vLLM's flattened layout (`verify_ragged`) on the GPU is tested in test_ragged_gpu.py.
"""

import pytest
import torch

import speccascade_fast as sc
from speccascade_fast import backends
from speccascade_fast.backends import reference

from .. import helpers
from ..helpers import assert_same_up_to_near_ties, capture, graph_replay_check, verify_args
from .helpers import ALPHA, DEV, GAMMA, V, llm_block

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def args_for(rule, T, B, seed):
    return verify_args(rule, ALPHA[rule], T, B, seed, DEV)


@pytest.mark.parametrize("B", [1, 8])
@pytest.mark.parametrize("T", [0.0, 0.8])
@pytest.mark.parametrize("rule", sc.RULES)
def test_qwen_vocabulary_matches_reference(rule, T, B):
    from speccascade_fast.backends import triton as tb

    seed = 10 * sc.RULES.index(rule) + B
    q, x, p = llm_block(B, seed, T=T)
    args = args_for(rule, T, B, seed)
    got = tb.verify(q, x, p, top_k=None, top_p=None, **args)
    want = reference.verify(q, x, p, top_k=None, top_p=None, **args)
    assert_same_up_to_near_ties(got, want, q, x, p, args, trials=8)


@pytest.mark.parametrize("trunc", [(50, None), (None, 0.9), (50, 0.9)])
@pytest.mark.parametrize("rule", ["spec", "opt", "token_v3", "lossy", "lossy_star", "bild"])
def test_qwen_vocabulary_top_k_top_p(rule, trunc):
    """Keep bounds computed on the GPU by the dispatch (top-k by torch, top-p by the Triton
    search), read by every kernel."""
    B, (top_k, top_p) = 4, trunc
    q, x, p = llm_block(B, 77 + sc.RULES.index(rule), T=0.8)
    args = args_for(rule, [0.0, 0.8, 1.0, 1.3], B, 77)
    got = backends.verify("triton", q, x, p, top_k=top_k, top_p=top_p, **args)
    want = reference.verify(q, x, p, top_k=top_k, top_p=top_p, **args)
    bad = [name for name, a, b in zip(want._fields[:4], got, want) if not torch.equal(a, b)]
    assert not bad, (rule, trunc, bad)


@pytest.mark.parametrize("rule", ["spec", "opt", "token_v3", "lossy", "bild"])
def test_verifier_bonus_mixed_temperatures_fp16(rule):
    B = 8
    q, x, p = llm_block(B, 99, T=1.0, cascade=False, dtype=torch.float16)
    args = args_for(rule, [0.0, 0.5, 0.8, 1.0, 1.0, 1.3, 0.0, 2.0], B, 99)
    got = sc.verify(q, x, p, backend="triton", **{k: v for k, v in args.items()})
    want = reference.verify(q, x, p, top_k=None, top_p=None, **args)
    assert_same_up_to_near_ties(got, want, q, x, p, args, trials=8)


@pytest.mark.parametrize("rule", ["spec", "opt", "token_v3"])
def test_cuda_graph_capture_and_replay(rule):
    from speccascade_fast.backends import triton as tb

    B = 8
    q, x, p = llm_block(B, 7)
    args = args_for(rule, 0.8, B, 7)

    def run():
        return tb.verify(q, x, p, top_k=None, top_p=None, **args)

    graph_replay_check(run, q, x, p, args, llm_block(B, 8), reference.verify, trials=8)


@pytest.mark.parametrize("vocab", [151936, 262144])
@pytest.mark.parametrize("rule", ["spec", "opt", "token_v3", "lossy"])
def test_narrow_race_slices_emit_the_wide_race_tokens(rule, vocab):
    """B = 1 and 2 race over narrower slices than the targets stage's (race_slice) on this GPU:
    the same outputs as the race over the targets stage's slices, bit for bit, over many seeds
    (the winner does not depend on the cut), and the widths really differ here (>= 8 SMs)."""
    from speccascade_fast.backends import triton as tb
    from speccascade_fast.kernels.accept_resample_insert import race_slice
    from speccascade_fast.kernels.launch import slice_size, sm_count

    wide = slice_size(vocab)
    for B in (1, 2):
        assert race_slice(vocab, B, wide, sm_count(torch.device(DEV))) < wide
        q, x, p = helpers.llm_block(B, vocab, 300 + B, gamma=GAMMA, device=DEV, T=1.0)
        for seed in range(16):
            args = args_for(rule, [1.0, 0.8][:B], B, seed)
            got = tb.launch(q, x, p, **args)
            want = tb.launch(q, x, p, **args, race_width=wide)
            bad = [name for name, a, b in zip(want._fields[:4], got, want) if not torch.equal(a, b)]
            assert not bad, (rule, vocab, B, seed, bad)


def test_no_recompilation_per_batch_size_or_gamma():
    from speccascade_fast import kernels
    from speccascade_fast.backends import triton as tb
    from speccascade_fast.kernels.accept_resample_insert import race_slice
    from speccascade_fast.kernels.launch import slice_size, sm_count

    fns = [kernels.targets_kernel, kernels.targets_sums_kernel,
           kernels.accept_resample_insert_kernel]
    if not all(hasattr(f, "device_caches") for f in fns):
        pytest.skip("this triton version keeps its compiled kernels elsewhere")

    def n_compiled():
        return sum(len(c[0]) for f in fns for c in f.device_caches.values())

    # B = 1 (per-request strides of 1 or 0) is no special case, nor is any gamma within a
    # power-of-two bucket of gamma + 1 (the constexpr G_PAD: gamma = 2 and 3 both give 4); the
    # race has two geometries (race_slice: the targets stage's slices, or narrower ones in
    # chunks of 1024 at small B, their width a runtime argument), each compiled once
    counts, geometries, seen = [], [], set()
    wide = slice_size(V)
    for B, gamma in ((1, 3), (8, 3), (3, 2), (5, 3), (1, 2)):
        q, x, p = llm_block(B, 40 + B, gamma=gamma)
        tb.verify(q, x, p, top_k=None, top_p=None, **args_for("token_v3", 0.8, B, 3))
        counts.append(n_compiled())
        seen.add(race_slice(V, B, wide, sm_count(q.device)) == wide)
        geometries.append(len(seen))
    assert [c - counts[0] for c in counts] == [g - 1 for g in geometries], (counts, geometries)


# ---- the drafter's sampler (kernels/sample.py) --------------------------------------------------
SAMPLE_T = [0.0, 0.5, 0.8, 1.0, 1.0, 1.3, 2.0, 0.7]


@pytest.mark.parametrize("trunc", [(None, None), (50, None), (None, 0.9), (20, 0.8)])
def test_qwen_vocabulary_sampler(monkeypatch, trunc):
    """``sample(backend="auto")`` on CUDA runs the Triton sampler and draws the reference's
    tokens at V = 151,936 (bf16, greedy and sampled rows mixed)."""
    from speccascade_fast.backends import triton as tb

    x = llm_block(8, 5)[0][:, 0]
    calls, real = [], tb.sample
    monkeypatch.setattr(tb, "sample", lambda *a, **k: calls.append(1) or real(*a, **k))
    top_k, top_p = trunc
    kw = dict(temperature=torch.tensor(SAMPLE_T, device=DEV), top_k=top_k, top_p=top_p,
              seed=torch.arange(8, device=DEV) * 3, positions=torch.arange(8, device=DEV) + 100)
    got = sc.sample(x, **kw)
    assert calls == [1]
    assert torch.equal(got, sc.sample(x, backend="reference", **kw))


@pytest.mark.parametrize("top_p", [None, 0.9])
def test_sampler_in_a_cuda_graph(top_p):
    """The sampler (with top-p: keep bounds from the Triton search inside the capture)
    captured once, replayed on new logits and positions: the reference's tokens."""
    from speccascade_fast.sampling import draw

    x = llm_block(4, 6)[0][:, 0].contiguous()
    T = torch.tensor([0.0, 0.8, 1.0, 1.5], dtype=torch.float64, device=DEV)
    seed = torch.arange(4, device=DEV) + 9
    pos = torch.arange(4, device=DEV) + 10

    def run():
        return draw(x, T, seed, pos, None, top_p, greedy=False)

    eager = run()
    graph, out = capture(run)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)
    x.copy_(llm_block(4, 7)[0][:, 0])
    pos.add_(3)
    graph.replay()
    torch.cuda.synchronize()
    want = sc.sample(x, temperature=T, top_p=top_p, seed=seed, positions=pos, backend="reference")
    assert torch.equal(out, want)


def assert_same_kept_sets(x, T, top_k, top_p, got, want):
    """The kept sets of two bounds differ at most by tokens of total mass <= 1e-6 (relative to
    the truncated law): the search sums fp32 weights in fp64 and the torch bounds fp64 ones, so
    a boundary token whose cumulative mass lies within rounding of top_p may go either way."""
    from speccascade_fast.probs import scaled
    from speccascade_fast.truncation import keep_mask

    law = scaled(x, T, top_k, None)  # after top-k, before top-p
    diff = keep_mask(x, got) ^ keep_mask(x, want)
    assert float((law * diff).sum(-1).max()) <= 1e-6


@pytest.mark.parametrize("top_k,top_p", [(None, 0.9), (None, 0.5), (50, 0.95), (None, 0.999)])
@pytest.mark.parametrize("rows", [1, 6, 48])
def test_keep_bound_search_at_the_qwen_vocabulary(rows, top_k, top_p):
    """On CUDA ``backends.keep_bounds`` takes top-p's bound from the Triton search
    (kernels/keep_bounds.py, default slicing): the torch bounds (fp64 over one full sort per row)
    up to rounding at the boundary, for bf16 and fp32 LLM-like rows at V = 151,936, greedy rows
    included; how many rows are bit for bit equal is printed."""
    from speccascade_fast import truncation

    q = llm_block(-(-rows // 6), 11)[0].reshape(-1, V)[:rows]
    T = torch.linspace(0.0, 1.5, rows, dtype=torch.float64, device=DEV)
    for x in (q, q.float()):
        assert backends.resolve("auto", x.device, "keep_bounds", logits=(x,),
                                top_p=top_p) == "triton"
        want = truncation.keep_bounds_torch(x, T, top_k, top_p)
        got = backends.keep_bounds(x, T, top_k, top_p)
        assert_same_kept_sets(x, T, top_k, top_p, got, want)
        print(f"{x.dtype}: {int((got == want).all(-1).sum())} of {rows} rows bit for bit")


def test_keep_bound_search_over_a_blocks_draft_and_target_rows():
    """``keep_bounds_pair`` (what the dispatch computes for a fused verification) searches the
    draft and target rows of a block in one go on CUDA: each part's bounds are those of its own
    search."""
    q, _, p = llm_block(2, 14)
    T = torch.tensor([0.7, 1.2], dtype=torch.float64, device=DEV)[:, None]
    kq, kp = backends.keep_bounds_pair(q, T, p, T, 20, 0.9)
    assert torch.equal(kq, backends.keep_bounds(q, T, 20, 0.9))
    assert torch.equal(kp, backends.keep_bounds(p, T, 20, 0.9))


def test_keep_bound_search_in_a_cuda_graph():
    """The search (7 launches for these bf16 logits, and torch's top-k) captured once, replayed on new logits: the
    eager search's bounds of the new logits (the torch ones up to rounding)."""
    from speccascade_fast import truncation

    x = llm_block(1, 12)[0].reshape(-1, V).contiguous()
    T = torch.full((x.shape[0],), 0.8, dtype=torch.float64, device=DEV)
    graph, out = capture(lambda: backends.keep_bounds(x, T, 40, 0.9))
    x.copy_(llm_block(1, 13)[0].reshape(-1, V))
    graph.replay()
    torch.cuda.synchronize()
    assert_same_kept_sets(x, T, 40, 0.9, out, truncation.keep_bounds_torch(x, T, 40, 0.9))
    assert torch.equal(out, backends.keep_bounds(x, T, 40, 0.9))  # the eager search
