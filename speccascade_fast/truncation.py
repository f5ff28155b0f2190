"""Top-k / top-p truncation as per-row keep bounds, for the fused kernels.

The reference (:mod:`speccascade_fast.probs`) truncates the scaled distribution with a sort. A
fused kernel instead receives, for every row, the bound ``(tau, cut)`` of the kept set

    K = {v : l_v > tau} ∪ {v : l_v == tau and v <= cut}

in the row's raw logits ``l`` (as fp32: every logit dtype the kernels read converts exactly). It
keeps a token's scaled weight ``exp((l_v - max l) / T)`` when ``v`` is in K and zeroes it
otherwise, while the unscaled ``q1, p1`` (every deferral statistic) stay untruncated. The max
logit is always kept, so the row maxima, argmaxes and T = 0 one-hots are untouched.

K is exactly the reference's set because softmax is monotone in the logit: top-k keeps the
tokens whose logit is >= the k-th largest (ties kept, as Hugging Face does: ``cut = V - 1``);
top-p walks the tokens by logit, descending, ties by lower id, and keeps one while the
renormalised mass before it is < ``top_p``; the last kept token ``v*`` gives
``(tau, cut) = (l_v*, v*)``. The masses are fp64 softmax terms as in the reference, so the
bound differs only where a cumulative mass lies within rounding (~1e-15) of ``top_p``.

Rows with T = 0 or no truncation get ``(-inf, V - 1)``: keep all.

Min-p (applied last, as Hugging Face does) keeps the tokens whose scaled probability is >=
``min_p`` times the largest: ``exp((l_v - max l) / T) >= min_p``, i.e. ``l_v >= max l + T
log(min_p)``, a bound ``(max l + T log(min_p), V - 1)`` that does not depend on what top-k / top-p
removed (they keep the max, and renormalising leaves the ratio alone). :func:`with_min_p`
intersects it with the top-k / top-p bound in torch (one max per row, no host read), for every
backend alike, rounded up to the next fp32 value (the kernels compare fp32 logits with an fp32
tau, which then keeps exactly the logits >= the bound); it differs from the reference's
probability-space test only where a logit lies within rounding (~1e-15) of the bound.

This module is the definition and its torch implementation, :func:`keep_bounds_torch` (fp64; one
top-k of width 64 per row, 4x wider for the rows not yet decided, up to a full sort; or one full
sort per row with no host read), which the reference backend runs and the others are tested
against. The other implementations belong to their backends: the C++ op
``torch.ops.speccascade.keep_bounds`` (cpu backend; csrc/cpu/keep_bounds_cpu.cpp: nth_element for
top-k, a quickselect by mass for top-p, expected O(V) per row, fp32 exp summed in fp64) and the
Triton search of :mod:`speccascade_fast.kernels.keep_bounds` (triton backend, top-p on CUDA: up to
eight passes over the logits' bits split over the vocabulary, fp32 exp summed in fp64, no sort
and no host read). Which one runs for a call is chosen in one place, the dispatch of
:mod:`speccascade_fast.backends` (``backends.keep_bounds``).
"""
from __future__ import annotations

import math

import torch

from .layout import row_temperatures

__all__ = ["keep_bounds_torch", "keep_mask", "rows", "torch_keep_bounds",
           "torch_keep_bounds_ragged", "with_min_p"]

_FIRST_WIDTH = 64


def rows(logits: torch.Tensor, temperature):
    """``logits`` ``[..., V]`` as ``[R, V]`` rows and their temperatures as float64 ``[R]``
    (broadcast to the rows), what the fused implementations take."""
    t = torch.as_tensor(temperature, dtype=torch.float64, device=logits.device)
    return logits.reshape(-1, logits.shape[-1]), t.expand(logits.shape[:-1]).reshape(-1).contiguous()


def torch_keep_bounds(top_k: int | None, top_p: float | None, *parts):
    """:func:`keep_bounds_torch` of each ``(logits, temperature)`` of ``parts`` (a ``None`` part
    stays ``None``), or all ``None`` when neither truncation is asked for: the bounds a fused
    backend falls back on when it is called directly, without the bounds the dispatch computes."""
    if top_k is None and top_p is None:
        return tuple(None for _ in parts)
    return tuple(None if part is None else keep_bounds_torch(part[0], part[1], top_k, top_p)
                 for part in parts)


