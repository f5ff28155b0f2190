"""The reference verification backend: Algorithm 4 in plain float64 PyTorch, no cleverness.

Stages (the same names in every backend):

1. ``targets``  - per position, both models' distributions, the deferral decision and the target;
2. ``accept``   - accept draft j with probability min(1, accept_j(x_j) / qT_j(x_j)), stop at the
   first rejection ``j*`` (uniforms from the ACCEPT stream at position ``positions + j``);
3. ``resample`` - at ``j*`` draw from norm(residual) (or, after full acceptance, the bonus token
   from the law at position gamma), Gumbel-max with the RESIDUAL stream at ``positions + j*``.

Inputs are validated by :func:`speccascade_fast.verify` before they reach this module.
"""
from __future__ import annotations

import torch

from .. import rng
from ..probs import scaled
from ..rules import Q_FLOOR, TOKEN_RULES, position_targets
from ..types import VerifyOutput


def verify(draft_logits, draft_tokens, target_logits, *, rule, alpha, temperature, top_k, top_p,
           seed, positions) -> VerifyOutput:
    """Shapes: ``draft_logits`` ``[B, g or g+1, V]``, ``draft_tokens`` ``[B, g]``,
    ``target_logits`` ``[B, g+1, V]``; ``alpha``, ``temperature`` float64 ``[B]``; ``seed``,
    ``positions`` int64 ``[B]``."""
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

    tokens = torch.full((B, gamma + 1), -1, dtype=torch.int64, device=device)
    cols = torch.arange(gamma + 1, device=device)
    tokens[:, :gamma] = torch.where(cols[:gamma] < num_accepted[:, None], draft_tokens, -1)
    tokens.scatter_(1, num_accepted[:, None], last[:, None])

    deferred = _deferred(rule, t, draft_tokens, last, num_accepted, cascade_bonus)
    return VerifyOutput(tokens, num_accepted, num_accepted + 1, deferred)


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
