"""The reference backend: Algorithm 4 in plain float64 PyTorch, no cleverness.

Stages (the same names in every backend):

1. ``targets``  - per position, both models' distributions, the deferral decision and the target;
2. ``accept``   - accept draft j with probability min(1, accept_j(x_j) / qT_j(x_j)), stop at the
   first rejection ``j*`` (uniforms from the ACCEPT stream at position ``positions + j``);
3. ``resample`` - at ``j*`` draw from norm(residual) (or, after full acceptance, the bonus token
   from the law at position gamma), Gumbel-max with the RESIDUAL stream at ``positions + j*``;
4. ``insert``   - write the output row: the accepted drafts, the resampled or bonus token at
   column ``j*``, -1 after it, and the deferral flags.

Inputs are validated by :func:`speccascade_fast.verify` before they reach this module. It also
holds the torch implementation of the other kinds of work the dispatch
(:mod:`speccascade_fast.backends`) hands out: :func:`verify_ragged` (each request on its own,
padded), :func:`sample` (the drafter's draw) and :func:`keep_bounds`
(:func:`speccascade_fast.truncation.keep_bounds_torch`).
"""
from __future__ import annotations

import torch

from .. import rng
from ..probs import scaled
from ..rules import (
    Q_FLOOR,
    TOKEN_RULES,
    budget_scan,
    divergence,
    position_targets,
    with_exact_positions,
)
from ..truncation import keep_bounds_torch as keep_bounds
from ..types import VerifyOutput

__all__ = ["is_available", "keep_bounds", "sample", "verify", "verify_ragged"]


def is_available(device=None) -> bool:
    """Always: torch runs on every device."""
    return True


def verify(draft_logits, draft_tokens, target_logits, *, rule, alpha, temperature, top_k, top_p,
           seed, positions, budget=None) -> VerifyOutput:
    """Shapes: ``draft_logits`` ``[B, g or g+1, V]``, ``draft_tokens`` ``[B, g]``,
    ``target_logits`` ``[B, g+1, V]``; ``alpha``, ``temperature`` float64 ``[B]``; ``seed``,
    ``positions`` int64 ``[B]``; ``budget``: None, or float64 ``[B]``, the divergence each row
    may still spend (docs/semantics.md §9): a position whose cost would overspend it is verified
    losslessly, and the output's ``spent`` holds each position's charge."""
    B, gamma = draft_tokens.shape
    V = target_logits.shape[-1]
    device = target_logits.device
    cascade_bonus = draft_logits.shape[1] == gamma + 1
    rows = gamma + 1 if cascade_bonus else gamma

    # 1. targets, for every row the drafter scored
    t = position_targets(
        draft_logits, target_logits[:, :rows], rule=rule,
        alpha=alpha[:, None].expand(B, rows), temperature=temperature[:, None].expand(B, rows),
        top_k=top_k, top_p=top_p,
    )
    spent = exact = None
    if budget is not None:  # 1b. the divergence budget: positions that would overspend are exact
        exact, spent = budget_scan(divergence(rule, t), budget)
        t = with_exact_positions(t, exact)
        if not cascade_bonus:  # the bonus from pT costs nothing
            spent = torch.cat([spent, spent.new_zeros(B, 1)], dim=1)
    if cascade_bonus:
        bonus_law = t.law[:, gamma]
    else:  # bonus="verifier": pi at the bonus position is pT
        bonus_law = scaled(target_logits[:, gamma], temperature, top_k, top_p)

    # 2. accept: the first rejection j* (= number of accepted drafts)
    x = draft_tokens.unsqueeze(-1)
    ratio = t.accept[:, :gamma].gather(-1, x).squeeze(-1) / t.qT[:, :gamma].gather(-1, x).squeeze(
        -1).clamp(min=Q_FLOOR)
    offsets = torch.arange(gamma, device=device)
    u = rng.uniform(seed[:, None], positions[:, None] + offsets, rng.ACCEPT, 0)
    accepted = u < ratio
    num_accepted = torch.cumprod(accepted.to(torch.int64), dim=1).sum(1)

    # 3. resample: residual at j* < gamma, else the bonus token
    j = num_accepted.clamp(max=gamma - 1)
    residual = t.residual[torch.arange(B, device=device), j]
    fallback = t.law[torch.arange(B, device=device), j]
    # an all-zero residual can only come with acceptance probability 1 (it is never normalised);
    # after floating-point rounding fall back to the position's law
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, fallback)
    weights = torch.where((num_accepted < gamma)[:, None], residual, bonus_law)
    noise = rng.exponential_noise(seed, positions + num_accepted, rng.RESIDUAL, V)
    last = rng.race(torch.log(weights), noise)

    # 4. insert: accepted drafts, the resampled / bonus token at j*, then -1; deferral flags
    tokens = torch.full((B, gamma + 1), -1, dtype=torch.int64, device=device)
    cols = torch.arange(gamma + 1, device=device)
    tokens[:, :gamma] = torch.where(cols[:gamma] < num_accepted[:, None], draft_tokens, -1)
    tokens.scatter_(1, num_accepted[:, None], last[:, None])

    deferred = _deferred(rule, t, draft_tokens, last, num_accepted, cascade_bonus)
    if exact is not None:  # an exact position always involves the verifier
        deferred[:, :rows] |= exact
    return VerifyOutput(tokens, num_accepted, num_accepted + 1, deferred, spent)


