"""Stage 2 (only for rules that need it): sums that need the whole row's log-partitions first.

* ``second_pass_kernel``, grid ``(B * rows, S)``: per (position, slice), for T > 0 rows,
  ``opt``/``opt_log``: ``TV(pT, qT) = Σ max(0, pT - qT)``; token rules: ``eta = Σ_{v∉A} qT``;
  ``lossy`` (bonus position of bonus="cascade" only): ``Σ min(qT, pT/(1-a))`` and
  ``Σ max(0, pT - qT)``, which normalise its output law. T = 0 rows have closed forms (stage 3).
* ``lossy_star_kernel``, grid ``(B * rows,)``: Lemma 2's equation for ``s = 1/beta``
  (``rules._lossy_star_target``) solved by k-section, one program per position: each of ``PASSES``
  reads of the row evaluates g at ``K`` interior points of the bracket and keeps the sub-interval
  where g crosses 1 (K = 8, 17 passes: 9^17 > 2^53, the resolution of the reference's 50-step
  bisection, in 18 reads of the row instead of 51; the CUDA kernel does the same). It is the only
  multi-pass stage.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .common import (
    F_P,
    F_Q,
    I_P,
    I_Q,
    LOSSY,
    NEG_INF,
    OPT,
    OPT_LOG,
    TOKEN_V1,
    TOKEN_V3,
    acceptable,
    load_keep,
    load_q,
    request_rows,
    row_stats,
    row_stats1,
    scaled,
    token_threshold,
    truncate,
)


@triton.jit(do_not_specialize=["st_t", "st_a", "NR", "GAMMA", "RQ", "G1"])
def second_pass_kernel(
    q_ptr, p_ptr, sq_b, sq_j, sp_b, sp_j, qb_ptr, sqb, qoff_ptr, poff_ptr, g_ptr,
    t_ptr, alpha_ptr, st_t, st_a,
    stf_ptr, sti_ptr, out_ptr, kq_ptr, kp_ptr,
    NR, GAMMA, RQ, G1, V, S,
    RULE: tl.constexpr, SLICE: tl.constexpr, BLOCK: tl.constexpr, S_PAD: tl.constexpr,
    KEEP: tl.constexpr, BONUS_ONLY: tl.constexpr, PER_ROW: tl.constexpr,
):
    """Rows j = 0 .. NR - 1 of every request, or (``BONUS_ONLY``, NR = 1) its bonus row."""
    pid = tl.program_id(0)
    s = tl.program_id(1)
    b = pid // NR
    gb, q_base, p_base = request_rows(b, q_ptr, p_ptr, sq_b, sp_b, qoff_ptr, poff_ptr, g_ptr,
                                      GAMMA, PER_ROW)
    if BONUS_ONLY:
        j = gb
    else:
        j = pid % NR
    n = b * G1 + j
    t = tl.load(t_ptr + b * st_t)
    if (t > 0) & (j < gb + (RQ - GAMMA)):  # T > 0 and the request has a drafter row j
        alpha = tl.load(alpha_ptr + b * st_a)
        inv_t = 1.0 / t
        # the row's statistics as [1]-vectors (they broadcast against the [BLOCK] chunks)
        nv = n + tl.arange(0, 1)
        mq, zq1, zqt, hq, aq = row_stats(stf_ptr, sti_ptr, nv, nv >= 0, S, inv_t, F_Q, I_Q, S_PAD)
        mp, zp1, zpt, hp, ap = row_stats(stf_ptr, sti_ptr, nv, nv >= 0, S, inv_t, F_P, I_P, S_PAD)
        mq32 = mq.to(tl.float32)
        mp32 = mp.to(tl.float32)
        lzq = tl.log(zqt).to(tl.float32)
        lzp = tl.log(zpt).to(tl.float32)
        it32 = inv_t.to(tl.float32)
        cth = token_threshold(zq1, zp1, alpha, RULE)
        one_m_a = (1.0 - alpha).to(tl.float32)
        q_row = q_base + j * sq_j
        qb_row = qb_ptr + b.to(tl.int64) * sqb
        p_row = p_base + j * sp_j
        tq, cq = load_keep(kq_ptr, b * RQ + j, j >= 0, KEEP)
        tp, cp = load_keep(kp_ptr, n, n >= 0, KEEP)
        acc0 = tl.full([], 0.0, tl.float32)
        acc1 = tl.full([], 0.0, tl.float32)
        for c in range(0, SLICE, BLOCK):
            offs = s * SLICE + c + tl.arange(0, BLOCK)
            inb = offs < V
            ql = load_q(q_row, qb_row, offs, V, j >= gb, PER_ROW).to(tl.float32)
            pl = tl.load(p_row + offs, mask=inb, other=NEG_INF).to(tl.float32)
            qT = scaled(truncate(ql, offs, tq, cq, KEEP), mq32, lzq, it32, offs, aq, False)
            pT = scaled(truncate(pl, offs, tp, cp, KEEP), mp32, lzp, it32, offs, ap, False)
            if (RULE == OPT) | (RULE == OPT_LOG):
                acc0 += tl.sum(tl.maximum(pT - qT, 0.0), 0)
            elif (RULE >= TOKEN_V1) & (RULE <= TOKEN_V3):
                in_a = acceptable(ql.to(tl.float64), pl.to(tl.float64), mq, mp, cth, RULE)
                acc0 += tl.sum(tl.where(in_a, 0.0, qT), 0)
            elif RULE == LOSSY:
                acc0 += tl.sum(tl.minimum(qT, pT / one_m_a), 0)
                acc1 += tl.sum(tl.maximum(pT - qT, 0.0), 0)
        ob = out_ptr + n.to(tl.int64) * (2 * S) + s
        tl.store(ob, acc0)
        tl.store(ob + S, acc1)


@triton.jit
def _capped_chunk(q_row, qb_row, bonus, p_row, c, V, mq, mp, lzq, lzp, inv_t, aq, ap, one_m_a,
                  tq, cq, tp, cp, BLOCK: tl.constexpr, KEEP: tl.constexpr,
                  PER_ROW: tl.constexpr):
    """lossy_star on the chunk at ``c`` (T > 0): ``min(qT, pT/(1-a))`` and ``pT`` (float32)."""
    offs = c + tl.arange(0, BLOCK)
    inb = offs < V
    ql = load_q(q_row, qb_row, offs, V, bonus, PER_ROW).to(tl.float32)
    pl = tl.load(p_row + offs, mask=inb, other=NEG_INF).to(tl.float32)
    qT = scaled(truncate(ql, offs, tq, cq, KEEP), mq, lzq, inv_t, offs, aq, False)
    pT = scaled(truncate(pl, offs, tp, cp, KEEP), mp, lzp, inv_t, offs, ap, False)
    return tl.minimum(qT, pT / one_m_a), pT


@triton.jit(do_not_specialize=["st_t", "st_a", "GAMMA", "RQ", "G1"])
def lossy_star_kernel(
    q_ptr, p_ptr, sq_b, sq_j, sp_b, sp_j, qb_ptr, sqb, qoff_ptr, poff_ptr, g_ptr,
    t_ptr, alpha_ptr, st_t, st_a,
    stf_ptr, sti_ptr, out_ptr, kq_ptr, kp_ptr,
    GAMMA, RQ, G1, V, S,
    PASSES: tl.constexpr, K: tl.constexpr, BLOCK: tl.constexpr, S_PAD: tl.constexpr,
    KEEP: tl.constexpr, PER_ROW: tl.constexpr,
):
    """out[n] = hi after ``PASSES`` k-section passes (``K`` points each) on
    g(s) = Σ max(m, s pT) = 1, m = min(qT, pT/(1-a)), keeping g(lo) < 1 <= g(hi) as the reference's
    bisection does; lo = 0, hi = 1/(1-a), or hi = 0 when Σ m >= 1 (pi = qT). Rows past a
    request's own drafter rows (ragged layout) write nothing."""
    pid = tl.program_id(0)
    b = pid // RQ
    j = pid % RQ
    gb, q_base, p_base = request_rows(b, q_ptr, p_ptr, sq_b, sp_b, qoff_ptr, poff_ptr, g_ptr,
                                      GAMMA, PER_ROW)
    if j < gb + (RQ - GAMMA):
        _lossy_star_row(q_base + j * sq_j, qb_ptr + b.to(tl.int64) * sqb, j >= gb,
                        p_base + j * sp_j, t_ptr, alpha_ptr, st_t, st_a, stf_ptr, sti_ptr,
                        out_ptr, kq_ptr, kp_ptr, b, b * RQ + j, b * G1 + j, V, S, PASSES, K,
                        BLOCK, S_PAD, KEEP, PER_ROW)


