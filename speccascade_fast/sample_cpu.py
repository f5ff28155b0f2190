"""Drafter sampling on CPU through the compiled kernel, with a torch fallback.

``sample_cpu(logits, temperature, seeds, positions)`` draws one token per row of ``logits``
``[R, V]``: the argmax for ``T == 0`` (ties to the lowest id), else the counter-based Gumbel-max
race ``argmax_v l_v / T - log(-log u_v)`` with ``u_v = rng.uniform(seed, position, DRAFT, v)``
(SEMANTICS §6). Only temperature, no top-k/top-p: that is the plain ``qT = softmax(l / T)``
drafter, and ``speccascade_fast.sampling.sample`` remains the general entry point.
"""
from __future__ import annotations

import torch

from . import _ext, rng

__all__ = ["sample_cpu", "sample_cpu_reference"]


def sample_cpu_reference(
    logits: torch.Tensor,
    temperature: float | torch.Tensor,
    seeds: torch.Tensor,
    positions: torch.Tensor,
) -> torch.Tensor:
    """The fp64 torch formula the kernel reproduces (builds [R, V] fp64 temporaries)."""
    x = logits.double()
    if isinstance(temperature, torch.Tensor):
        t = temperature.to(device=x.device, dtype=torch.float64).reshape(-1)
        t = t.expand(x.shape[0]) if t.numel() == 1 else t
        greedy = x.argmax(-1)
        noise = rng.exponential_noise(seeds, positions, rng.DRAFT, x.shape[-1])
        raced = rng.race(x / torch.where(t > 0, t, 1.0)[:, None], noise)
        return torch.where(t > 0, raced, greedy)
    if temperature == 0:
        return x.argmax(-1)
    noise = rng.exponential_noise(seeds, positions, rng.DRAFT, x.shape[-1])
    return rng.race(x / temperature, noise)


def sample_cpu(
    logits: torch.Tensor,
    temperature: float | torch.Tensor,
    seeds: torch.Tensor,
    positions: torch.Tensor,
) -> torch.Tensor:
    """One token per row of ``logits`` [R, V] (fp32/fp16/bf16, CPU); int64 ``[R]``.

    ``temperature`` is a number or a tensor of R temperatures; ``seeds`` and ``positions`` are
    int64 ``[R]``. Uses the compiled kernel when it is built, else :func:`sample_cpu_reference`
    (same tokens up to floating-point near-ties).
    """
    C = _ext.load()
    if C is not None and logits.device.type == "cpu" and logits.dtype != torch.float64:
        return C.sample_cpu(logits, temperature, seeds, positions)
    return sample_cpu_reference(logits, temperature, seeds, positions)
