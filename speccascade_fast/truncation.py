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

Rows with T = 0 or no truncation get ``(-inf, V - 1)``: keep all. Three implementations of the
one definition:

* on CPU (fp32/fp16/bf16 logits) the C++ op ``torch.ops.speccascade.keep_bounds``
  (csrc/cpu/keep_bounds_cpu.cpp: nth_element for top-k, a quickselect by mass for top-p, expected
  O(V) per row, fp32 exp summed in fp64);
* on CUDA with triton, for top-p (fp32/fp16/bf16 logits), the Triton search of
  :mod:`speccascade_fast.kernels.keep_bounds` (up to eight passes over the logits' bits split over
  the vocabulary, fp32 exp summed in fp64, no sort and no host read), after torch's top-k;
* elsewhere, and as the others' oracle in the tests, the torch code below (fp64; one top-k of
  width 64 per row, 4x wider for the rows not yet decided, up to a full sort; or, on CUDA, one
  full sort per row with no host read).
"""
from __future__ import annotations

import torch

__all__ = ["keep_bounds", "keep_bounds_torch", "keep_mask", "keep_bounds_or_none",
           "keep_bounds_pair", "ragged_keep_bounds"]

_FIRST_WIDTH = 64


def keep_bounds(logits: torch.Tensor, temperature: torch.Tensor, top_k: int | None,
                top_p: float | None) -> torch.Tensor:
    """The keep bounds of every row: float64 ``[..., 2]`` = ``(tau, cut)`` (module docstring).

    Args:
        logits: ``[..., V]`` raw logits (any float dtype).
        temperature: float tensor broadcastable to ``logits.shape[:-1]``; rows with T = 0 keep
            everything (their law is the argmax one-hot either way).
        top_k, top_p: validated truncation settings (``None``: off).
    """
    op = _cpu_op(logits)
    if op is None and not (top_p is not None and _searched(logits)):
        return keep_bounds_torch(logits, temperature, top_k, top_p)
    if op is None:
        from .backends import triton as triton_backend

        op = triton_backend.keep_bounds
    return op(*_rows(logits, temperature), top_k, top_p).reshape(*logits.shape[:-1], 2)


def _rows(logits: torch.Tensor, temperature):
    """``logits`` ``[..., V]`` as ``[R, V]`` rows and their temperatures as float64 ``[R]``
    (broadcast to the rows), what the fused implementations take."""
    t = torch.as_tensor(temperature, dtype=torch.float64, device=logits.device)
    return logits.reshape(-1, logits.shape[-1]), t.expand(logits.shape[:-1]).reshape(-1).contiguous()


def keep_bounds_or_none(logits: torch.Tensor, temperature: torch.Tensor, top_k: int | None,
                        top_p: float | None) -> torch.Tensor | None:
    """:func:`keep_bounds` (contiguous), or ``None`` when neither truncation is asked for: the
    optional ``keep`` argument of the fused kernels."""
    if top_k is None and top_p is None:
        return None
    return keep_bounds(logits, temperature, top_k, top_p)


def keep_bounds_pair(a: torch.Tensor, ta, b: torch.Tensor, tb, top_k: int | None,
                     top_p: float | None):
    """:func:`keep_bounds_or_none` of two logit tensors (a verification's draft and target
    rows, each with its temperatures): ``(bounds of a, bounds of b)``, or two ``None``. On the
    Triton search's path (CUDA, top-p) one search covers both when they share dtype and
    vocabulary: the launches of one."""
    if top_k is None and top_p is None:
        return None, None
    V = a.shape[-1]
    if not (top_p is not None and _searched(a) and b.dtype == a.dtype and b.shape[-1] == V
            and b.device == a.device):
        return keep_bounds(a, ta, top_k, top_p), keep_bounds(b, tb, top_k, top_p)
    from .backends import triton as triton_backend

    out = triton_backend.keep_bounds(*_rows(a, ta), top_k, top_p, second=_rows(b, tb))
    n = a.numel() // V
    return out[:n].reshape(*a.shape[:-1], 2), out[n:].reshape(*b.shape[:-1], 2)


def ragged_keep_bounds(draft_logits, target_logits, bonus_draft_logits, cu_num_draft_tokens,
                       temperature, top_k, top_p):
    """The keep bounds of vLLM's flattened layout (:func:`speccascade_fast.verify_ragged`), each
    row with its request's T: ``(draft [N, 2], target [N + B, 2], bonus [B, 2] or None)``, or
    three ``None`` when neither truncation is asked for. No host read. Padding rows (after
    ``cu[B]`` drafts, ``cu[B] + B`` targets) get the last request's T: never read."""
    if top_k is None and top_p is None:
        return None, None, None
    from .ragged import row_owners

    cu = cu_num_draft_tokens.to(device=temperature.device, dtype=torch.int64)
    t_draft = temperature[row_owners(cu, draft_logits.shape[0])[0]]  # gamma_b draft rows
    t_target = temperature[row_owners(cu, target_logits.shape[0], target=True)[0]]  # gamma_b + 1
    kb = (None if bonus_draft_logits is None
          else keep_bounds(bonus_draft_logits, temperature, top_k, top_p))
    kd, kt = keep_bounds_pair(draft_logits, t_draft, target_logits, t_target, top_k, top_p)
    return kd, kt, kb


def _cpu_op(logits):
    if logits.device.type != "cpu" or logits.dtype not in (torch.float32, torch.float16,
                                                            torch.bfloat16):
        return None
    from . import _ext

    if _ext.load() is None:
        return None
    try:
        return torch.ops.speccascade.keep_bounds
    except (AttributeError, RuntimeError):
        return None


def _searched(logits) -> bool:
    """Whether top-p's bound of these logits comes from the Triton search: CUDA fp32/fp16/bf16
    logits, with triton importable."""
    if not logits.is_cuda or logits.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return False
    from .backends import triton as triton_backend

    return triton_backend.is_available(logits.device)


def keep_bounds_torch(logits: torch.Tensor, temperature: torch.Tensor, top_k: int | None,
                      top_p: float | None, *, sync_free: bool | None = None) -> torch.Tensor:
    """:func:`keep_bounds` in torch (fp64): any device and dtype; the C++ op's and the Triton
    search's oracle, and what CUDA runs without triton.

    ``sync_free``: walk every row's full sort at once instead of top-k windows sized on the
    host (O(V log V) per row, but no host read, so it can be captured in a CUDA graph). Same
    bounds either way. None: on CUDA (with top_p, one sort per row measured 1.8-8.1x faster than
    the windows on an H100, before the Triton search: README, "Measured", "On a GPU"), not on
    CPU."""
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


def keep_mask(logits: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    """Boolean ``[..., V]``: the kept set of every row (for tests and the pure-torch paths)."""
    x = logits.to(torch.float32).to(torch.float64)
    tau, cut = bounds[..., :1], bounds[..., 1:]
    ids = torch.arange(x.shape[-1], device=x.device, dtype=torch.float64)
    return (x > tau) | ((x == tau) & (ids <= cut))
