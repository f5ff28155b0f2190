"""The divergence budget (docs/semantics.md §9) in the CUDA kernels (csrc/cuda/verify.cu), run
on the CUDA emulator (tests/cuda_emu.py) against the reference: the same cases and tie handling
as tests/test_triton_budget.py (budgets per row from the reference's costs, rows within 1e-6 of a
scan decision left out by name; tokens, counts and flags equal up to near-ties, ``spent`` to
1e-5), through :func:`speccascade_fast.backends.cuda.verify` on CPU tensors (also on a GPU
machine: the emulator runs CPU tensors)."""
import math

import pytest
import torch

import speccascade_fast as sc
from speccascade_fast import backends
from speccascade_fast.backends import cuda, keep_bounds_pair

from . import cuda_emu
from .budget_cases import RULES, G, block, call_args, check
from .helpers import NoHostReads


@pytest.fixture(scope="module")
def emu():
    return cuda_emu.module()


@pytest.fixture
def run(monkeypatch, emu):
    """cuda.verify with the emulator's ops for CPU tensors and the keep bounds the dispatch
    would compute."""
    monkeypatch.setattr(cuda, "_cuda_ops", lambda target_logits: cuda_emu.ops())

    def verify(q, x, p, args, top_p, budget):
        T = args["temperature"][:, None]
        keep = keep_bounds_pair(q, T, p, T, None, top_p)
        return cuda.verify(q, x, p, **args, top_k=None, top_p=top_p, keep=keep, budget=budget)

    return verify


@pytest.mark.parametrize("cascade", [True, False], ids=["cascade", "verifier"])
@pytest.mark.parametrize("T", [0.0, 1.0])
@pytest.mark.parametrize("rule", list(RULES))
def test_budget_matches_reference(run, rule, T, cascade):
    seed = 10 * list(RULES).index(rule) + 3 * int(T) + int(cascade)
    exact, cost = check(rule, T, cascade, seed, run=run, device="cpu")
    if rule != "spec" and T > 0:
        assert bool(exact.any()) and bool((~exact & (cost > 0)).any())


@pytest.mark.parametrize("rule", ["token_v3", "lossy", "lossy_star", "opt"])
def test_budget_with_top_p_matches_reference(run, rule):
    exact, _ = check(rule, 1.0, True, 300 + list(RULES).index(rule), top_p=0.8, run=run,
                     device="cpu")
    assert bool(exact.any())


@pytest.mark.parametrize("rule", ["token_v3", "lossy", "chow", "lossy_star"])
def test_every_path_spends_at_most_the_budget(run, rule):
    rows = 8
    q, x, p = block(77, T=1.0, cascade=False, rows=rows, device="cpu")
    args = call_args(rule, 1.0, rows, 77, "cpu")
    g = torch.Generator().manual_seed(6)
    budget = torch.rand(rows, generator=g, dtype=torch.float64) * 0.6
    out = run(q, x, p, args, None, budget)
    emitted = torch.arange(G + 1)[None] <= out.num_accepted[:, None]
    spent = torch.where(emitted, out.spent, 0.0).sum(1)
    assert bool((spent <= budget + 1e-6).all()), (spent, budget)
    assert bool((out.spent >= 0).all()) and bool((out.spent[:, G] == 0).all())
    assert bool((spent > 0).any()), "the case needs paths that spend"


def test_without_a_budget_spent_is_none_and_inf_is_the_plain_rule(run):
    q, x, p = block(9, T=1.0, cascade=True, device="cpu")
    args = call_args("lossy", 1.0, 4, 9, "cpu")
    plain = run(q, x, p, args, None, None)
    assert plain.spent is None
    inf = run(q, x, p, args, None, torch.full((4,), math.inf, dtype=torch.float64))
    for a, b in zip(plain[:4], inf[:4]):
        assert torch.equal(a, b)


def test_public_verify_sends_budget_calls_to_cuda(monkeypatch, emu):
    """With the cuda backend "available" (as on a GPU machine), the dispatch hands budget calls
    to its kernels."""
    assert backends.REGISTRY["cuda"].budget
    monkeypatch.setattr(cuda, "_cuda_ops", lambda target_logits: cuda_emu.ops())
    monkeypatch.setattr(cuda, "is_available", lambda device=None: True)
    q, x, p = block(11, T=1.0, cascade=True, device="cpu")
    got = sc.verify(q, x, p, rule="lossy", alpha=0.3, temperature=1.0, divergence_budget=0.1,
                    backend="cuda")
    want = sc.verify(q, x, p, rule="lossy", alpha=0.3, temperature=1.0, divergence_budget=0.1,
                     backend="reference")
    assert got.spent is not None
    for a, b in zip(got[:4], want[:4]):
        assert torch.equal(a, b)


def test_budget_calls_read_nothing_on_the_host(run):
    """The engine captures verification in CUDA graphs: the budget path adds no host read."""
    q, x, p = block(13, T=1.0, cascade=True, device="cpu")
    args = call_args("token_v3", 1.0, 4, 13, "cpu")
    budget = torch.tensor([0.0, 0.1, 0.3, math.inf], dtype=torch.float64)
    with NoHostReads():
        out = cuda.verify(q, x, p, **args, top_k=None, top_p=None, budget=budget)
    assert out.spent.shape == (4, G + 1)
