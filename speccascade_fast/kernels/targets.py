"""Stage ``targets`` (the reference backend's step 1) in one or two passes over the logits: the
statistics every later decision reads, and for some rules sums that need them first. The
decisions themselves (delta, A, eta, 1/beta and the target law) are taken per row from these
by the kernel of :mod:`.accept_resample_insert`, which replays them before it accepts.

* ``targets_kernel``, grid ``(B * (gamma + 1), S)``: one read of both models' logits. Program
  (n, s) reads slice s of the drafter row ``q`` and the verifier row ``p`` of position
  n = b * (gamma + 1) + j (no ``q`` for j = gamma with bonus="verifier"; in the ragged layout
  gamma is the longest request's and a request's positions past its own gamma_b + 1 read nothing)
  and writes the per-slice statistics described in :mod:`.common`: the max, the argmax (lowest
  id), ``Σexp`` at T and at 1 and the entropy-type sum, online over BLOCK-wide chunks in float32.
  It also resets the per-sequence workspace of the resample stage (two race maxima and an
  arrival counter, int64).
* ``targets_sums_kernel`` (only for rules that need it), grid ``(B * rows, S)``: sums that need
  the whole row's log-partitions first, per (position, slice), for T > 0 rows:
  ``opt``/``opt_log``: ``TV(pT, qT) = Σ max(0, pT - qT)``; token rules: ``eta = Σ_{v∉A} qT``;
  ``lossy`` (bonus position of bonus="cascade" only): ``Σ min(qT, pT/(1-a))`` and
  ``Σ max(0, pT - qT)``, which normalise its output law. T = 0 rows have closed forms (read where
  the decisions are taken).
* ``targets_lossy_star_kernel``, grid ``(B * rows,)``: Lemma 2's equation for ``s = 1/beta``
  (``rules._lossy_star_target``) solved by k-section, one program per position: each of
  ``PASSES`` reads of the row evaluates g at ``K`` interior points of the bracket and keeps the
  sub-interval where g crosses 1 (K = 8, 17 passes: 9^17 > 2^53, the resolution of the
  reference's 50-step bisection, in 18 reads of the row instead of 51; the CUDA kernel does the
  same). It is the only multi-pass kernel: correct, not fast.

:func:`launch` runs the stage: ``targets_kernel``, then ``targets_sums_kernel`` for opt, opt_log,
token_v1-3 and lossy with bonus="cascade", or ``targets_lossy_star_kernel`` for lossy_star.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..rules import RULES
from .common import (
    F_P,
    F_Q,
    F_X,
    I_INF,
    I_P,
    I_Q,
    LOSSY,
    NEG_INF,
    NF,
    NI,
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
from .launch import next_pow2, slice_size, warps

_NEED_Z1 = frozenset({"chow", "chow_log", "diff", "diff_log", "opt", "opt_log", "bild",
                      "token_v1", "token_v2"})
_NEED_H = frozenset({"chow_log", "diff_log", "opt_log"})
_NEED_SUMS = frozenset({"opt", "opt_log", "token_v1", "token_v2", "token_v3"})
_TOKEN = frozenset({"token_v1", "token_v2", "token_v3"})
# divergence budget: rules whose cost is (1 - delta) TV(pT, qT) and that need the sums launch for
# it (opt and opt_log compute TV(pT, qT) anyway)
_TV_COST = frozenset({"drafter", "chow", "chow_log", "diff", "diff_log", "bild"})
# lossy_star's 1/beta: K candidates per read of the row, PASSES reads: (K + 1)^PASSES > 2^53,
# the resolution of the reference's 50-step bisection (rules.LOSSY_STAR_BISECTION_STEPS)
LOSSY_STAR_K, LOSSY_STAR_PASSES = 8, 17


@triton.jit
def _fold(m, z1, zt, h, arg, x, xt, base, inv_t, NEED_Z1: tl.constexpr, NEED_H: tl.constexpr):
    """Fold one chunk ``x`` (float32, -inf where masked; ids ``base + i``) into the running max,
    argmax, ``Σexp((xt-m)/T)``, ``Σexp(x-m)`` and ``Σexp(x-m)(x-m)``, where ``xt`` is ``x``
    truncated by top-k / top-p (or ``x`` itself: the max is always kept). Also returns the chunk's
    ``exp(x - m_new)`` (0 where -inf) and the rescale factor ``exp(m_old - m_new)``, which bild's
    cross term needs."""
    cmax = tl.max(x, 0)
    carg = tl.argmax(x, 0)
    arg = tl.where(cmax > m, base + carg, arg)  # strict: the earlier (lower) id keeps a tie
    new_m = tl.maximum(m, cmax)
    had = m > NEG_INF
    shift = tl.where(had, m - new_m, 0.0)
    sc = tl.where(had, tl.exp(shift), 0.0)
    valid = x > NEG_INF
    d = tl.where(valid, x - new_m, 0.0)
    vt = xt > NEG_INF
    zt = tl.where(had, zt * tl.exp(shift * inv_t), 0.0) + tl.sum(
        tl.where(vt, tl.exp(tl.where(vt, xt - new_m, 0.0) * inv_t), 0.0), 0)
    e1 = tl.where(valid, tl.exp(d), 0.0)
    if NEED_Z1:
        if NEED_H:
            h = sc * (h + shift * z1) + tl.sum(e1 * d, 0)
        z1 = sc * z1 + tl.sum(e1, 0)
    return new_m, z1, zt, h, arg, e1, sc


@triton.jit(do_not_specialize=["st_t", "GAMMA", "RQ", "G1"])  # see kernels/common.py
def targets_kernel(
    q_ptr, p_ptr, sq_b, sq_j, sp_b, sp_j, qb_ptr, sqb, qoff_ptr, poff_ptr, g_ptr, t_ptr, st_t,
    stf_ptr, sti_ptr, ws_ptr, kq_ptr, kp_ptr,
    GAMMA, RQ, G1, V, S,
    SLICE: tl.constexpr, BLOCK: tl.constexpr,
    NEED_Z1: tl.constexpr, NEED_H: tl.constexpr, NEED_X: tl.constexpr, KEEP: tl.constexpr,
    PER_ROW: tl.constexpr,
):
    n = tl.program_id(0)
    s = tl.program_id(1)
    b = n // G1
    j = n % G1
    gb, q_base, p_base = request_rows(b, q_ptr, p_ptr, sq_b, sp_b, qoff_ptr, poff_ptr, g_ptr,
                                      GAMMA, PER_ROW)
    # drafter rows: the gamma_b drafts, + the bonus row with bonus="cascade" (RQ = GAMMA + 1);
    # verifier rows: the gamma_b drafts and the bonus position. Past them (ragged layout, a
    # request with fewer drafts than the longest) nothing is read: the stats stay empty
    has_q = j < gb + (RQ - GAMMA)
    q_lim = tl.where(has_q, V, 0)
    p_lim = tl.where(j <= gb, V, 0)
    t = tl.load(t_ptr + b * st_t)
    inv_t = tl.where(t > 0, 1.0 / tl.where(t > 0, t, 1.0), 1.0).to(tl.float32)
    q_row = q_base + j * sq_j
    qb_row = qb_ptr + b.to(tl.int64) * sqb
    p_row = p_base + j * sp_j
    tq, cq = load_keep(kq_ptr, b * RQ + j, has_q, KEEP)
    tp, cp = load_keep(kp_ptr, n, j <= gb, KEEP)

    zero = tl.full([], 0.0, tl.float32)
    mq = zero + NEG_INF
    zq1 = zero
    zqt = zero
    hq = zero
    mp = zero + NEG_INF
    zp1 = zero
    zpt = zero
    hp = zero
    xs = zero
    zb = zero
    ref = zero
    aq = s * SLICE
    ap = s * SLICE
    inf_flag = s * 0
    for c in range(0, SLICE, BLOCK):
        base = s * SLICE + c
        offs = base + tl.arange(0, BLOCK)
        q = load_q(q_row, qb_row, offs, q_lim, j >= gb, PER_ROW).to(tl.float32)
        p = tl.load(p_row + offs, mask=offs < p_lim, other=NEG_INF).to(tl.float32)
        qt = truncate(q, offs, tq, cq, KEEP)
        pt = truncate(p, offs, tp, cp, KEEP)
        mq, zq1, zqt, hq, aq, eq, scq = _fold(mq, zq1, zqt, hq, aq, q, qt, base, inv_t, NEED_Z1,
                                              NEED_H)
        mp, zp1, zpt, hp, ap, _, _ = _fold(mp, zp1, zpt, hp, ap, p, pt, base, inv_t, NEED_Z1,
                                           NEED_H)
        if NEED_X:
            both = (q > NEG_INF) & (p > NEG_INF)
            new_ref = tl.where(mp > NEG_INF, mp, ref)
            xs = scq * (xs + (ref - new_ref) * zb) + tl.sum(tl.where(both, eq * (p - new_ref), 0.0), 0)
            zb = scq * zb + tl.sum(tl.where(both, eq, 0.0), 0)
            ref = new_ref
            inf_flag = tl.maximum(inf_flag, tl.max(((q > NEG_INF) & (p == NEG_INF)).to(tl.int32), 0))

    fb = stf_ptr + n.to(tl.int64) * (NF * S) + s
    tl.store(fb + (F_Q + 0) * S, mq)
    tl.store(fb + (F_Q + 1) * S, zq1)
    tl.store(fb + (F_Q + 2) * S, zqt)
    tl.store(fb + (F_Q + 3) * S, hq)
    tl.store(fb + (F_P + 0) * S, mp)
    tl.store(fb + (F_P + 1) * S, zp1)
    tl.store(fb + (F_P + 2) * S, zpt)
    tl.store(fb + (F_P + 3) * S, hp)
    tl.store(fb + (F_X + 0) * S, xs)
    tl.store(fb + (F_X + 1) * S, zb)
    ib = sti_ptr + n.to(tl.int64) * (NI * S) + s
    tl.store(ib + I_Q * S, aq)
    tl.store(ib + I_P * S, ap)
    tl.store(ib + I_INF * S, inf_flag)
    if (j == 0) & (s == 0):
        # the resample stage's race maxima (int64 min) and arrival counter for sequence b
        tl.store(ws_ptr + 3 * b, -9223372036854775807 - 1)
        tl.store(ws_ptr + 3 * b + 1, -9223372036854775807 - 1)
        tl.store(ws_ptr + 3 * b + 2, 0)


@triton.jit(do_not_specialize=["st_t", "st_a", "NR", "GAMMA", "RQ", "G1"])
def targets_sums_kernel(
    q_ptr, p_ptr, sq_b, sq_j, sp_b, sp_j, qb_ptr, sqb, qoff_ptr, poff_ptr, g_ptr,
    t_ptr, alpha_ptr, st_t, st_a,
    stf_ptr, sti_ptr, out_ptr, kq_ptr, kp_ptr,
    NR, GAMMA, RQ, G1, V, S,
    RULE: tl.constexpr, SLICE: tl.constexpr, BLOCK: tl.constexpr, S_PAD: tl.constexpr,
    KEEP: tl.constexpr, BONUS_ONLY: tl.constexpr, PER_ROW: tl.constexpr,
    TV: tl.constexpr = False, COST: tl.constexpr = False,
):
    """Rows j = 0 .. NR - 1 of every request, or (``BONUS_ONLY``, NR = 1) its bonus row.
    Divergence budget: ``TV`` puts ``TV(pT, qT)`` in channel 0 (the cost of drafter and of the
    prefix rules but opt / opt_log, which have it there already); ``COST`` (token rules, a second
    launch after the first has left eta's per-slice sums in channel 0) puts
    ``Σ max(0, pT - pi)``, pi = [v∈A] qT + eta pT, in channel 1 and leaves channel 0 alone."""
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
        if COST:  # eta of the row, merged as the accept stage merges it
            si = tl.arange(0, S_PAD)
            eta32 = tl.sum(tl.load(out_ptr + n.to(tl.int64) * (2 * S) + si, mask=si < S,
                                   other=0.0), 0).to(tl.float32)  # (the loop's sums: float32)
        for c in range(0, SLICE, BLOCK):
            offs = s * SLICE + c + tl.arange(0, BLOCK)
            inb = offs < V
            ql = load_q(q_row, qb_row, offs, V, j >= gb, PER_ROW).to(tl.float32)
            pl = tl.load(p_row + offs, mask=inb, other=NEG_INF).to(tl.float32)
            qT = scaled(truncate(ql, offs, tq, cq, KEEP), mq32, lzq, it32, offs, aq, False)
            pT = scaled(truncate(pl, offs, tp, cp, KEEP), mp32, lzp, it32, offs, ap, False)
            if COST:
                in_a = acceptable(ql.to(tl.float64), pl.to(tl.float64), mq, mp, cth, RULE)
                law = tl.where(in_a, qT, 0.0) + eta32 * pT
                acc1 += tl.sum(tl.maximum(pT - law, 0.0), 0)
            elif (RULE == OPT) | (RULE == OPT_LOG) | TV:
                acc0 += tl.sum(tl.maximum(pT - qT, 0.0), 0)
            elif (RULE >= TOKEN_V1) & (RULE <= TOKEN_V3):
                in_a = acceptable(ql.to(tl.float64), pl.to(tl.float64), mq, mp, cth, RULE)
                acc0 += tl.sum(tl.where(in_a, 0.0, qT), 0)
            elif RULE == LOSSY:
                acc0 += tl.sum(tl.minimum(qT, pT / one_m_a), 0)
                acc1 += tl.sum(tl.maximum(pT - qT, 0.0), 0)
        ob = out_ptr + n.to(tl.int64) * (2 * S) + s
        if not COST:
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
def targets_lossy_star_kernel(
    q_ptr, p_ptr, sq_b, sq_j, sp_b, sp_j, qb_ptr, sqb, qoff_ptr, poff_ptr, g_ptr,
    t_ptr, alpha_ptr, st_t, st_a,
    stf_ptr, sti_ptr, out_ptr, kq_ptr, kp_ptr, cost_ptr,
    GAMMA, RQ, G1, V, S,
    PASSES: tl.constexpr, K: tl.constexpr, BLOCK: tl.constexpr, S_PAD: tl.constexpr,
    KEEP: tl.constexpr, PER_ROW: tl.constexpr, COST: tl.constexpr = False,
):
    """out[n] = hi after ``PASSES`` k-section passes (``K`` points each) on
    g(s) = Σ max(m, s pT) = 1, m = min(qT, pT/(1-a)), keeping g(lo) < 1 <= g(hi) as the reference's
    bisection does; lo = 0, hi = 1/(1-a), or hi = 0 when Σ m >= 1 (pi = qT). Rows past a
    request's own drafter rows (ragged layout) write nothing. ``COST`` (divergence budget): one
    more read of the row once 1/beta is known writes the position's cost
    ``Σ max(0, pT - pi)`` to ``cost_ptr[n]`` (0 at T = 0, where pi is pT or qT = pT)."""
    pid = tl.program_id(0)
    b = pid // RQ
    j = pid % RQ
    gb, q_base, p_base = request_rows(b, q_ptr, p_ptr, sq_b, sp_b, qoff_ptr, poff_ptr, g_ptr,
                                      GAMMA, PER_ROW)
    if j < gb + (RQ - GAMMA):
        _lossy_star_row(q_base + j * sq_j, qb_ptr + b.to(tl.int64) * sqb, j >= gb,
                        p_base + j * sp_j, t_ptr, alpha_ptr, st_t, st_a, stf_ptr, sti_ptr,
                        out_ptr, kq_ptr, kp_ptr, cost_ptr, b, b * RQ + j, b * G1 + j, V, S,
                        PASSES, K, BLOCK, S_PAD, KEEP, PER_ROW, COST)


@triton.jit
def _lossy_star_row(q_row, qb_row, bonus, p_row, t_ptr, alpha_ptr, st_t, st_a, stf_ptr, sti_ptr,
                    out_ptr, kq_ptr, kp_ptr, cost_ptr, b, kq_row, n, V, S,
                    PASSES: tl.constexpr, K: tl.constexpr, BLOCK: tl.constexpr,
                    S_PAD: tl.constexpr, KEEP: tl.constexpr, PER_ROW: tl.constexpr,
                    COST: tl.constexpr):
    """targets_lossy_star_kernel for the row pair at position n (drafter keep-bound row
    ``kq_row``)."""
    t = tl.load(t_ptr + b * st_t)
    alpha = tl.load(alpha_ptr + b * st_a)
    greedy = t == 0
    inv_t = tl.where(greedy, 1.0, 1.0 / tl.where(greedy, 1.0, t))
    mq, zq1, zqt, hq, aq = row_stats1(stf_ptr, sti_ptr, n, S, inv_t, F_Q, I_Q, S_PAD)
    mp, zp1, zpt, hp, ap = row_stats1(stf_ptr, sti_ptr, n, S, inv_t, F_P, I_P, S_PAD)
    lo = tl.full([], 0.0, tl.float64)
    hi = 1.0 / (1.0 - alpha)
    ks = tl.arange(0, K)
    cost = tl.full([], 0.0, tl.float64)
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
        if COST:  # pi as the accept stage forms it, from 1/beta in float32
            hi32 = hi.to(tl.float32)
            for c in range(0, V, BLOCK):
                m, pT = _capped_chunk(q_row, qb_row, bonus, p_row, c, V, mq32, mp32, lzq, lzp,
                                      it32, aq, ap, one_m_a, tq, cq, tp, cp, BLOCK, KEEP,
                                      PER_ROW)
                cost += tl.sum(tl.maximum(pT - tl.maximum(m, hi32 * pT), 0.0), 0).to(tl.float64)
    tl.store(out_ptr + n, hi)
    if COST:
        tl.store(cost_ptr + n, cost)


@triton.jit
def _narrow(lo, hi, cand, below, ks, K: tl.constexpr):
    """The sub-interval of [lo, hi] between the last candidate below 1 and the first one not
    below (g is non-decreasing: ``below`` is true on a prefix of the ``K`` ascending candidates)."""
    f = tl.min(tl.where(below, K, ks), 0)  # first candidate not below (K: none)
    new_lo = tl.max(tl.where(ks < f, cand, lo), 0)
    new_hi = tl.min(tl.where(ks >= f, cand, hi), 0)
    return new_lo, new_hi


class Targets(NamedTuple):
    """What the targets stage leaves for the next (:mod:`.accept_resample_insert`): float32
    ``stf`` / int32 ``sti`` per-slice statistics (:mod:`.common`), the sums of
    ``targets_sums_kernel`` (``sums``) and lossy_star's 1/beta (``inv_beta``), each ``stf`` where
    the rule has none (a placeholder never read), the resample stage's workspace ``ws`` and the
    slicing: ``slice_width`` (SLICE), ``block`` (BLOCK), S slices; with a divergence budget
    lossy_star's per-position cost (``cost``, float64 ``[B * (gamma + 1)]``; else a
    placeholder)."""

    stf: torch.Tensor
    sti: torch.Tensor
    sums: torch.Tensor
    inv_beta: torch.Tensor
    ws: torch.Tensor
    slice_width: int
    block: int
    S: int
    cost: torch.Tensor | None = None


def launch(q, p, rows, kq, kp, temperature, alpha, *, B: int, gamma: int, rq: int, rule: str,
           per_row: bool, slice_width: int | None = None, block: int | None = None,
           budget: bool = False) -> Targets:
    """The targets stage's 1-2 launches over ``B`` sequences of ``gamma + 1`` positions (``rq``
    drafter rows each: gamma, + 1 with bonus="cascade"). ``q`` / ``p``: the logits tensors,
    ``rows``: the layout arguments of :class:`speccascade_fast.backends.triton` (strides, bonus
    tensor, ragged offset tables), ``kq`` / ``kp``: the rows' keep bounds or None; float64
    ``temperature`` / ``alpha`` ``[B]``. ``slice_width`` / ``block`` (powers of two) override the
    vocabulary slice per program (default :func:`~.launch.slice_size`) and the chunk each program
    loops over (default: the whole slice in one go).

    ``budget``: also the sums each position's divergence cost ``TV(pi, pT)`` needs
    (docs/semantics.md §9), read by the accept stage: opt / opt_log have ``TV(pT, qT)`` already
    and lossy's cost is ``max(0, Σm + Σ max(0, pT - qT) - 1)`` from the sums its bonus law uses
    (then taken at every row); drafter and the other prefix rules get ``TV(pT, qT)`` from the
    sums launch (which they otherwise skip); lossy_star's kernel reads each row once more after
    1/beta; token rules, whose pi needs eta first, take a second sums launch (the one extra
    reduction over the row)."""
    device = p.device
    V = p.shape[-1]
    G1 = gamma + 1
    SLICE = slice_width or slice_size(V)
    BLOCK = min(SLICE, block or SLICE)
    S = -(-V // SLICE)
    S_PAD = next_pow2(S)
    nwarps = warps(BLOCK)
    rid = RULES.index(rule)
    keep = kq is not None
    stf = torch.empty((B * G1, NF.value, S), dtype=torch.float32, device=device)
    if not keep:
        kq = kp = stf  # placeholders: the kernels do not read them
    sti = torch.empty((B * G1, NI.value, S), dtype=torch.int32, device=device)
    ws = torch.empty((B, 3), dtype=torch.int64, device=device)  # race maxima, arrival counter
    targets_kernel[(B * G1, S)](
        q, p, *rows, temperature, temperature.stride(0), stf, sti, ws, kq, kp,
        gamma, rq, G1, V, S,
        SLICE=SLICE, BLOCK=BLOCK, NEED_Z1=rule in _NEED_Z1, NEED_H=rule in _NEED_H,
        NEED_X=rule == "bild", KEEP=keep, PER_ROW=per_row, num_warps=nwarps,
    )

    sums = inv_beta = cost = stf  # placeholders for pointer arguments a rule does not read
    scal = (temperature, alpha, temperature.stride(0), alpha.stride(0))
    tv = budget and rule in _TV_COST
    if rule in _NEED_SUMS or (rule == "lossy" and (rq == G1 or budget)) or tv:
        # lossy: only its bonus row's law needs these sums, unless every row's cost does
        bonus_only = rule == "lossy" and not budget
        nr = 1 if bonus_only else rq
        sums = torch.empty((B * G1, 2, S), dtype=torch.float32, device=device)
        for cost_pass in (False, True) if budget and rule in _TOKEN else (False,):
            targets_sums_kernel[(B * nr, S)](
                q, p, *rows, *scal, stf, sti, sums, kq, kp, nr, gamma, rq, G1, V, S,
                RULE=rid, SLICE=SLICE, BLOCK=BLOCK, S_PAD=S_PAD, KEEP=keep,
                BONUS_ONLY=bonus_only, PER_ROW=per_row, TV=tv, COST=cost_pass,
                num_warps=nwarps,
            )
    elif rule == "lossy_star":
        inv_beta = torch.empty((B * G1,), dtype=torch.float64, device=device)
        if budget:
            cost = torch.empty((B * G1,), dtype=torch.float64, device=device)
        targets_lossy_star_kernel[(B * rq,)](
            q, p, *rows, *scal, stf, sti, inv_beta, kq, kp, cost, gamma, rq, G1, V, S,
            PASSES=LOSSY_STAR_PASSES, K=LOSSY_STAR_K, BLOCK=min(next_pow2(V), block or 1024),
            S_PAD=S_PAD, KEEP=keep, PER_ROW=per_row, COST=budget, num_warps=8,
        )
    return Targets(stf, sti, sums, inv_beta, ws, SLICE, BLOCK, S, cost)
