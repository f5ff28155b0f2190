"""A static, position-indexed KV cache for Hugging Face decoder-only models.

Row ``b``'s key/value for the token at absolute position ``i`` lives in slot ``i`` of that row's
buffers, for every layer. A row's valid slots are ``[0, seen_b)``; everything at or after
``seen_b`` is stale (rejected drafts, padding) and is masked by the engine's attention
(:mod:`speccascade_fast.attention`) until it is overwritten: rolling back a rejection is just
lowering ``seen_b``, no copy, no crop.

The engine binds each forward call to the cache (:meth:`SlotCache.bind`): the slot every input
token writes to (its position; padding goes to a trash slot past the last real one) and how many
slots the attention reads. HF's attention layers call :meth:`SlotCache.update` with the new keys
and values, which scatters them into their slots and returns the first ``kv_len`` slots of every
row. The buffers are allocated once per layer, on the first call (shapes and dtype from the
model's own key states), and reused by every later call and ``generate``. Their layout is
``[rows, kv_heads, slots, head_dim]`` (the one HF's attention functions take), or heads-last,
``[rows, slots, kv_heads, head_dim]``, for flash-attn's kernel; ``update`` returns HF's
``[rows, kv_heads, kv_len, head_dim]`` either way (for heads-last buffers, a transposed view).
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache


class SlotCache(Cache):
    """Static K/V buffers ``[capacity, kv_heads, slots, head_dim]`` per layer (with
    ``heads_last``: ``[capacity, slots, kv_heads, head_dim]``), ``capacity`` = the engine's
    ``max_batch_size`` (not stored under that name: transformers 5.17's ``Cache`` has a read-only
    ``max_batch_size`` property).

    ``slots`` = the longest sequence the cache holds + 1: the last slot is the trash slot that
    padding tokens write to (never read: no real position reaches it).
    """

    def __init__(self, max_batch_size: int, slots: int, heads_last: bool = False):
        super().__init__(layers=[])
        self.capacity = max_batch_size
        self.slots = slots
        self.heads_last = heads_last
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self._rows = 0
        self._row_index: torch.Tensor | None = None
        self._write: torch.Tensor | None = None
        self._kv_len = 0

    @property
    def trash_slot(self) -> int:
        return self.slots - 1

    def bind(self, write_slots: torch.Tensor, kv_len: int) -> None:
        """The next forward writes input token ``[b, i]`` to slot ``write_slots[b, i]`` of row
        ``b`` (rows ``0 .. B-1`` of the buffers) and attends over slots ``[0, kv_len)``."""
        rows = write_slots.shape[0]
        if rows > self.capacity:
            raise ValueError(f"batch of {rows} rows exceeds max_batch_size={self.capacity}")
        self._rows = rows
        self._row_index = torch.arange(rows, device=write_slots.device)[:, None]
        self._write = write_slots
        self._kv_len = kv_len

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if layer_idx == len(self.keys):  # layers run in order: allocate on the first call
            B, H, _, D = key_states.shape
            shape = ((self.capacity, self.slots, H, D) if self.heads_last
                     else (self.capacity, H, self.slots, D))
            opts = dict(dtype=key_states.dtype, device=key_states.device)
            self.keys.append(torch.zeros(shape, **opts))
            self.values.append(torch.zeros(shape, **opts))
        out = []
        for buf, new in ((self.keys[layer_idx], key_states), (self.values[layer_idx],
                                                              value_states)):
            # [B, slots, H, D] (the buffer, or a view of it): index with (row, slot) pairs
            rows = buf[: self._rows] if self.heads_last else buf[: self._rows].transpose(1, 2)
            rows[self._row_index, self._write] = new.transpose(1, 2)
            out.append(rows[:, : self._kv_len].transpose(1, 2))  # [B, H, kv_len, D]
        return tuple(out)

    def keep_rows(self, index: torch.Tensor) -> None:
        """Compact the buffers: row ``i`` becomes the old row ``index[i]`` (finished sequences
        leave the batch; the freed rows are reused by the next ``generate``)."""
        n = index.numel()
        for buf in (*self.keys, *self.values):
            buf[:n] = buf.index_select(0, index)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._kv_len

    def get_max_length(self) -> int:
        return self.slots - 1

