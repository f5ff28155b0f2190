"""The drafter's draw on a CUDA GPU (skipped without one): the Triton sampler
(``kernels/sample.py``, two launches) against the torch formula that ran on CUDA before it (float64
softmax, the counter-based noise over the whole vocabulary, the race: 77 aten operations per
call, most of them a kernel each, counted with a TorchDispatchMode on CPU), each eager and
replayed from a CUDA graph (as the engine's drafter graphs run it).

R in {1, 8} rows (B = 1 drafting and a small batch), V in {32,000, 151,936}, bf16 LLM-like logits,
T = 1; at R = 1, V = 151,936 also top_p = 0.9 (keep bounds from the torch code in both: one
full sort per row). ``extra_info``
carries ``gpu_us``, the CUDA-event median as in bench_verify_gpu.py; ``python bench/report.py
out.json --stat gpu_us`` tabulates it with the ratio to the torch formula.

Run: ``pytest bench/bench_sample_gpu.py --benchmark-only --benchmark-json=out.json``.
"""
from __future__ import annotations

import pytest
import torch
from bench_sample import drafter_logits
from bench_verify_gpu import captured, gpu_us

from speccascade_fast.sampling import draw

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only")

IMPLS = ["triton", "triton-graph", "torch", "torch-graph"]
CASES = [(1, 32000, None), (1, 151936, None), (8, 32000, None), (8, 151936, None),
         (1, 151936, 0.9)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("R,V,top_p", CASES, ids=[f"R{r}-V{v}-p{p}" for r, v, p in CASES])
def test_sample_gpu(benchmark, R, V, top_p, impl):
    logits, seeds, positions = (t.cuda() for t in drafter_logits(R, V))
    T = torch.ones(R, dtype=torch.float64, device="cuda")
    name, _, mode = impl.partition("-")
    backend = "triton" if name == "triton" else "reference"

    def call():
        return draw(logits, T, seeds, positions, None, top_p, greedy=False, backend=backend)

    want = draw(logits, T, seeds, positions, None, top_p, greedy=False, backend="reference")
    assert torch.equal(call(), want)  # compiles the kernels, and checks the tokens
    torch.cuda.synchronize()
    step = captured(call) if mode == "graph" else call

    def timed():
        step()
        torch.cuda.synchronize()

    benchmark.group = f"sample R={R} V={V} top_p={top_p}"
    benchmark.extra_info.update(kind="sample", impl=impl, R=R, V=V, top_p=top_p,
                                gpu_us=round(gpu_us(step), 2), dtype="bf16",
                                device=torch.cuda.get_device_name())
    benchmark.pedantic(timed, rounds=100, warmup_rounds=2, iterations=1)
