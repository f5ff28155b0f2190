"""The CPU backend: the compiled extension ``speccascade_fast._C`` (csrc/cpu).

* ``verify`` / ``verify_ragged``: the whole block fused in one C++ op
  (``torch.ops.speccascade.verify_padded`` / ``verify_ragged``, :mod:`._ops`). Same stages as
  :mod:`.reference` (targets, accept, resample, insert), computed from the logits in one
  streaming pass per row plus a second pass only where a rule needs one, with the same
  counter-based randomness (with a divergence budget: the costs TV(pi, pT), the scan and the
  exact positions inside the same op, ``verify_padded.budget``); tokens equal the reference's
  except at floating-point near-ties (the
  kernel sums softmax terms of a fp32 exp in fp64: a uniform within ~1e-7 of an acceptance ratio,
  or two race scores within ~1e-7, may resolve differently). The op reads the padded
  ``[B, gamma(+1), V]`` logits in place (any strides with a unit stride along V: no copy, no
  upcast), or vLLM's flattened layout in one call for any mix of per-request gamma.
* ``keep_bounds``: top-k / top-p keep bounds (:mod:`speccascade_fast.truncation`) by the C++ op
  ``torch.ops.speccascade.keep_bounds`` (O(V) per row, no sort of the vocabulary).
* ``sample``: the drafter's draw, ``_C.sample_cpu``.

The kernels read fp32 / fp16 / bf16 logits (:data:`DTYPES`); the dispatch
(:mod:`speccascade_fast.backends`) sends float64 calls to the reference backend and hands the
verification the keep bounds it computed.
"""
from __future__ import annotations

import torch

from .. import _ext
from ..truncation import torch_keep_bounds, torch_keep_bounds_ragged
from ..types import VerifyOutput
from ._ops import DTYPES, call_padded, call_ragged, handles

__all__ = ["DTYPES", "handles", "is_available", "keep_bounds", "sample", "verify",
           "verify_ragged"]


def _ops_or_none():
    """``torch.ops.speccascade`` once ``speccascade_fast._C`` (which registers it) is loaded."""
    if _ext.load() is None:
        return None
    ops = torch.ops.speccascade
    try:
        ops.verify_padded, ops.verify_ragged, ops.keep_bounds  # noqa: B018  (raises if missing)
    except (AttributeError, RuntimeError):
        return None
    return ops


def is_available(device=None) -> bool:
    """The compiled ops are registered and ``device`` (None: CPU) is a CPU device."""
    dev = torch.device("cpu") if device is None else torch.device(device)
    return dev.type == "cpu" and _ops_or_none() is not None


def _cpu_ops():
    ops = _ops_or_none()
    if ops is None:
        raise RuntimeError(f"the cpu backend's op is not available ({_ext.IMPORT_ERROR})")
    return ops


def verify(draft_logits, draft_tokens, target_logits, *, rule, alpha, temperature, top_k, top_p,
           seed, positions, keep=None, budget=None) -> VerifyOutput:
    """The reference backend's signature (inputs validated by :func:`speccascade_fast.verify`,
    fp32/fp16/bf16 logits, ``budget`` None or each row's float64 divergence budget), plus
    ``keep``: the draft and target rows' keep bounds as the dispatch computed them; None: the
    torch reference's, when top-k / top-p is asked for."""
    if keep is None:
        T = temperature[:, None]
        keep = torch_keep_bounds(top_k, top_p, (draft_logits, T), (target_logits, T))
    return call_padded(_cpu_ops(), draft_logits, draft_tokens, target_logits, rule=rule,
                            alpha=alpha, temperature=temperature, seed=seed,
                            positions=positions, keep=keep, budget=budget)


def verify_ragged(draft_logits, draft_tokens, target_logits, cu_num_draft_tokens,
                  bonus_draft_logits, *, rule, alpha, temperature, seed, positions, top_k=None,
                  top_p=None, max_spec_len=None, keep=None) -> VerifyOutput:
    """The flattened layout (see :func:`speccascade_fast.ragged.verify_ragged`), validated and
    normalised (per-request ``[B]`` tensors), fp32/fp16/bf16 logits. ``keep``: the keep bounds
    ``(draft, target, bonus)`` per flattened row as the dispatch computed them; None: the torch
    reference's, when top-k / top-p is asked for."""
    if keep is None:
        keep = torch_keep_bounds_ragged(draft_logits, target_logits, bonus_draft_logits,
                                        cu_num_draft_tokens, temperature, top_k, top_p)
    return call_ragged(_cpu_ops(), draft_logits, draft_tokens, target_logits,
                            cu_num_draft_tokens, bonus_draft_logits, rule=rule, alpha=alpha,
                            temperature=temperature, seed=seed, positions=positions, keep=keep,
                            max_spec_len=max_spec_len)


def keep_bounds(logits, temperature, top_k, top_p) -> torch.Tensor:
    """The keep bounds of ``logits`` ``[R, V]`` (CPU, fp32/fp16/bf16) with float64
    ``temperature`` ``[R]``: float64 ``[R, 2]`` from the C++ op."""
    return _cpu_ops().keep_bounds(logits, temperature, top_k, top_p)


def sample(logits, temperature, seed, positions, keep=None) -> torch.Tensor:
    """The drafter's draw (:func:`speccascade_fast.sampling.draw`) by ``_C.sample_cpu``: int64
    ``[R]`` from CPU fp32/fp16/bf16 ``logits`` ``[R, V]``, float64 ``temperature`` and int64
    ``seed``, ``positions`` ``[R]``, ``keep`` the rows' ``[R, 2]`` keep bounds or None."""
    return _ext.load().sample_cpu(logits, temperature, seed, positions, keep)
