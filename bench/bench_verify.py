"""One verification block on CPU: the fused ``cpu`` backend against the float64 ``reference`` and
an eager fp32 PyTorch chain written the way Hugging Face's ``_speculative_sampling`` works.

Shapes: B in {1, 8, 32}, gamma in {1, 5, 8}, V in {32000, 151936, 262144} (Llama-2, Qwen,
Gemma-3 vocabularies); rules spec / opt / token_v3; T = 1, bonus="cascade", fp32 logits
(``SPECCASCADE_BENCH_DTYPE=bf16`` for bf16). By default a core subset runs (a few minutes on two
cores, B = 1 / gamma = 5 / V = 151936 among them); ``SPECCASCADE_BENCH_FULL=1`` runs the whole
grid (the reference is skipped above 20M logits per block: minutes per call and > 10 GB of fp64
temporaries).

Backends (the ``backend`` parameter):

* ``cpu``: ``backends.get("cpu")``, the dispatch to the fused C++ op, called with the
  normalised arguments ``speccascade_fast.verify`` passes to it (what a decode loop pays per block once its
  inputs are known to be valid); logits in cache (pytest-benchmark repeats the same call, and one
  block of the core shape, 7.3 MB of fp32, fits in the 32 MB L3);
* ``cpu-cold``: the same after streaming 64 MB through the cache before each round (untimed),
  so the logits come from DRAM: the number to hold against the memory-bandwidth roofline;
* ``cpu-api``: the public ``speccascade_fast.verify(..., backend="cpu")``, i.e. plus its input
  validation (NaN / +inf / all-masked scans of both logit tensors in eager torch ops);
* ``reference``: ``backends.get("reference")``, the float64 specification, same arguments;
* ``eager``: full-vocabulary fp32 softmax of both models, ratio gather, first rejection by the
  cumsum trick, residual by ``torch.multinomial`` (HF ``_speculative_sampling``, batched; opt and
  token_v3 build their target pi the same eager way). Its random numbers are torch's, so its
  tokens differ: it is a speed baseline only.

``extra_info``: ``logit_bytes`` (the draft and target logits of the block, read once),
``mem_bw_gbs`` (this machine's read bandwidth, measured once per pytest run: the best of 5
``torch.sum`` over 1 GiB of fp32), ``read_once_us`` = logit_bytes / mem_bw, and after the run
``gbps_min`` / ``x_read_once_min`` (bytes / min time, min time / read_once_us).

Run: ``pytest bench/bench_verify.py --benchmark-only --benchmark-json=out.json`` then
``python bench/report.py out.json`` for the markdown table. The machine's cores may be shared:
the ``min`` column is the least noisy.

The divergence budget's cost per block (script mode, not pytest):
``python bench/bench_verify.py --budget [--rounds N] [--json out.json]`` times the ``cpu``
backend's block with and without a divergence budget (docs/semantics.md §9) at the default
pair's vocabulary (V = 151936, gamma = 5, bonus="cascade", T = 1), B = 1 and 8, fp32 and bf16
logits, 1 and 2 threads, rules opt / token_v3 / lossy / drafter, in interleaved rounds (each
round calls both, in alternating order, so that the machine's drift hits both alike), and prints
a markdown table (min and median per call, and their ratios).
"""
from __future__ import annotations

import os
import time

import pytest
import torch

import speccascade_fast as sc
from speccascade_fast import backends, checks

FULL = os.environ.get("SPECCASCADE_BENCH_FULL") == "1"
DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16}[
    os.environ.get("SPECCASCADE_BENCH_DTYPE", "fp32")]
BS, GAMMAS, VOCABS = [1, 8, 32], [1, 5, 8], [32000, 151936, 262144]
CORE = [(1, 5, 151936), (1, 1, 32000), (1, 8, 262144), (8, 5, 32000)]
SHAPES = [(b, g, v) for b in BS for g in GAMMAS for v in VOCABS] if FULL else CORE
RULES = ["spec", "opt", "token_v3"]
ALPHA = {"spec": None, "opt": 0.5, "token_v3": 0.3}
BACKENDS = ["cpu", "cpu-cold", "cpu-api", "reference", "eager"]
REFERENCE_MAX_LOGITS = 20_000_000


def block(B, gamma, V, seed=0, dtype=None):
    """LLM-like logits for both models (a broad bulk plus a handful of likely tokens shared by
    drafter and verifier), drafts drawn from the drafter at T = 1; ``dtype`` None: ``DTYPE``."""
    dtype = DTYPE if dtype is None else dtype
    g = torch.Generator().manual_seed(seed)
    shape = (B, gamma + 1, V)
    shared = torch.randn(shape, generator=g) * 2.5
    top = torch.randint(0, V, (B, gamma + 1, 16), generator=g)
    shared.scatter_add_(-1, top, torch.full(top.shape, 9.0))
    q = (shared + torch.randn(shape, generator=g)).to(dtype)
    p = (shared + torch.randn(shape, generator=g)).to(dtype)
    x = sc.sample(q[:, :gamma], seed=torch.arange(B), positions=torch.full((B,), 100))
    return q, x, p


