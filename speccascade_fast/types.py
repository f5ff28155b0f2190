"""Result types of the public API."""
from __future__ import annotations

from typing import NamedTuple

import torch


class VerifyOutput(NamedTuple):
    """What one verification block emits, per row.

    * ``tokens``       int64 ``[B, gamma+1]``: accepted drafts, then the residual or bonus token,
      then ``-1`` padding;
    * ``num_accepted`` int64 ``[B]``: accepted drafts (0..gamma);
    * ``num_emitted``  int64 ``[B]``: ``num_accepted + 1``;
    * ``deferred``     bool ``[B, gamma+1]``: per position, delta for prefix rules; for token rules
      whether the position's draft token was outside A (bonus column: the emitted bonus token);
      True at every position the divergence budget verified losslessly;
    * ``spent``        float64 ``[B, gamma+1]`` or None: with a divergence budget, what each
      position charged to it (docs/semantics.md §9); a row spent the charges of the positions
      it emits. None without a budget.
    """

    tokens: torch.Tensor
    num_accepted: torch.Tensor
    num_emitted: torch.Tensor
    deferred: torch.Tensor
    spent: torch.Tensor | None = None
