"""Stage 1, ``stats``: one read of both models' logits, split over (position, vocabulary slice).

Grid ``(B * (gamma + 1), S)``. Program (n, s) reads slice s of the drafter row ``q`` and the
verifier row ``p`` of position n = b * (gamma + 1) + j (no ``q`` for j = gamma with
bonus="verifier"; in the ragged layout gamma is the longest request's and a request's positions
past its own gamma_b + 1 read nothing) and writes the per-slice statistics described in
:mod:`.common`: the max, the argmax (lowest id), ``Σexp`` at T and at 1 and the entropy-type sum,
online over BLOCK-wide chunks in float32. It also resets the per-sequence workspace of the
resample stage (two race maxima and an arrival counter, int64).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .common import (
    F_P,
    F_Q,
    F_X,
    I_INF,
    I_P,
    I_Q,
    NEG_INF,
    NF,
    NI,
    load_keep,
    load_q,
    request_rows,
    truncate,
)


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
def stats_kernel(
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
