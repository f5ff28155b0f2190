"""Microbenchmark of the quantised matmul kernels at the default pair's shapes, and the precision
of PyTorch's int4 path on the real Q4_K blocks.

    python bench/bench_quant.py --out docs/results/DATE-cpu2-quant-kernels
    python bench/bench_quant.py --shapes 1.5b --rows 1,6 --threads 1 --pool-mib 256

Kernels, each ``y[M, N] = x[M, K] W^T`` with bf16 activations and outputs:

* ``bf16``         ``F.linear`` on a dense bf16 weight (oneDNN);
* ``torch-int8``   ``aten._weight_int8pack_mm``: int8, one bf16 scale per output channel;
* ``torch-int4``   ``aten._weight_int4pack_mm_for_cpu``: 4-bit codes, groups of 32, bf16 scale
  and zero point per group (``aten._convert_weight_to_int4pack_for_cpu`` layout);
* ``ours-Q4_K``, ``ours-Q6_K``, ``ours-Q5_0``, ``ours-Q8_0``, ``ours-int8``: our kernel
  (speccascade_fast/quant/qmatmul.cpp) on each GGUF block type as the loader keeps it (Q5_0 and
  Q6_K: a nibble plus one or two bit planes; K-quants only where K is a multiple of 256, as in
  the GGUF files);
* ``ours-*-a8`` (with ``--a8``): the same weights with int8 activations (``weights="q4a8"``:
  activations quantised per block of 32 inside the call, integer dot products: AVX-512 VNNI,
  or AVX2 + FMA).

Every call reads a different weight of a pool of at least ``--pool-mib`` per kernel (larger
than the last-level cache), as a decoding step streams the model's weights from memory;
``--hot`` also times one weight over and over (cache-resident). Kernels are interleaved:
each of ``--rounds`` rounds passes once through every kernel's pool (in reverse order every
other round); a figure is the median of all its timed calls (robust to a busy machine's
preemptions; the 10th and 90th percentiles are in the JSON). GB/s counts the weight bytes each
kernel reads (codes, scales, offsets) per call.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from speccascade_fast.quant import formats, kernels  # noqa: E402

SHAPES = {  # (name, N, K)
    "0.5b": [("q/o proj", 896, 896), ("k/v proj", 128, 896), ("gate/up", 4864, 896),
             ("down", 896, 4864), ("lm_head", 151936, 896)],
    "1.5b": [("q/o proj", 1536, 1536), ("k/v proj", 256, 1536), ("gate/up", 8960, 1536),
             ("down", 1536, 8960), ("lm_head", 151936, 1536)],
}


def _rand_q(kind: str, N: int, K: int, g: torch.Generator) -> formats.QuantizedWeight:
    r = lambda *s: torch.rand(*s, generator=g) * 1e-3 + 1e-4
    ints = lambda lo, hi, *s, dt=torch.int8: torch.randint(lo, hi, s, generator=g, dtype=dt)
    if kind == "Q4_K":
        return formats.QuantizedWeight(kind, 4, 32, 8, N, K, ints(0, 256, N, K // 2,
                                                                  dt=torch.uint8),
                                       r(N, K // 256), sc=ints(0, 64, N, K // 32),
                                       Mn=r(N, K // 256), mq=ints(0, 64, N, K // 32))
    if kind in ("Q6_K", "Q5_0"):
        bits = 6 if kind == "Q6_K" else 5
        codes, qh = formats.pack_nibbles(ints(0, 1 << bits, N, K, dt=torch.uint8).numpy(), bits)
        codes, qh = torch.from_numpy(codes), torch.from_numpy(qh)
        if kind == "Q6_K":
            return formats.QuantizedWeight(kind, 6, 16, 16, N, K, codes, r(N, K // 256),
                                           sc=ints(-128, 128, N, K // 16), qh=qh, z=32)
        return formats.QuantizedWeight(kind, 5, 32, 1, N, K, codes, r(N, K // 32), qh=qh, z=16)
    if kind == "Q8_0":
        return formats.QuantizedWeight(kind, 8, 32, 1, N, K, ints(-128, 128, N, K), r(N, K // 32))
    if kind == "int8":
        return formats.QuantizedWeight(kind, 8, 32, K // 32, N, K, ints(-127, 128, N, K),
                                       r(N, 1))
    raise ValueError(kind)


def _nbytes(objs) -> int:
    return sum(t.numel() * t.element_size() for t in objs)


def make_kernel(name: str, N: int, K: int, g: torch.Generator):
    """``(weight bytes, call(x) -> y)`` for one fresh random weight of kernel ``name``."""
    if name == "bf16":
        w = torch.randn(N, K, generator=g, dtype=torch.bfloat16)
        return _nbytes([w]), lambda x: F.linear(x, w)
    if name == "torch-int8":
        w = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
        s = (torch.rand(N, generator=g) * 1e-2).bfloat16()
        return _nbytes([w, s]), lambda x: torch.ops.aten._weight_int8pack_mm(x, w, s)
    if name == "torch-int4":
        q = torch.randint(0, 16, (N, K), generator=g, dtype=torch.int32)
        w = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        del q
        sz = (torch.rand(K // 32, N, 2, generator=g) * 1e-2).bfloat16()
        return _nbytes([w, sz]), lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, w, 32,
                                                                                      sz)
    kind = name.removeprefix("ours-")
    a8 = kind.endswith("-a8")
    qw = _rand_q(kind.removesuffix("-a8"), N, K, g)
    return qw.nbytes, lambda x: kernels.matmul(x, qw, int8_activations=a8)


def kernels_for(K: int, a8: bool = False) -> list[str]:
    names = ["bf16", "torch-int8", "torch-int4", "ours-int8", "ours-Q5_0", "ours-Q8_0"]
    if K % 256 == 0:
        names += ["ours-Q4_K", "ours-Q6_K"]
    if a8:  # the same formats with int8 activations
        names += [n + "-a8" for n in names if n.startswith("ours-")]
    return names


def bench_shape(N: int, K: int, rows: list[int], rounds: int, pool_bytes: int, hot: bool,
                progress, a8: bool = False) -> list[dict]:
    g = torch.Generator().manual_seed(N * 7 + K)
    names = kernels_for(K, a8)
    pools = {}
    for name in names:
        nbytes, first = make_kernel(name, N, K, g)
        count = max(2, -(-pool_bytes // nbytes))
        pools[name] = (nbytes, [first] + [make_kernel(name, N, K, g)[1] for _ in range(count - 1)])
    out = []
    for M in rows:
        x = torch.randn(M, K, generator=g).bfloat16()
        per = {name: [] for name in names}
        for name in names:  # warm-up: one pass each (page faults, the kernel's first build)
            for f in pools[name][1]:
                f(x)
        for r in range(rounds):
            for name in (names if r % 2 == 0 else names[::-1]):
                times = per[name]
                for f in pools[name][1]:
                    t0 = time.perf_counter()
                    f(x)
                    times.append(time.perf_counter() - t0)
        hot_us = {}
        if hot:
            for name in names:
                f = pools[name][1][0]
                ts = []
                for _ in range(max(9, rounds * 5)):
                    t0 = time.perf_counter()
                    f(x)
                    ts.append(time.perf_counter() - t0)
                hot_us[name] = statistics.median(ts) * 1e6
        for name in names:
            times = sorted(per[name])
            us = statistics.median(times) * 1e6
            d = {"N": N, "K": K, "M": M, "kernel": name, "weight_bytes": pools[name][0],
                 "us": round(us, 1), "GB_s": round(pools[name][0] / us / 1e3, 2),
                 "us_p10": round(times[len(times) // 10] * 1e6, 1),
                 "us_p90": round(times[len(times) * 9 // 10] * 1e6, 1),
                 "calls": len(times), "pool": len(pools[name][1])}
            if hot:
                d["hot_us"] = round(hot_us[name], 1)
            out.append(d)
            progress(f"N={N} K={K} M={M} {name:11s} {us:9.1f} us {d['GB_s']:6.2f} GB/s"
                     + (f" (hot {hot_us[name]:.1f} us)" if hot else ""))
    return out


def precision(progress) -> list[dict]:
    """For every Q4_K and Q6_K tensor of the default verifier's GGUF blocks (the loader's cache):
    how far PyTorch's kernels' weights are from the exact de-quantisation (ours: 0), and, for
    scale, the bf16 dense model's own rounding."""
    from speccascade_fast import models
    from speccascade_fast.quant import load

    folder = models.cache_dir() / models.DEFAULT_VERIFIER
    weights = load.gguf_weights(folder, models.cache_dir(), models.gguf_file, True)
    out = []
    for name, qw in weights.items():
        if qw.kind not in ("Q4_K", "Q6_K"):
            continue
        exact = formats.dequantize(qw)
        if qw.kind == "Q4_K":  # aten's int4: (q - 8) * bf16(s) + bf16(8 s - o)
            s, o = qw.scales_offsets()
            sb = s.bfloat16().float().repeat_interleave(32, 1)
            zb = (8 * s - o).bfloat16().float().repeat_interleave(32, 1)
            torch_w = (qw.unpacked_codes().float() - 8) * sb + zb
            what = "torch-int4 (bf16 scale and zero)"
        else:  # no PyTorch kernel reads Q6_K: re-quantised per channel
            i8 = formats.int8_per_channel(exact)
            torch_w = formats.dequantize(i8)
            what = "torch-int8 (per-channel re-quantisation)"
        bf16 = exact.bfloat16().float()
        scale = exact.abs().max().item()
        rms = exact.pow(2).mean().sqrt().item()
        d = {"tensor": name, "kind": qw.kind, "torch_path": what, "max_abs_w": scale,
             "torch_max_abs_err": (torch_w - exact).abs().max().item(),
             "torch_rms_err_rel": ((torch_w - exact).pow(2).mean().sqrt() / rms).item(),
             "bf16_max_abs_err": (bf16 - exact).abs().max().item(),
             "bf16_rms_err_rel": ((bf16 - exact).pow(2).mean().sqrt() / rms).item()}
        out.append(d)
    progress(f"precision: {len(out)} tensors")
    return out