def _deferred(rule, t, draft_tokens, bonus, num_accepted, cascade_bonus) -> torch.Tensor:
    """delta per position for prefix rules; for token rules whether the draft lies outside A
    (bonus column: whether the emitted bonus token does). The bonus column is True whenever the
    bonus comes from the verifier (bonus="verifier")."""
    B, gamma = draft_tokens.shape
    if t.delta is not None:
        out = t.delta
    elif rule in TOKEN_RULES:
        drafts_out = ~t.in_a[:, :gamma].gather(-1, draft_tokens.unsqueeze(-1)).squeeze(-1)
        if cascade_bonus:
            bonus_out = ~t.in_a[:, gamma].gather(-1, bonus.unsqueeze(-1)).squeeze(-1)
            bonus_out &= num_accepted == gamma
            out = torch.cat([drafts_out, bonus_out[:, None]], dim=1)
        else:
            out = drafts_out
    else:  # spec, lossy, lossy_star always involve the verifier; drafter never does
        out = torch.full(t.qT.shape[:2], rule != "drafter", device=t.qT.device)
    if not cascade_bonus:
        out = torch.cat([out, torch.ones(B, 1, dtype=torch.bool, device=out.device)], dim=1)
    return out.clone()


def verify_ragged(draft_logits, draft_tokens, target_logits, cu_num_draft_tokens,
                  bonus_draft_logits, *, max_gamma=None, rule, alpha, temperature, top_k, top_p,
                  seed, positions) -> VerifyOutput:
    """vLLM's flattened layout (:func:`speccascade_fast.ragged.verify_ragged`, inputs validated
    and normalised there): each request through :func:`verify` on its own padded slice (batch
    invariance makes this exactly the batched result). Outputs are ``max_gamma + 1`` wide
    (None: the longest request's gamma + 1). Reads ``cu_num_draft_tokens`` on the host."""
    c = cu_num_draft_tokens.tolist()
    B = len(c) - 1
    if max_gamma is None:
        max_gamma = max(c[b + 1] - c[b] for b in range(B))
    device = target_logits.device
    tokens = torch.full((B, max_gamma + 1), -1, dtype=torch.int64, device=device)
    deferred = torch.zeros((B, max_gamma + 1), dtype=torch.bool, device=device)
    num_accepted = torch.zeros(B, dtype=torch.int64, device=device)
    for b in range(B):
        lo, hi = c[b], c[b + 1]
        q = draft_logits[lo:hi]
        if bonus_draft_logits is not None:
            bonus = bonus_draft_logits[b:b + 1]
            dtype = torch.promote_types(q.dtype, bonus.dtype)  # exact: the reference reads fp64
            q = torch.cat([q.to(dtype), bonus.to(dtype)])
        out = verify(
            q[None], draft_tokens[lo:hi][None].to(torch.int64),
            target_logits[lo + b:hi + b + 1][None], rule=rule, alpha=alpha[b:b + 1],
            temperature=temperature[b:b + 1], top_k=top_k, top_p=top_p, seed=seed[b:b + 1],
            positions=positions[b:b + 1],
        )
        n = hi - lo + 1
        tokens[b, :n] = out.tokens[0]
        deferred[b, :n] = out.deferred[0]
        num_accepted[b] = out.num_accepted[0]
    return VerifyOutput(tokens, num_accepted, num_accepted + 1, deferred)


def sample(logits, temperature, seed, positions, top_k=None, top_p=None, *,
           greedy=None, min_p=None) -> torch.Tensor:
    """The drafter's draw (:func:`speccascade_fast.sampling.draw`) in torch: int64 ``[R]`` from
    ``logits`` ``[R, V]`` (any float dtype), float64 ``temperature``, int64 ``seed`` and
    ``positions`` ``[R]``: the race ``argmax_v log qT(v) + E_v`` with the DRAFT stream's noise.
    ``greedy``: whether every row has T = 0 (then one argmax, ties to the lowest id, no noise);
    None reads it from ``temperature`` (a host read)."""
    if greedy is None:
        greedy = not bool(temperature.any())
    if greedy:
        return torch.argmax(logits, dim=-1)
    qT = scaled(logits, temperature, top_k, top_p, min_p)
    noise = rng.exponential_noise(seed, positions, rng.DRAFT, logits.shape[-1])
    return rng.race(torch.log(qT), noise)