def torch_keep_bounds_ragged(draft_logits, target_logits, bonus_draft_logits,
                             cu_num_draft_tokens, temperature, top_k, top_p):
    """:func:`torch_keep_bounds` of vLLM's flattened layout (:mod:`speccascade_fast.layout`),
    each row with its request's T: ``(draft [N, 2], target [N + B, 2], bonus [B, 2] or None)``,
    or three ``None``."""
    if top_k is None and top_p is None:
        return None, None, None
    t_draft, t_target = row_temperatures(cu_num_draft_tokens, temperature,
                                         draft_logits.shape[0], target_logits.shape[0])
    bonus = None if bonus_draft_logits is None else (bonus_draft_logits, temperature)
    return torch_keep_bounds(top_k, top_p, (draft_logits, t_draft), (target_logits, t_target),
                             bonus)


def keep_bounds_torch(logits: torch.Tensor, temperature: torch.Tensor, top_k: int | None,
                      top_p: float | None, *, sync_free: bool | None = None) -> torch.Tensor:
    """The keep bounds of every row in torch (fp64): float64 ``[..., 2]`` = ``(tau, cut)``
    (module docstring), any device and dtype; the C++ op's and the Triton search's oracle, and
    what CUDA runs without triton.

    Args:
        logits: ``[..., V]`` raw logits (any float dtype).
        temperature: float tensor broadcastable to ``logits.shape[:-1]``; rows with T = 0 keep
            everything (their law is the argmax one-hot either way).
        top_k, top_p: validated truncation settings (``None``: off).
        sync_free: walk every row's full sort at once instead of top-k windows sized on the
            host (O(V log V) per row, but no host read, so it can be captured in a CUDA graph).
            Same bounds either way. None: on CUDA (where each window's host read stalls the
            stream, one sort per row is the faster of the two), not on CPU."""
    shape, V = logits.shape[:-1], logits.shape[-1]
    if sync_free is None:
        sync_free = logits.is_cuda
    x = logits.reshape(-1, V).to(torch.float32).to(torch.float64)
    t = torch.as_tensor(temperature, dtype=torch.float64, device=logits.device)
    t = t.expand(shape).reshape(-1)
    R = x.shape[0]
    tau = torch.full((R,), -torch.inf, dtype=torch.float64, device=x.device)
    cut = torch.full((R,), float(V - 1), dtype=torch.float64, device=x.device)
    live = t > 0
    if top_k is not None and top_k < V:
        kth = torch.topk(x, top_k, dim=-1).values[:, -1]
        tau = torch.where(live, kth, tau)
    if top_p is not None and sync_free:  # every row, greedy ones too, then keep the live ones
        tp, cp = _top_p_sorted(x, torch.where(live, t, torch.ones_like(t)), tau, top_p)
        tau, cut = torch.where(live, tp, tau), torch.where(live, cp, cut)
    elif top_p is not None and bool(live.any()):
        rows = live.nonzero().flatten()
        tp, cp = _top_p_bounds(x[rows], t[rows], tau[rows], top_p)
        tau[rows], cut[rows] = tp, cp
    return torch.stack([tau, cut], -1).reshape(*shape, 2)


def _scaled_logits(x, t, tau_k):
    """Top-k's bound applied (-inf below it), then the scaled logits and their logsumexp."""
    x = torch.where(x >= tau_k[:, None], x, torch.full_like(x, -torch.inf))
    z = x / t[:, None]
    return x, z, torch.logsumexp(z, dim=-1, keepdim=True)


def _walk(vals, idx, z, lse, top_p):
    """Top-p's walk over tokens ordered by (logit desc, id asc): ``vals`` their logits, ``idx``
    their ids (``[R, W]``, a prefix of the order). Returns (kept count, logit and id of the last
    kept token). The kept tokens form a prefix (probs fall along the walk); tokens of weight 0
    (masked by top-k, or underflowing) never move the bound: their law is 0 either way."""
    probs = torch.exp(z.gather(1, idx) - lse)
    before = torch.cumsum(probs, -1) - probs
    kept = ((before < top_p) & (probs > 0)).sum(-1).clamp(min=1)
    last = (kept - 1)[:, None]
    return kept, vals.gather(1, last)[:, 0], idx.gather(1, last)[:, 0].to(torch.float64)


