"""The drafter's draw from ``qT`` (:func:`speccascade_fast.sample`) in two launches, split over the
vocabulary like the verification kernels, so that one row still fills the GPU.

1. ``sample_slices_kernel`` ``(R, S)``: program (r, s) runs the exponential race
   ``argmax_v x_v / T - log(-log u_v)`` over slice s of row r, with ``u_v`` from the DRAFT stream
   at ``(seed_r, position_r, v)`` (:mod:`.rng`, bit for bit), tokens outside the row's top-k /
   top-p keep bound at -inf, and writes the slice's best score and its lowest id; a row with
   T = 0 races the raw logits (the argmax, truncation ignored, as everywhere).
2. ``sample_merge_kernel`` ``(R,)``: the best of the S slices, ties to the lowest id.

The race drops the row's log-partition (``log qT = x / T - const``: the same argmax) and works in
float64 on the exactly converted fp32 / bf16 / fp16 logits, so tokens equal the float64
reference's except where two scores meet within float64 rounding. No atomics (the result does
not depend on which program finishes first), no host read: CUDA-graph capturable.
:func:`launch` runs both (the triton backend's ``sample``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import INT_BIG, NEG_INF, load_keep, truncate
from .launch import check_mode, next_pow2, slice_size, warps
from .rng import DRAFT, TWO_M52, bits52, row_key


@triton.jit
def sample_slices_kernel(x_ptr, sx, t_ptr, seed_ptr, pos_ptr, k_ptr, best_ptr, arg_ptr, V, S,
                         SLICE: tl.constexpr, BLOCK: tl.constexpr, KEEP: tl.constexpr):
    r = tl.program_id(0)
    s = tl.program_id(1)
    row = x_ptr + r.to(tl.int64) * sx
    t = tl.load(t_ptr + r).to(tl.float64)
    greedy = t <= 0.0
    inv_t = 1.0 / tl.where(greedy, 1.0, t)
    key = row_key(tl.load(seed_ptr + r), tl.load(pos_ptr + r), DRAFT)
    tau, cut = load_keep(k_ptr, r, r >= 0, KEEP)
    best = tl.full([], NEG_INF, tl.float64)
    arg = s * SLICE
    for c0 in range(0, SLICE, BLOCK):
        base = s * SLICE + c0
        offs = base + tl.arange(0, BLOCK)
        inb = offs < V
        x = tl.load(row + offs, mask=inb, other=NEG_INF)
        x64 = x.to(tl.float64)
        kept = truncate(x.to(tl.float32), offs, tau, cut, KEEP) > NEG_INF
        e = -tl.log((bits52(key, offs).to(tl.float64) + 0.5) * TWO_M52)  # E = -log u
        raced = tl.where(kept, x64 * inv_t - tl.log(e), NEG_INF)
        score = tl.where(greedy, x64, raced)
        cmax = tl.max(score, 0)
        arg = tl.where(cmax > best, base + tl.argmax(score, 0), arg)  # strict: lower id keeps a tie
        best = tl.maximum(best, cmax)
    out = r.to(tl.int64) * S + s
    tl.store(best_ptr + out, best)
    tl.store(arg_ptr + out, arg)


@triton.jit
def sample_merge_kernel(best_ptr, arg_ptr, out_ptr, S, S_PAD: tl.constexpr):
    r = tl.program_id(0)
    i = tl.arange(0, S_PAD)
    ok = i < S
    base = r.to(tl.int64) * S
    best = tl.load(best_ptr + base + i, mask=ok, other=NEG_INF)
    arg = tl.load(arg_ptr + base + i, mask=ok, other=INT_BIG)
    top = tl.max(best, 0)
    tok = tl.min(tl.where(ok & (best == top), arg, INT_BIG), 0)
    tl.store(out_ptr + r, tok.to(tl.int64))


def launch(logits, temperature, seed, positions, keep=None, *, slice_width: int | None = None,
           block: int | None = None) -> torch.Tensor:
    """The drafter's draw in two launches: int64 ``[R]`` from fp32/bf16/fp16 ``logits``
    ``[R, V]`` (last dim contiguous or copied), float64 ``temperature`` and int64 ``seed``,
    ``positions`` ``[R]`` (inputs checked by the caller), ``keep`` the rows' float64 ``[R, 2]``
    top-k / top-p bounds or None. T = 0 rows take the argmax. ``slice_width`` / ``block``
    (powers of two) override the vocabulary slice per program (default
    :func:`~.launch.slice_size`) and the chunk it loops over (default: the whole slice)."""
    check_mode(sample_slices_kernel, logits.device)
    x = logits if logits.stride(-1) == 1 else logits.contiguous()
    R, V = x.shape
    out = torch.empty((R,), dtype=torch.int64, device=x.device)
    if R == 0:
        return out
    SLICE = slice_width or slice_size(V)
    BLOCK = min(SLICE, block or SLICE)
    S = -(-V // SLICE)
    best = torch.empty((R, S), dtype=torch.float64, device=x.device)
    arg = torch.empty((R, S), dtype=torch.int32, device=x.device)
    t, sd, ps = (v.contiguous() for v in (temperature, seed, positions))
    sample_slices_kernel[(R, S)](
        x, x.stride(0), t, sd, ps, best if keep is None else keep.contiguous(), best, arg, V, S,
        SLICE=SLICE, BLOCK=BLOCK, KEEP=keep is not None, num_warps=warps(BLOCK))
    sample_merge_kernel[(R,)](best, arg, out, S, S_PAD=next_pow2(S))
    return out
