"""The engine's attention: the masks it builds for the models' own attention (SDPA or eager), and
flash-attn's ``flash_attn_with_kvcache`` as an optional backend.

Every forward call of the :class:`~speccascade_fast.Engine` feeds row ``b`` tokens at absolute
positions that are contiguous and end at its last column (``slots[b, -1]``); columns before a
row's first real token are padding, written to the cache's trash slot. Its queries read the
row's slots ``[0, slots[b, -1] + 1)`` of the static cache (:mod:`speccascade_fast.kv_cache`), the
stale ones past a row's valid prefix never being visible to a real token.

* ``attention=None`` (default): the model's own implementation, ``sdpa`` or ``eager``, given the
  explicit mask of :func:`attention_mask` over the first ``kv_len`` slots.
* ``attention="flash_attn"``: flash-attn's ``flash_attn_with_kvcache`` (an sdist that needs a
  CUDA build: never a dependency of this package). The cache keeps its buffers heads-last,
  ``[rows, slots, kv_heads, head_dim]``, the layout the kernel reads; the cache's ``update`` has
  already written the call's keys and values to their slots, so the kernel only reads, with
  ``cache_seqlens[b] = slots[b, -1] + 1`` and ``causal=True`` (its causal mask is aligned to the
  bottom right: query ``i`` of ``n`` sees keys ``<= cache_seqlens - n + i``, i.e. its own
  position's prefix for every real query; a padding query sees garbage or nothing, and its output
  is never read). Sliding-window layers pass ``window_size=(window - 1, 0)``. The per-row lengths
  reach the attention layers as the model's ``attention_mask``: an int32 ``[B, 1, 1, 1]`` tensor,
  which Hugging Face passes through untouched (a 4-D mask is taken as prepared). The kernel is
  selected per forward call (the model's ``config._attn_implementation`` is set to
  :data:`FLASH_KEY` for the call and restored), so the models stay usable outside the engine.
"""
from __future__ import annotations

import contextlib
import functools

import torch

#: the models' own attention implementations whose masks :func:`attention_mask` builds
ATTENTION = ("sdpa", "eager")
#: the engine's ``attention`` settings besides None (the models' own implementation)
BACKENDS = ("flash_attn",)
#: the name under which the flash-attn forward is registered with Hugging Face
FLASH_KEY = "speccascade_flash_kvcache"
#: what flash-attn's kernels run on (tests on the CPU widen these for a torch stand-in)
FLASH_DEVICES = ("cuda",)
FLASH_DTYPES = (torch.float16, torch.bfloat16)


def attention_mask(config, positions: torch.Tensor, kv_len: int, attn: str, dtype):
    """The mask of one forward call: query ``[b, i]`` at absolute position ``positions[b, i]``
    sees slot ``j < kv_len`` iff ``j <= positions[b, i]`` (and, in sliding-window layers,
    ``j > positions[b, i] - window``), i.e. its own row's causal prefix: stale slots past a
    row's valid prefix are never visible to a real token.

    Returns a ``[B, 1, n, kv_len]`` mask in the format of ``attn`` (boolean for ``sdpa``, additive
    for ``eager``), or for models with sliding-window layers a dict ``{layer type: mask}``; for
    ``attn="flash_attn"`` the per-row lengths ``cache_seqlens`` as int32 ``[B, 1, 1, 1]``
    (``positions[b, -1] + 1``, at most ``kv_len``: the kernel must not read past the view).
    """
    if attn == "flash_attn":  # a row of padding only (a 1-token prompt's prefill) ends at the
        # trash slot: clamped into the cache view, its garbage output is never read
        lengths = (positions[:, -1] + 1).clamp(max=kv_len)
        return lengths.to(torch.int32).reshape(-1, 1, 1, 1)
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


def check_backend(attention, models) -> None:
    """A clear error unless ``attention`` can run ``models`` (None always can)."""
    if attention is None:
        return
    if attention not in BACKENDS:
        raise ValueError(f"attention must be None (the models' own SDPA/eager attention) or one "
                         f"of {', '.join(map(repr, BACKENDS))}, got {attention!r}")
    if _flash_kernel() is None:
        raise ValueError("attention='flash_attn' needs the flash-attn package "
                         "(flash_attn.flash_attn_with_kvcache, a CUDA build), which does not "
                         "import here; use attention=None for PyTorch SDPA")
    for m in models:
        p = next(m.parameters())
        if p.device.type not in FLASH_DEVICES or p.dtype not in FLASH_DTYPES:
            raise ValueError(f"attention='flash_attn' runs fp16/bf16 models on CUDA; "
                             f"{type(m).__name__} is {p.dtype} on {p.device}")
        if getattr(m.config, "attn_logit_softcapping", None):
            raise ValueError(f"attention='flash_attn': {type(m).__name__} caps its attention "
                             f"logits, which this backend does not pass on; use attention=None")


@functools.cache
def _flash_kernel():
    """flash-attn's ``flash_attn_with_kvcache``, or None when it does not import."""
    try:
        from flash_attn import flash_attn_with_kvcache
    except ImportError:
        return None
    return flash_attn_with_kvcache


@functools.cache
def _register() -> str:
    from transformers import AttentionInterface

    AttentionInterface.register(FLASH_KEY, flash_forward)
    return FLASH_KEY


def flash_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                  sliding_window=None, **kwargs):
    """A Hugging Face attention function: ``query`` ``[B, H, n, D]``, ``key`` / ``value`` the
    cache's ``[B, kv_heads, kv_len, D]`` views of its heads-last buffers, ``attention_mask`` the
    int32 ``cache_seqlens`` ``[B, 1, 1, 1]``. Returns ``([B, n, H, D], None)``."""
    window = sliding_window or getattr(module, "sliding_window", None)
    out = _flash_kernel()(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
        cache_seqlens=attention_mask.reshape(-1), softmax_scale=scaling, causal=True,
        window_size=(window - 1, 0) if window else (-1, -1))
    return out, None


@contextlib.contextmanager
def selected(config, attention):
    """The model uses ``attention``'s kernel inside the block (nothing changes for None)."""
    if attention is None:
        yield
        return
    saved = config._attn_implementation
    config._attn_implementation = _register()
    try:
        yield
    finally:
        config._attn_implementation = saved