@triton.jit
def _lossy_star_row(q_row, qb_row, bonus, p_row, t_ptr, alpha_ptr, st_t, st_a, stf_ptr, sti_ptr,
                    out_ptr, kq_ptr, kp_ptr, b, kq_row, n, V, S, PASSES: tl.constexpr,
                    K: tl.constexpr, BLOCK: tl.constexpr, S_PAD: tl.constexpr,
                    KEEP: tl.constexpr, PER_ROW: tl.constexpr):
    """lossy_star_kernel for the row pair at position n (drafter keep-bound row ``kq_row``)."""
    t = tl.load(t_ptr + b * st_t)
    alpha = tl.load(alpha_ptr + b * st_a)
    greedy = t == 0
    inv_t = tl.where(greedy, 1.0, 1.0 / tl.where(greedy, 1.0, t))
    mq, zq1, zqt, hq, aq = row_stats1(stf_ptr, sti_ptr, n, S, inv_t, F_Q, I_Q, S_PAD)
    mp, zp1, zpt, hp, ap = row_stats1(stf_ptr, sti_ptr, n, S, inv_t, F_P, I_P, S_PAD)
    lo = tl.full([], 0.0, tl.float64)
    hi = 1.0 / (1.0 - alpha)
    ks = tl.arange(0, K)
    if greedy:
        # one-hot qT, pT: sum m = [aq == ap]; otherwise m = 0 and g(s) = s exactly
        hi = tl.where(aq == ap, 0.0, hi)
        for _ in range(PASSES):
            cand = lo + (hi - lo) * (ks + 1).to(tl.float64) / (K + 1)
            lo, hi = _narrow(lo, hi, cand, cand < 1.0, ks, K)
    else:
        mq32 = mq.to(tl.float32)
        mp32 = mp.to(tl.float32)
        lzq = tl.log(zqt).to(tl.float32)
        lzp = tl.log(zpt).to(tl.float32)
        it32 = inv_t.to(tl.float32)
        one_m_a = (1.0 - alpha).to(tl.float32)
        tq, cq = load_keep(kq_ptr, kq_row, n >= 0, KEEP)
        tp, cp = load_keep(kp_ptr, n, n >= 0, KEEP)
        sum_m = tl.full([], 0.0, tl.float64)
        for c in range(0, V, BLOCK):
            m, _ = _capped_chunk(q_row, qb_row, bonus, p_row, c, V, mq32, mp32, lzq, lzp, it32,
                                 aq, ap, one_m_a, tq, cq, tp, cp, BLOCK, KEEP, PER_ROW)
            sum_m += tl.sum(m, 0).to(tl.float64)
        hi = tl.where(sum_m >= 1.0, 0.0, hi)
        for _ in range(PASSES):
            cand = lo + (hi - lo) * (ks + 1).to(tl.float64) / (K + 1)
            cand32 = cand.to(tl.float32)
            g = tl.zeros([K], tl.float64)
            for c in range(0, V, BLOCK):  # g at the K candidates, one read of the row
                m, pT = _capped_chunk(q_row, qb_row, bonus, p_row, c, V, mq32, mp32, lzq, lzp,
                                      it32, aq, ap, one_m_a, tq, cq, tp, cp, BLOCK, KEEP,
                                      PER_ROW)
                g += tl.sum(tl.maximum(m[None, :], cand32[:, None] * pT[None, :]), 1).to(
                    tl.float64)
            lo, hi = _narrow(lo, hi, cand, g < 1.0, ks, K)
    tl.store(out_ptr + n, hi)


@triton.jit
def _narrow(lo, hi, cand, below, ks, K: tl.constexpr):
    """The sub-interval of [lo, hi] between the last candidate below 1 and the first one not
    below (g is non-decreasing: ``below`` is true on a prefix of the ``K`` ascending candidates)."""
    f = tl.min(tl.where(below, K, ks), 0)  # first candidate not below (K: none)
    new_lo = tl.max(tl.where(ks < f, cand, lo), 0)
    new_hi = tl.min(tl.where(ks >= f, cand, hi), 0)
    return new_lo, new_hi
