"""The CUDA C++ kernels (csrc/cuda/*.cu) and their torch bindings, run without a GPU on the CUDA
emulator (csrc/emu/README.md; built by tests/cuda_emu.py) against the reference backend.

The emulator runs every CUDA thread of a block as a fiber, one after another up to each barrier
(a legal and harsh schedule), and fails a launch where CUDA's behaviour is undefined (threads at
different barriers, a deadlock, a full-mask shuffle missing lanes, a bad launch configuration);
shared memory starts as garbage in every block. The first group of tests shows that it catches
each of these in small kernels written to have them (csrc/emu/selftest.cu). The rest run the
project's own kernels through the dispatch to :mod:`speccascade_fast.backends.cuda` (its
``_cuda_ops`` pointed at the emulator's ops, CPU tensors): the same checks as
tests/gpu/test_cuda_backend.py and tests/gpu/test_ragged_gpu.py, on vocabularies of one to three
slices. What a GPU adds beyond
this is its memory model, its own expf / log (last-bit differences: tokens may differ only at
floating-point near-ties, as for every backend), capture in a CUDA graph, and speed.
"""
from __future__ import annotations

import types

import pytest
import torch

import speccascade_fast as sc
from speccascade_fast import backends, checks
from speccascade_fast.backends import cuda, reference
from speccascade_fast.ragged import verify_ragged
from speccascade_fast.rules import FUSED_RULES  # the rules the kernels implement

from . import cuda_emu, helpers
from .helpers import ALPHAS, assert_same_up_to_near_ties, ragged_inputs, verify_args

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.fixture(scope="module")
def emu():
    return cuda_emu.module()


@pytest.fixture
def backend(monkeypatch, emu):
    """The dispatch's ``verify`` / ``verify_ragged`` on the cuda backend (as the public API and
    the engine call it: keep bounds computed by the dispatch, float64 calls to the reference),
    speccascade_fast.backends.cuda running the emulator's ops for CPU tensors."""
    monkeypatch.setattr(cuda, "_cuda_ops", lambda target_logits: cuda_emu.ops())

    def verify(*args, **kw):
        return backends.verify("cuda", *args, **kw)

    def verify_ragged(*args, top_k=None, top_p=None, **kw):
        return backends.verify_ragged("cuda", *args, top_k=top_k, top_p=top_p, **kw)

    return types.SimpleNamespace(verify=verify, verify_ragged=verify_ragged)


# ---- the emulator catches what it promises -------------------------------------------------------
SELFTESTS = {
    # case: (error message fragment or None, outputs[:4])
    "block_sum": (None, [8256] * 4),
    "block_sum_no_barrier": (None, [1 - 127] * 4),  # thread 0 sums its own 1 and 127 garbage -1s
    "warp_sums": (None, [528] * 8),
    "divergent_barriers": ("different __syncthreads calls", None),
    "shuffle_against_barrier": ("deadlock", None),
    "partial_warp_shuffle": ("a lane exited while its warp waits in a full-mask shuffle", None),
    "too_many_threads": ("invalid launch configuration", None),
}


@pytest.mark.parametrize("case", list(SELFTESTS))
def test_emulator_exposes_what_a_gpu_would_get_wrong(emu, case):
    error, values = SELFTESTS[case]
    got_error, out = emu.selftest(case)
    if error is None:
        assert got_error == ""
        assert out[: len(values)] == values
    else:
        assert error in got_error


def test_rewrite_leaves_no_cuda_syntax():
    """Every launch and shared variable of the shipped kernels is rewritten, and nothing else:
    the rewritten text differs from the source only on those lines."""
    for cu in cuda_emu.KERNELS:
        src = cu.read_text()
        out = cuda_emu.translate(src, cu).split("\n", 1)[1]
        changed = [(a, b) for a, b in zip(src.splitlines(), out.splitlines()) if a != b]
        assert len(src.splitlines()) == len(out.splitlines())
        assert changed and all("__shared__" in a or "<<<" in a for a, _ in changed)
    with pytest.raises(RuntimeError, match="no kernel launch"):
        cuda_emu.translate("int f();", cuda_emu.KERNELS[0])


# ---- verify_padded ---------------------------------------------------------------------------------
def llm_block(seed, *, B=3, gamma=3, V=2100, dtype=torch.float32, **kw):
    """:func:`tests.helpers.llm_block` on the CPU. V = 2100: three vocabulary slices of 1024, the
    last one partial."""
    return helpers.llm_block(B, V, seed, gamma=gamma, dtype=dtype, **kw)