# --- the eager baseline -------------------------------------------------------------------------
def eager_verify(draft_logits, draft_tokens, target_logits, *, rule, alpha, temperature=1.0):
    """Speculative sampling as eager fp32 PyTorch ops, HF-style (full softmaxes, cumsum trick,
    multinomial residual), batched over B; bonus="cascade" (pi at the bonus row from the
    drafter's extra row), on the logits' device. Returns (tokens [B, gamma+1] with -1 padding,
    num_accepted)."""
    B, gamma = draft_tokens.shape
    dev = draft_tokens.device
    q = torch.softmax(draft_logits.float() / temperature, dim=-1)  # [B, gamma+1, V] fp32
    p = torch.softmax(target_logits.float() / temperature, dim=-1)
    if rule == "spec":
        pi = p
    elif rule == "opt":  # T = 1 here: the unscaled and scaled pairs coincide
        tv = torch.clamp(p - q, min=0).sum(-1)
        defer = q.amax(-1) < p.amax(-1) - alpha * tv
        pi = torch.where(defer[..., None], p, q)
    elif rule == "token_v3":
        in_a = p >= (1 - alpha) * p.amax(-1, keepdim=True)
        eta = torch.where(in_a, 0.0, q).sum(-1, keepdim=True)
        pi = torch.where(in_a, q, 0.0) + eta * p
    else:
        raise ValueError(rule)
    idx = draft_tokens[..., None]
    q_i = q[:, :gamma].gather(-1, idx).squeeze(-1)
    pi_i = pi[:, :gamma].gather(-1, idx).squeeze(-1)
    r = torch.rand_like(q_i)
    accepted = r <= pi_i / q_i
    n = ((~accepted).cumsum(dim=-1) < 1).sum(-1)  # HF's first-rejection count
    rows = torch.arange(B, device=dev)
    pi_n = pi[rows, n]
    q_n = q[rows, n]
    residual = torch.clamp(pi_n - q_n, min=0)
    residual = torch.where((n < gamma)[:, None], residual, pi_n)
    residual = residual / residual.sum(-1, keepdim=True)
    last = torch.multinomial(residual, num_samples=1).squeeze(1)
    tokens = torch.full((B, gamma + 1), -1, dtype=torch.int64, device=dev)
    cols = torch.arange(gamma + 1, device=dev)
    keep = cols[:gamma] < n[:, None]
    tokens[:, :gamma] = torch.where(keep, draft_tokens, -1)
    tokens[rows, n] = last
    return tokens, n


# --- memory bandwidth ---------------------------------------------------------------------------
@pytest.fixture(scope="session")
def mem_bw_gbs():
    """Read bandwidth in GB/s: best of 5 torch.sum over 1 GiB of fp32 (far larger than L3)."""
    x = torch.ones(256 * 2**20)  # 1 GiB
    x.sum()
    best = min(_timed(x.sum) for _ in range(5))
    del x
    return 2**30 / best / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def test_memory_bandwidth(benchmark, mem_bw_gbs):
    """The roofline's denominator, also in the JSON: torch.sum over 1 GiB of fp32."""
    x = torch.ones(256 * 2**20)
    benchmark.group = "memory bandwidth"
    benchmark.extra_info.update(logit_bytes=2**30, mem_bw_gbs=mem_bw_gbs)
    benchmark.pedantic(x.sum, rounds=5, iterations=1, warmup_rounds=1)
    benchmark.extra_info["gbps_min"] = 2**30 / benchmark.stats.stats.min / 1e9


_FLUSH = torch.empty(0)


def _flush_cache():
    """Stream 64 MB (twice the L3) through the cache: the next call reads its logits from DRAM."""
    global _FLUSH
    if _FLUSH.numel() == 0:
        _FLUSH = torch.empty(16 * 2**20)
    _FLUSH.fill_(1.0)


