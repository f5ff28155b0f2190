"""The Triton verification backend: the reference's three stages as 2-3 fused kernel launches.

Same signature and semantics as :mod:`.reference` (inputs arrive validated by
:func:`speccascade_fast.verify`); tokens, ``num_accepted`` and ``deferred`` equal the reference's
for the same inputs and seeds up to floating-point near-ties: the kernels work on float32 logits
(fp64 inputs are rounded), accumulate per slice in float32, merge slices and take every decision
in float64, draw the acceptance uniforms bit-exactly, and race in float32; the reference is
float64 throughout. One systematic kind of near-tie: a residual whose total mass is below float32
resolution (e.g. lossy_star where pi = qT up to its bisection's rounding) is all zero here, so the
position's law is drawn (the reference's fallback for an exactly-zero residual), while the
reference races on its rounding noise (with drafts drawn from qT such a residual is reached
with a probability of that same negligible order).

Launches (grids over (position or sequence) x vocabulary slice, so B = 1 still fills the GPU;
probability tensors are never materialised):

1. ``stats`` ``(B(gamma+1), S)``: one read of q and p: per-slice max, argmax, Σexp at T and at 1,
   the entropy-type sum (chow_log, diff_log, opt_log) and bild's cross term;
2. only where a rule needs sums taken after the log-partitions are known:
   ``second_pass`` ``(B rows, S)`` for opt / opt_log (TV(pT, qT)), token_v1-3 (eta) and lossy with
   bonus="cascade" (its bonus law's normaliser), or ``lossy_star`` ``(B rows,)``, 1/beta by
   k-section (18 reads of the row per position, one program each: correct, not fast);
3. ``accept_resample`` ``(B, SR)``: decisions, the accept loop with the counter-based RNG and the
   Gumbel-max race of the residual / bonus row over SR race slices (the S stats slices, or
   narrower ones at small B: :func:`race_slice`), merged with an int64 atomic max; the last
   program of each sequence writes the emitted token. The winner is the same token whatever the
   slicing (ties go to the lowest id).

So spec, drafter, chow, chow_log, diff, diff_log, bild and lossy (bonus="verifier") take 2 launches;
opt, opt_log, token_v1-3, lossy (bonus="cascade") and lossy_star take 3. No host synchronisation,
no ``.item()``; only ``torch.empty`` allocations: CUDA-graph capturable. Constexprs: the rule, the
slice / block widths (functions of V only: :func:`slice_size`, one block per slice, 4-16 warps;
stage 3's race block is that block or, for the narrower race slices of small B, 1024) and
paddings; B, gamma, T, alpha, seeds, positions and the race slice width are runtime values (no
recompile per B: at most two compiled race geometries per V).

**top_k / top_p**: each logit row's keep bound ``(tau, cut)`` (:mod:`speccascade_fast.truncation`)
is computed first (on CUDA top-k by torch and top-p by the search of
:mod:`speccascade_fast.kernels.keep_bounds`, :func:`keep_bounds`, no host read; on the
interpreter by the C++ op)
and every kernel reads a truncated row as -inf outside its set wherever it forms qT or pT (the
unscaled q1, p1 stay whole). T = 0 (greedy) and T > 0 may mix within a batch.

**Ragged layout** (:func:`verify_ragged`, vLLM's flattened rows with per-request gamma): the same
launches, every kernel taking per request its gamma_b and the offsets of its first draft / target
rows (constexpr ``PER_ROW``), the bonus drafter rows from their own tensor; the grids are sized by
the longest request's gamma and a shorter request's extra positions read nothing.

The module also runs the drafter's draw, :func:`sample` (:mod:`speccascade_fast.kernels.sample`:
a race per vocabulary slice, then the best of the slices; two launches), which
:func:`speccascade_fast.sample` uses on CUDA.

Devices: CUDA, or the CPU through Triton's interpreter when ``TRITON_INTERPRET=1`` was set before
the kernels were first imported (tests; slow, keep V small).
"""
from __future__ import annotations

import functools
import os