def check(backend, q, x, p, args, **trunc):
    kw = dict(top_k=trunc.get("top_k"), top_p=trunc.get("top_p"))
    got = backend.verify(q, x, p, **kw, **args)
    if trunc:  # near_tie() perturbs untruncated calls only: truncated ones must be equal
        want = reference.verify(q, x, p, **kw, **args)
        for name, a, b in zip(want._fields[:4], got, want):
            assert torch.equal(a, b), (name, a, b)
    else:
        want = reference.verify(q, x, p, top_k=None, top_p=None, **args)
        assert_same_up_to_near_ties(got, want, q, x, p, args, who="cuda (emulated)", trials=8)
    for a, b in zip(got[:4], want[:4]):
        assert a.dtype == b.dtype and a.shape == b.shape
    return got


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("T", [0.0, 0.8])
@pytest.mark.parametrize("rule", FUSED_RULES)
def test_matches_reference(backend, rule, T, dtype):
    seed = 100 * sc.RULES.index(rule) + 10 * (T > 0) + (dtype == "bf16")
    q, x, p = llm_block(seed, T=T, dtype=DTYPES[dtype])
    check(backend, q, x, p, verify_args(rule, ALPHAS[rule][-1], T, 3, seed, "cpu"))


@pytest.mark.parametrize("rule", FUSED_RULES)
def test_verifier_bonus_mixed_temperatures_masked_fp16(backend, rule):
    """bonus="verifier" (gamma draft rows), a greedy row among sampled ones, masked tokens."""
    seed = 2000 + sc.RULES.index(rule)
    q, x, p = llm_block(seed, B=4, T=0.9, dtype=torch.float16, cascade=False, mask=True)
    check(backend, q, x, p, verify_args(rule, ALPHAS[rule][0], [0.0, 0.5, 1.0, 1.6], 4, seed,
                                        "cpu"))


@pytest.mark.parametrize("V", [1, 5, 1024, 1025])
@pytest.mark.parametrize("rule", ["spec", "chow", "opt", "token_v1", "lossy", "lossy_star", "bild"])
def test_vocabulary_edges(backend, rule, V):
    """One token, a vocabulary smaller than a warp, exactly one slice, one slice and one token."""
    seed = 3000 + 10 * sc.RULES.index(rule) + V
    q, x, p = llm_block(seed, B=2, gamma=2, V=V, T=1.0)
    check(backend, q, x, p, verify_args(rule, ALPHAS[rule][-1], [0.0, 1.0], 2, seed, "cpu"))


@pytest.mark.parametrize("trunc", [{"top_k": 20}, {"top_p": 0.9}, {"top_k": 50, "top_p": 0.8}],
                         ids=["top_k", "top_p", "both"])
@pytest.mark.parametrize("rule", FUSED_RULES)
def test_top_k_top_p(backend, rule, trunc):
    """Keep bounds read wherever the kernels form qT / pT (every rule, both truncations)."""
    seed = 4000 + sc.RULES.index(rule)
    q, x, p = llm_block(seed, T=0.9, dtype=torch.bfloat16)
    check(backend, q, x, p, verify_args(rule, ALPHAS[rule][0], [0.9, 0.0, 1.3], 3, seed, "cpu"),
          **trunc)


def test_fp64_goes_to_the_reference_and_errors_are_clear(backend):
    q, x, p = llm_block(5, B=2, V=64)
    args = verify_args("spec", None, 0.8, 2, 5, "cpu")
    got = backend.verify(q.double(), x, p.double(), top_k=None, top_p=None, **args)
    want = reference.verify(q.double(), x, p.double(), top_k=None, top_p=None, **args)
    assert all(torch.equal(a, b) for a, b in zip(got[:4], want[:4]))
    ops = cuda_emu.ops()
    rest = (args["seed"], args["positions"], args["temperature"], args["alpha"])
    with pytest.raises(RuntimeError, match="target_logits must be"):
        ops.verify_padded(q, x, p[:, :2], *rest, 0, None, None)
    with pytest.raises(RuntimeError, match="rule id 14 out of range"):
        ops.verify_padded(q, x, p, *rest, 14, None, None)


# ---- verify_ragged -----------------------------------------------------------------------------------
def ragged_args(n, rule, alpha, T, seed):
    return dict(rule=rule, alpha=alpha, temperature=torch.tensor(T, dtype=torch.float64),
                seed=torch.arange(n) * 31 + seed, positions=torch.arange(n) * 2**33 + seed)


def ragged_emulated(backend, flat, args, **extra):
    """The dispatch's ``verify_ragged`` on the cuda backend for the flattened inputs ``flat``,
    the public call's ``args`` normalised as :func:`speccascade_fast.verify_ragged` hands them
    on."""
    n = flat["cu_num_draft_tokens"].numel() - 1
    kw = dict(args, alpha=checks.alpha_tensor(args["alpha"], (n,), "cpu"),
              temperature=checks.temperature(args["temperature"], (n,), "cpu"))
    return backend.verify_ragged(*flat.values(), **kw, **extra)


