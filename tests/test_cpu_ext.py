"""The compiled CPU sampler (speccascade_fast._C.sample_cpu) against the torch reference formula.

Reference (SEMANTICS §6): with ``noise = rng.exponential_noise(seeds, positions, DRAFT, V)``,
``tok = rng.race(logits.double() / T, noise)`` for T > 0 and ``logits.double().argmax(-1)`` for
T == 0. The kernel computes the same fp64 scores, so the tokens must be identical; the inputs here
are random, so exact fp64 near-ties (where the two log implementations could round differently)
do not occur in practice.
"""
from __future__ import annotations

import os
import shutil

import pytest
import torch

from speccascade_fast import _ext, rng
from speccascade_fast.sampling import sample

C = _ext.load()
needs_ext = pytest.mark.skipif(C is None, reason=f"_C not built ({_ext.IMPORT_ERROR})")


def reference(logits: torch.Tensor, T: float, seeds: torch.Tensor, positions: torch.Tensor):
    """The formula of the brief, written out directly."""
    if T == 0:
        return logits.double().argmax(-1)
    noise = rng.exponential_noise(seeds, positions, rng.DRAFT, logits.shape[-1])
    return rng.race(logits.double() / T, noise)


def make_inputs(R: int, V: int, dtype: torch.dtype, seed: int, mask_frac: float = 0.0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(R, V, generator=g) * 3.0).to(dtype)
    if mask_frac:
        logits[torch.rand(R, V, generator=g) < mask_frac] = float("-inf")
    seeds = torch.randint(-(2**63), 2**63 - 1, (R,), generator=g, dtype=torch.int64)
    positions = torch.randint(0, 2**40, (R,), generator=g, dtype=torch.int64)
    return logits, seeds, positions


def test_extension_built_when_a_compiler_is_present():
    """CI machines have g++: a missing _C there is a build failure, not something to skip."""
    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("no C++ compiler on this machine: the pure-Python fallback is expected")
    if os.environ.get("SPECCASCADE_NO_EXT") == "1":
        pytest.skip("SPECCASCADE_NO_EXT=1: the extension was deliberately not built")
    assert C is not None, f"speccascade_fast._C did not import: {_ext.IMPORT_ERROR}"
    assert _ext.HAS_CPU_EXT
    assert hasattr(C, "sample_cpu")


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T", [0.0, 0.7, 1.3])
@pytest.mark.parametrize(
    "R,V",
    [(1, 1), (1, 7), (3, 100), (1, 32000), (2, 50257), (8, 4096), (5, 20001), (1, 151936)],
)
def test_matches_reference(R, V, T, dtype):
    for trial, mask in enumerate((0.0, 0.3)):
        logits, seeds, positions = make_inputs(R, V, dtype, R * 1000 + V + trial, mask_frac=mask)
        got = C.sample_cpu(logits, T, seeds, positions)
        want = reference(logits, T, seeds, positions)
        assert got.dtype == torch.int64 and got.shape == (R,)
        # integer temperatures reach the same overload
        if T == 0:
            assert torch.equal(C.sample_cpu(logits, 0, seeds, positions), want)
        assert torch.equal(got, want), (got, want)


