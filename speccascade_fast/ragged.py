"""Verification over vLLM's flattened ("ragged") layout: many requests, each with its own gamma.

Request ``b`` owns ``gamma_b = cu[b+1] - cu[b]`` draft rows ``cu[b]:cu[b+1]`` of ``draft_logits``
and ``gamma_b + 1`` target rows ``cu[b]+b : cu[b+1]+b+1`` of ``target_logits`` (its drafts and the
bonus position), so nothing is padded and nothing is copied to pad it (:mod:`.layout`).

:func:`verify_ragged` checks its inputs and hands them to the dispatch,
:func:`speccascade_fast.backends.verify_ragged`, which :func:`call` is without the checks.
"""
from __future__ import annotations

from . import backends, checks
from .layout import check_cu
from .rules import check_alpha, check_rule
from .types import VerifyOutput

__all__ = ["verify_ragged"]


def verify_ragged(draft_logits, draft_tokens, target_logits, cu_num_draft_tokens, *, rule,
                  alpha=None, temperature=1.0, top_k=None, top_p=None, seed=0, positions=None,
                  bonus_draft_logits=None, max_spec_len=None, backend="auto") -> VerifyOutput:
    """Verify B requests with per-request block sizes in one call (Algorithm 4, as
    :func:`speccascade_fast.verify`).

    Args:
        draft_logits: ``[N, V]``, N = sum of gamma_b: the drafter's logits at every draft position
            (fp32/bf16/fp16/fp64; -inf masks a token).
        draft_tokens: int64 ``[N]``: the drafts, each in ``[0, V)``, drawn from the drafter's qT.
        target_logits: ``[N + B, V]``: the verifier's logits; request b's rows are
            ``cu[b] + b .. cu[b+1] + b`` (its gamma_b drafts, then its bonus position).
        cu_num_draft_tokens: int64 ``[B + 1]``: 0, then the cumulative draft counts (strictly
            increasing: gamma_b >= 1), ending at N.
        rule, alpha, temperature, top_k, top_p: as in :func:`speccascade_fast.verify`; ``alpha``
            and ``temperature`` may be float tensors ``[B]`` (one per request).
        seed: int or int64 tensor ``[B]``.
        positions: int64 tensor ``[B]``: absolute position of each request's first draft (the RNG
            key); default zeros.
        bonus_draft_logits: ``[B, V]``, the drafter's logits at each request's bonus position
            (``bonus="cascade"``: the bonus token follows the rule's target), or None
            (``bonus="verifier"``: it is drawn from pT).
        max_spec_len: None (the output width follows the longest request) or vLLM's
            ``max_spec_len``, an int >= every gamma_b: the output is ``[B, max_spec_len + 1]``,
            a width that does not depend on ``cu``'s values, and ``cu`` may end before N: the
            draft rows from ``cu[B]`` on (and target rows from ``cu[B] + B`` on) are padding,
            never read, so fixed-size buffers serve any ``cu`` (their tokens must still be ids
            in ``[0, V)``). (This function validates its inputs, which reads the device; the
            unchecked call that a CUDA graph can capture is :func:`call` with ``max_spec_len``
            on the ``cuda`` or ``triton`` backend.)
        backend: ``"auto"``, ``"reference"`` (each request verified on its own, padded:
            exactly what :func:`speccascade_fast.verify` returns for it), ``"cpu"`` (one fused
            op call over the flattened rows, no copy), ``"triton"`` or ``"cuda"`` (the same 2-3
            launches as the padded layout, reading the flattened rows where they lie). Float64
            logits go to ``"reference"`` on every backend but ``"triton"``.

    Returns:
        :class:`VerifyOutput` with ``tokens`` int64 ``[B, W]`` (accepted drafts, the resampled
        or bonus token, then -1), ``num_accepted`` / ``num_emitted`` ``[B]`` and ``deferred``
        bool ``[B, W]`` (request b's first gamma_b + 1 columns as in
        :func:`speccascade_fast.verify`, then False); W = max gamma_b + 1, or
        ``max_spec_len + 1``.

    Example:
        >>> V, cu = 32, torch.tensor([0, 1, 4])          # gamma = 1 and 3
        >>> q, p = torch.randn(4, V), torch.randn(4 + 2, V)
        >>> x = sample(q, seed=0)
        >>> out = verify_ragged(q, x, p, cu, rule="token_v3", alpha=0.3, seed=torch.tensor([1, 2]))
        >>> out.tokens.shape
        torch.Size([2, 4])
    """
    check_rule(rule)
    check_alpha(rule, alpha)
    for name, x in (("draft_logits", draft_logits), ("target_logits", target_logits)):
        checks.logits(name, x[:0] if getattr(x, "dim", lambda: 0)() == 2 else x, dims=2)
    if bonus_draft_logits is not None:
        checks.logits("bonus_draft_logits", bonus_draft_logits, dims=2)
    draft_tokens = checks.int_tensor("draft_tokens", draft_tokens, 1)
    cu = checks.int_tensor("cu_num_draft_tokens", cu_num_draft_tokens, 1)
    N, V = draft_logits.shape
    if draft_tokens.shape[0] != N:
        raise ValueError(
            f"draft_tokens must have shape [N] = [{N}] (one per draft_logits row), got "
            f"{tuple(draft_tokens.shape)}"
        )
    c = check_cu(cu, N, padded=max_spec_len is not None)
    B = len(c) - 1
    max_gamma = max(c[b + 1] - c[b] for b in range(B))
    if max_spec_len is not None:
        if isinstance(max_spec_len, bool) or not isinstance(max_spec_len, int) \
                or max_spec_len < max_gamma:
            raise ValueError(
                f"max_spec_len must be None or an int >= every request's gamma (here "
                f"{max_gamma}), got {max_spec_len!r}")
        max_gamma = max_spec_len
    if target_logits.shape[-1] != V:
        raise ValueError(
            f"vocabulary mismatch: draft_logits has V={V}, target_logits has "
            f"V={target_logits.shape[-1]}"
        )
    if target_logits.shape[0] != N + B:
        raise ValueError(
            f"target_logits must have N + B = {N} + {B} = {N + B} rows (each request's drafts "
            f"and its bonus position), got {target_logits.shape[0]}"
        )
    if bonus_draft_logits is not None and tuple(bonus_draft_logits.shape) != (B, V):
        raise ValueError(
            f"bonus_draft_logits must have shape [B, V] = [{B}, {V}], got "
            f"{tuple(bonus_draft_logits.shape)}"
        )
    # only the rows the requests own: with max_spec_len the rows after cu[B] are padding that is
    # never read (it may be uninitialised memory)
    checks.logits("draft_logits", draft_logits[: c[-1]], dims=2)
    checks.logits("target_logits", target_logits[: c[-1] + B], dims=2)
    device = target_logits.device
    tensors = [draft_logits, draft_tokens, cu] + (
        [bonus_draft_logits] if bonus_draft_logits is not None else [])
    if any(t.device != device for t in tensors):
        raise ValueError(
            "draft_logits, draft_tokens, target_logits, cu_num_draft_tokens and "
            "bonus_draft_logits must be on the same device"
        )
    used = draft_tokens[: c[-1]]  # (the padding rows' tokens are never read either)
    if N and bool(((used < 0) | (used >= V)).any()):
        raise ValueError(f"draft_tokens must be token ids in [0, {V}), got one outside")
    alpha_b = checks.alpha_tensor(alpha, (B,), device)
    temperature_b = checks.temperature(temperature, (B,), device)
    top_k, top_p = checks.top_k(top_k, V), checks.top_p(top_p)
    seed_b = checks.per_row("seed", seed, B, device)
    positions_b = checks.per_row("positions", positions, B, device, non_negative=True,
                                 span=max_gamma + 1)

    name = backends.resolve(backend, device, "verify_ragged")  # a ValueError naming them
    return backends.verify_ragged(
        name, draft_logits, draft_tokens, target_logits, cu, bonus_draft_logits,
        max_gamma=max_gamma, max_spec_len=max_spec_len, rule=rule, alpha=alpha_b,
        temperature=temperature_b, top_k=top_k, top_p=top_p, seed=seed_b, positions=positions_b)
