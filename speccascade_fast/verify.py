"""Public entry points for one position's law and one verification block."""
from __future__ import annotations

import torch

from . import backends, checks
from .rules import check_alpha, check_rule, position_targets
from .types import VerifyOutput


def target_distribution(draft_logits, target_logits, *, rule, alpha=None, temperature=1.0,
                        top_k=None, top_p=None) -> torch.Tensor:
    """The exact law of the token emitted at one position, float64 ``[..., V]``.

    Args:
        draft_logits: the drafter's logits ``q``, ``[..., V]`` (any float dtype; -inf masks a token).
        target_logits: the verifier's logits ``p``, same shape.
        rule: one of :data:`speccascade_fast.RULES`.
        alpha: the rule's lenience, a number in the rule's range (``rules.ALPHA_RANGES``) or a
            tensor broadcastable to ``[...]``; ignored (may be None) for ``spec`` and ``drafter``.
        temperature: T >= 0 (0 = greedy), a number or a tensor broadcastable to ``[...]``.
        top_k, top_p: optional truncation applied to both models' scaled distributions alike.

    For ``lossy`` this is its true output law ``m + (1 - sum m) norm(max(0, pT - qT))``.

    Example:
        >>> q, p = torch.randn(2, 8), torch.randn(2, 8)
        >>> target_distribution(q, p, rule="token_v3", alpha=0.3).sum(-1)
        tensor([1., 1.], dtype=torch.float64)
    """
    check_rule(rule)
    check_alpha(rule, alpha)
    checks.logits("draft_logits", draft_logits)
    checks.logits("target_logits", target_logits)
    if draft_logits.shape != target_logits.shape:
        raise ValueError(
            f"draft_logits {tuple(draft_logits.shape)} and target_logits "
            f"{tuple(target_logits.shape)} must have the same shape (same vocabulary)"
        )
    lead = tuple(draft_logits.shape[:-1])
    V = draft_logits.shape[-1]
    device = draft_logits.device
    t = position_targets(
        draft_logits, target_logits, rule=rule,
        alpha=checks.alpha_tensor(alpha, lead, device),
        temperature=checks.temperature(temperature, lead, device),
        top_k=checks.top_k(top_k, V), top_p=checks.top_p(top_p),
    )
    return t.law


def verify(draft_logits, draft_tokens, target_logits, *, rule, alpha=None, temperature=1.0,
           top_k=None, top_p=None, seed=0, positions=None, divergence_budget=None,
           backend="auto") -> VerifyOutput:
    """Verify one block of ``gamma`` drafts per row (Algorithm 4 towards the rule's target).

    Args:
        draft_logits: ``[B, gamma+1, V]`` (last row: the drafter at the bonus position, the
            ``bonus="cascade"`` policy) or ``[B, gamma, V]`` (the bonus token is drawn from the
            verifier, ``bonus="verifier"``). fp32/bf16/fp16/fp64; -inf masks a token.
        draft_tokens: int64 ``[B, gamma]``, each in ``[0, V)``, drawn from the drafter's ``qT``.
        target_logits: the verifier's logits ``[B, gamma+1, V]``.
        rule, alpha, temperature, top_k, top_p: as in :func:`target_distribution`; ``alpha`` and
            ``temperature`` may also be float tensors ``[B]`` (one per request).
        seed: int, or int64 tensor ``[B]`` (one per row).
        positions: int64 tensor ``[B]``: absolute position of the first draft token (RNG key);
            default zeros.
        divergence_budget: None, or a number >= 0 or a float tensor ``[B]``: the total
            variation each row may still spend (docs/semantics.md §9). A position whose cost
            ``TV(pi, pT)`` would take the row's charges past it is verified losslessly
            (pi = pT); the output's ``spent`` ``[B, gamma+1]`` holds each position's charge.
        backend: ``"auto"`` (fastest available) or one of ``backends.available()``.

    Returns:
        :class:`VerifyOutput` ``(tokens [B, gamma+1] with -1 after the emitted ones,
        num_accepted [B], num_emitted [B], deferred [B, gamma+1])``.

    A row's output depends only on its own logits, tokens, seed and position (counter-based
    randomness), not on the batch it rides in nor on the backend.

    Example:
        >>> B, g, V = 2, 3, 16
        >>> q, p = torch.randn(B, g + 1, V), torch.randn(B, g + 1, V)
        >>> x = sample(q[:, :g].reshape(-1, V), seed=0).view(B, g)
        >>> out = verify(q, x, p, rule="token_v3", alpha=0.2, seed=torch.tensor([1, 2]))
        >>> out.tokens.shape
        torch.Size([2, 4])
    """
    check_rule(rule)
    check_alpha(rule, alpha)
    checks.logits("target_logits", target_logits, dims=3)
    checks.logits("draft_logits", draft_logits, dims=3)
    checks.int_tensor("draft_tokens", draft_tokens, 2)
    B, gamma = draft_tokens.shape
    if gamma < 1:
        raise ValueError(f"gamma (draft_tokens.shape[1]) must be >= 1, got {gamma}")
    if B < 1:
        raise ValueError("draft_tokens must have at least one row (B >= 1)")
    V = target_logits.shape[-1]
    if tuple(target_logits.shape[:2]) != (B, gamma + 1):
        raise ValueError(
            f"target_logits must have shape [B, gamma+1, V] = [{B}, {gamma + 1}, V], "
            f"got {tuple(target_logits.shape)}"
        )
    if draft_logits.shape[0] != B or draft_logits.shape[1] not in (gamma, gamma + 1):
        raise ValueError(
            f"draft_logits must have shape [{B}, {gamma + 1}, V] (bonus='cascade') or "
            f"[{B}, {gamma}, V] (bonus='verifier'), got {tuple(draft_logits.shape)}"
        )
    if draft_logits.shape[-1] != V:
        raise ValueError(
            f"vocabulary mismatch: draft_logits has V={draft_logits.shape[-1]}, "
            f"target_logits has V={V}"
        )
    if draft_logits.device != target_logits.device or draft_tokens.device != target_logits.device:
        raise ValueError("draft_logits, draft_tokens and target_logits must be on the same device")
    if bool(((draft_tokens < 0) | (draft_tokens >= V)).any()):
        raise ValueError(f"draft_tokens must be token ids in [0, {V}), got one outside")
    device = target_logits.device
    return backends.get(backend, device)(
        draft_logits, draft_tokens.to(torch.int64), target_logits,
        rule=rule,
        alpha=checks.alpha_tensor(alpha, (B,), device),
        temperature=checks.temperature(temperature, (B,), device),
        top_k=checks.top_k(top_k, V), top_p=checks.top_p(top_p),
        seed=checks.per_row("seed", seed, B, device),
        positions=checks.per_row("positions", positions, B, device, non_negative=True,
                                 span=target_logits.shape[1]),
        budget=checks.divergence_budget(divergence_budget, B, device),
    )
