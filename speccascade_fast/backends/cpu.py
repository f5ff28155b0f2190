"""The CPU verification backend: the whole block fused in one C++ op (csrc/cpu/verify_cpu.cpp).

Same stages as :mod:`.reference` (targets, accept, resample), computed from the logits in one
streaming pass per row plus a second pass only where a rule needs one, with the same
counter-based randomness; tokens equal the reference's except at floating-point near-ties
(the kernel sums softmax terms of a fp32 exp in fp64: a uniform within ~1e-7 of an acceptance
ratio, or two race scores within ~1e-7, may resolve differently).

The op reads the padded ``[B, gamma(+1), V]`` logits in place (any strides with a unit stride
along V: no copy, no upcast). ``top_k`` / ``top_p`` reach it as per-row keep bounds
(:mod:`speccascade_fast.truncation`: the C++ op ``keep_bounds``, O(V) per row, no sort of the
vocabulary), which the kernel applies wherever it forms a scaled law. Calls with float64 logits (the kernel reads
fp32 / fp16 / bf16) go to the reference backend, whole.

``verify_ragged`` is the native entry of :func:`speccascade_fast.ragged.verify_ragged`: vLLM's
flattened layout, one op call for any mix of per-request gamma.
"""
from __future__ import annotations

import torch

from .. import _ext
from ..rules import RULES
from ..truncation import keep_bounds_pair, ragged_keep_bounds
from ..types import VerifyOutput
from . import reference

#: logits dtypes the kernel reads directly
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _ops():
    """``torch.ops.speccascade`` once ``speccascade_fast._C`` (which registers it) is loaded."""
    if _ext.load() is None:
        return None
    ops = torch.ops.speccascade
    try:
        ops.verify_padded, ops.verify_ragged  # noqa: B018  (lookup raises if not registered)
    except (AttributeError, RuntimeError):
        return None
    return ops


def is_available(device=None) -> bool:
    """The compiled op is registered and ``device`` (None: CPU) is a CPU device."""
    dev = torch.device("cpu") if device is None else torch.device(device)
    return dev.type == "cpu" and _ops() is not None


def handles(draft_logits, target_logits, top_k, top_p, *more_logits) -> bool:
    """Whether the kernel covers a call (else the reference backend runs it): every logits dtype
    but float64, with or without top-k / top-p."""
    return all(t.dtype in DTYPES for t in (draft_logits, target_logits, *more_logits))


def _per_request(temperature, alpha, seed, positions):
    return (
        seed.to(torch.int64).contiguous(),
        positions.to(torch.int64).contiguous(),
        temperature.to(torch.float64).contiguous(),
        alpha.to(torch.float64).contiguous(),
    )


def verify(draft_logits, draft_tokens, target_logits, *, rule, alpha, temperature, top_k, top_p,
           seed, positions) -> VerifyOutput:
    """The reference backend's signature; inputs validated by :func:`speccascade_fast.verify`."""
    if not handles(draft_logits, target_logits, top_k, top_p):
        return reference.verify(
            draft_logits, draft_tokens, target_logits, rule=rule, alpha=alpha,
            temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, positions=positions,
        )
    return call_padded(_cpu_ops(), draft_logits, draft_tokens, target_logits, rule=rule,
                       alpha=alpha, temperature=temperature, top_k=top_k, top_p=top_p,
                       seed=seed, positions=positions)


def verify_ragged(draft_logits, draft_tokens, target_logits, cu_num_draft_tokens,
                  bonus_draft_logits, *, rule, alpha, temperature, seed, positions, top_k=None,
                  top_p=None, max_spec_len=None) -> VerifyOutput:
    """The flattened layout (see :func:`speccascade_fast.ragged.verify_ragged`), validated and
    normalised (per-request ``[B]`` tensors), fp32/fp16/bf16 logits."""
    return call_ragged(_cpu_ops(), draft_logits, draft_tokens, target_logits,
                       cu_num_draft_tokens, bonus_draft_logits, rule=rule, alpha=alpha,
                       temperature=temperature, seed=seed, positions=positions, top_k=top_k,
                       top_p=top_p, max_spec_len=max_spec_len)


def _cpu_ops():
    ops = _ops()
    if ops is None:
        raise RuntimeError(f"the cpu backend's op is not available ({_ext.IMPORT_ERROR})")
    return ops


# The ops' calling convention, shared with the cuda backend: the same torch.ops.speccascade ops,
# whose kernel the dispatcher picks by the tensors' device (verify_cpu.cpp / verify_cuda.cpp).
def call_padded(ops, draft_logits, draft_tokens, target_logits, *, rule, alpha, temperature,
                top_k, top_p, seed, positions) -> VerifyOutput:
    """``ops.verify_padded`` on a backend's normalised arguments (top-k / top-p as keep bounds)."""
    tokens, num_accepted, deferred = ops.verify_padded(
        draft_logits, draft_tokens.to(torch.int64), target_logits,
        *_per_request(temperature, alpha, seed, positions), RULES.index(rule),
        *keep_bounds_pair(draft_logits, temperature[:, None], target_logits,
                          temperature[:, None], top_k, top_p),
    )
    return VerifyOutput(tokens, num_accepted, num_accepted + 1, deferred)


def call_ragged(ops, draft_logits, draft_tokens, target_logits, cu_num_draft_tokens,
                bonus_draft_logits, *, rule, alpha, temperature, seed, positions, top_k,
                top_p, max_spec_len=None) -> VerifyOutput:
    """``ops.verify_ragged`` on :func:`speccascade_fast.ragged.verify_ragged`'s normalised
    arguments (keep bounds per flattened row, with its request's T). ``max_spec_len``: None (the
    output width from ``cu``, read on the host) or an int >= every gamma_b (the width
    ``max_spec_len + 1``; the CUDA op then reads nothing on the host)."""
    keep = ragged_keep_bounds(draft_logits, target_logits, bonus_draft_logits,
                              cu_num_draft_tokens, temperature, top_k, top_p)
    tokens, num_accepted, deferred = ops.verify_ragged(
        draft_logits, draft_tokens.to(torch.int64).contiguous(), target_logits,
        cu_num_draft_tokens.to(torch.int64).contiguous(), bonus_draft_logits,
        *_per_request(temperature, alpha, seed, positions), RULES.index(rule), *keep,
        max_spec_len=0 if max_spec_len is None else int(max_spec_len),
    )
    return VerifyOutput(tokens, num_accepted, num_accepted + 1, deferred)
