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

import struct
from collections import namedtuple

import torch


class Layout:
    """Fields in order: ``name=1`` a scalar, packed from ``[B]`` and unpacked to an int;
    ``name=[w]`` a vector, packed from ``[B, w]`` and unpacked to a list of w ints (w >= 1).
    The fields named in ``floats`` carry float64 values (their bits travel as int64) and
    unpack to floats."""

    def __init__(self, name: str, *, floats: tuple[str, ...] = (), **fields: int | list[int]):
        unknown = set(floats) - fields.keys()
        if unknown:
            raise ValueError(f"floats names fields the layout lacks: {', '.join(sorted(unknown))}")
        self.floats = frozenset(floats)
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
            if field in self.floats:
                cols.append(v.to(torch.float64).view(torch.int64))
            else:
                cols.append(v.to(torch.int64))
        return torch.cat(cols, dim=1)

    def get(self, packed: torch.Tensor, field: str) -> torch.Tensor:
        """Field ``field`` of a packed tensor, on the device: ``[B]`` (scalar) or ``[B, w]``."""
        s = self.slices[field]
        out = packed[:, s] if self.vector[field] else packed[:, s.start]
        return out.view(torch.float64) if field in self.floats else out

    def unpack(self, packed: torch.Tensor, rows: int | None = None) -> list:
        """The first ``rows`` rows (default all) as named tuples: one device-to-host read."""
        host = packed.tolist()
        if rows is not None:
            host = host[:rows]
        return [self._row(r) for r in host]

    def _row(self, r: list[int]):
        return self.row(*(self._field(f, r[s]) if self.vector[f] else self._field(f, r[s])[0]
                          for f, s in self.slices.items()))

    def _field(self, field: str, values: list[int]) -> list:
        if field not in self.floats:
            return values
        return list(struct.unpack(f"<{len(values)}d", struct.pack(f"<{len(values)}q", *values)))


def nonfinite(logits: torch.Tensor) -> torch.Tensor:
    """int64 ``[B]``: 1 where row b of ``[B, ..., V]`` logits has a NaN, a +inf, or a position
    where every logit is -inf (a row's max is finite iff none of these), on the device."""
    bad = ~torch.isfinite(logits.amax(-1))
    return bad.reshape(bad.shape[0], -1).any(-1).to(torch.int64)


class BlockResult:
    """What one row of a verified block emits: the number of accepted drafts, the tokens to
    emit (the accepted drafts and the residual/bonus token), the deferral flags, and how many
    drafts the sequential engine would have verified (``drafted``), and with a divergence budget
    each position's charge (``spent``, else None), and where the goodput controller reads it the
    drafter's largest probability at each draft (``confidence``, else None)."""

    __slots__ = ("accepted", "tokens", "deferred", "drafted", "spent", "confidence")

    def __init__(self, accepted: int, tokens: list[int], deferred: list[int], drafted: int,
                 spent: list[float] | None = None, confidence: list[float] | None = None):
        self.accepted, self.tokens, self.drafted, self.spent = accepted, tokens, drafted, spent
        self.confidence = confidence
        self.deferred = [bool(f) for f in deferred]
