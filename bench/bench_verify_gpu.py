"""One verification block on a CUDA GPU (skipped without one): the fused ``triton`` and ``cuda``
backends against the float64 ``reference`` and the eager PyTorch chain written the way Hugging
Face's ``_speculative_sampling`` works (``bench_verify.eager_verify``, on the GPU).

Shapes: B in {1, 8, 32}, gamma in {1, 5, 8}, V in {32000, 151936, 262144} (Llama-2, Qwen,
Gemma-3 vocabularies), bf16 logits, T = 1, bonus="cascade", rules spec / opt / token_v3 (2, 3 and
3 launches). By default the core shapes of bench_verify.py run (B = 1 / gamma = 5 / V = 151,936
among them); ``SPECCASCADE_BENCH_FULL=1`` runs the whole grid (the reference only up to 20M
logits per block). Backends (the ``backend`` parameter):

* ``triton`` / ``cuda``: ``backends.get(name)`` as the engine calls it (the dispatch, the
  backend's Python wrapper, allocations, launches), then ``torch.cuda.synchronize()``;
* ``triton-graph`` / ``cuda-graph``: the same call captured once in a CUDA graph, timed as
  ``replay()`` + ``torch.cuda.synchronize()`` (what a graph-captured decode loop pays);
* ``triton_wide-graph``: ``triton-graph`` with the race (accept + resample + insert) over the
  targets stage's slices (``race_width=slice_size(V)``, the geometry without ``race_slice``):
  the baseline that shows what the narrower race slices of small B buy, in the same run;
* ``reference``: the float64 specification on the GPU;
* ``eager``: the HF-style chain (fp32 softmaxes, cumsum trick, multinomial residual); its random
  numbers are torch's, so it is a speed baseline only.

pytest-benchmark's table reports each call in µs with its host synchronisation. ``extra_info``
adds ``gpu_us`` (median of CUDA-event timings of back-to-back calls, no host sync in between:
FlashInfer's way), the bytes of logits read once and the effective GB/s at ``gpu_us``, plus the
fields ``bench/report.py`` reads (``python bench/report.py out.json --stat gpu_us``: ratios
against the reference and the eager chain of the same shape).

A fused backend that is not available on the machine (triton not importable, ``_C`` built
without CUDA) fails its benchmarks rather than skipping them: on a GPU machine that is a broken
install.

Run: ``pytest bench/bench_verify_gpu.py --benchmark-only --benchmark-json=out.json``.
"""
from __future__ import annotations

import os

import pytest
import torch
from bench_verify import CORE, REFERENCE_MAX_LOGITS, eager_verify

from speccascade_fast import backends, checks

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only")

DEV = "cuda"

FULL = os.environ.get("SPECCASCADE_BENCH_FULL") == "1"
BS, GAMMAS, VOCABS = [1, 8, 32], [1, 5, 8], [32000, 151936, 262144]
SHAPES = [(b, g, v) for b in BS for g in GAMMAS for v in VOCABS] if FULL else CORE
RULES = ["spec", "opt", "token_v3"]
ALPHA = {"spec": None, "opt": 0.5, "token_v3": 0.3}
BACKENDS = ["triton", "triton-graph", "triton_wide-graph", "cuda", "cuda-graph", "reference",
            "eager"]


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


def fused(name):
    """``backends.get(name)``, failing (not skipping) when the backend is missing here."""
    if name not in backends.available(torch.device(DEV)):
        pytest.fail(f"backend {name!r} is not available on this GPU machine")
    return backends.get(name, torch.device(DEV))


