"""The divergence budget (docs/semantics.md §9) in the Triton kernels against the reference.

Per position the kernels compute the cost ``TV(pi, pT)`` in float32 sums (the reference in
float64) and scan it along the block in float64 as ``rules.budget_scan`` does. A position whose
running charge plus its cost lies within ~1e-6 of the row's budget may legitimately go either
way, so the budgets are chosen per row from the reference's costs (0, a third and two thirds of
the row's total, inf) and rows still landing that close to a decision are left out by name
(``scan_ties``); everything else must match: tokens, num_accepted, deferred exactly up to
the usual floating-point near-ties of the accept and resample stages
(``assert_same_up_to_near_ties``), ``spent`` to 1e-5. The cases and that check are shared with
tests/test_cuda_emu_budget.py: tests/budget_cases.py.

Runs in Triton's interpreter on the CPU (tests/conftest.py), so shapes stay tiny.
"""
import math

import pytest
import torch
import triton  # noqa: F401  (a missing triton must fail this module, not skip it)

import speccascade_fast as sc
from speccascade_fast import backends
from speccascade_fast.backends import triton as tb

from .budget_cases import DEVICE, RULES, B, G, block, call_args, check
from .helpers import NoHostReads

_CUDA = torch.cuda.is_available()

pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    if not _CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def triton_dispatch(q, x, p, args, top_p, budget):
    """The public path: the dispatch computes the keep bounds and hands the budget to Triton."""
    return backends.verify("triton", q, x, p, **args, top_k=None, top_p=top_p, budget=budget)


# ---- tokens, counts, flags and charges equal the reference's --------------------------------------
@pytest.mark.parametrize("cascade", [True, False], ids=["cascade", "verifier"])
@pytest.mark.parametrize("T", [0.0, 1.0])
@pytest.mark.parametrize("rule", list(RULES))
def test_budget_matches_reference(rule, T, cascade):
    seed = 10 * list(RULES).index(rule) + 3 * int(T) + int(cascade)
    exact, cost = check(rule, T, cascade, seed, run=triton_dispatch)
    if rule != "spec" and T > 0:  # the case must make positions exact and let others spend
        assert bool(exact.any()) and bool((~exact & (cost > 0)).any())


@pytest.mark.parametrize("cascade", [True, False], ids=["cascade", "verifier"])
@pytest.mark.parametrize("rule", list(RULES))
def test_budget_with_top_p_matches_reference(rule, cascade):
    exact, _ = check(rule, 1.0, cascade, 200 + list(RULES).index(rule), top_p=0.8,
                     run=triton_dispatch)
    if rule != "spec":
        assert bool(exact.any())


# ---- every path spends at most its budget ------------------------------------------------------------
@pytest.mark.parametrize("rule", ["token_v3", "lossy", "chow", "lossy_star"])
def test_every_path_spends_at_most_the_budget(rule):
    rows = 8
    q, x, p = block(77, T=1.0, cascade=True, rows=rows)
    args = call_args(rule, 1.0, rows, 77)
    g = torch.Generator().manual_seed(5)
    budget = (torch.rand(rows, generator=g, dtype=torch.float64) * 0.6).to(DEVICE)
    out = tb.verify(q, x, p, **args, top_k=None, top_p=None, budget=budget)
    emitted = torch.arange(G + 1, device=DEVICE)[None] <= out.num_accepted[:, None]
    spent = torch.where(emitted, out.spent, 0.0).sum(1)
    assert bool((spent <= budget + 1e-6).all()), (spent, budget)
    assert bool((out.spent >= 0).all())
    assert bool((spent > 0).any()), "the case needs paths that spend"


# ---- no budget: the plain kernels; the dispatch sends budget calls here ------------------------------
def test_without_a_budget_spent_is_none_and_inf_is_the_plain_rule():
    q, x, p = block(9, T=1.0, cascade=True)
    args = call_args("token_v3", 1.0, B, 9)
    plain = tb.verify(q, x, p, **args, top_k=None, top_p=None)
    assert plain.spent is None
    inf = tb.verify(q, x, p, **args, top_k=None, top_p=None,
                    budget=torch.full((B,), math.inf, dtype=torch.float64, device=DEVICE))
    for a, b in zip(plain[:4], inf[:4]):
        assert torch.equal(a, b)


def test_public_verify_sends_budget_calls_to_triton(monkeypatch):
    assert backends.REGISTRY["triton"].budget
    calls = []
    real = tb.verify

    def spy(*a, **kw):
        calls.append(kw.get("budget"))
        return real(*a, **kw)

    monkeypatch.setattr(tb, "verify", spy)
    q, x, p = block(11, T=1.0, cascade=True)
    out = sc.verify(q, x, p, rule="lossy", alpha=0.3, temperature=1.0, divergence_budget=0.1,
                    backend="triton")
    assert len(calls) == 1 and calls[0] is not None and out.spent is not None



def test_budget_calls_read_nothing_on_the_host():
    """The engine captures verification in CUDA graphs: the budget path adds no host read."""
    q, x, p = block(13, T=1.0, cascade=True)
    args = call_args("token_v3", 1.0, B, 13)
    budget = torch.tensor([0.0, 0.1, 0.3, math.inf], dtype=torch.float64, device=DEVICE)
    with NoHostReads():
        out = tb.verify(q, x, p, **args, top_k=None, top_p=None, budget=budget)
    assert out.spent.shape == (B, G + 1)


def test_engine_on_triton_equals_engine_on_the_reference():
    """The Engine's budget blocks (what each row has left in, the charges back) on the Triton
    kernels: the same tokens and spending as on the reference, for mixed per-row budgets."""
    from speccascade_fast import Engine

    from .helpers import tiny_pair

    q, p = (m.to(DEVICE) for m in tiny_pair())
    ids = torch.randint(3, 60, (3, 5), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    runs = {}
    for backend in ("reference", "triton"):
        eng = Engine(q, p, max_batch_size=3, max_seq_len=64, rule="token_v3", alpha=0.6,
                     backend=backend)
        runs[backend] = eng.generate(ids, max_new_tokens=16, seed=[1, 2, 3], temperature=1.0,
                                     divergence_budget=[0.05, 0.3, math.inf])
    ref, tri = runs["reference"], runs["triton"]
    assert torch.equal(ref.sequences, tri.sequences)
    spent = [s["divergence_spent"] for s in tri.stats["per_sequence"]]
    assert spent == pytest.approx([s["divergence_spent"] for s in ref.stats["per_sequence"]],
                                  abs=1e-5)
    assert spent[1] > 0 and spent[2] > spent[1] and spent[1] <= 0.3 + 1e-6
