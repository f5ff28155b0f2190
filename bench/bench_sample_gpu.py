"""The drafter's draw on a CUDA GPU (skipped without one): the Triton sampler
(``kernels/sample.py``, two launches) against the reference backend's torch formula, what CUDA
runs without triton (float64 softmax, the counter-based noise over the whole vocabulary, the race:
77 aten operations per call, most of them a kernel each, counted with a TorchDispatchMode on
CPU), each eager and replayed from a CUDA graph (as the engine's drafter graphs run it).

R in {1, 8} rows (B = 1 drafting and a small batch), V in {32,000, 151,936}, bf16 LLM-like logits,
T = 1; at R = 1, V = 151,936 also top_p = 0.9 (keep bounds from
:func:`speccascade_fast.backends.keep_bounds` in both: the Triton search on CUDA). ``extra_info``
carries ``gpu_us``, the CUDA-event median as in bench_verify_gpu.py; ``python bench/report.py
out.json --stat gpu_us`` tabulates it with the ratio to the torch formula.

Also top-p's keep bounds alone (kind "keep_bounds"), R in {1, 6, 48} rows (a drafter draw at
B = 1, a verification block of B = 1, gamma = 5, and of B = 8), V = 151,936, top_p = 0.9: the
Triton search (kernels/keep_bounds.py) against the torch code CUDA runs without triton (one full
sort per row, no host read), eager and graph-replayed.

Run: ``pytest bench/bench_sample_gpu.py --benchmark-only --benchmark-json=out.json``.
"""
from __future__ import annotations

import pytest
import torch
from bench_sample import drafter_logits
from bench_verify_gpu import captured, gpu_us

from speccascade_fast import backends, truncation
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
    backend = "triton" if impl.startswith("triton") else "reference"

    def call():
        return draw(logits, T, seeds, positions, None, top_p, greedy=False, backend=backend)

    want = draw(logits, T, seeds, positions, None, top_p, greedy=False, backend="reference")
    assert torch.equal(call(), want)  # compiles the kernels, and checks the tokens
    measure(benchmark, call, "sample", impl, R=R, V=V, top_p=top_p)


def measure(benchmark, call, kind, impl, **shape):
    """Time ``call`` (its first call already made: compiled), eager or replayed from a CUDA graph
    as ``impl`` says ("...-graph"): host-synchronised rounds, and the CUDA-event ``gpu_us``."""
    torch.cuda.synchronize()
    step = captured(call) if impl.endswith("-graph") else call

    def timed():
        step()
        torch.cuda.synchronize()

    benchmark.group = f"{kind} " + " ".join(f"{k}={v}" for k, v in shape.items())
    benchmark.extra_info.update(kind=kind, impl=impl, **shape, gpu_us=round(gpu_us(step), 2),
                                dtype="bf16", device=torch.cuda.get_device_name())
    benchmark.pedantic(timed, rounds=100, warmup_rounds=2, iterations=1)


KEEP_IMPLS = ["search", "search-graph", "torch", "torch-graph"]


@pytest.mark.parametrize("impl", KEEP_IMPLS)
@pytest.mark.parametrize("R", [1, 6, 48])
def test_keep_bounds_gpu(benchmark, R, impl):
    V, top_p = 151936, 0.9
    logits = drafter_logits(R, V)[0].cuda()
    T = torch.linspace(0.5, 1.5, R, dtype=torch.float64, device="cuda")
    if impl.startswith("search"):
        assert backends.resolve("auto", logits.device, "keep_bounds", logits=(logits,),
                                top_p=top_p) == "triton"

        def call():
            return backends.keep_bounds(logits, T, None, top_p)
    else:
        def call():
            return truncation.keep_bounds_torch(logits, T, None, top_p, sync_free=True)

    call()  # compiles the kernels
    measure(benchmark, call, "keep_bounds", impl, R=R, V=V, top_p=top_p)
