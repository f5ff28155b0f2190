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

:class:`SlotModel` is one model of the batched Engine with its cache: every forward call binds the
slots, builds the attention mask and runs the model (``torch.compile``d for one-token steps when
asked), device work only, so it can run inside a CUDA graph.
"""
from __future__ import annotations

import weakref

import torch
from transformers.cache_utils import Cache

from . import model_facts
from .attention import attention_mask, selected


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

    def copy_prefix(self, n: int, rows: int) -> None:
        """Rows ``1 .. rows-1`` get row 0's slots ``[0, n)`` (a prompt prefix they share)."""
        for buf in (*self.keys, *self.values):
            if self.heads_last:
                buf[1:rows, :n] = buf[:1, :n]
            else:
                buf[1:rows, :, :n] = buf[:1, :, :n]

    def save_prefix(self, n: int) -> list[torch.Tensor]:
        """A copy of row 0's slots ``[0, n)``, every layer's keys then values."""
        if self.heads_last:
            return [buf[:1, :n].clone() for buf in (*self.keys, *self.values)]
        return [buf[:1, :, :n].clone() for buf in (*self.keys, *self.values)]

    def load_prefix(self, saved: list[torch.Tensor], n: int) -> None:
        """Row 0's slots ``[0, n)`` from :meth:`save_prefix`'s copy (of at least n slots)."""
        for buf, old in zip((*self.keys, *self.values), saved):
            if self.heads_last:
                buf[:1, :n] = old[:, :n]
            else:
                buf[:1, :, :n] = old[:, :, :n]

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


#: model -> its torch.compile'd callable, shared by every Engine (compiled code is reused)
_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def compiled(model):
    """``torch.compile(model, dynamic=True)``, once per model: the sizes that change from step to
    step (batch rows, attended length) are symbolic, so decoding does not recompile per step."""
    fn = _COMPILED.get(model)
    if fn is None:
        fn = _COMPILED[model] = torch.compile(model, dynamic=True)
    return fn


class SlotModel:
    """One model, its static cache, and per row the number of valid slots (``seen``, host ints).
    ``compile_steps``: one-token calls (the decode steps) run the model ``torch.compile``d; the
    longer calls stay eager. ``attention``: the engine's attention (None: the model's own)."""

    def __init__(self, model, max_batch_size: int, slots: int, compile_steps: bool = False,
                 attention: str | None = None):
        self.model = model
        self.step_model = compiled(model) if compile_steps else model
        self.config = model.config
        self.attention = attention
        self.attn = attention or getattr(model.config, "_attn_implementation", None) or "eager"
        self.dtype = next(model.parameters()).dtype
        self.cache = SlotCache(max_batch_size, slots, heads_last=attention == "flash_attn")
        self.keep_arg = model_facts.accepts(model, "logits_to_keep")
        self.cache_arg = model_facts.cache_kwarg(model)
        limit = model_facts.context(model)
        self.max_position = (limit - 1) if limit is not None else None
        self.seen: list[int] = []
        #: the last shared prefix fed: (its tokens [n], row 0's slots [0, n) per layer)
        self.prefix: tuple[torch.Tensor, list[torch.Tensor]] | None = None

    def forward(self, ids: torch.Tensor, slots: torch.Tensor, kv_len: int,
                keep: int) -> torch.Tensor:
        """Feed token ``ids[b, i]`` at position ``slots[b, i]`` and return the logits of the last
        ``keep`` columns, ``[B, keep, V]``; attention reads slots ``[0, kv_len)``. A row's real
        tokens are contiguous positions ending at its last column (padding before them goes to
        the trash slot). Device work only (no host reads), so it can run inside a CUDA graph."""
        self.cache.bind(slots, kv_len)
        mask = attention_mask(self.config, slots, kv_len, self.attn, self.dtype)
        positions = slots if self.max_position is None else slots.clamp(max=self.max_position)
        kwargs = {"logits_to_keep": keep} if self.keep_arg else {}
        fwd = self.step_model if ids.shape[1] == 1 else self.model
        with selected(self.config, self.attention):
            out = fwd(input_ids=ids, attention_mask=mask, position_ids=positions,
                      use_cache=True, **{self.cache_arg: self.cache}, **kwargs).logits
        return out if self.keep_arg else out[:, -keep:]

    def prefill_shared(self, tokens: torch.Tensor, n: int) -> int:
        """Every row's first ``n`` tokens are the same (``tokens[0, :n]``): feed them once, as
        row 0 alone, and copy its slots to the other rows (a few-shot prefix costs one row's
        prefill, not one per row). Every row has seen nothing yet.

        The slots of the last shared prefix fed are kept (:attr:`prefix`, one per model): the
        tokens this prefix has in common with it are copied from there instead of being fed
        again (the key/value slots of a position depend only on the tokens up to it), so
        calls that share a few-shot prefix pay for it once. Returns how many were reused."""
        rows = len(self.seen)
        reuse = 0
        if self.prefix is not None:
            old, saved = self.prefix
            m = min(n, old.numel())
            differ = (tokens[0, :m] != old[:m]).nonzero()
            reuse = int(differ[0]) if differ.numel() else m
            if reuse:
                self.cache.load_prefix(saved, reuse)
        if n > reuse:
            slots = torch.arange(reuse, n, device=tokens.device)[None]
            self.forward(tokens[:1, reuse:n], slots, n, 1)
            self.prefix = (tokens[0, :n].clone(), self.cache.save_prefix(n))
        self.cache.copy_prefix(n, rows)
        self.seen = [n] * rows
        return reuse

    def prefill(self, tokens: torch.Tensor, upto: list[int]) -> None:
        """Feed each row ``b`` its tokens ``tokens[b, seen_b : upto_b]`` (rows left-padded to
        one width, the padding written to the trash slot); the logits are not needed."""
        counts = [u - s for u, s in zip(upto, self.seen)]
        n = max(counts)
        if n > 0:
            device = tokens.device
            col = torch.arange(n, device=device)
            pad = n - torch.tensor(counts, device=device)[:, None]
            start = torch.tensor(self.seen, device=device)[:, None]
            slots = torch.where(col >= pad, start + col - pad, self.cache.trash_slot)
            self.forward(tokens.gather(1, slots), slots, max(upto), 1)
        self.seen = list(upto)

    def keep_rows(self, index: torch.Tensor, rows: list[int]) -> None:
        self.cache.keep_rows(index)
        self.seen = [self.seen[i] for i in rows]