def captured(call):
    """``call`` captured once in a CUDA graph (after a warm-up on a side stream): its replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    return graph.replay


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("B,gamma,V", SHAPES, ids=[f"B{b}-g{g}-V{v}" for b, g, v in SHAPES])
def test_verify_gpu(benchmark, B, gamma, V, rule, backend):
    if backend == "reference" and B * (gamma + 1) * V * 2 > REFERENCE_MAX_LOGITS:
        pytest.skip("reference: too slow and too much fp64 memory at this shape")
    q, x, p = block(B, gamma, V)
    args = dict(
        rule=rule,
        alpha=checks.alpha_tensor(ALPHA[rule], (B,), DEV).contiguous(),
        temperature=torch.ones(B, dtype=torch.float64, device=DEV),
        top_k=None, top_p=None,
        seed=torch.arange(B, dtype=torch.int64, device=DEV),
        positions=torch.full((B,), 100, dtype=torch.int64, device=DEV),
    )
    name, _, mode = backend.partition("-")
    if name == "eager":
        def call():
            return eager_verify(q, x, p, rule=rule, alpha=ALPHA[rule])
    elif name == "triton_wide":
        from speccascade_fast.backends import triton as tb
        from speccascade_fast.kernels.launch import slice_size

        fused("triton")
        wide = slice_size(V)

        def call():
            return tb.launch(q, x, p, **args, race_width=wide)
    else:
        fn = fused(name) if name != "reference" else backends.get("reference")

        def call():
            return fn(q, x, p, **args)

    call()  # compile / warm up
    torch.cuda.synchronize()
    step = captured(call) if mode == "graph" else call

    def timed():
        step()
        torch.cuda.synchronize()

    n = 5 if name == "reference" else 50
    us = gpu_us(step, n=n)
    nbytes = q.numel() * q.element_size() + p.numel() * p.element_size()
    benchmark.group = f"verify {rule} B={B} gamma={gamma} V={V}"
    benchmark.extra_info.update(
        gpu_us=round(us, 2), logits_MB=round(nbytes / 2**20, 2),
        GBps=round(nbytes / (us * 1e-6) / 1e9, 1), logit_bytes=nbytes, B=B, gamma=gamma, V=V,
        rule=rule, backend=backend, dtype="bf16", device=torch.cuda.get_device_name())
    rounds = 10 if name == "reference" else 100
    benchmark.pedantic(timed, rounds=rounds, warmup_rounds=2, iterations=1)


# ---- vLLM's flattened layout: one fused call against one padded call per request -------------
@pytest.mark.parametrize("how", ["fused", "per_request"])
@pytest.mark.parametrize("rule", ["spec", "token_v3"])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_verify_ragged_gpu(benchmark, backend, rule, how):
    """32 requests of gamma 1..8 (vLLM's flattened rows), V = 151,936, bf16, T = 1: the ragged
    kernels (one 2-3 launch call, rows read where they lie, through the dispatch as the engine
    calls it) against each request through the padded kernels on its own."""
    verify_one = fused(backend)
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

    def ragged():
        return backends.verify_ragged(backend, flat_q, flat_x, flat_p, cu, bonus,
                                      max_gamma=max(gammas), rule=rule, top_k=None, top_p=None,
                                      **per)

    def per_request():
        for b in range(B):
            one = {k: v[b:b + 1] for k, v in per.items()}
            verify_one(torch.cat([flat_q[c[b]:c[b + 1]], bonus[b:b + 1]])[None],
                       flat_x[c[b]:c[b + 1]][None], flat_p[c[b] + b:c[b + 1] + b + 1][None],
                       rule=rule, top_k=None, top_p=None, **one)

    step = ragged if how == "fused" else per_request
    step()  # compile
    torch.cuda.synchronize()

    def timed():
        step()
        torch.cuda.synchronize()

    benchmark.group = f"verify_ragged {backend} {rule} B={B} gamma=1..8 V={V}"
    us = gpu_us(step, n=20)
    nbytes = flat_q.numel() * 2 + bonus.numel() * 2 + flat_p.numel() * 2
    benchmark.extra_info.update(gpu_us=round(us, 2), logits_MB=round(nbytes / 2**20, 2),
                                GBps=round(nbytes / (us * 1e-6) / 1e9, 1))
    benchmark.pedantic(timed, rounds=30, warmup_rounds=3, iterations=1)
