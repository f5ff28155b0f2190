"""Shared pieces of the verification kernels: rule ids, the layout of the per-slice statistics,
the cross-slice combine, and the pointwise formulas of docs/semantics.md §1-3.

Per (position n = b * (gamma + 1) + j, vocabulary slice s) the targets kernel writes, for the
drafter row ``q`` and the verifier row ``p`` (each relative to the slice's own max ``m``):

* float32 ``stf[n, F, s]``: ``m``, ``Σ exp(x - m)``, ``Σ exp((x - m) / T)``, ``Σ exp(x - m) (x - m)``
  for q (F = 0..3) and p (F = 4..7); for ``bild``, ``X = Σ exp(q - mq) (p - ref)`` and
  ``Zb = Σ exp(q - mq)`` over tokens where both are finite (F = 8, 9; ``ref`` = the slice's p max);
* int32 ``sti[n, I, s]``: argmax of q and of p (lowest id on ties), and for ``bild`` whether some
  token has q finite and p = -inf (then -Σ q1 log p1 = +inf).

Everything that reads a whole row (``row_stats``) merges the slices in float64.

Specialisation: Triton compiles a variant of a kernel for every int argument that equals 1 or is
divisible by 16. The scalars that vary with the batch or gamma (the per-request tensors' strides,
which are 1 or 0 for one request, and GAMMA, RQ, G1, NR, the draft tokens' row stride) are
declared ``do_not_specialize`` on each launched kernel, so one compiled kernel serves every B and
every gamma with the same power-of-two bucket of gamma + 1 (the accept kernel's constexpr G_PAD)
of a vocabulary (tests/gpu/test_triton_gpu.py, test_no_recompilation_per_batch_size_or_gamma);
the strides along which logit rows are loaded stay specialised (their divisibility allows vector
loads).
"""
from __future__ import annotations

import triton
import triton.language as tl

# rule ids = positions in speccascade_fast.rules.RULES
SPEC = tl.constexpr(0)
DRAFTER = tl.constexpr(1)
CHOW = tl.constexpr(2)
CHOW_LOG = tl.constexpr(3)
DIFF = tl.constexpr(4)
DIFF_LOG = tl.constexpr(5)
OPT = tl.constexpr(6)
OPT_LOG = tl.constexpr(7)
TOKEN_V1 = tl.constexpr(8)
TOKEN_V2 = tl.constexpr(9)
TOKEN_V3 = tl.constexpr(10)
LOSSY = tl.constexpr(11)
LOSSY_STAR = tl.constexpr(12)
BILD = tl.constexpr(13)

NF = tl.constexpr(10)  # float stats per (position, slice)
NI = tl.constexpr(3)  # int stats per (position, slice)
F_Q = tl.constexpr(0)  # q: max, Σexp(x-m), Σexp((x-m)/T), Σexp(x-m)(x-m)
F_P = tl.constexpr(4)  # p: the same
F_X = tl.constexpr(8)  # bild: X, Zb
I_Q = tl.constexpr(0)
I_P = tl.constexpr(1)
I_INF = tl.constexpr(2)

Q_FLOOR = tl.constexpr(1e-10)  # rules.Q_FLOOR
NEG_INF = tl.constexpr(float("-inf"))
INT_BIG = tl.constexpr(2147483647)


@triton.jit
def row_stats(stf_ptr, sti_ptr, n, n_ok, S, inv_t, F0: tl.constexpr, I0: tl.constexpr,
              S_PAD: tl.constexpr):
    """Merge one model's per-slice stats of the positions ``n`` (int32 ``[R]``; rows where
    ``n_ok`` is False read nothing) with float64 ``inv_t`` = 1/T (1 at T = 0).

    Returns float64 ``[R]`` ``(m, Σexp(x-m), Σexp((x-m)/T), Σexp(x-m)(x-m))`` and the int32 argmax
    (lowest id on ties; a row with no finite entry gets m = -inf, sums 0, argmax INT_BIG).
    """
    s = tl.arange(0, S_PAD)[None, :]
    ok = (s < S) & n_ok[:, None]
    fb = stf_ptr + n.to(tl.int64)[:, None] * (NF * S) + s
    m_s = tl.load(fb + F0 * S, mask=ok, other=NEG_INF).to(tl.float64)
    z1_s = tl.load(fb + (F0 + 1) * S, mask=ok, other=0.0).to(tl.float64)
    zt_s = tl.load(fb + (F0 + 2) * S, mask=ok, other=0.0).to(tl.float64)
    h_s = tl.load(fb + (F0 + 3) * S, mask=ok, other=0.0).to(tl.float64)
    a_s = tl.load(sti_ptr + n.to(tl.int64)[:, None] * (NI * S) + I0 * S + s, mask=ok, other=0)
    m = tl.max(m_s, 1)
    live = m_s > NEG_INF
    d = tl.where(live, m_s - m[:, None], 0.0)
    f1 = tl.where(live, tl.exp(d), 0.0)
    ft = tl.where(live, tl.exp(d * inv_t), 0.0)
    z1 = tl.sum(f1 * z1_s, 1)
    zt = tl.sum(ft * zt_s, 1)
    h = tl.sum(f1 * (h_s + d * z1_s), 1)
    arg = tl.min(tl.where(live & (m_s == m[:, None]), a_s, INT_BIG), 1)
    return m, z1, zt, h, arg


