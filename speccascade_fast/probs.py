"""The two pairs of distributions every position carries (docs/semantics.md §1), in float64.

* unscaled ``q1, p1`` = softmax(logits): what every deferral statistic reads;
* scaled ``qT, pT`` = softmax(logits / T), truncated by top-k / top-p and renormalised; at T = 0 the
  one-hot of the argmax (ties: lowest id). Drafting, the target, the acceptance ratio and the
  residual use these.

Truncation convention (HF order: temperature, then top-k, then top-p):

* top-k keeps every token whose scaled probability is >= the k-th largest (ties at the boundary
  are kept, as Hugging Face does);
* top-p sorts tokens by scaled probability, descending, ties by lower id first, and keeps a token
  when the mass of the tokens strictly before it is < top_p (the smallest prefix reaching top_p);
* min-p (last, as Hugging Face's ``MinPLogitsWarper``) keeps a token when its probability is
  >= min_p times the largest (of the distribution truncated so far: the ratio does not depend
  on the renormalisation, and the largest is always kept).
"""
from __future__ import annotations

import torch


def unscaled(logits: torch.Tensor) -> torch.Tensor:
    """softmax(logits) in float64, ``[..., V]``."""
    return torch.softmax(logits.to(torch.float64), dim=-1)


def _top_k(probs: torch.Tensor, top_k: int) -> torch.Tensor:
    kth = torch.topk(probs, top_k, dim=-1).values[..., -1:]
    return torch.where(probs >= kth, probs, torch.zeros_like(probs))


def _top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    keep_sorted = mass_before < top_p
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return torch.where(keep, probs, torch.zeros_like(probs))


def scaled(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
) -> torch.Tensor:
    """``qT`` / ``pT`` in float64 ``[..., V]``.

    ``temperature`` is a float64 tensor broadcastable to ``logits.shape[:-1]``; rows with T = 0
    get the one-hot of the argmax, the others the truncated, renormalised softmax(logits / T).
    """
    x = logits.to(torch.float64)
    t = temperature.to(torch.float64)[..., None]
    greedy = t == 0
    probs = torch.softmax(x / torch.where(greedy, torch.ones_like(t), t), dim=-1)
    if top_k is not None:
        probs = _top_k(probs, top_k)
    if top_p is not None:
        probs = _top_p(probs / probs.sum(-1, keepdim=True), top_p)
    if min_p is not None:
        largest = probs.max(-1, keepdim=True).values
        probs = torch.where(probs >= min_p * largest, probs, torch.zeros_like(probs))
    probs = probs / probs.sum(-1, keepdim=True)
    # the one-hot by comparison: F.one_hot reads its indices' range on the host
    ids = torch.arange(x.shape[-1], device=x.device)
    onehot = (ids == torch.argmax(x, dim=-1, keepdim=True)).to(torch.float64)
    return torch.where(greedy, onehot, probs)


def neg_entropy(probs: torch.Tensor) -> torch.Tensor:
    """``sum_v p log p`` (0 log 0 = 0), ``[...]``."""
    return torch.xlogy(probs, probs).sum(-1)


def total_variation(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``TV(p, q) = sum_v max(0, p - q)``, ``[...]``."""
    return torch.clamp(p - q, min=0).sum(-1)
