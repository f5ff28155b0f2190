"""Top-p's keep bound (:mod:`speccascade_fast.truncation`) without a sort: a search over the
logits' float32 bit patterns, split over the vocabulary, no host read: 7 launches for bf16
logits, 8 for fp16, 11 for fp32.

A row's weights are ``w_v = exp((l_v - m) / T)`` (float32, ``m`` the row max; 0 below top-k's
bound ``tau_k``), ``Z`` their sum and the target ``top_p * Z``. The last kept token t is the
first, walking by (logit desc, id asc), at which the cumulative weight reaches the target, so
its logit ``tau`` is the largest value whose upper mass ``M(tau) = Σ_{l_v >= tau} w_v`` reaches
it, and the cut is the id of the n-th token tied at ``tau``, n the fewest ties (each of weight
``w(tau)``) that take the mass above ``tau`` to the target.

Logits map to keys in [0, 2^32) monotone in their value (:func:`_key`). P passes narrow the key
interval that holds ``tau`` 16-fold each: pass p sums, per vocabulary slice, the weight of the
row's tokens in each sixteenth of the interval, and every program of the next launch adds the
slices' partial sums (in one fixed order, so the decision is deterministic and the same in every
program) and keeps the sixteenth where the mass from the top first reaches the target
(:func:`_decide`). P = 8 resolves a float32 key; bf16 and fp16 logits leave the last 16 and 13
bits of their float32 patterns constant (per sign), so P = 4 and 5 already leave an interval
holding one value of theirs: ``tau``. Sums are float64 over the float32 weights, the C++ op's
numerics: the bound differs from the float64 reference only where a cumulative mass lies within
rounding of the target. If rounding leaves the target out of reach (``top_p = 1``), the lowest
sixteenth of positive weight is followed: every token of positive weight is kept.

Launches, each over (rows, slices):

1. ``keep_max_kernel``: slice maxima (each later program takes the row max from them);
2. ``keep_pass_kernel`` for p = 0..P-1: the decision of pass p - 1 (program (r, 0) stores it, and
   at p = 1 the target from pass 0's sums, which cover the whole row), then pass p's partial sums;
3. ``keep_ties_kernel``: the last decision, then the slice's count of the tokens in the interval
   (the ties at ``tau``) and their value;
4. ``keep_final_kernel``: ``tau``, n, the slice holding the n-th tie, and that slice's program
   finds its id. Rows with T = 0, or no finite logit, get ``(-inf, V - 1)`` (keep all).

Rows may come from two tensors of one dtype and vocabulary (rows below ``R1`` from the first):
a verification's draft and target rows take one search. No atomics and no host read:
deterministic and CUDA-graph capturable. Constexprs: the block each program loops over; the
slice width, S, the pass and P are runtime values. :func:`launch` runs the search (the triton
backend's ``keep_bounds``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import INT_BIG, NEG_INF
from .launch import check_mode, next_pow2, sm_count, spread

NB = tl.constexpr(16)  # sixteenths per pass
SB = tl.constexpr(32)  # slices' partial sums read per chunk


@triton.jit
def _key(x):
    """float32 -> int64 key in [0, 2^32), monotone in the value (-0.0 and +0.0 alike)."""
    x = tl.where(x == 0.0, 0.0, x)
    b = x.to(tl.int32, bitcast=True)
    k = b ^ ((b >> 31) & 0x7FFFFFFF)
    return k.to(tl.int64) + 2147483648


@triton.jit
def _row(t_ptr, tk_ptr, mx_ptr, r, S):
    """Row r's (live, m, 1/T, tau_k): live when T > 0 and some logit is finite; m the max over
    the slice maxima."""
    t = tl.load(t_ptr + r)
    tauk = tl.load(tk_ptr + r)
    m = tl.full([], NEG_INF, tl.float32)
    for s0 in range(0, S, SB):
        ss = s0 + tl.arange(0, SB)
        m = tl.maximum(m, tl.max(tl.load(mx_ptr + r * S + ss, mask=ss < S, other=NEG_INF), 0))
    live = (t > 0.0) & (m > NEG_INF)
    inv_t = (1.0 / tl.where(t > 0.0, t, 1.0)).to(tl.float32)
    return live, m, inv_t, tauk


@triton.jit
def _weight(x, m, inv_t, tauk):
    """float32 weight exp((x - m) / T) of logits x (0 below top-k's bound, and at -inf)."""
    return tl.where(x >= tauk, tl.exp((x - m) * inv_t), 0.0)


@triton.jit
def _load(x_ptr, sx, x2_ptr, sx2, R1, r, offs, V):
    """Row r's logits at ``offs`` as float32: rows below R1 from the first tensor, the others
    from the second (a verification's draft and target rows in one search)."""
    row = x_ptr + r.to(tl.int64) * sx
    if r >= R1:
        row = x2_ptr + (r - R1).to(tl.int64) * sx2
    x = tl.load(row + offs, mask=offs < V, other=NEG_INF)
    return x.to(tl.float32)


@triton.jit
def _decide(h_ptr, lo_ptr, acc_ptr, R, r, S, p, target):
    """Pass p's decision from its slices' partial sums ``h[p, r, s, :]``: the sixteenth where the
    mass from the top first reaches ``target``. Returns the next interval's low key, the mass
    above it, and the pass's total (pass 0: Z)."""
    j = tl.arange(0, NB)
    base = (r + R * p).to(tl.int64) * S * NB
    tot = tl.zeros([NB], tl.float64)
    for s0 in range(0, S, SB):
        ss = s0 + tl.arange(0, SB)
        blk = tl.load(h_ptr + base + ss[:, None] * NB + j[None, :], mask=(ss < S)[:, None],
                      other=0.0)
        tot += tl.sum(blk, 0)
    lo = tl.load(lo_ptr + R * p + r)
    acc = tl.load(acc_ptr + R * p + r)
    cum = acc + tl.sum(tl.where(j[None, :] >= j[:, None], tot[None, :], 0.0), 1)  # from the top
    pick = tl.max(tl.where(cum >= target, j, -1), 0)
    lowest = tl.minimum(tl.min(tl.where(tot > 0.0, j, NB), 0), NB - 1)
    pick = tl.where(pick >= 0, pick, lowest)  # out of reach (rounding): keep all of weight > 0
    above = tl.sum(tl.where(j == pick + 1, cum, 0.0), 0)  # acc + the mass above the pick
    above = tl.where(pick == NB - 1, acc, above)
    shift = 28 - 4 * p
    return lo + (pick.to(tl.int64) << shift), above, tl.sum(tot, 0)


@triton.jit(do_not_specialize=["R1", "S", "SLICE"])
def keep_max_kernel(x_ptr, sx, x2_ptr, sx2, R1, mx_ptr, V, S, SLICE, BLOCK: tl.constexpr):
    r = tl.program_id(0)
    s = tl.program_id(1)
    m = tl.full([], NEG_INF, tl.float32)
    for c0 in range(0, SLICE, BLOCK):
        offs = s * SLICE + c0 + tl.arange(0, BLOCK)
        m = tl.maximum(m, tl.max(_load(x_ptr, sx, x2_ptr, sx2, R1, r, offs, V), 0))
    tl.store(mx_ptr + r * S + s, m)


@triton.jit(do_not_specialize=["R1", "R", "S", "SLICE", "p"])
def keep_pass_kernel(x_ptr, sx, x2_ptr, sx2, R1, t_ptr, tk_ptr, tp_ptr, mx_ptr, h_ptr, lo_ptr,
                     acc_ptr, tgt_ptr, R, V, S, SLICE, p, BLOCK: tl.constexpr):
    r = tl.program_id(0)
    s = tl.program_id(1)
    live, m, inv_t, tauk = _row(t_ptr, tk_ptr, mx_ptr, r, S)
    lo = tl.full([], 0, tl.int64)
    acc = tl.full([], 0.0, tl.float64)
    if p > 0:
        if p == 1:
            target = tl.full([], float("inf"), tl.float64)  # pass 0's total first
            _, _, z = _decide(h_ptr, lo_ptr, acc_ptr, R, r, S, 0, target)
            target = tl.load(tp_ptr) * z
            if s == 0:
                tl.store(tgt_ptr + r, target)
        else:
            target = tl.load(tgt_ptr + r)
        lo, acc, _ = _decide(h_ptr, lo_ptr, acc_ptr, R, r, S, p - 1, target)
        if s == 0:
            tl.store(lo_ptr + R * p + r, lo)
            tl.store(acc_ptr + R * p + r, acc)
    j = tl.arange(0, NB)
    shift = 28 - 4 * p
    width = tl.full([], NB, tl.int64) << shift
    part = tl.zeros([BLOCK, NB], tl.float64)  # reduced once, after the loop
    if live:
        for c0 in range(0, SLICE, BLOCK):
            offs = s * SLICE + c0 + tl.arange(0, BLOCK)
            x = _load(x_ptr, sx, x2_ptr, sx2, R1, r, offs, V)
            w = _weight(x, m, inv_t, tauk).to(tl.float64)
            d = _key(x) - lo
            bucket = tl.where((d >= 0) & (d < width), d >> shift, -1)
            part += tl.where(bucket[:, None] == j[None, :], w[:, None], 0.0)
    tl.store(h_ptr + ((r + R * p).to(tl.int64) * S + s) * NB + j, tl.sum(part, 0))


@triton.jit(do_not_specialize=["R1", "R", "S", "SLICE", "P"])
def keep_ties_kernel(x_ptr, sx, x2_ptr, sx2, R1, t_ptr, tk_ptr, mx_ptr, h_ptr, lo_ptr, acc_ptr,
                     tgt_ptr, cnt_ptr, val_ptr, R, V, S, SLICE, P, BLOCK: tl.constexpr):
    r = tl.program_id(0)
    s = tl.program_id(1)
    live, m, inv_t, tauk = _row(t_ptr, tk_ptr, mx_ptr, r, S)
    lo, above, _ = _decide(h_ptr, lo_ptr, acc_ptr, R, r, S, P - 1, tl.load(tgt_ptr + r))
    if s == 0:
        tl.store(lo_ptr + R * P + r, lo)
        tl.store(acc_ptr + R * P + r, above)
    width = tl.full([], 1, tl.int64) << (32 - 4 * P)  # holds one value of the logits' dtype
    n = tl.full([], 0, tl.int32)
    tau = tl.full([], NEG_INF, tl.float32)
    if live:
        for c0 in range(0, SLICE, BLOCK):
            offs = s * SLICE + c0 + tl.arange(0, BLOCK)
            x = _load(x_ptr, sx, x2_ptr, sx2, R1, r, offs, V)
            d = _key(x) - lo
            tie = (d >= 0) & (d < width)
            n += tl.sum(tie.to(tl.int32), 0)
            tau = tl.maximum(tau, tl.max(tl.where(tie, x, NEG_INF), 0))
    tl.store(cnt_ptr + r * S + s, n)
    tl.store(val_ptr + r * S + s, tau)


@triton.jit(do_not_specialize=["R1", "R", "V", "S", "SLICE", "P"])
def keep_final_kernel(x_ptr, sx, x2_ptr, sx2, R1, t_ptr, tk_ptr, mx_ptr, acc_ptr, tgt_ptr, cnt_ptr,
                      val_ptr, out_ptr, R, V, S, SLICE, P, BLOCK: tl.constexpr):
    r = tl.program_id(0)
    s = tl.program_id(1)
    live, m, inv_t, tauk = _row(t_ptr, tk_ptr, mx_ptr, r, S)
    if live:
        above = tl.load(acc_ptr + R * P + r)
        total = tl.full([], 0, tl.int32)
        tau = tl.full([], NEG_INF, tl.float32)
        for s0 in range(0, S, SB):
            ss = s0 + tl.arange(0, SB)
            total += tl.sum(tl.load(cnt_ptr + r * S + ss, mask=ss < S, other=0), 0)
            tau = tl.maximum(tau, tl.max(tl.load(val_ptr + r * S + ss, mask=ss < S,
                                                 other=NEG_INF), 0))
        w = _weight(tau, m, inv_t, tauk).to(tl.float64)
        # the fewest ties at tau that take the mass above it to the target (all of them when
        # rounding leaves the target out of reach)
        need = tl.ceil((tl.load(tgt_ptr + r) - above) / tl.where(w > 0.0, w, 1.0))
        need = tl.where(w > 0.0, need, total.to(tl.float64))
        n = tl.minimum(tl.maximum(need, 1.0), total.to(tl.float64)).to(tl.int32)
        before = tl.full([], 0, tl.int32)  # ties in the slices before the chunk
        owner = tl.full([], -1, tl.int32)  # the slice holding the n-th tie
        owner_before = tl.full([], 0, tl.int32)  # ties before that slice
        for s0 in range(0, S, SB):
            ss = s0 + tl.arange(0, SB)
            c = tl.load(cnt_ptr + r * S + ss, mask=ss < S, other=0)
            upto = tl.cumsum(c, 0) + before
            hit = (upto >= n) & (upto - c < n)
            owner = tl.maximum(owner, tl.max(tl.where(hit, ss, -1), 0))
            owner_before = tl.maximum(owner_before, tl.max(tl.where(hit, upto - c, 0), 0))
            before += tl.sum(c, 0)
        if s == owner:
            k = n - owner_before
            run = tl.full([], 0, tl.int32)
            cut = tl.full([], INT_BIG, tl.int32)
            for c0 in range(0, SLICE, BLOCK):
                offs = s * SLICE + c0 + tl.arange(0, BLOCK)
                tie = _load(x_ptr, sx, x2_ptr, sx2, R1, r, offs, V) == tau
                upto = tl.cumsum(tie.to(tl.int32), 0) + run
                cut = tl.minimum(cut, tl.min(tl.where(tie & (upto == k), offs, INT_BIG), 0))
                run += tl.sum(tie.to(tl.int32), 0)
            tl.store(out_ptr + 2 * r, tau.to(tl.float64))
            tl.store(out_ptr + 2 * r + 1, cut.to(tl.float64))
    else:
        if s == 0:
            tl.store(out_ptr + 2 * r, float("-inf"))
            tl.store(out_ptr + 2 * r + 1, (V - 1).to(tl.float64))


# passes of the search that leave one value of the logits' dtype in the key interval: bf16 and
# fp16 leave the last 16 and 13 bits of their fp32 patterns constant; fp32 takes all 8
KEEP_PASSES = {torch.bfloat16: 4, torch.float16: 5, torch.float32: 8}


def keep_slice(V: int, R: int, sms: int) -> int:
    """Vocabulary slice per program of the search: 8192 when R rows of ``V / 8192`` programs
    give each of the ``sms`` multiprocessors two, else narrower (down to 1024) so that they
    about do; a runtime argument (no compile per width)."""
    return min(8192, spread(V, R, sms), next_pow2(V))


def launch(logits, temperature, top_k, top_p, *, second=None, slice_width: int | None = None,
           block: int | None = None) -> torch.Tensor:
    """Top-p's keep bounds (:mod:`speccascade_fast.truncation`, top-k's bound first when given)
    by the search: float64 ``[R, 2]`` from fp32/bf16/fp16 ``logits`` ``[R, V]`` and float64
    ``temperature`` ``[R]``; ``top_p`` a float in (0, 1], ``top_k`` an int or None (inputs
    checked by the caller). 7 launches for bf16 logits, 8 for fp16, 11 for fp32 (and torch's
    top-k with ``top_k``), no host read. ``second``: ``(logits [R2, V], temperature [R2])`` of
    the same dtype, searched in the same launches: the output is then ``[R + R2, 2]``, its rows
    in that order. ``slice_width`` / ``block`` (powers of two) override the vocabulary slice per
    program and the chunk it loops over (the tests use tiny ones)."""
    check_mode(keep_max_kernel, logits.device)
    parts = [(logits, temperature)] + ([] if second is None else [second])
    xs = [y if y.stride(-1) == 1 else y.contiguous() for y, _ in parts]
    x, x2 = xs[0], xs[-1]  # (the same tensor without a second)
    if x2.dtype != x.dtype or x2.shape[-1] != x.shape[-1]:
        raise ValueError("keep_bounds: both logit tensors need one dtype and vocabulary")
    R1, V = x.shape
    R = sum(y.shape[0] for y in xs)
    dev = x.device
    out = torch.empty((R, 2), dtype=torch.float64, device=dev)
    if R == 0:
        return out
    t = torch.cat([t for _, t in parts]).to(torch.float64).contiguous()
    tauk = torch.full((R,), -torch.inf, dtype=torch.float32, device=dev)
    if top_k is not None and top_k < V:  # ties with the k-th largest are kept (cut = V - 1)
        kth = [torch.topk(y, top_k, dim=-1).values[:, -1] for y in xs if len(y)]
        tauk = torch.where(t > 0, torch.cat(kth).to(torch.float32), tauk)
    SLICE = slice_width or keep_slice(V, R, sm_count(dev))
    BLOCK = min(SLICE, block or 256)
    S = -(-V // SLICE)
    passes = KEEP_PASSES.get(x.dtype, 8)
    mx = torch.empty((R, S), dtype=torch.float32, device=dev)
    h = torch.empty((passes, R, S, NB.value), dtype=torch.float64, device=dev)
    lo = torch.zeros((passes + 1, R), dtype=torch.int64, device=dev)  # row 0: pass 0's (0, 0)
    acc = torch.zeros((passes + 1, R), dtype=torch.float64, device=dev)
    tgt = torch.empty((R,), dtype=torch.float64, device=dev)
    cnt = torch.empty((R, S), dtype=torch.int32, device=dev)
    val = torch.empty((R, S), dtype=torch.float32, device=dev)
    tp = torch.full((1,), float(top_p), dtype=torch.float64, device=dev)
    grid, nwarps, rows = (R, S), 4, (x, x.stride(0), x2, x2.stride(0), R1)
    keep_max_kernel[grid](*rows, mx, V, S, SLICE, BLOCK=BLOCK, num_warps=nwarps)
    for p in range(passes):
        keep_pass_kernel[grid](*rows, t, tauk, tp, mx, h, lo, acc, tgt, R, V, S, SLICE, p,
                               BLOCK=BLOCK, num_warps=nwarps)
    keep_ties_kernel[grid](*rows, t, tauk, mx, h, lo, acc, tgt, cnt, val, R, V, S, SLICE, passes,
                           BLOCK=BLOCK, num_warps=nwarps)
    keep_final_kernel[grid](*rows, t, tauk, mx, acc, tgt, cnt, val, out, R, V, S, SLICE, passes,
                            BLOCK=BLOCK, num_warps=nwarps)
    return out
