"""The CUDA verification backend: the CPU backend's fused algorithm in CUDA C++ (csrc/cuda/verify.cu).

Same stages as :mod:`.reference` (targets, accept, resample) and the same algorithm, RNG keying
and fp64 scalar formulas as :mod:`.cpu`, in 2-3 kernel launches split over the vocabulary (so a
batch of one still fills the GPU), with no host synchronisation (CUDA-graph capturable). Tokens
equal the reference's except at floating-point near-ties, as for the cpu backend.

It is the CUDA kernel of the op ``torch.ops.speccascade.verify_padded``, present only when
``speccascade_fast._C`` was built against a CUDA torch (setup.py). Calls it does not cover go to
the reference backend, whole, exactly as in :mod:`.cpu`: float64 logits (the kernels read fp32 /
fp16 / bf16). ``top_k`` / ``top_p`` reach the kernel as per-row keep bounds
(:mod:`speccascade_fast.truncation`, computed on the GPU with no host read: top-k by torch,
top-p by the Triton search when triton imports, else from one full sort per row).

``verify_ragged`` (vLLM's flattened layout) runs the same kernels, which read each request's rows
where they lie (``torch.ops.speccascade.verify_ragged``'s CUDA kernel); the op reads
``cu_num_draft_tokens`` (B + 1 integers) on the host once, for the output width and the grid.

Status: compile-checked for sm_80 and sm_90a; run in CI on the CPU under the CUDA emulator
(csrc/emu, tests/test_cuda_emu.py: equal to the reference); on an H100 (2026-11-24) equal to the
reference in tests/gpu, 1.3-3.2x slower than the triton backend (README, "On a GPU").
"""
from __future__ import annotations

import torch

from .. import _ext
from ..types import VerifyOutput
from . import reference
from .cpu import call_padded, call_ragged, handles  # handles: the cpu backend's coverage (not fp64)

__all__ = ["handles", "is_available", "verify", "verify_ragged"]

_OP = "speccascade::verify_padded"


def _ops():
    """``torch.ops.speccascade`` if ``speccascade_fast._C`` registered a CUDA kernel for
    ``verify_padded`` (a build against a CUDA torch), else None."""
    if _ext.load() is None or not _ext.HAS_CUDA_EXT:
        return None
    try:
        if not torch._C._dispatch_has_kernel_for_dispatch_key(_OP, "CUDA"):
            return None
    except RuntimeError:  # the op itself is not registered
        return None
    return torch.ops.speccascade


def is_available(device=None) -> bool:
    """True only for a CUDA ``device`` (None means the CPU: False) with a GPU present and the
    op's CUDA kernel registered."""
    dev = torch.device("cpu") if device is None else torch.device(device)
    return dev.type == "cuda" and torch.cuda.is_available() and _ops() is not None


def verify(draft_logits, draft_tokens, target_logits, *, rule, alpha, temperature, top_k, top_p,
           seed, positions) -> VerifyOutput:
    """The reference backend's signature; inputs validated by :func:`speccascade_fast.verify`
    (token ids, T and alpha values are not re-checked on the GPU: that would synchronise)."""
    if not handles(draft_logits, target_logits, top_k, top_p):
        return reference.verify(
            draft_logits, draft_tokens, target_logits, rule=rule, alpha=alpha,
            temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, positions=positions,
        )
    return call_padded(_cuda_ops(target_logits), draft_logits, draft_tokens, target_logits,
                       rule=rule, alpha=alpha, temperature=temperature, top_k=top_k, top_p=top_p,
                       seed=seed, positions=positions)


def verify_ragged(draft_logits, draft_tokens, target_logits, cu_num_draft_tokens,
                  bonus_draft_logits, *, rule, alpha, temperature, seed, positions, top_k=None,
                  top_p=None, max_spec_len=None) -> VerifyOutput:
    """The flattened layout (see :func:`speccascade_fast.ragged.verify_ragged`), validated and
    normalised (per-request ``[B]`` tensors), fp32/fp16/bf16 logits on one CUDA device.

    With ``max_spec_len`` (an int >= every gamma_b) the output is ``[B, max_spec_len + 1]`` and
    nothing is read on the host (top-k / top-p included: their keep bounds too), so the call
    can be captured in a CUDA graph and replayed with other values of ``cu_num_draft_tokens``
    (same buffers). This entry point does not check values (that would
    read the device): ``cu`` starting at 0, strictly increasing, ending at most at N (rows after
    ``cu[B]`` are padding), and every gamma_b <= ``max_spec_len`` are the caller's promise, as
    in vLLM's rejection sampler."""
    return call_ragged(_cuda_ops(target_logits), draft_logits, draft_tokens, target_logits,
                       cu_num_draft_tokens, bonus_draft_logits, rule=rule, alpha=alpha,
                       temperature=temperature, seed=seed, positions=positions, top_k=top_k,
                       top_p=top_p, max_spec_len=max_spec_len)


def _cuda_ops(target_logits):
    """``torch.ops.speccascade`` with its CUDA kernels, for logits on a CUDA device; a clear error
    otherwise."""
    if target_logits.device.type != "cuda":
        raise ValueError(
            f"backend='cuda' needs CUDA tensors, got target_logits on {target_logits.device}")
    ops = _ops()
    if ops is None:
        raise RuntimeError(
            "the cuda backend's op is not available (speccascade_fast._C was not built against a "
            f"CUDA torch{'' if _ext.IMPORT_ERROR is None else ': ' + _ext.IMPORT_ERROR})")
    return ops
