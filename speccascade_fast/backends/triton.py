"""The Triton backend: the reference's four stages as 2-3 fused kernel launches, plus the
drafter's draw and top-p's keep bounds, composed from the launchers of
:mod:`speccascade_fast.kernels` (each next to its kernels).

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

1. ``targets`` (:mod:`speccascade_fast.kernels.targets`): ``targets_kernel``
   ``(B(gamma+1), S)``, one read of q and p: per-slice max, argmax, Σexp at T and at 1, the
   entropy-type sum (chow_log, diff_log, opt_log) and bild's cross term; then only where a rule
   needs sums taken after the log-partitions are known: ``targets_sums_kernel`` ``(B rows, S)``
   for opt / opt_log (TV(pT, qT)), token_v1-3 (eta) and lossy with bonus="cascade" (its bonus
   law's normaliser), or ``targets_lossy_star_kernel`` ``(B rows,)``, 1/beta by k-section (18
   reads of the row per position, one program each: correct, not fast);
2. ``accept`` + ``resample`` + ``insert``
   (:mod:`speccascade_fast.kernels.accept_resample_insert`): ``accept_resample_insert_kernel``
   ``(B, SR)``: the decisions, the accept loop with the counter-based RNG and the Gumbel-max race
   of the residual / bonus row over SR race slices (the S targets slices, or narrower ones at
   small B: ``race_slice``), merged with an int64 atomic max; slice 0 writes the accepted drafts,
   padding and deferral flags, the last program of each sequence the emitted token. The winner
   is the same token whatever the slicing (ties go to the lowest id).

So spec, drafter, chow, chow_log, diff, diff_log, bild and lossy (bonus="verifier") take 2 launches;
opt, opt_log, token_v1-3, lossy (bonus="cascade") and lossy_star take 3. With a divergence budget
(``budget``, padded layout; docs/backends.md) the costs come from the targets stage (the sums
launch then also runs for drafter, the prefix rules and lossy at every row; token rules take a
second sums launch after eta) and the accept kernel scans them. No host synchronisation,
no ``.item()``; only ``torch.empty`` allocations: CUDA-graph capturable. Constexprs: the rule, the
slice / block widths (functions of V only: ``slice_size``, one block per slice, 4-16 warps; the
race's block is that block or, for the narrower race slices of small B, 1024) and paddings; B,
gamma, T, alpha, seeds, positions and the race slice width are runtime values (no recompile per
B: at most two compiled race geometries per V).

**top_k / top_p**: each logit row's keep bound ``(tau, cut)`` (:mod:`speccascade_fast.truncation`)
reaches the kernels as ``keep``, computed by the dispatch (:mod:`speccascade_fast.backends`: on
CUDA top-k by torch and top-p by this backend's :func:`keep_bounds`, no host read), and every
kernel reads a truncated row as -inf outside its set wherever it forms qT or pT (the unscaled
q1, p1 stay whole). T = 0 (greedy) and T > 0 may mix within a batch.

**Ragged layout** (:func:`verify_ragged`, vLLM's flattened rows with per-request gamma): the same
launches, every kernel taking per request its gamma_b and the offsets of its first draft / target
rows (constexpr ``PER_ROW``), the bonus drafter rows from their own tensor; the grids are sized by
the longest request's gamma and a shorter request's extra positions read nothing.

The backend also runs the drafter's draw, :func:`sample` (:mod:`speccascade_fast.kernels.sample`:
a race per vocabulary slice, then the best of the slices; two launches), and top-p's keep bounds,
:func:`keep_bounds` (:mod:`speccascade_fast.kernels.keep_bounds`).

Devices: CUDA, or the CPU through Triton's interpreter when ``TRITON_INTERPRET=1`` was set before
the kernels were first imported (tests; slow, keep V small). The kernels are imported on first
use (``triton.jit`` reads ``TRITON_INTERPRET`` when it decorates), so this module imports without
triton.
"""
from __future__ import annotations

import functools
import os

import torch

from ..truncation import torch_keep_bounds, torch_keep_bounds_ragged
from ..types import VerifyOutput

__all__ = ["is_available", "keep_bounds", "launch", "sample", "verify", "verify_ragged"]


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


def verify(draft_logits, draft_tokens, target_logits, *, rule, alpha, temperature, top_k, top_p,
           seed, positions, keep=None, budget=None) -> VerifyOutput:
    """Shapes: ``draft_logits`` ``[B, g or g+1, V]``, ``draft_tokens`` int64 ``[B, g]``,
    ``target_logits`` ``[B, g+1, V]`` (fp32/bf16/fp16/fp64, last dim contiguous or copied);
    ``alpha``, ``temperature`` float64 ``[B]``; ``seed``, ``positions`` int64 ``[B]``. ``keep``:
    the draft and target rows' keep bounds as the dispatch computed them; None: the torch
    reference's, when top-k / top-p is asked for. ``budget``: None, or float64 ``[B]`` each
    row's divergence budget (docs/semantics.md §9; the output's ``spent`` then holds each
    position's charge)."""
    return launch(draft_logits, draft_tokens, target_logits, rule=rule, alpha=alpha,
                  temperature=temperature, seed=seed, positions=positions, top_k=top_k,
                  top_p=top_p, keep=keep, budget=budget)


