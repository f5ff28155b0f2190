"""The calling convention of the ops ``torch.ops.speccascade.verify_padded`` / ``verify_ragged``,
shared by the ``cpu`` and ``cuda`` backends: the same ops, whose kernel the dispatcher picks by
the tensors' device (csrc/cpu for CPU tensors, csrc/cuda for CUDA ones).

Each backend looks its ops up its own way (the CPU kernels, or the CUDA ones) and hands them to
:func:`call_padded` / :func:`call_ragged`, which turn the backend's normalised arguments into the
ops' (int64 / float64 per-request tensors, the rule's id, the top-k / top-p keep bounds) and the
ops' results into a :class:`~speccascade_fast.types.VerifyOutput`.
"""
from __future__ import annotations

import torch

from ..rules import RULES
from ..types import VerifyOutput

#: logits dtypes the ops' kernels read directly (float64 calls go to the reference backend)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def handles(draft_logits, target_logits, top_k, top_p, *more_logits) -> bool:
    """Whether the ops' kernels cover a call: every logits dtype but float64, with or without
    top-k / top-p (which reach them as keep bounds)."""
    return all(t.dtype in DTYPES for t in (draft_logits, target_logits, *more_logits))


def _per_request(temperature, alpha, seed, positions):
    return (
        seed.to(torch.int64).contiguous(),
        positions.to(torch.int64).contiguous(),
        temperature.to(torch.float64).contiguous(),
        alpha.to(torch.float64).contiguous(),
    )


def call_padded(ops, draft_logits, draft_tokens, target_logits, *, rule, alpha, temperature,
                seed, positions, keep, budget=None) -> VerifyOutput:
    """``ops.verify_padded`` on a backend's normalised arguments; ``keep``: the draft and target
    rows' keep bounds ``(kq, kp)``, ``(None, None)`` without top-k / top-p. ``budget``: None, or
    float64 ``[B]``, each row's divergence budget: then the overload ``verify_padded.budget``,
    whose fourth output is ``spent``."""
    args = (draft_logits, draft_tokens.to(torch.int64), target_logits,
            *_per_request(temperature, alpha, seed, positions), RULES.index(rule), *keep)
    if budget is None:
        tokens, num_accepted, deferred = ops.verify_padded(*args)
        return VerifyOutput(tokens, num_accepted, num_accepted + 1, deferred)
    tokens, num_accepted, deferred, spent = ops.verify_padded.budget(
        *args, budget=budget.to(torch.float64).contiguous())
    return VerifyOutput(tokens, num_accepted, num_accepted + 1, deferred, spent)


def call_ragged(ops, draft_logits, draft_tokens, target_logits, cu_num_draft_tokens,
                bonus_draft_logits, *, rule, alpha, temperature, seed, positions, keep,
                max_spec_len=None) -> VerifyOutput:
    """``ops.verify_ragged`` on :func:`speccascade_fast.ragged.verify_ragged`'s normalised
    arguments; ``keep``: the keep bounds per flattened row, with its request's T, ``(draft,
    target, bonus)`` (three ``None`` without top-k / top-p). ``max_spec_len``: None (the output
    width from ``cu``, read on the host) or an int >= every gamma_b (the width
    ``max_spec_len + 1``; the CUDA op then reads nothing on the host)."""
    tokens, num_accepted, deferred = ops.verify_ragged(
        draft_logits, draft_tokens.to(torch.int64).contiguous(), target_logits,
        cu_num_draft_tokens.to(torch.int64).contiguous(), bonus_draft_logits,
        *_per_request(temperature, alpha, seed, positions), RULES.index(rule), *keep,
        max_spec_len=0 if max_spec_len is None else int(max_spec_len),
    )
    return VerifyOutput(tokens, num_accepted, num_accepted + 1, deferred)