@triton.jit
def row_stats1(stf_ptr, sti_ptr, n, S, inv_t, F0: tl.constexpr, I0: tl.constexpr,
               S_PAD: tl.constexpr):
    """:func:`row_stats` of the single position ``n``, as scalars."""
    nv = n + tl.arange(0, 1)
    m, z1, zt, h, arg = row_stats(stf_ptr, sti_ptr, nv, nv >= 0, S, inv_t, F0, I0, S_PAD)
    return tl.max(m, 0), tl.sum(z1, 0), tl.sum(zt, 0), tl.sum(h, 0), tl.min(arg, 0)


@triton.jit
def row_cross(stf_ptr, sti_ptr, n, n_ok, S, mq, mp, S_PAD: tl.constexpr):
    """bild, positions ``n`` ``[R]``: ``Σ exp(q - mq) (p - mp)`` over tokens where both are finite
    (float64), and whether some token has q finite and p = -inf."""
    s = tl.arange(0, S_PAD)[None, :]
    ok = (s < S) & n_ok[:, None]
    fb = stf_ptr + n.to(tl.int64)[:, None] * (NF * S) + s
    mq_s = tl.load(fb + F_Q * S, mask=ok, other=NEG_INF).to(tl.float64)
    mp_s = tl.load(fb + F_P * S, mask=ok, other=NEG_INF).to(tl.float64)
    x_s = tl.load(fb + F_X * S, mask=ok, other=0.0).to(tl.float64)
    zb_s = tl.load(fb + (F_X + 1) * S, mask=ok, other=0.0).to(tl.float64)
    inf_s = tl.load(sti_ptr + n.to(tl.int64)[:, None] * (NI * S) + I_INF * S + s, mask=ok,
                    other=0)
    live = mq_s > NEG_INF
    f = tl.where(live, tl.exp(tl.where(live, mq_s - mq[:, None], 0.0)), 0.0)
    ref = tl.where(mp_s > NEG_INF, mp_s, 0.0)
    x = tl.sum(tl.where(live, f * (x_s + (ref - mp[:, None]) * zb_s), 0.0), 1)
    return x, tl.max(inf_s, 1) > 0


@triton.jit
def request_rows(b, q_ptr, p_ptr, sq_b, sp_b, qoff_ptr, poff_ptr, g_ptr, GAMMA,
                 PER_ROW: tl.constexpr):
    """``(gamma_b, base of b's draft rows, base of b's target rows)``: row j of request b is at
    ``base + j * stride_j``. Padded layout (``PER_ROW`` False): every request has ``GAMMA``
    drafts and its rows start at ``b * stride_b``. Ragged layout: ``gamma_b`` and the element
    offsets of its first rows come from int64 ``[B]`` tables (vLLM's flattened rows: request b's
    drafts start at row ``cu[b]``, its target rows at ``cu[b] + b``)."""
    if PER_ROW:
        gb = tl.load(g_ptr + b)
        q_base = q_ptr + tl.load(qoff_ptr + b)
        p_base = p_ptr + tl.load(poff_ptr + b)
    else:
        gb = GAMMA
        q_base = q_ptr + b.to(tl.int64) * sq_b
        p_base = p_ptr + b.to(tl.int64) * sp_b
    return gb, q_base, p_base


@triton.jit
def load_q(q_row, qb_row, offs, lim, bonus, PER_ROW: tl.constexpr):
    """Drafter logits at ``offs < lim`` (else -inf) of one row: ``q_row``, or in the ragged
    layout, where ``bonus`` holds, the request's row ``qb_row`` of the separate bonus tensor
    (the padded layout keeps the bonus row with the drafts, at j = gamma). Two predicated loads,
    no select between pointers: the one masked off reads nothing. A bonus tensor of another dtype
    than the drafts is read as is; both are then returned as float64 (exact for every input
    dtype, so every caller's own conversion gives what the padded layout gives)."""
    if PER_ROW:
        a = tl.load(q_row + offs, mask=offs < tl.where(bonus, 0, lim), other=NEG_INF)
        c = tl.load(qb_row + offs, mask=offs < tl.where(bonus, lim, 0), other=NEG_INF)
        if a.dtype == c.dtype:
            r = tl.where(bonus, c, a)
        else:
            r = tl.where(bonus, c.to(tl.float64), a.to(tl.float64))
    else:
        r = tl.load(q_row + offs, mask=offs < lim, other=NEG_INF)
    return r