@needs_ext
@pytest.mark.parametrize("threads", [1, 2])
def test_many_rows_distinct_seeds_and_positions(threads):
    """Many draws: each row has its own key, so this exercises the hash over a wide range."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for T in (0.5, 1.0, 2.0):
            logits, seeds, positions = make_inputs(64, 1000, torch.float32, seed=int(T * 10))
            logits[:, :5] += 4.0  # a few likely tokens, as in real logits
            got = C.sample_cpu(logits, T, seeds, positions)
            assert torch.equal(got, reference(logits, T, seeds, positions))
    finally:
        torch.set_num_threads(old)


@needs_ext
def test_sampling_is_a_function_of_seed_and_position_only():
    """Same row, same key -> same token regardless of batch neighbours or row order."""
    logits, seeds, positions = make_inputs(6, 5000, torch.float32, seed=11)
    full = C.sample_cpu(logits, 1.0, seeds, positions)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    permuted = C.sample_cpu(logits[perm], 1.0, seeds[perm], positions[perm])
    assert torch.equal(permuted, full[perm])
    single = torch.stack([C.sample_cpu(logits[i : i + 1], 1.0, seeds[i : i + 1],
                                       positions[i : i + 1])[0] for i in range(6)])
    assert torch.equal(single, full)
    # a different position (or seed) gives a fresh draw
    other = C.sample_cpu(logits, 1.0, seeds, positions + 1)
    assert not torch.equal(other, full)


@needs_ext
def test_masked_entries_never_win():
    g = torch.Generator().manual_seed(5)
    logits = torch.full((16, 3000), float("-inf"))
    allowed = torch.randint(0, 3000, (16, 4), generator=g)
    logits.scatter_(1, allowed, torch.randn(16, 4, generator=g))
    seeds = torch.arange(16, dtype=torch.int64)
    for T in (0.0, 0.3, 1.0, 5.0):
        for pos in range(20):
            tok = C.sample_cpu(logits, T, seeds, torch.full((16,), pos, dtype=torch.int64))
            assert bool((torch.gather(logits, 1, tok[:, None]) > float("-inf")).all())


@needs_ext
def test_edge_rows_follow_torch_argmax_rules():
    """All -inf -> id 0; +inf logits -> the first +inf; NaN -> the first NaN; ties -> lowest id."""
    inf, nan = float("inf"), float("nan")
    V = 40000  # long enough for the row to be split across threads
    rows = torch.zeros(4, V)
    rows[0] = -inf
    rows[1, 30000] = rows[1, 35000] = inf
    rows[2, 25000] = nan
    rows[2, 33000] = nan
    rows[3] = 2.5  # all tied: T == 0 gives 0, T > 0 races on the noise alone
    seeds = torch.tensor([1, 2, 3, 4])
    positions = torch.tensor([9, 9, 9, 9])
    for T in (0.0, 1.0):
        got = C.sample_cpu(rows, T, seeds, positions)
        assert got[:3].tolist() == [0, 30000, 25000]
        assert torch.equal(got[3:], reference(rows, T, seeds, positions)[3:])
    assert C.sample_cpu(rows[3:], 0.0, seeds[3:], positions[3:]).item() == 0


@needs_ext
def test_strided_rows_and_rowwise_temperature():
    logits, seeds, positions = make_inputs(4, 3000, torch.float32, seed=3)
    big = torch.randn(4, 3, 3000)
    big[:, 1] = logits
    view = big[:, 1, :]  # row stride 9000, unit stride along V
    assert torch.equal(C.sample_cpu(view, 0.8, seeds, positions),
                       reference(logits, 0.8, seeds, positions))
    # a non-unit stride along V is copied, not misread
    wide = torch.stack([logits, logits], dim=-1)[..., 0]
    assert torch.equal(C.sample_cpu(wide, 0.8, seeds, positions),
                       reference(logits, 0.8, seeds, positions))
    temps = torch.tensor([0.0, 0.5, 1.0, 2.0])
    got = C.sample_cpu(logits, temps, seeds, positions)
    want = torch.stack([reference(logits[i : i + 1], float(temps[i]), seeds[i : i + 1],
                                  positions[i : i + 1])[0] for i in range(4)])
    assert torch.equal(got, want)
    assert torch.equal(sample(logits, temperature=temps, seed=seeds, positions=positions,
                              backend="reference"), want)


@needs_ext
def test_rejects_bad_arguments():
    logits, seeds, positions = make_inputs(2, 10, torch.float32, seed=1)
    with pytest.raises(RuntimeError):
        C.sample_cpu(logits, -1.0, seeds, positions)
    with pytest.raises(RuntimeError):
        C.sample_cpu(logits, float("nan"), seeds, positions)
    with pytest.raises(RuntimeError):
        C.sample_cpu(logits, 1.0, seeds[:1], positions)
    with pytest.raises(RuntimeError):
        C.sample_cpu(logits, 1.0, seeds.int(), positions)
    with pytest.raises(RuntimeError):
        C.sample_cpu(logits.double(), 1.0, seeds, positions)
    with pytest.raises(RuntimeError):
        C.sample_cpu(logits[0], 1.0, seeds, positions)


def test_public_sample_matches_reference():
    """sample() (kernel when built and eligible, torch otherwise) and the fp64 path agree."""
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        logits, seeds, positions = make_inputs(3, 2000, dtype, seed=4)
        for T in (0.0, 0.9):
            got = sample(logits, temperature=T, seed=seeds, positions=positions)
            assert torch.equal(got, reference(logits, T, seeds, positions))
            block = sample(logits.view(1, 3, 2000), temperature=T, seed=seeds[:1],
                           positions=positions[:1])
            assert torch.equal(block[0], sample(logits, temperature=T, seed=seeds[0].item(),
                                                positions=positions[:1] + torch.arange(3),
                                                backend="reference"))


@needs_ext
@pytest.mark.parametrize("V", [50, 5000, 151936])
def test_truncated_sampling_matches_reference(V):
    """top-k / top-p reach the kernel as keep bounds: the same tokens as the torch formula, for
    mixed per-row temperatures (greedy rows ignore truncation), ties at the boundary, and
    truncated chunks whose largest logit lies outside the kept set (V = 151936: several
    chunks per row on two threads)."""
    for k, kw in enumerate(({"top_k": 1}, {"top_k": 20}, {"top_p": 0.5}, {"top_p": 0.95},
                            {"top_k": 30, "top_p": 0.8})):
        logits, seeds, positions = make_inputs(4, V, torch.float32, seed=V + k, mask_frac=0.2)
        if k % 2:
            logits = (logits * 2).round() / 2  # ties at the boundary
        T = torch.tensor([0.0, 0.6, 1.0, 1.7])
        got = sample(logits, temperature=T, seed=seeds, positions=positions, **kw)
        want = sample(logits, temperature=T, seed=seeds, positions=positions,
                      backend="reference", **kw)
        assert torch.equal(got, want), (kw, got, want)
        block = sample(logits.view(1, 4, V), temperature=0.8, seed=seeds[:1],
                       positions=positions[:1], **kw)
        ref = sample(logits.view(1, 4, V), temperature=0.8, seed=seeds[:1],
                     positions=positions[:1], backend="reference", **kw)
        assert torch.equal(block, ref), kw


@needs_ext
def test_keep_bounds_argument_is_checked():
    logits, seeds, positions = make_inputs(2, 10, torch.float32, seed=1)
    t = torch.ones(2)
    with pytest.raises(RuntimeError, match="keep must be"):
        C.sample_cpu(logits, t, seeds, positions, torch.zeros(2, 2))
    assert C.sample_cpu(logits, t, seeds, positions, None).shape == (2,)
