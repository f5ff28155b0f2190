"""The engine's packed device results: a named layout of int64 fields in one ``[B, width]`` tensor.

A body of device work (a drafter step, a block, a verification) ends by packing what the host
needs into one tensor, so the host reads it with a single device-to-host copy. A :class:`Layout`
names the fields and their widths; the device side packs and slices by name, the host side
unpacks each row into a named tuple. No caller indexes a packed tensor by position.

Example:
    >>> BLOCK = Layout("Block", accepted=1, tokens=[3])
    >>> packed = BLOCK.pack(accepted=torch.tensor([2]), tokens=torch.tensor([[4, 5, 6]]))
    >>> BLOCK.unpack(packed)[0]
    Block(accepted=2, tokens=[4, 5, 6])
"""
from __future__ import annotations

from collections import namedtuple

import torch


class Layout:
    """Fields in order: ``name=1`` a scalar, packed from ``[B]`` and unpacked to an int;
    ``name=[w]`` a vector, packed from ``[B, w]`` and unpacked to a list of w ints (w >= 1)."""

    def __init__(self, name: str, **fields: int | list[int]):
        self.vector = {f: isinstance(w, list) for f, w in fields.items()}
        self.widths = {f: (w[0] if isinstance(w, list) else w) for f, w in fields.items()}
        if any(w != 1 for f, w in self.widths.items() if not self.vector[f]):
            raise ValueError("a scalar field has width 1; write a vector field as name=[width]")
        self.slices, start = {}, 0
        for field, w in self.widths.items():
            self.slices[field] = slice(start, start + w)
            start += w
        self.width = start
        self.row = namedtuple(name, list(fields))

    def pack(self, **values: torch.Tensor) -> torch.Tensor:
        """int64 ``[B, width]`` from every field's tensor (on the device; no host read)."""
        if values.keys() != self.widths.keys():
            raise TypeError(f"{self.row.__name__}.pack takes exactly {', '.join(self.widths)}; "
                            f"got {', '.join(values)}")
        cols = []
        for field, w in self.widths.items():
            v = values[field]
            v = v.reshape(v.shape[0], w)
            cols.append(v.to(torch.int64))
        return torch.cat(cols, dim=1)

    def get(self, packed: torch.Tensor, field: str) -> torch.Tensor:
        """Field ``field`` of a packed tensor, on the device: ``[B]`` (scalar) or ``[B, w]``."""
        s = self.slices[field]
        return packed[:, s] if self.vector[field] else packed[:, s.start]

    def unpack(self, packed: torch.Tensor, rows: int | None = None) -> list:
        """The first ``rows`` rows (default all) as named tuples: one device-to-host read."""
        host = packed.tolist()
        if rows is not None:
            host = host[:rows]
        return [self._row(r) for r in host]

    def _row(self, r: list[int]):
        return self.row(*(r[s] if self.vector[f] else r[s.start]
                          for f, s in self.slices.items()))


def nonfinite(logits: torch.Tensor) -> torch.Tensor:
    """int64 ``[B]``: 1 where row b of ``[B, ..., V]`` logits has a NaN, a +inf, or a position
    where every logit is -inf (a row's max is finite iff none of these), on the device."""
    bad = ~torch.isfinite(logits.amax(-1))
    return bad.reshape(bad.shape[0], -1).any(-1).to(torch.int64)


class BlockResult:
    """What one row of a verified block emits: the number of accepted drafts, the tokens to
    emit (the accepted drafts and the residual/bonus token), the deferral flags, and how many
    drafts the sequential engine would have verified (``drafted``)."""

    __slots__ = ("accepted", "tokens", "deferred", "drafted")

    def __init__(self, accepted: int, tokens: list[int], deferred: list[int], drafted: int):
        self.accepted, self.tokens, self.drafted = accepted, tokens, drafted
        self.deferred = [bool(f) for f in deferred]