import torch

from ..rules import RULES
from ..truncation import keep_bounds_pair, ragged_keep_bounds
from ..types import VerifyOutput

_NEED_Z1 = frozenset({"chow", "chow_log", "diff", "diff_log", "opt", "opt_log", "bild",
                      "token_v1", "token_v2"})
# lossy_star's 1/beta: K candidates per read of the row, PASSES reads: (K + 1)^PASSES > 2^53,
# the resolution of the reference's 50-step bisection (rules.LOSSY_STAR_BISECTION_STEPS)
LOSSY_STAR_K, LOSSY_STAR_PASSES = 8, 17
_NEED_H = frozenset({"chow_log", "diff_log", "opt_log"})
_SECOND_PASS = frozenset({"opt", "opt_log", "token_v1", "token_v2", "token_v3"})
_NF, _NI = 10, 3  # kernels.common.NF / NI
RACE_PROGRAMS_PER_SM = 2  # stage 3's race: programs per multiprocessor it aims for (race_slice)


@functools.cache
def _triton_imports() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def is_available(device=None) -> bool:
    """True when triton imports and ``device`` is CUDA (with a GPU present), or ``device`` is the
    CPU (None) and ``TRITON_INTERPRET=1`` is set."""
    dev = torch.device("cpu") if device is None else torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_available() and _triton_imports()
    return dev.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1" and _triton_imports()


