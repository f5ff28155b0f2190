"""vLLM's flattened ("ragged") row layout: many requests, each with its own gamma, in one tensor.

Request ``b`` owns ``gamma_b = cu[b+1] - cu[b]`` draft rows ``cu[b]:cu[b+1]`` and ``gamma_b + 1``
target rows ``cu[b]+b : cu[b+1]+b+1`` (its drafts and the bonus position), ``cu`` being
``cu_num_draft_tokens``. Nothing is padded and nothing is copied to pad it.

This module only describes the layout (which request owns a row, what a valid ``cu`` is); it
imports nothing of the package, so the public API, the dispatch and the backends may all use it.
"""
from __future__ import annotations

import torch

__all__ = ["check_cu", "row_owners", "row_temperatures"]


def row_owners(cu: torch.Tensor, rows: int, *, target: bool = False):
    """For each of ``rows`` flattened rows: the request b that owns it and its index j among
    b's rows, int64 ``[rows]`` tensors on ``cu``'s device, with no host read. Draft rows of b
    start at ``cu[b]``; with ``target``, target rows, which have one more per request (the
    bonus position), start at ``cu[b] + b``. Rows after the last request's (padding) count as
    the last request's, with j past its rows."""
    B = cu.numel() - 1
    extra = torch.arange(B + 1, device=cu.device) if target else torch.zeros_like(cu)
    starts = cu + extra  # starts[b]: request b's first row; starts[B]: one past the last
    i = torch.arange(rows, device=cu.device)
    b = torch.searchsorted(starts[1:], i, right=True).clamp(max=B - 1)
    return b, i - starts[b]


def row_temperatures(cu: torch.Tensor, temperature: torch.Tensor, draft_rows: int,
                     target_rows: int):
    """Each flattened row's temperature, its request's: ``(draft [draft_rows], target
    [target_rows])`` from the per-request ``temperature`` ``[B]``, no host read. Padding rows
    (after ``cu[B]`` drafts, ``cu[B] + B`` targets) get the last request's."""
    cu = cu.to(device=temperature.device, dtype=torch.int64)
    t_draft = temperature[row_owners(cu, draft_rows)[0]]  # gamma_b draft rows
    t_target = temperature[row_owners(cu, target_rows, target=True)[0]]  # gamma_b + 1
    return t_draft, t_target


def check_cu(cu: torch.Tensor, num_drafts: int, padded: bool) -> list[int]:
    """``cu_num_draft_tokens`` as a list (one host read), or a ValueError saying what is wrong:
    B + 1 >= 2 entries, starting at 0, strictly increasing (every request has gamma >= 1), ending
    at N = ``num_drafts`` (``padded``: at most N, the rows after it being padding)."""
    if cu.numel() < 2:
        raise ValueError(
            "cu_num_draft_tokens must have B + 1 >= 2 entries (cumulative draft counts starting "
            f"at 0), got {cu.numel()}"
        )
    c = cu.tolist()
    if c[0] != 0:
        raise ValueError(f"cu_num_draft_tokens must start at 0, got {c[0]}")
    for b in range(len(c) - 1):
        if c[b + 1] - c[b] < 1:
            raise ValueError(
                "cu_num_draft_tokens must be strictly increasing: every request needs gamma >= 1 "
                f"drafts, but request {b} has cu[{b + 1}] - cu[{b}] = {c[b + 1] - c[b]}"
            )
    if c[-1] > num_drafts or (c[-1] != num_drafts and not padded):
        raise ValueError(
            f"cu_num_draft_tokens must end at N = draft_logits.shape[0] = {num_drafts} (or, "
            f"with max_spec_len, at most N: the rows after it are padding), got {c[-1]}"
        )
    return c