# --- the benchmark --------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("B,gamma,V", SHAPES, ids=[f"B{b}-g{g}-V{v}" for b, g, v in SHAPES])
def test_verify(benchmark, mem_bw_gbs, B, gamma, V, rule, backend):
    if backend == "reference" and B * (gamma + 1) * V * 2 > REFERENCE_MAX_LOGITS:
        pytest.skip("reference: too slow and too much fp64 memory at this shape")
    q, x, p = block(B, gamma, V)
    alpha = ALPHA[rule]
    nbytes = q.numel() * q.element_size() + p.numel() * p.element_size()
    benchmark.group = f"{rule} B={B} gamma={gamma} V={V}"
    benchmark.extra_info.update(
        logit_bytes=nbytes, mem_bw_gbs=mem_bw_gbs, read_once_us=nbytes / mem_bw_gbs / 1e3,
        B=B, gamma=gamma, V=V, rule=rule, backend=backend, dtype=str(DTYPE).split(".")[-1],
        threads=torch.get_num_threads(),
    )
    seed, positions = torch.arange(B), torch.full((B,), 100)
    # what speccascade_fast.verify hands a backend after validating its inputs
    backend_kw = dict(
        rule=rule, alpha=checks.alpha_tensor(alpha, (B,)), temperature=checks.temperature(1.0, (B,)),
        top_k=None, top_p=None, seed=seed, positions=positions,
    )
    if backend == "eager":
        out = benchmark(eager_verify, q, x, p, rule=rule, alpha=alpha)
        assert out[0].shape == (B, gamma + 1)
    else:
        if backend == "cpu-api":
            out = benchmark(sc.verify, q, x, p, rule=rule, alpha=alpha, seed=seed,
                            positions=positions, backend="cpu")
        else:
            fn = backends.get("reference" if backend == "reference" else "cpu")
            if backend == "cpu-cold":
                rounds = 20 if V * B * gamma < 5_000_000 else 8
                out = benchmark.pedantic(fn, args=(q, x, p), kwargs=backend_kw,
                                         setup=_flush_cache, rounds=rounds, iterations=1,
                                         warmup_rounds=1)
            else:
                out = benchmark(fn, q, x, p, **backend_kw)
        assert out.tokens.shape == (B, gamma + 1)
        if backend == "cpu" and B * (gamma + 1) * V * 2 <= REFERENCE_MAX_LOGITS // 4:
            ref = backends.get("reference")(q, x, p, **backend_kw)
            assert torch.equal(out.tokens, ref.tokens)
    t_min = benchmark.stats.stats.min
    benchmark.extra_info["gbps_min"] = nbytes / t_min / 1e9
    benchmark.extra_info["x_read_once_min"] = t_min / (nbytes / mem_bw_gbs / 1e9)


# --- truncated sampling (top-k / top-p) -----------------------------------------------------------
TRUNCATIONS = {"top_k=50": dict(top_k=50, top_p=None), "top_p=0.9": dict(top_k=None, top_p=0.9),
               "top_k=50,top_p=0.9": dict(top_k=50, top_p=0.9)}


