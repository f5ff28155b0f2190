"""A torch stand-in for flash-attn's ``flash_attn_with_kvcache`` (flash-attn itself is a CUDA
build that CI never installs), written from its documented semantics, one row at a time:

* ``q`` ``[B, seqlen_q, nheads, headdim]``; ``k_cache`` / ``v_cache`` ``[B, seqlen_cache,
  nheads_k, headdim]`` (last dimension contiguous), ``nheads`` a multiple of ``nheads_k`` (query
  head h reads key head ``h // (nheads / nheads_k)``); row b's keys are ``[0, cache_seqlens[b])``;
* ``causal=True`` aligns the mask to the bottom right: query i sees key j iff
  ``j <= i + seqlen_k - seqlen_q``; ``window_size=(left, right)`` (-1: unbounded) keeps
  ``i + seqlen_k - seqlen_q - left <= j <= i + seqlen_k - seqlen_q + right``;
* a query that sees no key outputs zeros; ``softmax_scale`` defaults to ``headdim ** -0.5``.

Only what the engine uses (no in-place append of new keys, rotary, paging, alibi, softcap): the
rest is refused so a test cannot pass by ignoring an argument. ``CALLS`` counts the calls.
"""
from __future__ import annotations

import torch

CALLS = [0]


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None,
                            rotary_sin=None, cache_seqlens=None, cache_batch_idx=None,
                            cache_leftpad=None, block_table=None, softmax_scale=None,
                            causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0,
                            return_softmax_lse=False):
    unused = (k, v, rotary_cos, rotary_sin, cache_batch_idx, cache_leftpad, block_table,
              alibi_slopes)
    if any(x is not None for x in unused) or softcap or return_softmax_lse:
        raise NotImplementedError("the stand-in covers only what the engine passes")
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    assert cache_seqlens is not None and cache_seqlens.dtype == torch.int32
    # the kernel reads k_cache[b, :cache_seqlens[b]]: past the cache is out of bounds
    assert 0 <= int(cache_seqlens.min()) and int(cache_seqlens.max()) <= k_cache.shape[1]
    CALLS[0] += 1
    B, sq, H, D = q.shape
    group = H // k_cache.shape[2]
    scale = D ** -0.5 if softmax_scale is None else softmax_scale
    out = torch.zeros_like(q)
    for b in range(B):
        sk = int(cache_seqlens[b])
        keys = k_cache[b, :sk].repeat_interleave(group, dim=1).double()  # [sk, H, D]
        values = v_cache[b, :sk].repeat_interleave(group, dim=1).double()
        scores = torch.einsum("qhd,khd->hqk", q[b].double(), keys) * scale
        i = torch.arange(sq)[:, None] + (sk - sq)  # each query's diagonal in key space
        j = torch.arange(sk)[None, :]
        seen = torch.ones(sq, sk, dtype=torch.bool)
        if causal:
            seen &= j <= i
        if window_size[0] >= 0:
            seen &= j >= i - window_size[0]
        if window_size[1] >= 0:
            seen &= j <= i + window_size[1]
        probs = torch.softmax(scores.masked_fill(~seen, -torch.inf), dim=-1).nan_to_num(0.0)
        out[b] = torch.einsum("hqk,khd->qhd", probs, values).to(q.dtype)
    return out
