"""Shared divergence-budget cases: blocks, call arguments and the check against the reference."""
import math
from collections import namedtuple

import torch

import speccascade_fast as sc
from speccascade_fast import checks
from speccascade_fast.backends import reference
from speccascade_fast.rules import budget_scan, divergence, position_targets

from .helpers import assert_same_up_to_near_ties

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
B, G, V = 4, 3, 64
TIE = 1e-6
RULES = {"spec": None, "token_v3": 0.5, "chow": 0.9, "opt": 0.5, "lossy": 0.4,
         "lossy_star": 0.4, "drafter": None}

# VerifyOutput's decisions, without ``spent`` (compared to a tolerance)
Decisions = namedtuple("Decisions", "tokens num_accepted num_emitted deferred")


def block(seed, *, T, cascade, rows=B, device=DEVICE):
    """Drafter / verifier logits that partly agree (fp32), drafts drawn from qT at T."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(rows, G + 1, V, generator=g, dtype=torch.float64) * 2
    p = q + torch.randn(rows, G + 1, V, generator=g, dtype=torch.float64)
    q, p = q.float(), p.float()
    temps = torch.full((rows,), float(T), dtype=torch.float64)
    x = sc.sample(q[:, :G], temperature=temps, seed=torch.arange(rows) + 31 * seed)
    if not cascade:
        q = q[:, :G].contiguous()
    return q.to(device), x.to(device), p.to(device)


def call_args(rule, T, rows, seed, device=DEVICE):
    return dict(
        rule=rule,
        alpha=checks.alpha_tensor(RULES[rule], (rows,), device),
        temperature=torch.full((rows,), float(T), dtype=torch.float64, device=device),
        seed=(torch.arange(rows, dtype=torch.int64) * 7919 + seed).to(device),
        positions=(torch.arange(rows, dtype=torch.int64) * 13 + 5).to(device),
    )


def costs(q, p, args, top_k=None, top_p=None):
    """The reference's cost per scanned position, float64 ``[B, rows]``."""
    n = q.shape[1]
    t = position_targets(q.double(), p[:, :n].double(), rule=args["rule"],
                         alpha=args["alpha"][:, None].expand(-1, n),
                         temperature=args["temperature"][:, None].expand(-1, n),
                         top_k=top_k, top_p=top_p)
    return divergence(args["rule"], t)


def scan_ties(cost, budget):
    """Rows where some position's running charge plus its cost lies within TIE of the budget
    (float32 costs may decide it the other way). Positions of cost <= TIE are not counted: their
    law is within TV TIE of pT whichever way the scan goes."""
    exact, charged = budget_scan(cost, budget)
    before = torch.cumsum(charged, 1) - charged
    near = ((before + cost - budget[:, None]).abs() < TIE) & (cost > TIE)
    return {int(r) for r in torch.nonzero(near.any(1)).flatten()}, exact


def budgets_for(cost):
    """Per row: 0, a third and two thirds of the row's total cost, inf (cycled over rows)."""
    total = cost.sum(1)
    pick = [torch.zeros_like(total), total / 3, 2 * total / 3, torch.full_like(total, math.inf)]
    return torch.stack([pick[r % 4][r] for r in range(cost.shape[0])])


def check(rule, T, cascade, seed, top_p=None, *, run, device=DEVICE):
    """``run``'s output for a block with per-row budgets equals the reference's (see
    tests/test_triton_budget.py's docstring) on ``device``; returns the reference's exact
    positions and costs."""
    q, x, p = block(seed, T=T, cascade=cascade, device=device)
    args = call_args(rule, T, B, seed, device)
    cost = costs(q, p, args, top_p=top_p)
    budget = budgets_for(cost).to(device)
    ties, exact = scan_ties(cost, budget)
    assert len(ties) <= 1, f"budgets chosen at ties in rows {sorted(ties)}: change the seed"
    keep = set(range(B)) - ties
    got = run(q, x, p, args, top_p, budget)
    want = reference.verify(q, x, p, **args, top_k=None, top_p=top_p, budget=budget)
    assert got.spent is not None and got.spent.dtype == torch.float64
    assert got.spent.shape == (B, G + 1)
    rows = torch.tensor(sorted(keep), device=device)
    sub = [Decisions(*(f.index_select(0, rows) for f in o[:4])) for o in (got, want)]
    if top_p is None:
        sargs = {**args, "budget": budget}
        for k in ("alpha", "temperature", "seed", "positions", "budget"):
            sargs[k] = sargs[k].index_select(0, rows)
        qs, xs, ps = (t.index_select(0, rows) for t in (q, x, p))
        assert_same_up_to_near_ties(sub[0], sub[1], qs, xs, ps, sargs)
    else:  # (the near-tie check perturbs untruncated calls only; random inputs have none here)
        for name, a, b in zip(want._fields, *sub):
            assert torch.equal(a, b), (name, a, b)
    torch.testing.assert_close(got.spent[rows], want.spent[rows], atol=1e-5, rtol=0)
    return exact, cost
