"""Stages ``accept`` + ``resample`` + ``insert`` (the reference backend's steps 2-4) in one kernel,
``accept_resample_insert_kernel``: grid ``(B, SR)``, one program per (sequence, race slice).

The race slices (width RS, a runtime argument) need not be the targets stage's S slices: at small
B they are narrower (:func:`race_slice`), so that more programs share the race.

Every program of sequence b first completes the targets stage and runs the (cheap) accept stage,
for all positions j at once (vectors over j): it merges each row's slice statistics, takes the
rule's decision (delta, A and eta, 1/beta: :func:`row_targets`), and accepts draft x_j when
``u_j < accept_j(x_j) / max(qT_j(x_j), 1e-10)`` with u_j from the ACCEPT stream at
``positions + j``, stopping at the first rejection j*. Resample: the resample row is r = j* (its
residual ``max(0, accept - qT)``, or when that is all zero the row's law ``min(qT, accept)``) or,
after full acceptance, r = gamma (the bonus law). Each program runs the Gumbel-max race
``argmax_v log w_v - log(-log u_v)`` (RESIDUAL stream at ``positions + r``) over its race slice and
folds its winner into a per-sequence int64 ``atomic_max`` of (float32 score, lowest id). Insert:
slice 0 writes the accepted drafts, the -1 padding and the deferral flags; the last program to
arrive (an atomic counter) writes the emitted token, the counts and, for token rules with
bonus="cascade", the bonus column's flag. No host synchronisation anywhere.

With a divergence budget (constexpr ``BUDGET``; docs/semantics.md §9) every program also forms
each position's cost from the targets stage's sums (:func:`row_cost`) and scans them in order
(:func:`budget_scan`) before the accept loop; the positions the scan makes exact take spec's
acceptance pT, residual max(0, pT - qT) and bonus law pT and are flagged deferred, and slice 0
writes the charges (``spent``). Without it none of this is compiled in.

:func:`launch` runs it after :func:`speccascade_fast.kernels.targets.launch`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..rules import RULES
from .common import (
    BILD,
    CHOW,
    CHOW_LOG,
    DIFF,
    DIFF_LOG,
    DRAFTER,
    F_P,
    F_Q,
    I_P,
    I_Q,
    LOSSY,
    LOSSY_STAR,
    NEG_INF,
    OPT,
    OPT_LOG,
    Q_FLOOR,
    SPEC,
    TOKEN_V1,
    TOKEN_V3,
    accept_fn,
    acceptable,
    load_keep,
    load_q,
    pack,
    request_rows,
    row_cross,
    row_stats,
    scaled,
    token_threshold,
    truncate,
    unpack,
)
from .launch import next_pow2, sm_count, spread, warps
from .rng import ACCEPT, RESIDUAL, TWO_M52, bits52, row_key, uniform


@triton.jit
def _pick(v, sel):
    """The lane of ``v`` where ``sel`` holds (exactly one lane), as a scalar."""
    return tl.sum(tl.where(sel, v, 0), 0)


@triton.jit
def row_targets(q_rows, p_rows, stf_ptr, sti_ptr, p2_ptr, sst_ptr, n, has_q, has_p, S, greedy,
                inv_t, alpha, bonus_lossy, RULE: tl.constexpr, S_PAD: tl.constexpr):
    """The targets stage's decisions at the positions ``n``, from its statistics: everything
    the accept and resample stages need about them (vectors over rows; float64 but the
    argmaxes): ``(mq, log ZqT, aq, mp, log ZpT, ap, delta, eta, cth, sstar, c)``, where delta =
    defer (prefix rules), eta / cth = the token rules' Σ_{v∉A} qT and A-threshold, sstar =
    lossy_star's 1/beta, c = the weight of max(0, pT - qT) in lossy's bonus law (rows where
    ``bonus_lossy``). Rows without a drafter row (``has_q`` False) get qT = 0."""
    mq, zq1, zqt, hq, aq = row_stats(stf_ptr, sti_ptr, n, has_q, S, inv_t, F_Q, I_Q, S_PAD)
    mp, zp1, zpt, hp, ap = row_stats(stf_ptr, sti_ptr, n, has_p, S, inv_t, F_P, I_P, S_PAD)
    mq = tl.where(has_q, mq, 0.0)
    aq = tl.where(has_q, aq, 0)
    zq1 = tl.where(has_q, zq1, 1.0)
    zqt = tl.where(has_q, zqt, 1.0)
    mp = tl.where(has_p, mp, 0.0)
    ap = tl.where(has_p, ap, 0)
    zp1 = tl.where(has_p, zp1, 1.0)
    zpt = tl.where(has_p, zpt, 1.0)
    zero = tl.zeros_like(mq)
    delta = zero != zero
    eta = zero
    cth = zero
    sstar = zero
    c = zero
    # the targets stage's sums (T > 0 rows only; T = 0 rows have closed forms)
    s_idx = tl.arange(0, S_PAD)[None, :]
    p2_rows = p2_ptr + n.to(tl.int64)[:, None] * (2 * S) + s_idx
    p2_ok = (s_idx < tl.where(greedy, 0, S)) & has_p[:, None]
    if (RULE >= CHOW) & (RULE <= OPT_LOG):
        # deferral statistics on the unscaled pair (docs/semantics.md §3)
        maxq = 1.0 / zq1
        maxp = 1.0 / zp1
        negent_q = hq / zq1 - tl.log(zq1)
        negent_p = hp / zp1 - tl.log(zp1)
        if RULE == CHOW:
            delta = maxq < 1.0 - alpha
        elif RULE == CHOW_LOG:
            delta = -negent_q > alpha
        elif RULE == DIFF:
            delta = maxq < maxp - alpha
        elif RULE == DIFF_LOG:
            delta = negent_q < negent_p - alpha
        else:
            tv = tl.sum(tl.load(p2_rows, mask=p2_ok, other=0.0), 1).to(tl.float64)
            tv = tl.where(greedy, tl.where(aq != ap, 1.0, 0.0), tv)  # TV(pT, qT); T=0: one-hots
            if RULE == OPT:
                delta = maxq < maxp - alpha * tv
            else:
                delta = negent_q < negent_p - alpha * tv
    elif RULE == BILD:
        xs, has_inf = row_cross(stf_ptr, sti_ptr, n, has_q, S, mq, mp, S_PAD)
        lzp1 = tl.log(zp1)
        cross = tl.where(has_inf, float("inf"), lzp1 - xs / zq1)  # -Σ q1 log p1
        top = lzp1 + mp - tl.load(p_rows + aq, mask=has_p, other=0.0).to(tl.float64)
        delta = tl.where(greedy, top, cross) > alpha  # T = 0: -log p1(argmax q)
    elif (RULE >= TOKEN_V1) & (RULE <= TOKEN_V3):
        cth = token_threshold(zq1, zp1, alpha, RULE)
        # T = 0: eta = [argmax q outside A]
        p_top = tl.load(p_rows + aq, mask=has_p, other=0.0).to(tl.float64)
        in_a_top = acceptable(mq, p_top, mq, mp, cth, RULE)
        eta = tl.sum(tl.load(p2_rows, mask=p2_ok, other=0.0), 1).to(tl.float64)
        eta = tl.where(greedy, tl.where(in_a_top, 0.0, 1.0), eta)
    elif RULE == LOSSY_STAR:
        sstar = tl.load(sst_ptr + n, mask=has_q, other=0.0)
    elif RULE == LOSSY:
        # bonus law m + (1 - Σm)_+ norm(max(0, pT - qT)); T = 0: Σm = [aq == ap]
        ok = p2_ok & bonus_lossy[:, None]
        sm = tl.sum(tl.load(p2_rows, mask=ok, other=0.0), 1).to(tl.float64)
        sr = tl.sum(tl.load(p2_rows + S, mask=ok, other=0.0), 1).to(tl.float64)
        sm = tl.where(greedy, tl.where(aq == ap, 1.0, 0.0), sm)
        sr = tl.where(greedy, tl.where(aq == ap, 0.0, 1.0), sr)
        c = tl.where(sr > 0, tl.maximum(1.0 - sm, 0.0) / tl.where(sr > 0, sr, 1.0), 0.0)
    return mq, tl.log(zqt), aq, mp, tl.log(zpt), ap, delta, eta, cth, sstar, c


@triton.jit
def row_cost(p2_ptr, cost_ptr, n, has_q, S, greedy, aq, ap, delta, eta, RULE: tl.constexpr,
             S_PAD: tl.constexpr):
    """The divergence budget's cost ``TV(pi, pT) = Σ max(0, pT - law)`` at the positions ``n``
    (float64 vector; 0 where ``has_q`` is False, the bonus position of bonus="verifier"), from
    the targets stage's sums (T > 0; ``targets.launch`` with ``budget``) or closed forms on the
    one-hot laws of T = 0: prefix rules and drafter ``(1 - delta) TV(pT, qT)``, token rules
    ``Σ max(0, pT - pi)`` (T = 0: the argmax of q is in A and not p's), lossy
    ``max(0, Σm + Σ max(0, pT - qT) - 1)`` (its law is m + (1 - Σm) norm(max(0, pT - qT)), which
    exceeds pT nowhere outside {pT > qT}; 0 at T = 0), lossy_star read from ``cost_ptr``."""
    s_idx = tl.arange(0, S_PAD)[None, :]
    rows = p2_ptr + n.to(tl.int64)[:, None] * (2 * S) + s_idx
    ok = (s_idx < tl.where(greedy, 0, S)) & has_q[:, None]
    sum0 = tl.sum(tl.load(rows, mask=ok, other=0.0), 1).to(tl.float64)
    sum1 = tl.sum(tl.load(rows + S, mask=ok, other=0.0), 1).to(tl.float64)
    differ = tl.where(aq != ap, 1.0, 0.0)  # TV of the one-hots of T = 0
    if RULE == SPEC:
        c = tl.zeros_like(sum0)
    elif (RULE >= TOKEN_V1) & (RULE <= TOKEN_V3):
        c = tl.where(greedy, tl.where(eta == 0.0, differ, 0.0), sum1)
    elif RULE == LOSSY:
        c = tl.where(greedy, 0.0, tl.maximum(sum0 + sum1 - 1.0, 0.0))
    elif RULE == LOSSY_STAR:
        c = tl.where(greedy, 0.0, tl.load(cost_ptr + n, mask=has_q, other=0.0))
    else:  # drafter (delta False) and the prefix rules
        c = tl.where(delta, 0.0, tl.where(greedy, differ, sum0))
    return tl.where(has_q, c, 0.0)


@triton.jit
def budget_scan(cost, jv, live, budget, G_PAD: tl.constexpr):
    """The scan of ``rules.budget_scan`` over one sequence's positions (``cost`` float64 over
    ``jv``; only ``live`` positions take part): in order, a position keeps the rule and is
    charged its cost while the charges so far plus it stay within ``budget``, else it is exact
    (charged 0). Returns ``(exact, charged)`` vectors."""
    spent = tl.full([], 0.0, tl.float64)
    exact = jv < 0
    charged = tl.zeros_like(cost)
    for k in range(G_PAD):
        at = jv == k
        ck = _pick(cost, at)
        lk = _pick(live.to(tl.int32), at) > 0
        keep = spent + ck <= budget
        over = tl.where(keep, 0, 1) > 0  # (not ~keep: the interpreter's scalar invert)
        ch = tl.where(lk & keep, ck, 0.0)
        spent = spent + ch
        exact = exact | (at & lk & over)
        charged = tl.where(at, ch, charged)
    return exact, charged


@triton.jit(do_not_specialize=["st_t", "st_a", "st_seed", "st_pos", "sx_b", "GAMMA", "RQ", "RS",
                               "SR"])
def accept_resample_insert_kernel(
    q_ptr, p_ptr, sq_b, sq_j, sp_b, sp_j, qb_ptr, sqb, qoff_ptr, poff_ptr, g_ptr, x_ptr,
    t_ptr, alpha_ptr, seed_ptr, pos_ptr, st_t, st_a, st_seed, st_pos, sx_b, sx_j,
    stf_ptr, sti_ptr, p2_ptr, sst_ptr, ws_ptr, kq_ptr, kp_ptr,
    tok_ptr, nacc_ptr, nem_ptr, def_ptr, bud_ptr, cost_ptr, spent_ptr,
    GAMMA, RQ, V, S, RS, SR,
    RULE: tl.constexpr, BLOCK: tl.constexpr, S_PAD: tl.constexpr,
    G_PAD: tl.constexpr, KEEP: tl.constexpr, PER_ROW: tl.constexpr,
    BUDGET: tl.constexpr = False,
):
    b = tl.program_id(0)
    s = tl.program_id(1)
    b64 = b.to(tl.int64)
    G1 = GAMMA + 1  # output columns (ragged layout: the longest request's gamma + 1)
    # this request's gamma (padded layout: GAMMA) and rows; CASC: a drafter row at the bonus
    # position (bonus="cascade")
    gb, q_base, p_base = request_rows(b, q_ptr, p_ptr, sq_b, sp_b, qoff_ptr, poff_ptr, g_ptr,
                                      GAMMA, PER_ROW)
    CASC = RQ - GAMMA
    qb_row = qb_ptr + b64 * sqb
    t = tl.load(t_ptr + b * st_t)
    alpha = tl.load(alpha_ptr + b * st_a)
    seed = tl.load(seed_ptr + b * st_seed)
    pos = tl.load(pos_ptr + b * st_pos)
    greedy = t == 0
    inv_t = tl.where(greedy, 1.0, 1.0 / tl.where(greedy, 1.0, t))
    one_m_a = 1.0 - alpha
    token_rule: tl.constexpr = (RULE >= TOKEN_V1) & (RULE <= TOKEN_V3)

    # ---- targets (decisions) + accept, all positions at once: first rejection j* ---------------
    jv = tl.arange(0, G_PAD)
    has_q = jv < gb + CASC
    has_p = jv <= gb
    q_rows = q_base + jv * sq_j
    p_rows = p_base + jv * sp_j
    bonus_lossy = jv == tl.where(CASC > 0, gb, -1)  # bonus position of bonus="cascade"
    mq, lzq, aq, mp, lzp, ap, delta, eta, cth, sstar, c = row_targets(
        q_rows, p_rows, stf_ptr, sti_ptr, p2_ptr, sst_ptr, b * G1 + jv, has_q, has_p, S, greedy,
        inv_t, alpha, bonus_lossy, RULE, S_PAD)
    is_draft = jv < gb
    x = tl.load(x_ptr + b64 * sx_b + jv * sx_j, mask=is_draft, other=0)
    ql = tl.load(q_rows + x, mask=is_draft, other=NEG_INF).to(tl.float64)
    pl = tl.load(p_rows + x, mask=is_draft, other=NEG_INF).to(tl.float64)
    tq, cq = load_keep(kq_ptr, b * RQ + jv, has_q, KEEP)
    tp, cp = load_keep(kp_ptr, b * G1 + jv, has_p, KEEP)
    qx = scaled(truncate(ql, x, tq, cq, KEEP), mq, lzq, inv_t, x, aq, greedy)
    px = scaled(truncate(pl, x, tp, cp, KEEP), mp, lzp, inv_t, x, ap, greedy)
    in_a = acceptable(ql, pl, mq, mp, cth, RULE)
    acc_x = accept_fn(qx, px, in_a, delta, eta, sstar, one_m_a, RULE)
    if BUDGET:  # the divergence budget: positions that would overspend it are verified as spec
        cost = row_cost(p2_ptr, cost_ptr, b * G1 + jv, has_q, S, greedy, aq, ap, delta, eta,
                        RULE, S_PAD)
        exact, charged = budget_scan(cost, jv, has_q, tl.load(bud_ptr + b), G_PAD)
        acc_x = tl.where(exact, px, acc_x)
        if s == 0:
            tl.store(spent_ptr + b64 * G1 + jv, charged, mask=jv < G1)
    ratio = acc_x / tl.maximum(qx, Q_FLOOR)
    u = uniform(row_key(seed, pos + jv, ACCEPT), jv * 0)
    rejected = is_draft & (~(u < ratio))
    r = tl.min(tl.where(rejected, jv, gb), 0)  # = number of accepted drafts

    if s == 0:
        # ---- insert (slice 0): deferral flags, accepted drafts, -1 padding -----------------------
        # deferred: delta (prefix rules); draft outside A (token rules; their bonus column depends
        # on the emitted token: written below); else whether the verifier is involved at all
        # (and every position the divergence budget made exact)
        if token_rule:
            dflag = ~in_a
            if BUDGET:
                dflag = dflag | exact
            tl.store(def_ptr + b64 * G1 + jv, dflag, mask=is_draft)
        else:
            if (RULE == SPEC) | (RULE == LOSSY) | (RULE == LOSSY_STAR):
                flag = has_p
            elif RULE == DRAFTER:
                flag = jv < 0
            else:
                flag = delta
            if BUDGET:
                flag = flag | exact
            tl.store(def_ptr + b64 * G1 + jv, flag, mask=has_q)
        if CASC == 0:  # bonus="verifier": the bonus token always comes from the verifier
            tl.store(def_ptr + b64 * G1 + gb, tl.full([], 1, tl.int1))
        if PER_ROW:  # columns past this request's block: not deferred
            tl.store(def_ptr + b64 * G1 + jv, jv < 0, mask=(jv > gb) & (jv < G1))
        # accepted drafts, then -1 padding (the emitted token at column r comes last)
        tl.store(tok_ptr + b64 * G1 + jv, tl.where(jv < r, x, -1), mask=(jv < G1) & (jv != r))

    # ---- resample: row r = j* (residual), or the bonus position ----------------------------------
    sel = jv == r
    is_res = r < gb
    has_q_r = r < gb + CASC
    mq_r = _pick(mq, sel)
    mp_r = _pick(mp, sel)
    aq_r = _pick(aq, sel)
    ap_r = _pick(ap, sel)
    cth_r = _pick(cth, sel)
    delta_r = _pick(delta.to(tl.int32), sel) > 0
    if BUDGET:
        exact_r = _pick(exact.to(tl.int32), sel) > 0
    mq32 = mq_r.to(tl.float32)
    mp32 = mp_r.to(tl.float32)
    lzq32 = _pick(lzq, sel).to(tl.float32)
    lzp32 = _pick(lzp, sel).to(tl.float32)
    it32 = inv_t.to(tl.float32)
    eta32 = _pick(eta, sel).to(tl.float32)
    sst32 = _pick(sstar, sel).to(tl.float32)
    c32 = _pick(c, sel).to(tl.float32)
    oma32 = one_m_a.to(tl.float32)
    tq_r = _pick(tq, sel)
    cq_r = _pick(cq, sel)
    tp_r = _pick(tp, sel)
    cp_r = _pick(cp, sel)
    q_row = q_base + r * sq_j
    p_row = p_base + r * sp_j
    q_lim = tl.where(has_q_r, V, 0)
    key = row_key(seed, pos + r, RESIDUAL)
    best_w = tl.full([], NEG_INF, tl.float32)
    best_f = tl.full([], NEG_INF, tl.float32)
    arg_w = s * RS
    arg_f = s * RS
    for c0 in range(0, RS, BLOCK):
        base = s * RS + c0
        offs = base + tl.arange(0, BLOCK)
        inb = offs < V
        lq = load_q(q_row, qb_row, offs, q_lim, r >= gb, PER_ROW).to(tl.float32)
        lp = tl.load(p_row + offs, mask=inb, other=NEG_INF).to(tl.float32)
        qT = scaled(truncate(lq, offs, tq_r, cq_r, KEEP), mq32, lzq32, it32, offs, aq_r,
                    greedy & has_q_r)
        pT = scaled(truncate(lp, offs, tp_r, cp_r, KEEP), mp32, lzp32, it32, offs, ap_r, greedy)
        if token_rule:
            in_v = acceptable(lq.to(tl.float64), lp.to(tl.float64), mq_r, mp_r, cth_r, RULE)
        else:
            in_v = inb
        acc = accept_fn(qT, pT, in_v, delta_r, eta32, sst32, oma32, RULE)
        if BUDGET:  # an exact position: spec's accept pT, residual max(0, pT - qT), law pT
            acc = tl.where(exact_r, pT, acc)
        if RULE == LOSSY:
            res = tl.maximum(pT - qT, 0.0)
            law = tl.minimum(qT, acc) + c32 * res
            if BUDGET:
                law = tl.where(exact_r, pT, law)
        else:
            res = tl.maximum(acc - qT, 0.0)
            law = acc
        # weights: the residual at j* (and its fallback, the row's law min(qT, accept), for when
        # the residual is all zero), else the bonus law (bonus="verifier": pT)
        w = tl.where(is_res, res, tl.where(CASC > 0, law, pT))
        fb = tl.where(is_res, tl.minimum(qT, acc), w)
        # exponential noise E = -log u (float64), then the race on log w - log E in float32
        e = -tl.log((bits52(key, offs).to(tl.float64) + 0.5) * TWO_M52)
        le = tl.log(e.to(tl.float32))
        sw = tl.where(inb, tl.log(w) - le, NEG_INF)
        sf = tl.where(inb, tl.log(fb) - le, NEG_INF)
        cw = tl.max(sw, 0)
        cf = tl.max(sf, 0)
        arg_w = tl.where(cw > best_w, base + tl.argmax(sw, 0), arg_w)
        arg_f = tl.where(cf > best_f, base + tl.argmax(sf, 0), arg_f)
        best_w = tl.maximum(best_w, cw)
        best_f = tl.maximum(best_f, cf)

    # ---- merge the slices: int64 atomic max of (score, lowest id); the last program inserts ----
    tl.atomic_max(ws_ptr + 3 * b, pack(best_w, arg_w))
    tl.atomic_max(ws_ptr + 3 * b + 1, pack(best_f, arg_f))
    arrived = tl.atomic_add(ws_ptr + 3 * b + 2, 1)
    if arrived == SR - 1:  # ---- insert: the emitted token, the counts, the bonus flag ----
        sw_best, iw = unpack(tl.atomic_xchg(ws_ptr + 3 * b, -9223372036854775807 - 1))
        sf_best, i_f = unpack(tl.atomic_xchg(ws_ptr + 3 * b + 1, -9223372036854775807 - 1))
        tok = tl.where(sw_best > NEG_INF, iw, i_f)
        tl.store(tok_ptr + b64 * G1 + r, tok.to(tl.int64))
        tl.store(nacc_ptr + b, r.to(tl.int64))
        tl.store(nem_ptr + b, r.to(tl.int64) + 1)
        if token_rule:
            if CASC > 0:
                qb = load_q(q_row, qb_row, tok, V, r >= gb, PER_ROW).to(tl.float64)
                pb = tl.load(p_row + tok).to(tl.float64)
                out_a = ~acceptable(qb, pb, mq_r, mp_r, cth_r, RULE)
                out_a = out_a & (r == gb)
                if BUDGET:
                    out_a = out_a | (_pick(exact.to(tl.int32), jv == gb) > 0)
                tl.store(def_ptr + b64 * G1 + gb, out_a)


def race_slice(V: int, B: int, slice_width: int, sms: int) -> int:
    """Vocabulary slice per program of the race: the targets stage's ``slice_width`` when B
    sequences of ``V / slice_width`` programs already give each of the device's ``sms``
    multiprocessors a program, else narrower, so that B x (V / width) is about 2 per
    multiprocessor, but not below 1024 (nor above ``slice_width``). The race (a hash, a float64
    log and two float32 logs per token) is the block's longest stage, and at B = 1 the targets
    stage's 19 slices of 8192 at V = 151,936 leave most of a GPU with 100+ multiprocessors idle.
    A power of two; B only picks among a few widths, and the width is a runtime argument (see
    :func:`launch`)."""
    if B * -(-V // slice_width) >= sms:
        return slice_width
    return min(slice_width, spread(V, B, sms))


def launch(q, p, rows, x, kq, kp, targets, temperature, alpha, seed, positions, *, B: int,
           gamma: int, rq: int, rule: str, per_row: bool, block: int | None = None,
           race_width: int | None = None, budget: torch.Tensor | None = None):
    """The kernel after the targets stage (``targets``: what
    :func:`speccascade_fast.kernels.targets.launch` returned, on the same arguments), ``x``
    int64 ``[B, gamma]`` the drafts; seeds and positions int64 ``[B]``. The race runs over slices
    of its own width RS (``race_width``, default :func:`race_slice`), a runtime argument, in
    chunks of RBLOCK: the targets stage's BLOCK where RS is its slice, else at most 1024
    (4 warps). So a V has at most two compiled race geometries, whatever B. Returns
    ``(tokens [B, gamma + 1], num_accepted [B], num_emitted [B], deferred [B, gamma + 1],
    spent)``. ``budget``: None, or float64 ``[B]`` each sequence's divergence budget (the
    targets stage then ran with ``budget=True``): the scan of docs/semantics.md §9 runs before
    the accept loop and ``spent`` is float64 ``[B, gamma + 1]`` the charges (else None)."""
    device = p.device
    V = p.shape[-1]
    G1 = gamma + 1
    SLICE, S = targets.slice_width, targets.S
    RS = race_width or race_slice(V, B, SLICE, sm_count(device))
    RBLOCK = min(RS, block or (targets.block if RS == SLICE else 1024))
    SR = -(-V // RS)
    keep = kq is not None
    if not keep:
        kq = kp = targets.stf  # placeholders: the kernel does not read them
    tokens = torch.empty((B, G1), dtype=torch.int64, device=device)
    num_accepted = torch.empty((B,), dtype=torch.int64, device=device)
    num_emitted = torch.empty((B,), dtype=torch.int64, device=device)
    deferred = torch.empty((B, G1), dtype=torch.bool, device=device)
    spent = None
    if budget is None:
        bud = spent_out = cost = targets.stf  # placeholders: the kernel does not read them
    else:
        bud = budget.contiguous()
        spent = spent_out = torch.empty((B, G1), dtype=torch.float64, device=device)
        cost = targets.cost
    accept_resample_insert_kernel[(B, SR)](
        q, p, *rows, x, temperature, alpha, seed, positions,
        temperature.stride(0), alpha.stride(0), seed.stride(0), positions.stride(0),
        x.stride(0), x.stride(1),
        targets.stf, targets.sti, targets.sums, targets.inv_beta, targets.ws, kq, kp,
        tokens, num_accepted, num_emitted, deferred, bud, cost, spent_out,
        gamma, rq, V, S, RS, SR,
        RULE=RULES.index(rule), BLOCK=RBLOCK, S_PAD=next_pow2(S), G_PAD=next_pow2(G1), KEEP=keep,
        PER_ROW=per_row, BUDGET=budget is not None, num_warps=warps(RBLOCK),
    )
    return tokens, num_accepted, num_emitted, deferred, spent
