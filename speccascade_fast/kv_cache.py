"""A static, position-indexed KV cache for Hugging Face decoder-only models, and its masks.

Row ``b``'s key/value for the token at absolute position ``i`` lives in slot ``i`` of that row's
buffers, for every layer. A row's valid slots are ``[0, seen_b)``; everything at or after
``seen_b`` is stale (rejected drafts, padding) and is masked by :func:`attention_mask` until it is
overwritten: rolling back a rejection is just lowering ``seen_b``, no copy, no crop.

The engine binds each forward call to the cache (:meth:`SlotCache.bind`): the slot every input
token writes to (its position; padding goes to a trash slot past the last real one) and how many
slots the attention reads. HF's attention layers call :meth:`SlotCache.update` with the new keys
and values, which scatters them into their slots and returns the first ``kv_len`` slots of every
row. The buffers are allocated once per layer, on the first call (shapes and dtype from the
model's own key states), and reused by every later call and ``generate``.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache

#: attention implementations whose masks :func:`attention_mask` can build
ATTENTION = ("sdpa", "eager")


class SlotCache(Cache):
    """Static K/V buffers ``[max_batch_size, kv_heads, slots, head_dim]`` per layer.

    ``slots`` = the longest sequence the cache holds + 1: the last slot is the trash slot that
    padding tokens write to (never read: no real position reaches it).
    """

    def __init__(self, max_batch_size: int, slots: int):
        super().__init__(layers=[])
        self.max_batch_size = max_batch_size
        self.slots = slots
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
        if rows > self.max_batch_size:
            raise ValueError(f"batch of {rows} rows exceeds max_batch_size={self.max_batch_size}")
        self._rows = rows
        self._row_index = torch.arange(rows, device=write_slots.device)[:, None]
        self._write = write_slots
        self._kv_len = kv_len

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if layer_idx == len(self.keys):  # layers run in order: allocate on the first call
            B, H, _, D = key_states.shape
            shape = (self.max_batch_size, H, self.slots, D)
            opts = dict(dtype=key_states.dtype, device=key_states.device)
            self.keys.append(torch.zeros(shape, **opts))
            self.values.append(torch.zeros(shape, **opts))
        k = self.keys[layer_idx][: self._rows]
        v = self.values[layer_idx][: self._rows]
        # [B, H, n, D] -> slots: index the [B, slots, H, D] view with (row, slot) pairs
        k.transpose(1, 2)[self._row_index, self._write] = key_states.transpose(1, 2)
        v.transpose(1, 2)[self._row_index, self._write] = value_states.transpose(1, 2)
        return k[:, :, : self._kv_len], v[:, :, : self._kv_len]

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


def attention_mask(config, positions: torch.Tensor, kv_len: int, attn: str, dtype):
    """The mask of one forward call: query ``[b, i]`` at absolute position ``positions[b, i]``
    sees slot ``j < kv_len`` iff ``j <= positions[b, i]`` (and, in sliding-window layers,
    ``j > positions[b, i] - window``), i.e. its own row's causal prefix: stale slots past a
    row's valid prefix are never visible to a real token.

    Returns a ``[B, 1, n, kv_len]`` mask in the format of ``attn`` (boolean for ``sdpa``, additive
    for ``eager``), or for models with sliding-window layers a dict ``{layer type: mask}``.
    """
    j = torch.arange(kv_len, device=positions.device)
    pos = positions[:, None, :, None]
    masks = {"full_attention": j <= pos}
    layer_types = getattr(config, "layer_types", None) or ()
    if "sliding_attention" in layer_types:
        masks["sliding_attention"] = masks["full_attention"] & (j > pos - config.sliding_window)
    if attn == "eager":
        zero = torch.zeros((), dtype=dtype, device=positions.device)
        low = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=positions.device)
        masks = {k: torch.where(m, zero, low) for k, m in masks.items()}
    return masks if len(masks) > 1 else masks["full_attention"]
