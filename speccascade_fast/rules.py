"""Deferral rules and their targets (docs/semantics.md §3-4): the specification in code.

Everything here is float64 PyTorch, written for clarity; it is the oracle that every fast backend
is tested against. One function, :func:`position_targets`, turns a position's two logit vectors
into the three things the speculative-sampling procedure (Algorithm 4) needs:

* ``accept``   - a draft ``x ~ qT`` is accepted with probability ``min(1, accept(x) / qT(x))``;
* ``residual`` - on rejection the token is drawn from ``norm(residual)`` (unnormalised weights);
* ``law``      - the exact law of the emitted token (what the bonus token is drawn from, and what
  :func:`speccascade_fast.target_distribution` returns).

For every rule but ``lossy`` ``accept = pi`` and ``residual = max(0, pi - qT)``; ``law`` is computed
by one formula for all rules, the law of the procedure itself:
``law = min(qT, accept) + (1 - sum min(qT, accept)) * norm(residual)``, which equals ``pi`` whenever
``pi`` sums to one and is ``lossy``'s true output law otherwise.

``ensemble`` (docs/semantics.md §9) is Hugging Face's ``assistant_ensemble_weight``:
``pi = w * pT + (1 - w) * qT`` with ``w = alpha`` in [0, 1]. No fused kernel implements it
(:data:`REFERENCE_ONLY_RULES`): every backend sends it to this reference.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import probs as P

RULES = (
    "spec", "drafter", "chow", "chow_log", "diff", "diff_log", "opt", "opt_log",
    "token_v1", "token_v2", "token_v3", "lossy", "lossy_star", "bild", "ensemble",
)
PREFIX_RULES = frozenset({"chow", "chow_log", "diff", "diff_log", "opt", "opt_log", "bild"})
TOKEN_RULES = frozenset({"token_v1", "token_v2", "token_v3"})
# rules whose decision needs only the drafter (token_cascade may use these)
DRAFTER_ONLY_RULES = frozenset({"chow", "chow_log"})
# rules no fused kernel implements: backends.covers() routes them to the float64 reference
REFERENCE_ONLY_RULES = frozenset({"ensemble"})
# the rules the fused kernels implement; a rule's kernel id is its position in RULES
FUSED_RULES = tuple(r for r in RULES if r not in REFERENCE_ONLY_RULES)

INF = math.inf
# (low, high, low_closed, high_closed); None: the rule ignores alpha.
ALPHA_RANGES: dict[str, tuple[float, float, bool, bool] | None] = {
    "spec": None,
    "drafter": None,
    "chow": (0.0, 1.0, True, True),
    "chow_log": (0.0, INF, True, False),
    "diff": (-1.0, 1.0, True, True),
    "diff_log": (-INF, INF, False, False),
    "opt": (-INF, INF, False, False),
    "opt_log": (-INF, INF, False, False),
    "token_v1": (-1.0, 1.0, True, True),
    "token_v2": (-1.0, 1.0, True, True),
    "token_v3": (-INF, INF, False, False),
    "lossy": (0.0, 1.0, True, False),
    "lossy_star": (0.0, 1.0, True, False),
    "bild": (0.0, INF, True, False),
    "ensemble": (0.0, 1.0, True, True),  # alpha = w, the verifier's weight: 1 is spec, 0 drafter
}

Q_FLOOR = 1e-10  # docs/semantics.md §6: the q denominator of acceptance ratios is clipped here
LOSSY_STAR_BISECTION_STEPS = 50  # in s = 1/beta; 2**-50 relative, far below the 1e-6 asked for


def check_rule(rule: str) -> str:
    if rule not in RULES:
        raise ValueError(f"rule={rule!r} is not a known rule; choose one of {', '.join(RULES)}")
    return rule


def range_text(rule: str) -> str:
    rng = ALPHA_RANGES[rule]
    if rng is None:
        return "any (ignored)"
    lo, hi, lo_c, hi_c = rng
    return f"{'[' if lo_c else '('}{lo:g}, {hi:g}{']' if hi_c else ')'}"


def alpha_in_range(rule: str, alpha: torch.Tensor) -> torch.Tensor:
    """Elementwise: is ``alpha`` finite and inside ``rule``'s range?"""
    rng = ALPHA_RANGES[rule]
    ok = torch.isfinite(alpha)
    if rng is None:
        return ok
    lo, hi, lo_c, hi_c = rng
    ok &= (alpha >= lo) if lo_c else (alpha > lo)
    ok &= (alpha <= hi) if hi_c else (alpha < hi)
    return ok