@triton.jit
def load_keep(k_ptr, row, ok, KEEP: tl.constexpr):
    """Top-k / top-p keep bound ``(tau, cut)`` of logit row(s) ``row`` from the float64
    ``[rows, 2]`` array at ``k_ptr`` (speccascade_fast/truncation.py); without ``KEEP`` (or where
    ``ok`` is False) the bound that keeps everything."""
    if KEEP:
        r = row.to(tl.int64) * 2
        tau = tl.load(k_ptr + r, mask=ok, other=float("-inf")).to(tl.float32)
        cut = tl.load(k_ptr + r + 1, mask=ok, other=2147483647.0).to(tl.int32)
    else:
        tau = row.to(tl.float32) * 0.0 + NEG_INF
        cut = row.to(tl.int32) * 0 + INT_BIG
    return tau, cut


@triton.jit
def truncate(l, idx, tau, cut, KEEP: tl.constexpr):
    """The logits ``l`` (ids ``idx``) with -inf outside the kept set
    ``{l > tau} ∪ {l == tau, id <= cut}``: what the scaled laws qT / pT are formed from when
    truncating (the unscaled q1 / p1 read ``l`` itself)."""
    if KEEP:
        kept = (l > tau) | ((l == tau) & (idx <= cut))
        r = tl.where(kept, l, NEG_INF)
    else:
        r = l
    return r


@triton.jit
def scaled(l, m, lz, inv_t, idx, arg, greedy):
    """``qT``/``pT`` at logits ``l``: ``exp((l - m)/T - lz)`` (``lz`` = log Σexp((x-m)/T)), or at
    T = 0 (``greedy``) the one-hot of the argmax ``arg``. ``l`` = -inf gives 0."""
    e = tl.exp((l - m) * inv_t - lz)
    return tl.where(greedy, tl.where(idx == arg, 1.0, 0.0), e)


@triton.jit
def acceptable(ql, pl, mq, mp, cth, RULE: tl.constexpr):
    """Token rules' set A in logit space (``cth`` from :func:`token_threshold`):
    token_v1 tests ``q - mq >= cth``, token_v2/v3 ``p - mp >= cth``. Call with float64 logits."""
    if RULE == TOKEN_V1:
        r = (ql - mq) >= cth
    else:
        r = (pl - mp) >= cth
    return r


@triton.jit
def token_threshold(zq1, zp1, alpha, RULE: tl.constexpr):
    """Rewrites eqs. 13-15 as a threshold on ``logit - max`` (float64; -inf: every token is in A).

    v1: q1(v) >= max p1 - a   <=>  q - mq >= log(Zq (1/Zp - a))
    v2: p1(v) >= max p1 - a   <=>  p - mp >= log(1 - a Zp)
    v3: p1(v) >= (1-a) max p1 <=>  p - mp >= log(1 - a)
    (no argument of the log > 0: every token qualifies, as 0 >= a non-positive threshold).
    """
    if RULE == TOKEN_V1:
        arg = zq1 * (1.0 / zp1 - alpha)
    elif RULE == TOKEN_V2:
        arg = 1.0 - alpha * zp1
    else:
        arg = 1.0 - alpha
    return tl.where(arg > 0, tl.log(tl.where(arg > 0, arg, 1.0)), NEG_INF)


@triton.jit
def accept_fn(qT, pT, in_a, delta, eta, sstar, one_m_a, RULE: tl.constexpr):
    """The rule's ``accept`` (``rules.Targets.accept``): pi for every rule, ``pT/(1-a)`` for lossy.

    ``delta`` (prefix rules: defer?) selects pT over qT exactly; ``eta`` = Σ_{v∉A} qT (token rules);
    ``sstar`` = 1/beta (lossy_star)."""
    if RULE == SPEC:
        r = pT
    elif RULE == DRAFTER:
        r = qT
    elif (RULE >= TOKEN_V1) & (RULE <= TOKEN_V3):
        r = tl.where(in_a, qT, 0.0) + eta * pT
    elif RULE == LOSSY:
        r = pT / one_m_a
    elif RULE == LOSSY_STAR:
        r = tl.maximum(tl.minimum(qT, pT / one_m_a), sstar * pT)
    else:
        r = tl.where(delta, pT, qT)
    return r


@triton.jit
def pack(score, idx):
    """(float32 score, int32 id) -> int64 whose signed order is (score, then lower id)."""
    bits = score.to(tl.int32, bitcast=True)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (key.to(tl.int64) << 32) | (4294967295 - idx.to(tl.int64))


@triton.jit
def unpack(packed):
    key = (packed >> 32).to(tl.int32)
    bits = key ^ ((key >> 31) & 0x7FFFFFFF)
    return bits.to(tl.float32, bitcast=True), (4294967295 - (packed & 4294967295)).to(tl.int32)