def precision_markdown(rows: list[dict]) -> str:
    lines = ["| kind | tensors | PyTorch path | max abs error / max abs weight (worst tensor) | "
             "RMS error / RMS weight (mean) | bf16 dense: max abs error / max abs weight | "
             "bf16 dense: RMS error / RMS weight |", "|---|---|---|---|---|---|---|"]
    for kind in ("Q4_K", "Q6_K"):
        rs = [r for r in rows if r["kind"] == kind]
        if not rs:
            continue
        lines.append(
            f"| {kind} | {len(rs)} | {rs[0]['torch_path']} | "
            f"{max(r['torch_max_abs_err'] / r['max_abs_w'] for r in rs):.2e} | "
            f"{statistics.mean(r['torch_rms_err_rel'] for r in rs):.2e} | "
            f"{max(r['bf16_max_abs_err'] / r['max_abs_w'] for r in rs):.2e} | "
            f"{statistics.mean(r['bf16_rms_err_rel'] for r in rs):.2e} |")
    return "\n".join(lines)


def markdown(results: list[dict], shapes: dict) -> str:
    names = ["bf16", "torch-int8", "torch-int4", "ours-int8", "ours-Q5_0", "ours-Q8_0",
             "ours-Q4_K", "ours-Q6_K"]
    names += [n + "-a8" for n in names if n.startswith("ours-")
              and any(r["kernel"] == n + "-a8" for r in results)]
    lines = ["| model | matrix | N x K | M | " + " | ".join(names) + " |",
             "|---|---|---|---|" + "---|" * len(names)]
    label = {(N, K): (m, n) for m, lst in shapes.items() for n, N, K in lst}
    for (N, K, M) in dict.fromkeys((r["N"], r["K"], r["M"]) for r in results):
        cells = []
        for name in names:
            r = next((r for r in results if (r["N"], r["K"], r["M"], r["kernel"])
                      == (N, K, M, name)), None)
            cells.append("" if r is None else f"{r['us']:.0f} µs, {r['GB_s']:.1f} GB/s")
        model, what = label.get((N, K), ("", ""))
        lines.append(f"| {model} | {what} | {N} x {K} | {M} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="0.5b,1.5b", help="comma-separated: 0.5b, 1.5b")
    p.add_argument("--rows", default="1,6", help="activation rows M (default: 1,6)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--pool-mib", type=int, default=512,
                   help="bytes of distinct weights each kernel cycles through (default: 512)")
    p.add_argument("--hot", action="store_true", help="also time one cache-resident weight")
    p.add_argument("--a8", action="store_true",
                   help="also our kernels with int8 activations (needs AVX-512 VNNI or AVX2)")
    p.add_argument("--no-precision", action="store_true",
                   help="skip the precision table (it needs the default verifier's GGUF)")
    p.add_argument("--out", default=None, help="folder for kernels.json and kernels.md")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not kernels.ours_available():
        print(f"our kernels are unavailable: {kernels.BUILD_ERROR}", file=sys.stderr)
        return 1
    if args.a8 and not kernels.has_int8_activations():
        print("--a8: int8 activations need AVX-512 VNNI or AVX2", file=sys.stderr)
        return 1
    say = lambda s: print(s, file=sys.stderr, flush=True)
    shapes = {k: SHAPES[k] for k in args.shapes.split(",")}
    rows = [int(r) for r in args.rows.split(",")]
    t0 = time.time()
    results = []
    for lst in shapes.values():
        for _, N, K in lst:
            results += bench_shape(N, K, rows, args.rounds, args.pool_mib << 20, args.hot, say,
                                   args.a8)
    prec = [] if args.no_precision else precision(say)
    try:
        load = open("/proc/loadavg").read().split()[:3]
    except OSError:
        load = None
    meta = {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                        "torch": torch.__version__, "threads": torch.get_num_threads(),
                        "avx512": kernels.has_avx512(),
                        "int8_activations": kernels.has_int8_activations(),
                        "path": kernels.vector_path(),
                        "date": time.strftime("%Y-%m-%d"),
                        "loadavg_at_end": load},
            "settings": vars(args), "elapsed_s": round(time.time() - t0)}
    table = markdown(results, shapes)
    if prec:
        table += "\n\n" + precision_markdown(prec)
    print(table)
    if args.out:
        out = pathlib.Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "kernels.json").write_text(json.dumps({**meta, "results": results,
                                                      "precision": prec}, indent=1))
        (out / "kernels.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