def check_alpha(rule: str, alpha) -> None:
    """Raise ``ValueError`` unless ``alpha`` (a number or a tensor) is finite and in range."""
    check_rule(rule)
    if ALPHA_RANGES[rule] is None and alpha is None:
        return
    if alpha is None:
        raise ValueError(f"alpha is required for rule {rule!r}; its range is {range_text(rule)}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, torch.Tensor)):
        raise ValueError(f"alpha must be a real number or a float tensor, got {type(alpha).__name__}")
    a = torch.as_tensor(alpha, dtype=torch.float64)
    if not bool(alpha_in_range(rule, a).all()):
        bad = a.flatten()[~alpha_in_range(rule, a).flatten()][0].item()
        raise ValueError(
            f"alpha={bad!r} is outside the range {range_text(rule)} of rule {rule!r} "
            "(alpha must be finite)"
        )


# --- deferral statistics (all on the UNSCALED pair, except OPT's TV term) -----------------------
def defer(rule, alpha, q1, p1, qT, pT, temperature) -> torch.Tensor:
    """delta in {0, 1} for a prefix rule, bool ``[...]``. ``alpha``/``temperature``: ``[...]``."""
    if rule == "chow":
        return q1.amax(-1) < 1 - alpha
    if rule == "chow_log":
        return -P.neg_entropy(q1) > alpha
    if rule == "diff":
        return q1.amax(-1) < p1.amax(-1) - alpha
    if rule == "diff_log":
        return P.neg_entropy(q1) < P.neg_entropy(p1) - alpha
    if rule == "opt":
        return q1.amax(-1) < p1.amax(-1) - alpha * P.total_variation(pT, qT)
    if rule == "opt_log":
        return P.neg_entropy(q1) < P.neg_entropy(p1) - alpha * P.total_variation(pT, qT)
    if rule == "bild":
        cross = -torch.xlogy(q1, p1).sum(-1)  # -sum q1 log p1 (0 where q1 = 0)
        top = torch.argmax(q1, dim=-1, keepdim=True)
        greedy = -torch.log(torch.gather(p1, -1, top).squeeze(-1))
        return torch.where(temperature == 0, greedy, cross) > alpha
    raise ValueError(f"rule={rule!r} is not a prefix rule")


def acceptable(rule, alpha, q1, p1) -> torch.Tensor:
    """The token rules' set A (eqs. 13-15), bool ``[..., V]``. ``alpha``: ``[...]``."""
    a = alpha[..., None]
    pmax = p1.amax(-1, keepdim=True)
    if rule == "token_v1":
        return q1 >= pmax - a
    if rule == "token_v2":
        return p1 >= pmax - a
    if rule == "token_v3":
        return p1 >= (1 - a) * pmax
    raise ValueError(f"rule={rule!r} is not a token rule")


def _lossy_star_target(qT, pT, alpha):
    """Lemma 2: pi = max(min(qT, pT/(1-alpha)), s*pT) with s = 1/beta solving sum pi = 1.

    g(s) = sum max(m, s*pT) rises from sum m <= 1 at s = 0 to 1/(1-alpha) >= 1 at s = 1/(1-alpha);
    bisection keeps g(lo) < 1 <= g(hi) and returns pi at hi.
    """
    a = alpha[..., None]
    m = torch.minimum(qT, pT / (1 - a))
    lo = torch.zeros_like(alpha)
    hi = 1 / (1 - alpha)
    if_zero = m.sum(-1) >= 1  # sum m = 1 exactly: pi = qT (beta -> infinity)
    hi = torch.where(if_zero, lo, hi)
    for _ in range(LOSSY_STAR_BISECTION_STEPS):
        mid = (lo + hi) / 2
        below = torch.maximum(m, mid[..., None] * pT).sum(-1) < 1
        lo = torch.where(below, mid, lo)
        hi = torch.where(below, hi, mid)
    return torch.maximum(m, hi[..., None] * pT)


def _ensemble_target(q1, p1, qT, pT, alpha, temperature):
    """Hugging Face's ``assistant_ensemble_weight`` (docs/semantics.md §9): the fixed mixture
    ``w * pT + (1 - w) * qT`` with ``w = alpha``, so a draft is accepted with probability
    ``min(1, 1 - w + w * pT(x) / qT(x))`` and the residual is ``w * max(0, pT - qT)`` (spec's,
    scaled). At T = 0 (Decision, HF's greedy path) the one-hot of the argmax of the unscaled
    mixture ``w * p1 + (1 - w) * q1`` (ties: the lowest id), so greedy decoding stays
    deterministic."""
    w = alpha[..., None]
    mixture = w * pT + (1 - w) * qT
    ids = torch.arange(q1.shape[-1], device=q1.device)
    top = torch.argmax(w * p1 + (1 - w) * q1, dim=-1, keepdim=True)
    greedy = (ids == top).to(torch.float64)
    return torch.where(temperature[..., None] == 0, greedy, mixture)


@dataclass
class Targets:
    """Per-position quantities, float64 ``[..., V]`` unless noted."""

    qT: torch.Tensor
    pT: torch.Tensor
    accept: torch.Tensor
    residual: torch.Tensor
    law: torch.Tensor
    delta: torch.Tensor | None  # bool [...] for prefix rules
    in_a: torch.Tensor | None  # bool [..., V] for token rules


def law_of_procedure(qT, accept, residual):
    """Law of the token emitted by: draft x ~ qT, accept w.p. min(1, accept(x)/qT(x)), else
    draw from norm(residual). An all-zero residual is never normalised (it only arises when
    every draft is accepted, and then its weight ``1 - sum min(qT, accept)`` is 0)."""
    kept = torch.minimum(qT, accept)
    rejected_mass = torch.clamp(1 - kept.sum(-1, keepdim=True), min=0)
    total = residual.sum(-1, keepdim=True)
    safe = torch.where(total > 0, total, torch.ones_like(total))
    return kept + rejected_mass * torch.where(total > 0, residual / safe, torch.zeros_like(residual))


def position_targets(
    draft_logits: torch.Tensor,
    target_logits: torch.Tensor,
    *,
    rule: str,
    alpha: torch.Tensor,
    temperature: torch.Tensor,
    top_k: int | None = None,
    top_p: float | None = None,
) -> Targets:
    """All per-position quantities for ``[..., V]`` logits; ``alpha``/``temperature`` ``[...]``."""
    q1, p1 = P.unscaled(draft_logits), P.unscaled(target_logits)
    qT = P.scaled(draft_logits, temperature, top_k, top_p)
    pT = P.scaled(target_logits, temperature, top_k, top_p)
    delta = in_a = None
    if rule == "spec":
        pi = pT
    elif rule == "drafter":
        pi = qT
    elif rule in PREFIX_RULES:
        delta = defer(rule, alpha, q1, p1, qT, pT, temperature)
        pi = torch.where(delta[..., None], pT, qT)
    elif rule in TOKEN_RULES:
        in_a = acceptable(rule, alpha, q1, p1)
        eta = torch.where(in_a, torch.zeros_like(qT), qT).sum(-1, keepdim=True)
        pi = torch.where(in_a, qT, torch.zeros_like(qT)) + eta * pT
    elif rule == "lossy":
        accept = pT / (1 - alpha[..., None])
        residual = torch.clamp(pT - qT, min=0)
        law = law_of_procedure(qT, accept, residual)
        return Targets(qT, pT, accept, residual, law, None, None)
    elif rule == "lossy_star":
        pi = _lossy_star_target(qT, pT, alpha)
    elif rule == "ensemble":
        pi = _ensemble_target(q1, p1, qT, pT, alpha, temperature)
    else:
        raise ValueError(f"rule={rule!r} is not a known rule")
    residual = torch.clamp(pi - qT, min=0)
    return Targets(qT, pT, pi, residual, law_of_procedure(qT, pi, residual), delta, in_a)


# --- the divergence budget (docs/semantics.md §9) ----------------------------------------------
def divergence(rule: str, t: Targets) -> torch.Tensor:
    """float64 ``[...]``: the cost ``TV(law, pT) = sum_v max(0, pT(v) - law(v))`` of emitting
    from the rule's law instead of the verifier's at each position (truncated laws where top-k /
    top-p are asked for). Exactly 0 where the law is pT by construction (``spec``, a prefix
    rule's deferral); ``(1 - delta) TV(qT, pT)`` for prefix rules."""
    if rule == "spec":
        return torch.zeros(t.pT.shape[:-1], dtype=torch.float64, device=t.pT.device)
    if t.delta is not None:
        return torch.where(t.delta, 0.0, P.total_variation(t.pT, t.qT))
    return P.total_variation(t.pT, t.law)


def budget_scan(cost: torch.Tensor, budget: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The divergence budget along one block: ``cost`` float64 ``[B, n]`` per position (in
    order), ``budget`` float64 ``[B]`` what each row has left (``inf``: no budget). A position
    keeps its rule iff the charges so far plus its cost stay within the budget (then it is
    charged its cost), else it is verified losslessly (pi = pT, charged 0). Returns
    ``(exact bool [B, n], charged float64 [B, n])``."""
    spent = torch.zeros_like(budget)
    exact, charged = [], []
    for j in range(cost.shape[1]):
        keep = spent + cost[:, j] <= budget
        c = torch.where(keep, cost[:, j], 0.0)
        spent = spent + c
        exact.append(~keep)
        charged.append(c)
    return torch.stack(exact, 1), torch.stack(charged, 1)


def with_exact_positions(t: Targets, exact: torch.Tensor) -> Targets:
    """``t`` with the positions where ``exact`` (bool ``[...]``) is True replaced by lossless
    speculative decoding's quantities (accept pT, residual max(0, pT - qT), law pT; delta 1, an
    empty set A)."""
    e = exact[..., None]
    residual = torch.clamp(t.pT - t.qT, min=0)
    return Targets(
        t.qT, t.pT, torch.where(e, t.pT, t.accept), torch.where(e, residual, t.residual),
        torch.where(e, t.pT, t.law),
        None if t.delta is None else t.delta | exact,
        None if t.in_a is None else t.in_a & ~e,
    )