@pytest.mark.parametrize("bonus", ["cascade", "verifier"])
@pytest.mark.parametrize("rule", FUSED_RULES)
def test_ragged_matches_reference(backend, rule, bonus):
    """vLLM's flattened rows (requests of gamma 1, 4 and 2, mixed T): the public
    ``verify_ragged`` routed to the cuda backend's ops equals the reference, output width from
    ``cu``; with ``max_spec_len`` (what a CUDA graph captures: nothing read on the host) the
    same rows, padded with -1 to the wider width, even with padding rows after ``cu[B]``."""
    seed = 5000 + sc.RULES.index(rule) + 50 * (bonus == "verifier")
    _, flat = ragged_inputs(V=1500, seed=seed, gammas=[1, 4, 2])
    if bonus == "verifier":
        flat["bonus_draft_logits"] = None
    a = ALPHAS[rule][-1]
    alpha = None if a is None else torch.tensor([a, a / 2, a], dtype=torch.float64)
    args = ragged_args(3, rule, alpha, [0.0, 0.8, 1.3], seed)
    want = verify_ragged(**flat, backend="reference", **args)
    got = ragged_emulated(backend, flat, args)
    for name, x, y in zip(want._fields[:4], got, want):
        assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y), (name, x, y)
    padded = dict(flat)  # two padding rows after cu[B]: never read
    padded["draft_logits"] = torch.cat([flat["draft_logits"], torch.full((2, 1500), float("nan"))])
    padded["draft_tokens"] = torch.cat([flat["draft_tokens"], torch.tensor([-7, 10**9])])
    padded["target_logits"] = torch.cat([flat["target_logits"],
                                         torch.full((2, 1500), float("nan"))])
    wide = ragged_emulated(backend, padded, args, max_spec_len=6)
    assert wide.tokens.shape == (3, 7)
    assert torch.equal(wide.tokens[:, :5], want.tokens) and (wide.tokens[:, 5:] == -1).all()
    assert torch.equal(wide.deferred[:, :5], want.deferred) and not wide.deferred[:, 5:].any()
    assert torch.equal(wide.num_accepted, want.num_accepted)


@pytest.mark.parametrize("rule", ["spec", "diff", "opt", "token_v3", "lossy", "lossy_star", "bild"])
def test_ragged_top_k_top_p_and_mixed_dtypes(backend, rule):
    """Keep bounds per flattened row (the bonus rows' from their own tensor); bf16 drafts with an
    fp32 bonus tensor."""
    seed = 5500 + sc.RULES.index(rule)
    a = ALPHAS[rule][0]
    alpha = None if a is None else torch.tensor([a] * 3, dtype=torch.float64)
    for bonus in ("cascade", "verifier"):
        _, flat = ragged_inputs(V=1100, seed=seed, gammas=[3, 1, 2])
        if bonus == "verifier":
            flat["bonus_draft_logits"] = None
        for trunc in ({"top_k": 5}, {"top_p": 0.8}):
            args = ragged_args(3, rule, alpha, [0.7, 0.0, 1.0], seed)
            want = verify_ragged(**flat, backend="reference", **args, **trunc)
            got = ragged_emulated(backend, flat, args, **trunc)
            assert all(torch.equal(x, y) for x, y in zip(got[:4], want[:4])), (bonus, trunc)
    _, flat = ragged_inputs(V=1100, seed=seed + 1, dtype=torch.bfloat16, gammas=[2, 2, 1])
    flat["bonus_draft_logits"] = flat["bonus_draft_logits"].float()
    args = ragged_args(3, rule, alpha, [1.0, 1.0, 0.5], seed)
    want = verify_ragged(**flat, backend="reference", **args)
    got = ragged_emulated(backend, flat, args)
    assert all(torch.equal(x, y) for x, y in zip(got[:4], want[:4]))


# ---- the sampler (_C.sample_cuda: one T for all rows, no truncation) -----------------------------
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("T", [0.0, 0.6, 1.0])
def test_sample_cuda_draws_the_reference_tokens(emu, T, dtype):
    g = torch.Generator().manual_seed(int(T * 10) + len(dtype))
    logits = (torch.randn(6, 3000, generator=g) * 3).to(DTYPES[dtype])
    logits[1, 100:] = float("-inf")  # masked tokens
    logits[3, 5:9] = logits[3].max()  # a greedy tie: the lowest id
    seeds = torch.arange(6, dtype=torch.int64) * 977 + 3
    positions = torch.arange(6, dtype=torch.int64) + 2**40
    got = emu.sample_cuda(logits, T, seeds, positions)
    want = sc.sample(logits, temperature=T, seed=seeds, positions=positions, backend="reference")
    assert torch.equal(got, want), (got, want)
