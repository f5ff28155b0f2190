"""The Triton verification backend on CUDA (skipped without a GPU): one verification block.

Shapes: B in {1, 8, 32}, gamma in {1, 5, 8}, V in {32000, 151936, 262144} (Llama-2, Qwen,
Gemma-3 vocabularies), bf16 logits, T = 1, bonus="cascade", rules spec / opt / token_v3 (2, 3 and
3 launches). Two modes per shape:

* ``eager``: ``backends.triton.verify`` as the engine calls it (Python wrapper, allocations,
  launches), then ``torch.cuda.synchronize()``;
* ``graph``: the same call captured once in a CUDA graph, timed as ``replay()`` +
  ``torch.cuda.synchronize()`` (what a graph-captured decode loop pays; ENGINE.md §1 targets
  10-20 µs on H100 for B <= 8, gamma <= 8, V <= 256k).

pytest-benchmark's table reports each call in µs (``min`` is the least noisy column).
``extra_info`` adds ``gpu_us`` (median of CUDA-event timings of 50 back-to-back calls, no host
sync in between), the bytes of logits read once, and the effective GB/s at ``gpu_us``.

Run: ``pytest bench/bench_verify_triton.py --benchmark-only --benchmark-group-by=group``.
"""
from __future__ import annotations

import pytest
import torch

from speccascade_fast import checks

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only")

DEV = "cuda"

BS = [1, 8, 32]
GAMMAS = [1, 5, 8]
VOCABS = [32000, 151936, 262144]
RULES = ["spec", "opt", "token_v3"]
ALPHA = {"spec": None, "opt": 0.5, "token_v3": 0.3}


def block(B, gamma, V, seed=0):
    """LLM-like bf16 logits for both models, drafts drawn from the drafter at T = 1."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    shape = (B, gamma + 1, V)
    shared = torch.randn(shape, generator=g, device=DEV) * 2.5
    top = torch.randint(0, V, (B, gamma + 1, 16), generator=g, device=DEV)
    shared.scatter_add_(-1, top, torch.full(top.shape, 9.0, device=DEV))
    q = (shared + torch.randn(shape, generator=g, device=DEV)).to(torch.bfloat16)
    p = (shared + torch.randn(shape, generator=g, device=DEV)).to(torch.bfloat16)
    gumbel = -torch.log(-torch.log(torch.rand(B, gamma, V, generator=g, device=DEV)))
    x = (q[:, :gamma].float() + gumbel).argmax(-1)
    return q, x, p


def gpu_us(fn, n=50) -> float:
    """Median GPU time per call (CUDA events around n back-to-back calls, 5 repeats)."""
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000 / n)
    return sorted(times)[len(times) // 2]


@pytest.mark.parametrize("mode", ["eager", "graph"])
@pytest.mark.parametrize("V", VOCABS)
@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("B", BS)
@pytest.mark.parametrize("rule", RULES)
def test_verify_triton(benchmark, rule, B, gamma, V, mode):
    from speccascade_fast.backends import triton as tb

    q, x, p = block(B, gamma, V)
    args = dict(
        rule=rule,
        alpha=checks.alpha_tensor(ALPHA[rule], (B,), DEV).contiguous(),
        temperature=torch.ones(B, dtype=torch.float64, device=DEV),
        top_k=None, top_p=None,
        seed=torch.arange(B, dtype=torch.int64, device=DEV),
        positions=torch.full((B,), 100, dtype=torch.int64, device=DEV),
    )

    def call():
        return tb.verify(q, x, p, **args)

    call()  # compile
    torch.cuda.synchronize()
    if mode == "graph":
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            call()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            call()
        step = graph.replay
    else:
        step = call

    def timed():
        step()
        torch.cuda.synchronize()

    benchmark.group = f"verify {rule} B={B} gamma={gamma} V={V}"
    us = gpu_us(step)
    nbytes = q.numel() * q.element_size() + p.numel() * p.element_size()
    benchmark.extra_info.update(gpu_us=round(us, 2), logits_MB=round(nbytes / 2**20, 2),
                                GBps=round(nbytes / (us * 1e-6) / 1e9, 1))
    benchmark.pedantic(timed, rounds=100, warmup_rounds=10, iterations=1)


# ---- vLLM's flattened layout: one fused call against one padded call per request -------------
@pytest.mark.parametrize("how", ["fused", "per_request"])
@pytest.mark.parametrize("rule", ["spec", "token_v3"])
def test_verify_ragged_triton(benchmark, rule, how):
    """32 requests of gamma 1..8 (vLLM's flattened rows), V = 151,936, bf16, T = 1: the ragged
    kernels (one 2-3 launch call, rows read where they lie) against what ``verify_ragged`` did
    before them (each request through the padded kernels on its own)."""
    from speccascade_fast.backends import triton as tb

    B, V = 32, 151936
    gammas = [1 + (7 * b) % 8 for b in range(B)]
    q, x, p = block(B, max(gammas), V, seed=3)
    cu = torch.tensor([0, *torch.tensor(gammas).cumsum(0).tolist()], device=DEV)
    flat_q = torch.cat([q[b, :g] for b, g in enumerate(gammas)])
    flat_x = torch.cat([x[b, :g] for b, g in enumerate(gammas)])
    flat_p = torch.cat([p[b, :g + 1] for b, g in enumerate(gammas)])
    bonus = torch.stack([q[b, g] for b, g in enumerate(gammas)])
    per = dict(alpha=checks.alpha_tensor(ALPHA[rule], (B,), DEV).contiguous(),
               temperature=torch.ones(B, dtype=torch.float64, device=DEV),
               seed=torch.arange(B, dtype=torch.int64, device=DEV),
               positions=torch.full((B,), 100, dtype=torch.int64, device=DEV))
    c = cu.tolist()

    def fused():
        return tb.verify_ragged(flat_q, flat_x, flat_p, cu, bonus, max_gamma=max(gammas),
                                rule=rule, top_k=None, top_p=None, **per)

    def per_request():
        for b in range(B):
            one = {k: v[b:b + 1] for k, v in per.items()}
            tb.verify(torch.cat([flat_q[c[b]:c[b + 1]], bonus[b:b + 1]])[None],
                      flat_x[c[b]:c[b + 1]][None], flat_p[c[b] + b:c[b + 1] + b + 1][None],
                      rule=rule, top_k=None, top_p=None, **one)

    step = fused if how == "fused" else per_request
    step()  # compile
    torch.cuda.synchronize()

    def timed():
        step()
        torch.cuda.synchronize()

    benchmark.group = f"verify_ragged {rule} B={B} gamma=1..8 V={V}"
    us = gpu_us(step, n=20)
    nbytes = flat_q.numel() * 2 + bonus.numel() * 2 + flat_p.numel() * 2
    benchmark.extra_info.update(gpu_us=round(us, 2), logits_MB=round(nbytes / 2**20, 2),
                                GBps=round(nbytes / (us * 1e-6) / 1e9, 1))
    benchmark.pedantic(timed, rounds=30, warmup_rounds=3, iterations=1)