def eager_truncate(logits, *, top_k, top_p):
    """Hugging Face's TopK / TopP logits warpers (T = 1): -inf outside the kept tokens."""
    x = logits.float()
    if top_k is not None:
        kth = torch.topk(x, top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p is not None:
        sorted_x, order = torch.sort(x, dim=-1)
        cum = sorted_x.softmax(-1).cumsum(-1)
        drop = cum <= 1 - top_p
        drop[..., -1:] = False
        x = x.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return x


def eager_verify_truncated(q, x, p, *, rule, alpha, top_k, top_p):
    return eager_verify(eager_truncate(q, top_k=top_k, top_p=top_p), x,
                        eager_truncate(p, top_k=top_k, top_p=top_p), rule=rule, alpha=alpha)


@pytest.mark.parametrize("backend", ["cpu", "reference", "eager"])
@pytest.mark.parametrize("trunc", list(TRUNCATIONS))
@pytest.mark.parametrize("rule", ["spec", "token_v3"])
def test_verify_truncated(benchmark, mem_bw_gbs, rule, trunc, backend):
    """B = 1, gamma = 5, V = 151936 with top-k / top-p: ``cpu`` includes the keep bounds (the C++
    op keep_bounds: nth_element / quickselect by mass), ``reference`` its sorts in fp64, ``eager``
    HF's warpers (topk, full sort + cumsum) before the eager chain."""
    B, gamma, V = 1, 5, 151936
    kw = TRUNCATIONS[trunc]
    q, _, p = block(B, gamma, V)
    x = sc.sample(q[:, :gamma], seed=torch.arange(B), positions=torch.full((B,), 100), **kw)
    alpha = ALPHA[rule]
    nbytes = q.numel() * q.element_size() + p.numel() * p.element_size()
    benchmark.group = f"{rule} {trunc} B={B} gamma={gamma} V={V}"
    benchmark.extra_info.update(
        logit_bytes=nbytes, mem_bw_gbs=mem_bw_gbs, read_once_us=nbytes / mem_bw_gbs / 1e3,
        B=B, gamma=gamma, V=V, rule=f"{rule} {trunc}", backend=backend,
        dtype=str(DTYPE).split(".")[-1], threads=torch.get_num_threads(),
    )
    backend_kw = dict(
        rule=rule, alpha=checks.alpha_tensor(alpha, (B,)), temperature=checks.temperature(1.0, (B,)),
        seed=torch.arange(B), positions=torch.full((B,), 100), **kw,
    )
    if backend == "eager":
        out = benchmark(eager_verify_truncated, q, x, p, rule=rule, alpha=alpha, **kw)
        assert out[0].shape == (B, gamma + 1)
        return
    out = benchmark(backends.get(backend), q, x, p, **backend_kw)
    if backend == "cpu":
        ref = backends.get("reference")(q, x, p, **backend_kw)
        assert torch.equal(out.tokens, ref.tokens)



# --- the divergence budget's cost per block (script mode) ------------------------------------------
BUDGET_RULES = ["opt", "token_v3", "lossy", "drafter"]
BUDGET_ALPHA = {**ALPHA, "lossy": 0.3, "drafter": None}


def budget_cost(*, batches=(1, 8), dtypes=("fp32", "bf16"), threads=(1, 2), rules=BUDGET_RULES,
                gamma=5, V=151936, rounds=7, budget=0.25) -> list[dict]:
    """Per (dtype, B, rule, threads): the ``cpu`` backend's block without a budget and with
    ``budget`` per row, timed in ``rounds`` interleaved rounds (ms per call: min and median)."""
    fn = backends.get("cpu")
    before = torch.get_num_threads()
    rows = []
    try:
        for dt in dtypes:
            for B in batches:
                q, x, p = block(B, gamma, V, dtype={"fp32": torch.float32,
                                                    "bf16": torch.bfloat16}[dt])
                for rule in rules:
                    kw = dict(rule=rule, alpha=checks.alpha_tensor(BUDGET_ALPHA[rule], (B,)),
                              temperature=checks.temperature(1.0, (B,)), top_k=None, top_p=None,
                              seed=torch.arange(B), positions=torch.full((B,), 100))
                    spend = torch.full((B,), budget, dtype=torch.float64)
                    calls = {"none": {}, "budget": {"budget": spend}}
                    for n in threads:
                        torch.set_num_threads(n)
                        for more in calls.values():  # warm-up
                            fn(q, x, p, **kw, **more)
                        times = {k: [] for k in calls}
                        for r in range(rounds):
                            for k in (list(calls) if r % 2 == 0 else list(calls)[::-1]):
                                t = time.perf_counter()
                                fn(q, x, p, **kw, **calls[k])
                                times[k].append(1e3 * (time.perf_counter() - t))
                        row = dict(dtype=dt, B=B, rule=rule, threads=n, rounds=rounds)
                        for k, ts in times.items():
                            ts.sort()
                            row[f"{k}_min_ms"], row[f"{k}_median_ms"] = ts[0], ts[len(ts) // 2]
                        rows.append(row)
                        print(_budget_line(row), flush=True)
    finally:
        torch.set_num_threads(before)
    return rows


BUDGET_HEADER = ("| logits | B | threads | rule | no budget: min / median (ms) | "
                 "budget: min / median (ms) | ratio of mins | ratio of medians |\n"
                 "|---|---|---|---|---|---|---|---|")


def _budget_line(r: dict) -> str:
    return (f"| {r['dtype']} | {r['B']} | {r['threads']} | {r['rule']} | "
            f"{r['none_min_ms']:.2f} / {r['none_median_ms']:.2f} | "
            f"{r['budget_min_ms']:.2f} / {r['budget_median_ms']:.2f} | "
            f"{r['budget_min_ms'] / r['none_min_ms']:.2f} | "
            f"{r['budget_median_ms'] / r['none_median_ms']:.2f} |")


def main(argv=None) -> int:
    import argparse
    import json

    ap = argparse.ArgumentParser(description="the cpu backend's verification block with and "
                                             "without a divergence budget (see the docstring)")
    ap.add_argument("--budget", action="store_true", required=True,
                    help="time the divergence budget's cost per block (the only script mode)")
    ap.add_argument("--value", type=float, default=0.25, help="each row's budget (default 0.25)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rules", default=",".join(BUDGET_RULES))
    ap.add_argument("--json", default=None, help="also write the rows here")
    a = ap.parse_args(argv)
    print(BUDGET_HEADER, flush=True)
    rows = budget_cost(batches=[int(b) for b in a.batches.split(",")],
                       dtypes=a.dtypes.split(","), threads=[int(n) for n in a.threads.split(",")],
                       rules=a.rules.split(","), rounds=a.rounds, budget=a.value)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"budget": a.value, "rounds": a.rounds, "V": 151936, "gamma": 5,
                       "torch": torch.__version__, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