def _top_p_sorted(x, t, tau_k, top_p):
    """(tau, cut) of top-p for every row from one full sort (stable, so ties keep id order)."""
    x, z, lse = _scaled_logits(x, t, tau_k)
    # the logits are float32 values held in float64: sorting them as float32 gives the same
    # order for half the key bits (a radix sort's passes on the GPU)
    idx = torch.sort(x.to(torch.float32), dim=-1, descending=True, stable=True).indices
    _, tau, cut = _walk(x.gather(1, idx), idx, z, lse, top_p)
    return tau, cut


def _top_p_bounds(x, t, tau_k, top_p):
    """(tau, cut) of top-p over the rows ``x`` (fp64 logits, T > 0), after top-k's bound:
    windows of the order, 4x wider for the rows not yet decided, up to a full sort."""
    R, V = x.shape
    x, z, lse = _scaled_logits(x, t, tau_k)
    tau = torch.empty(R, dtype=torch.float64, device=x.device)
    cut = torch.empty(R, dtype=torch.float64, device=x.device)
    todo = torch.arange(R, device=x.device)
    width = min(_FIRST_WIDTH, V)
    while todo.numel():
        vals, idx = torch.topk(x[todo], width, dim=-1)
        # order by (logit desc, id asc): sort by id, then a stable sort by logit
        idx, o = torch.sort(idx, dim=-1)
        vals = vals.gather(1, o)
        vals, o = torch.sort(vals, dim=-1, descending=True, stable=True)
        idx = idx.gather(1, o)
        kept, tl, cl = _walk(vals, idx, z[todo], lse[todo], top_p)
        # decided unless the walk may continue past the window, or the last kept logit ties
        # the window's smallest (tokens with that logit may lie outside the window)
        done = (width == V) | ((kept < width) & (tl > vals[:, -1]))
        tau[todo[done]] = tl[done]
        cut[todo[done]] = cl[done]
        todo = todo[~done]
        width = min(width * 4, V)
    return tau, cut


def with_min_p(bounds: torch.Tensor | None, logits: torch.Tensor, temperature,
               min_p: float | None) -> torch.Tensor | None:
    """``bounds`` (float64 ``[R, 2]`` or None: keep all) intersected with min-p's keep bound
    (module docstring) of ``logits`` ``[R, V]`` with ``temperature`` broadcastable to ``[R]``;
    ``bounds`` itself when ``min_p`` is None. Rows with T = 0 keep their bounds."""
    if min_p is None:
        return bounds
    R, V = logits.shape
    x = logits.to(torch.float32).to(torch.float64)
    t = torch.as_tensor(temperature, dtype=torch.float64, device=x.device).expand(R)
    tau_m = x.max(-1).values + t * math.log(min_p)
    # the kernels hold tau in fp32 and compare fp32 logits: the smallest fp32 >= the bound keeps
    # exactly the logits >= the bound (rounding to nearest could admit one just below it)
    t32 = tau_m.to(torch.float32)
    t32 = torch.where(t32.to(torch.float64) < tau_m,
                      torch.nextafter(t32, torch.full_like(t32, torch.inf)), t32)
    tau_m = torch.where(t > 0, t32.to(torch.float64), torch.full_like(tau_m, -torch.inf))
    if bounds is None:
        tau, cut = torch.full_like(tau_m, -torch.inf), torch.full_like(tau_m, float(V - 1))
    else:
        tau, cut = bounds[:, 0], bounds[:, 1]
    tighter = tau_m > tau  # at a tie the top-k / top-p set is the smaller one
    return torch.stack([torch.where(tighter, tau_m, tau),
                        torch.where(tighter, torch.full_like(cut, float(V - 1)), cut)], -1)


def keep_mask(logits: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    """Boolean ``[..., V]``: the kept set of every row (for tests and the pure-torch paths)."""
    x = logits.to(torch.float32).to(torch.float64)
    tau, cut = bounds[..., :1], bounds[..., 1:]
    ids = torch.arange(x.shape[-1], device=x.device, dtype=torch.float64)
    return (x > tau) | ((x == tau) & (ids <= cut))