def launch(draft_logits, draft_tokens, target_logits, *, rule, alpha, temperature, seed,
           positions, top_k=None, top_p=None, keep=None, slice_width: int | None = None,
           block: int | None = None, race_width: int | None = None,
           budget=None) -> VerifyOutput:
    """Run the kernels on the padded layout (``keep`` and ``budget`` as in :func:`verify`).
    ``slice_width`` / ``block`` / ``race_width`` (powers of two) override the vocabulary slice
    per program (default ``kernels.launch.slice_size``), the chunk each program loops over
    (default: the whole slice in one go) and the slice per program of the race (default
    ``kernels.accept_resample_insert.race_slice``); the tests use tiny ones."""
    B, gamma = draft_tokens.shape
    q = draft_logits if draft_logits.stride(-1) == 1 else draft_logits.contiguous()
    p = target_logits if target_logits.stride(-1) == 1 else target_logits.contiguous()
    if keep is None:
        T = temperature[:, None]
        keep = torch_keep_bounds(top_k, top_p, (q, T), (p, T))
    kq, kp = keep
    layout = _Layout(B=B, gamma=gamma, rq=q.shape[1],
                     strides=(q.stride(0), q.stride(1), p.stride(0), p.stride(1)))
    return _run(q, p, draft_tokens, kq, kp, layout, rule=rule, alpha=alpha,
                temperature=temperature, seed=seed, positions=positions,
                slice_width=slice_width, block=block, race_width=race_width, budget=budget)


def verify_ragged(draft_logits, draft_tokens, target_logits, cu_num_draft_tokens,
                  bonus_draft_logits, *, max_gamma: int, rule, alpha, temperature, seed,
                  positions, top_k=None, top_p=None, keep=None, slice_width: int | None = None,
                  block: int | None = None, race_width: int | None = None) -> VerifyOutput:
    """vLLM's flattened layout (:func:`speccascade_fast.ragged.verify_ragged`, inputs validated
    there) in the same 2-3 launches as the padded one, reading the logits where they lie (no
    padded copy): every kernel takes per request its gamma_b and the offsets of its first draft
    row (``cu[b]``) and target row (``cu[b] + b``), and the bonus drafter rows from their own
    tensor. ``max_gamma`` = the longest request's gamma (the grids' size, from the host: vLLM's
    ``max_spec_len``). ``keep``: the keep bounds ``(draft, target, bonus)`` per flattened row as
    the dispatch computed them; None: the torch reference's, when top-k / top-p is asked for.
    Only the drafts and the keep bounds (a few numbers per row) are gathered into the padded
    ``[B, max_gamma (+1)]`` layout, on the device."""
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
    if keep is None:
        keep = torch_keep_bounds_ragged(q, p, qb if cascade else None, cu, temperature, top_k,
                                        top_p)
    kd, kt, kb = keep
    kq = kp = None
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
         slice_width, block, race_width, budget=None) -> VerifyOutput:
    """The stages of the module docstring, on either layout: targets, then accept + resample +
    insert (with a divergence ``budget``: the costs in the targets stage, the scan in the
    accept stage)."""
    from ..kernels import accept_resample_insert, targets
    from ..kernels.launch import check_mode

    check_mode(targets.targets_kernel, p.device)
    rows = layout.args(q)
    shape = dict(B=layout.B, gamma=layout.gamma, rq=layout.rq, rule=rule,
                 per_row=layout.gammas is not None)
    stats = targets.launch(q, p, rows, kq, kp, temperature, alpha, **shape,
                           slice_width=slice_width, block=block, budget=budget is not None)
    out = accept_resample_insert.launch(q, p, rows, x, kq, kp, stats, temperature, alpha, seed,
                                        positions, **shape, block=block, race_width=race_width,
                                        budget=budget)
    return VerifyOutput(*out)


def sample(logits, temperature, seed, positions, keep=None, *, slice_width: int | None = None,
           block: int | None = None) -> torch.Tensor:
    """The drafter's draw (:func:`speccascade_fast.sampling.draw`) in two launches
    (:func:`speccascade_fast.kernels.sample.launch`): int64 ``[R]`` from fp32/bf16/fp16
    ``logits`` ``[R, V]``, float64 ``temperature`` and int64 ``seed``, ``positions`` ``[R]``,
    ``keep`` the rows' float64 ``[R, 2]`` top-k / top-p bounds or None."""
    from ..kernels import sample as kernel

    return kernel.launch(logits, temperature, seed, positions, keep, slice_width=slice_width,
                         block=block)


def keep_bounds(logits, temperature, top_k, top_p, *, second=None, slice_width: int | None = None,
                block: int | None = None) -> torch.Tensor:
    """Top-p's keep bounds of ``logits`` ``[R, V]`` (fp32/bf16/fp16) with float64
    ``temperature`` ``[R]``, top-k's bound first when given: float64 ``[R, 2]`` by the search of
    :func:`speccascade_fast.kernels.keep_bounds.launch` (``second``: more rows searched in the
    same launches)."""
    from ..kernels import keep_bounds as kernel

    return kernel.launch(logits, temperature, top_k, top_p, second=second,
                         slice_width=slice_width, block=block)
