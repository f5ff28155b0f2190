"""Fused CPU drafter sampling (``_C.sample_cpu``) against the torch reference formula.

The groups pair the two implementations per shape: R in {1, 8} (B=1 drafting and a small batch),
V in {32000, 151936} (Llama-2 and Qwen vocabularies), T = 1, bf16 logits.
"""
from __future__ import annotations

import pytest
import torch

from speccascade_fast import _ext
from speccascade_fast.sampling import sample

C = _ext.load()
SHAPES = [(1, 32000), (1, 151936), (8, 32000), (8, 151936)]


def drafter_logits(R: int, V: int, dtype: torch.dtype = torch.bfloat16, seed: int = 0):
    """LLM-like logits: a broad bulk and a handful of likely tokens, as a drafter emits."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(R, V, generator=g) * 2.5
    logits[:, :32] += 10.0
    seeds = torch.arange(R, dtype=torch.int64) + 12345
    positions = torch.arange(R, dtype=torch.int64) + 100
    return logits.to(dtype), seeds, positions


@pytest.mark.parametrize("R,V", SHAPES, ids=[f"R{r}-V{v}" for r, v in SHAPES])
def test_sample_cpu_ext(benchmark, R, V):
    if C is None:
        pytest.skip(f"_C not built ({_ext.IMPORT_ERROR})")
    logits, seeds, positions = drafter_logits(R, V)
    benchmark.group = f"sample R={R} V={V}"
    out = benchmark(C.sample_cpu, logits, 1.0, seeds, positions)
    assert torch.equal(out, sample(logits, seed=seeds, positions=positions, backend="reference"))


@pytest.mark.parametrize("R,V", SHAPES, ids=[f"R{r}-V{v}" for r, v in SHAPES])
def test_sample_torch_reference(benchmark, R, V):
    logits, seeds, positions = drafter_logits(R, V)
    benchmark.group = f"sample R={R} V={V}"
    benchmark(sample, logits, seed=seeds, positions=positions, backend="reference")