def _kernels():
    from .. import kernels  # imported on first use: TRITON_INTERPRET is read at decoration time

    return kernels


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def slice_size(V: int) -> int:
    """Vocabulary slice per program: about V/32, a power of two in [1024, 8192] (V=262,144: 32
    slices of 8192; V=151,936: 19 of 8192; V=32,000: 32 of 1024), or the whole of a small V."""
    return min(max(_next_pow2(-(-V // 32)), 1024), 8192, _next_pow2(V))


def race_slice(V: int, B: int, slice_width: int, sms: int) -> int:
    """Vocabulary slice per program of stage 3's race: the stats' ``slice_width`` when B sequences
    of ``V / slice_width`` programs already give each of the device's ``sms`` multiprocessors a
    program, else narrower, so that B x (V / width) is about 2 per multiprocessor, but not below
    1024 (nor above ``slice_width``). The race (a hash, a float64 log and two float32 logs per
    token) is the block's longest stage, and at B = 1 the stats' 19 slices of 8192 at V = 151,936
    leave most of an H100's 132 multiprocessors idle. A power of two; B only picks among a few
    widths, and the width is a runtime argument (see :func:`_run`)."""
    if B * -(-V // slice_width) >= sms:
        return slice_width
    return min(slice_width, _spread(V, B, sms))


def _spread(V: int, rows: int, sms: int) -> int:
    """The power-of-two slice width (at least 1024) at which ``rows`` rows of V tokens make
    about RACE_PROGRAMS_PER_SM programs per multiprocessor."""
    want = -(-RACE_PROGRAMS_PER_SM * sms // max(rows, 1))  # programs per row
    return max(1024, _next_pow2(-(-V // want)))


@functools.cache
def _sm_count(device: torch.device) -> int:
    """Multiprocessors of a CUDA device; 1 on the CPU (the interpreter: the race keeps the stats'
    slices unless a test asks otherwise)."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def _warps(block: int) -> int:
    """16 elements per thread at most: 8192-wide blocks get 16 warps."""
    return max(4, min(16, block // 512))


def verify(draft_logits, draft_tokens, target_logits, *, rule, alpha, temperature, top_k, top_p,
           seed, positions) -> VerifyOutput:
    """Shapes: ``draft_logits`` ``[B, g or g+1, V]``, ``draft_tokens`` int64 ``[B, g]``,
    ``target_logits`` ``[B, g+1, V]`` (fp32/bf16/fp16/fp64, last dim contiguous or copied);
    ``alpha``, ``temperature`` float64 ``[B]``; ``seed``, ``positions`` int64 ``[B]``."""
    return launch(draft_logits, draft_tokens, target_logits, rule=rule, alpha=alpha,
                  temperature=temperature, seed=seed, positions=positions, top_k=top_k,
                  top_p=top_p)


def _check_mode(kernels, device: torch.device) -> None:
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    # triton.jit reads TRITON_INTERPRET when it decorates: our kernels and triton's own helpers
    # (tl.max, ...) must both have been decorated with it set, i.e. at triton's first import
    interpreted = all(isinstance(f, InterpretedFunction) for f in (kernels.stats_kernel, tl.max))
    if device.type == "cpu" and not (interpreted and os.environ.get("TRITON_INTERPRET") == "1"):
        raise RuntimeError(
            "the Triton backend got CPU tensors: that needs Triton's interpreter, i.e. "
            "TRITON_INTERPRET=1 set before triton is first imported (by anything) and while "
            "the kernels run")
    if device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"the Triton backend runs on CUDA (or CPU when interpreted), got {device}")


def launch(draft_logits, draft_tokens, target_logits, *, rule, alpha, temperature, seed,
           positions, top_k=None, top_p=None, slice_width: int | None = None,
           block: int | None = None, race_width: int | None = None) -> VerifyOutput:
    """Run the kernels on the padded layout. ``slice_width`` / ``block`` / ``race_width``
    (powers of two) override the vocabulary slice per program (default :func:`slice_size`), the
    chunk each program loops over (default: the whole slice in one go) and the slice per program
    of stage 3's race (default :func:`race_slice`); the tests use tiny ones."""
    _check_mode(_kernels(), target_logits.device)
    B, gamma = draft_tokens.shape
    q = draft_logits if draft_logits.stride(-1) == 1 else draft_logits.contiguous()
    p = target_logits if target_logits.stride(-1) == 1 else target_logits.contiguous()
    kq, kp = keep_bounds_pair(q, temperature[:, None], p, temperature[:, None], top_k, top_p)
    layout = _Layout(B=B, gamma=gamma, rq=q.shape[1],
                     strides=(q.stride(0), q.stride(1), p.stride(0), p.stride(1)))
    return _run(q, p, draft_tokens, kq, kp, layout, rule=rule, alpha=alpha,
                temperature=temperature, seed=seed, positions=positions,
                slice_width=slice_width, block=block, race_width=race_width)


def verify_ragged(draft_logits, draft_tokens, target_logits, cu_num_draft_tokens,
                  bonus_draft_logits, *, max_gamma: int, rule, alpha, temperature, seed,
                  positions, top_k=None, top_p=None, slice_width: int | None = None,
                  block: int | None = None, race_width: int | None = None) -> VerifyOutput:
    """vLLM's flattened layout (:func:`speccascade_fast.ragged.verify_ragged`, inputs validated
    there) in the same 2-3 launches as the padded one, reading the logits where they lie (no
    padded copy): every kernel takes per request its gamma_b and the offsets of its first draft
    row (``cu[b]``) and target row (``cu[b] + b``), and the bonus drafter rows from their own
    tensor. ``max_gamma`` = the longest request's gamma (the grids' size, from the host: vLLM's
    ``max_spec_len``). Only the drafts and the top-k / top-p keep bounds (a few numbers per row)
    are gathered into the padded ``[B, max_gamma (+1)]`` layout, on the device."""
    _check_mode(_kernels(), target_logits.device)
    device = target_logits.device
    q = draft_logits if draft_logits.stride(-1) == 1 else draft_logits.contiguous()
    p = target_logits if target_logits.stride(-1) == 1 else target_logits.contiguous()
    N = q.shape[0]
    cu = cu_num_draft_tokens.to(device=device, dtype=torch.int64)
    B = cu.numel() - 1
    cascade = bonus_draft_logits is not None
    G, G1 = int(max_gamma), int(max_gamma) + 1
    RQ = G + int(cascade)
    start, gam = cu[:-1], cu[1:] - cu[:-1]
    req = torch.arange(B, device=device)
    j = torch.arange(G1, device=device)
    draft_row = (start[:, None] + j).clamp(max=N - 1)  # [B, G1]: request b's j-th draft row
    target_row = (start + req)[:, None] + j  # [B, G1]; rows past gamma_b are never read...
    target_row = target_row.clamp(max=N + B - 1)  # ...but must index something
    x = torch.where(j[:G] < gam[:, None], draft_tokens.to(torch.int64)[draft_row[:, :G]], 0)
    if cascade:  # (of its own dtype: the kernels read each tensor as it is)
        qb = bonus_draft_logits
        qb = qb if qb.stride(-1) == 1 else qb.contiguous()
    else:
        qb = q  # never read
    kq = kp = None
    kd, kt, kb = ragged_keep_bounds(q, p, qb if cascade else None, cu, temperature, top_k,
                                    top_p)
    if kd is not None:  # the flattened rows' bounds, gathered to the padded rows
        kq = kd[draft_row[:, :RQ]]
        if cascade:
            kq = torch.where((j[:RQ] == gam[:, None])[..., None], kb[:, None], kq)
        kq, kp = kq.contiguous(), kt[target_row].contiguous()
    layout = _Layout(B=B, gamma=G, rq=RQ, strides=(0, q.stride(0), 0, p.stride(0)), qb=qb,
                     qoff=start * q.stride(0), poff=(start + req) * p.stride(0), gammas=gam)
    return _run(q, p, x, kq, kp, layout, rule=rule, alpha=alpha, temperature=temperature,
                seed=seed, positions=positions, slice_width=slice_width, block=block,
                race_width=race_width)


class _Layout:
    """Where the kernels find request b's rows: ``strides`` ``(q_b, q_j, p_b, p_j)`` (padded:
    row j of b at ``b * stride_b + j * stride_j``), or with ``gammas`` (ragged) its gamma_b and
    the element offsets ``qoff[b]`` / ``poff[b]`` of its first rows (row j at ``off + j *
    stride_j``), its bonus drafter row in ``qb`` (row b)."""

    def __init__(self, *, B, gamma, rq, strides, qb=None, qoff=None, poff=None, gammas=None):
        self.B, self.gamma, self.rq, self.strides = B, gamma, rq, strides
        self.qb, self.qoff, self.poff, self.gammas = qb, qoff, poff, gammas

    def args(self, q):
        """The kernels' layout arguments: q/p strides, bonus tensor and its row stride, offset
        tables and gammas (placeholders in the padded layout, never read there)."""
        if self.gammas is None:
            return (*self.strides, q, 0, q, q, q)
        return (*self.strides, self.qb, self.qb.stride(0), self.qoff, self.poff, self.gammas)


def _run(q, p, x, kq, kp, layout: _Layout, *, rule, alpha, temperature, seed, positions,
         slice_width, block, race_width) -> VerifyOutput:
    """The 2-3 launches of the module docstring, on either layout. Stage 3's race runs over
    slices of its own width RS (:func:`race_slice`), a runtime argument, in chunks of RBLOCK: the
    stats' BLOCK where RS is the stats' slice, else at most 1024 (4 warps). So a V has at most
    two compiled race geometries, whatever B."""
    k = _kernels()
    device = p.device
    B, gamma, RQ = layout.B, layout.gamma, layout.rq
    V = p.shape[-1]
    G1 = gamma + 1
    SLICE = slice_width or slice_size(V)
    BLOCK = min(SLICE, block or SLICE)
    S = -(-V // SLICE)
    S_PAD = _next_pow2(S)
    warps = _warps(BLOCK)
    rid = RULES.index(rule)
    rows = layout.args(q)
    per_row = layout.gammas is not None

    keep = kq is not None
    stf = torch.empty((B * G1, _NF, S), dtype=torch.float32, device=device)
    if not keep:
        kq = kp = stf  # placeholders: the kernels do not read them
    sti = torch.empty((B * G1, _NI, S), dtype=torch.int32, device=device)
    ws = torch.empty((B, 3), dtype=torch.int64, device=device)  # race maxima, arrival counter
    k.stats_kernel[(B * G1, S)](
        q, p, *rows, temperature, temperature.stride(0), stf, sti, ws, kq, kp,
        gamma, RQ, G1, V, S,
        SLICE=SLICE, BLOCK=BLOCK, NEED_Z1=rule in _NEED_Z1, NEED_H=rule in _NEED_H,
        NEED_X=rule == "bild", KEEP=keep, PER_ROW=per_row, num_warps=warps,
    )

    p2 = sst = stf  # placeholders for pointer arguments a rule does not read
    scal = (temperature, alpha, temperature.stride(0), alpha.stride(0))
    if rule in _SECOND_PASS or (rule == "lossy" and RQ == G1):
        bonus_only = rule == "lossy"  # lossy: only its bonus row's law needs these sums
        nr = 1 if bonus_only else RQ
        p2 = torch.empty((B * G1, 2, S), dtype=torch.float32, device=device)
        k.second_pass_kernel[(B * nr, S)](
            q, p, *rows, *scal, stf, sti, p2, kq, kp, nr, gamma, RQ, G1, V, S,
            RULE=rid, SLICE=SLICE, BLOCK=BLOCK, S_PAD=S_PAD, KEEP=keep, BONUS_ONLY=bonus_only,
            PER_ROW=per_row, num_warps=warps,
        )
    elif rule == "lossy_star":
        sst = torch.empty((B * G1,), dtype=torch.float64, device=device)
        k.lossy_star_kernel[(B * RQ,)](
            q, p, *rows, *scal, stf, sti, sst, kq, kp, gamma, RQ, G1, V, S,
            PASSES=LOSSY_STAR_PASSES, K=LOSSY_STAR_K, BLOCK=min(_next_pow2(V), block or 1024),
            S_PAD=S_PAD, KEEP=keep, PER_ROW=per_row, num_warps=8,
        )

    RS = race_width or race_slice(V, B, SLICE, _sm_count(device))
    RBLOCK = min(RS, block or (BLOCK if RS == SLICE else 1024))
    SR = -(-V // RS)
    tokens = torch.empty((B, G1), dtype=torch.int64, device=device)
    num_accepted = torch.empty((B,), dtype=torch.int64, device=device)
    num_emitted = torch.empty((B,), dtype=torch.int64, device=device)
    deferred = torch.empty((B, G1), dtype=torch.bool, device=device)
    k.accept_resample_kernel[(B, SR)](
        q, p, *rows, x, temperature, alpha, seed, positions,
        temperature.stride(0), alpha.stride(0), seed.stride(0), positions.stride(0),
        x.stride(0), x.stride(1),
        stf, sti, p2, sst, ws, kq, kp, tokens, num_accepted, num_emitted, deferred,
        gamma, RQ, V, S, RS, SR,
        RULE=rid, BLOCK=RBLOCK, S_PAD=S_PAD, G_PAD=_next_pow2(G1), KEEP=keep,
        PER_ROW=per_row, num_warps=_warps(RBLOCK),
    )
    return VerifyOutput(tokens, num_accepted, num_emitted, deferred)


def sample(logits, temperature, seed, positions, keep=None, *, slice_width: int | None = None,
           block: int | None = None) -> torch.Tensor:
    """The drafter's draw (:func:`speccascade_fast.sampling.draw`) in two launches
    (:mod:`speccascade_fast.kernels.sample`): int64 ``[R]`` from fp32/bf16/fp16 ``logits``
    ``[R, V]`` (last dim contiguous or copied), float64 ``temperature`` and int64 ``seed``,
    ``positions`` ``[R]`` (inputs checked by the caller), ``keep`` the rows' float64 ``[R, 2]``
    top-k / top-p bounds or None. T = 0 rows take the argmax. ``slice_width`` / ``block`` as
    for :func:`launch`."""
    k = _kernels()
    _check_mode(k, logits.device)
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
    k.sample_slices_kernel[(R, S)](
        x, x.stride(0), t, sd, ps, best if keep is None else keep.contiguous(), best, arg, V, S,
        SLICE=SLICE, BLOCK=BLOCK, KEEP=keep is not None, num_warps=_warps(BLOCK))
    k.sample_merge_kernel[(R,)](best, arg, out, S, S_PAD=_next_pow2(S))
    return out


# passes of the keep-bound search that leave one value of the logits' dtype in the key interval
# (kernels/keep_bounds.py): bf16 and fp16 leave the last 16 and 13 bits of their fp32 patterns
# constant; fp32 takes all 8
KEEP_PASSES = {torch.bfloat16: 4, torch.float16: 5, torch.float32: 8}


def keep_slice(V: int, R: int, sms: int) -> int:
    """Vocabulary slice per program of the keep-bound search: 8192 when R rows of ``V / 8192``
    programs give each of the ``sms`` multiprocessors two, else narrower (down to 1024) so that
    they about do; a runtime argument (no compile per width)."""
    return min(8192, _spread(V, R, sms), _next_pow2(V))


def keep_bounds(logits, temperature, top_k, top_p, *, second=None, slice_width: int | None = None,
                block: int | None = None) -> torch.Tensor:
    """Top-p's keep bounds (:func:`speccascade_fast.truncation.keep_bounds`, top-k's bound
    first when given) by the search of :mod:`speccascade_fast.kernels.keep_bounds`: float64
    ``[R, 2]`` from fp32/bf16/fp16 ``logits`` ``[R, V]`` and float64 ``temperature`` ``[R]``;
    ``top_p`` a float in (0, 1], ``top_k`` an int or None (inputs checked by the caller). 7
    launches for bf16 logits, 8 for fp16, 11 for fp32 (and torch's top-k with ``top_k``), no
    host read. ``second``: ``(logits [R2, V], temperature [R2])`` of the same dtype, searched in
    the same launches: the output is then ``[R + R2, 2]``, its rows in that order.
    ``slice_width`` / ``block`` (powers of two) override the vocabulary slice per program and
    the chunk it loops over (the tests use tiny ones)."""
    k = _kernels()
    _check_mode(k, logits.device)
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
    SLICE = slice_width or keep_slice(V, R, _sm_count(dev))
    BLOCK = min(SLICE, block or 256)
    S = -(-V // SLICE)
    passes = KEEP_PASSES.get(x.dtype, 8)
    mx = torch.empty((R, S), dtype=torch.float32, device=dev)
    h = torch.empty((passes, R, S, k.keep_bounds.NB.value), dtype=torch.float64, device=dev)
    lo = torch.zeros((passes + 1, R), dtype=torch.int64, device=dev)  # row 0: pass 0's (0, 0)
    acc = torch.zeros((passes + 1, R), dtype=torch.float64, device=dev)
    tgt = torch.empty((R,), dtype=torch.float64, device=dev)
    cnt = torch.empty((R, S), dtype=torch.int32, device=dev)
    val = torch.empty((R, S), dtype=torch.float32, device=dev)
    tp = torch.full((1,), float(top_p), dtype=torch.float64, device=dev)
    grid, warps, rows = (R, S), 4, (x, x.stride(0), x2, x2.stride(0), R1)
    k.keep_max_kernel[grid](*rows, mx, V, S, SLICE, BLOCK=BLOCK, num_warps=warps)
    for p in range(passes):
        k.keep_pass_kernel[grid](*rows, t, tauk, tp, mx, h, lo, acc, tgt, R, V, S, SLICE, p,
                                 BLOCK=BLOCK, num_warps=warps)
    k.keep_ties_kernel[grid](*rows, t, tauk, mx, h, lo, acc, tgt, cnt, val, R, V, S, SLICE,
                             passes, BLOCK=BLOCK, num_warps=warps)
    k.keep_final_kernel[grid](*rows, t, tauk, mx, acc, tgt, cnt, val, out, R, V, S, SLICE,
                              passes, BLOCK=BLOCK, num_warps=warps)
    return out
