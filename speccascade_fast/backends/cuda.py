"""The CUDA verification backend: the CPU backend's fused algorithm in CUDA C++ (csrc/cuda).

Same stages as :mod:`.reference` (targets, accept, resample, insert) and the same algorithm, RNG
keying and fp64 scalar formulas as :mod:`.cpu`, in 2-3 kernel launches split over the vocabulary
(so a batch of one still fills the GPU), with no host synchronisation (CUDA-graph capturable).
Tokens equal the reference's except at floating-point near-ties, as for the cpu backend.

It is the CUDA kernel of the ops ``torch.ops.speccascade.verify_padded`` / ``verify_ragged``
(the calling convention of :mod:`._ops`, shared with :mod:`.cpu`), present only when
``speccascade_fast._C`` was built against a CUDA torch (setup.py). The kernels read fp32 / fp16 /
bf16 logits (:data:`DTYPES`): the dispatch (:mod:`speccascade_fast.backends`) sends float64 calls
to the reference backend. ``top_k`` / ``top_p`` reach the kernels as per-row keep bounds, which
the dispatch computes on the GPU with no host read (top-k by torch, top-p by the Triton search
when triton imports, else from one full sort per row).

``verify_ragged`` (vLLM's flattened layout) runs the same kernels, which read each request's rows
where they lie; the op reads ``cu_num_draft_tokens`` (B + 1 integers) on the host once, for the
output width and the grid, unless ``max_spec_len`` gives the width.

It runs in CI on the CPU under the CUDA emulator (csrc/emu, tests/test_cuda_emu.py: equal to the
reference) and on a GPU in tests/gpu.
"""
from __future__ import annotations

import torch

from .. import _ext
from ..truncation import torch_keep_bounds, torch_keep_bounds_ragged
from ..types import VerifyOutput
from ._ops import DTYPES, call_padded, call_ragged, handles

__all__ = ["DTYPES", "handles", "is_available", "verify", "verify_ragged"]

_OP = "speccascade::verify_padded"


def _ops_or_none():
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
    return dev.type == "cuda" and torch.cuda.is_available() and _ops_or_none() is not None


def verify(draft_logits, draft_tokens, target_logits, *, rule, alpha, temperature, top_k, top_p,
           seed, positions, keep=None, budget=None) -> VerifyOutput:
    """The reference backend's signature (inputs validated by :func:`speccascade_fast.verify`;
    token ids, T, alpha and budget values are not re-checked on the GPU: that would
    synchronise), fp32/fp16/bf16 logits, plus ``keep``: the draft and target rows' keep bounds as
    the dispatch computed them; None: the torch reference's, when top-k / top-p is asked for.
    ``budget``: None, or float64 ``[B]`` each row's divergence budget (docs/semantics.md §9;
    the op's ``.budget`` overload, whose ``spent`` holds each position's charge)."""
    ops = _cuda_ops(target_logits)
    if keep is None:
        T = temperature[:, None]
        keep = torch_keep_bounds(top_k, top_p, (draft_logits, T), (target_logits, T))
    extra = {} if budget is None else {"budget": budget}
    return call_padded(ops, draft_logits, draft_tokens, target_logits, rule=rule,
                            alpha=alpha, temperature=temperature, seed=seed,
                            positions=positions, keep=keep, **extra)


def verify_ragged(draft_logits, draft_tokens, target_logits, cu_num_draft_tokens,
                  bonus_draft_logits, *, rule, alpha, temperature, seed, positions, top_k=None,
                  top_p=None, max_spec_len=None, keep=None) -> VerifyOutput:
    """The flattened layout (see :func:`speccascade_fast.ragged.verify_ragged`), validated and
    normalised (per-request ``[B]`` tensors), fp32/fp16/bf16 logits on one CUDA device; ``keep``
    as in :func:`speccascade_fast.backends.cpu.verify_ragged`.

    With ``max_spec_len`` (an int >= every gamma_b) the output is ``[B, max_spec_len + 1]`` and
    nothing is read on the host (top-k / top-p included: their keep bounds too), so the call
    can be captured in a CUDA graph and replayed with other values of ``cu_num_draft_tokens``
    (same buffers). This entry point does not check values (that would read the device): ``cu``
    starting at 0, strictly increasing, ending at most at N (rows after ``cu[B]`` are padding),
    and every gamma_b <= ``max_spec_len`` are the caller's promise, as in vLLM's rejection
    sampler."""
    ops = _cuda_ops(target_logits)
    if keep is None:
        keep = torch_keep_bounds_ragged(draft_logits, target_logits, bonus_draft_logits,
                                        cu_num_draft_tokens, temperature, top_k, top_p)
    return call_ragged(ops, draft_logits, draft_tokens, target_logits, cu_num_draft_tokens,
                            bonus_draft_logits, rule=rule, alpha=alpha, temperature=temperature,
                            seed=seed, positions=positions, keep=keep,
                            max_spec_len=max_spec_len)


def _cuda_ops(target_logits):
    """``torch.ops.speccascade`` with its CUDA kernels, for logits on a CUDA device; a clear error
    otherwise."""
    if target_logits.device.type != "cuda":
        raise ValueError(
            f"backend='cuda' needs CUDA tensors, got target_logits on {target_logits.device}")
    ops = _ops_or_none()
    if ops is None:
        raise RuntimeError(
            "the cuda backend's op is not available (speccascade_fast._C was not built against a "
            f"CUDA torch{'' if _ext.IMPORT_ERROR is None else ': ' + _ext.IMPORT_ERROR})")
    return ops
