"""Markdown table of bench/bench_verify.py (CPU) or bench/bench_verify_gpu.py results, for
docs/benchmarks.md and docs/results/ (and of bench/bench_sample_gpu.py's drafter sampler and
top-p keep bounds, when the JSON holds them).

    pytest bench/bench_verify.py --benchmark-only --benchmark-json=out.json
    python bench/report.py out.json [--stat median|min] > table.md
    pytest bench/bench_verify_gpu.py --benchmark-only --benchmark-json=gpu.json
    python bench/report.py gpu.json --stat gpu_us > table.md

One row per (rule, shape, backend): time in µs (median and min of the host-synchronised calls),
effective GB/s (logit bytes read once / time), the time as a multiple of reading the logits once
at the measured memory bandwidth (CPU runs), and the speed-up over the reference and over the
eager chain of the same shape (ratios of the chosen statistic, median by default; ``gpu_us``: the
GPU benchmark's CUDA-event median without host synchronisation, shown as its own column).
"""
from __future__ import annotations

import argparse
import json
import sys

ORDER = {"cpu": 0, "cpu-cold": 1, "cpu-api": 2, "triton-graph": 3, "triton_wide-graph": 4,
         "cuda-graph": 5, "triton": 6, "cuda": 7, "eager": 8, "reference": 9}


def load(data: dict) -> tuple[list[dict], float | None]:
    """The verification rows of pytest-benchmark's JSON ``data`` and the measured bandwidth."""
    rows, bw = [], None
    for b in data["benchmarks"]:
        info = b.get("extra_info", {})
        if b.get("group") == "memory bandwidth":
            bw = info.get("mem_bw_gbs", bw)
            continue
        if "backend" not in info:
            continue
        bw = bw or info.get("mem_bw_gbs")
        rows.append({
            "rule": info["rule"], "B": info["B"], "gamma": info["gamma"], "V": info["V"],
            "backend": info["backend"], "dtype": info.get("dtype", "?"),
            "bytes": info["logit_bytes"], "bw": info.get("mem_bw_gbs"),
            "median": b["stats"]["median"], "min": b["stats"]["min"],
            "gpu_us": info["gpu_us"] * 1e-6 if "gpu_us" in info else None,
        })
    return rows, bw


SAMPLER_KINDS = {"sample": "sample", "keep_bounds": "keep bounds"}


def load_sampler(data: dict) -> list[dict]:
    """bench_sample_gpu.py's rows (``extra_info`` kind "sample": the drafter's draw, or
    "keep_bounds": top-p's keep bounds alone)."""
    return [dict(b["extra_info"], median=b["stats"]["median"]) for b in data["benchmarks"]
            if b.get("extra_info", {}).get("kind") in SAMPLER_KINDS]


def sampler_table(rows: list[dict]) -> str:
    """One row per (kind, R, V, top_p, impl): GPU µs, host-synchronised median µs, and the GPU
    time of the torch code run the same way (eager or graph) over this one."""
    out = ["| what | R | V | top_p | impl | GPU µs | median µs (host sync) | torch / this |",
           "|---" * 8 + "|"]
    by = {(r["kind"], r["R"], r["V"], r["top_p"], r["impl"]): r["gpu_us"] for r in rows}
    order = {"triton-graph": 0, "search-graph": 0, "torch-graph": 1, "triton": 2, "search": 2,
             "torch": 3}
    kinds = list(SAMPLER_KINDS)
    for r in sorted(rows, key=lambda r: (kinds.index(r["kind"]), r["R"], r["V"],
                                         r["top_p"] is not None, r["top_p"] or 0,
                                         order.get(r["impl"], 9))):
        mode = r["impl"].partition("-")[2]
        base = by.get((r["kind"], r["R"], r["V"], r["top_p"],
                       "torch" + ("-" + mode if mode else "")))
        speedup = "" if base is None else f"{base / r['gpu_us']:.1f}×"
        out.append(f"| {SAMPLER_KINDS[r['kind']]} | {r['R']} | {r['V']} | {r['top_p'] or '–'} | "
                   f"{r['impl']} | {r['gpu_us']:.1f} | {fmt_us(r['median'])} | {speedup} |")
    return "\n".join(out)


def fmt_us(seconds: float) -> str:
    us = seconds * 1e6
    return f"{us:,.0f}" if us >= 100 else f"{us:.1f}"


def ratio(a: float | None, b: float) -> str:
    return "" if a is None else f"{a / b:.1f}×"


def table(rows: list[dict], bw: float | None, stat: str = "median") -> str:
    out = []
    if bw:
        out.append(f"Measured read bandwidth: **{bw:.1f} GB/s** (torch.sum over 1 GiB of fp32). "
                   "'× read' = time / (logit bytes / bandwidth).\n")
    gpu = stat == "gpu_us"
    if gpu and any(r["gpu_us"] is None for r in rows):
        raise ValueError("--stat gpu_us needs bench_verify_gpu.py results (extra_info gpu_us)")
    out.append(f"| rule | B | γ | V | dtype | backend | median µs | min µs"
               f"{' | GPU µs' if gpu else ''} | GB/s ({stat}) | × read | vs reference | vs eager |")
    out.append("|---" * (13 if gpu else 12) + "|")
    key = lambda r: (r["rule"], r["B"], r["gamma"], r["V"])  # noqa: E731
    groups: dict = {}
    for r in rows:
        groups.setdefault(key(r), []).append(r)
    for k in sorted(groups, key=lambda k: (k[1], k[2], k[3], k[0])):
        g = groups[k]
        by = {r["backend"]: r[stat] for r in g}
        for r in sorted(g, key=lambda r: ORDER.get(r["backend"], 9)):
            t = r[stat]
            read = r["bytes"] / (r["bw"] or bw) / 1e9 if (r["bw"] or bw) else None
            out.append(
                f"| {r['rule']} | {r['B']} | {r['gamma']} | {r['V']} | {r['dtype']} | "
                f"{r['backend']} | {fmt_us(r['median'])} | {fmt_us(r['min'])} | "
                f"{fmt_us(t) + ' | ' if gpu else ''}{r['bytes'] / t / 1e9:.1f} | "
                f"{'' if read is None else f'{t / read:.1f}'} | "
                f"{ratio(by.get('reference'), t)} | {ratio(by.get('eager'), t)} |"
            )
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", help="pytest-benchmark --benchmark-json output")
    ap.add_argument("--stat", choices=["median", "min", "gpu_us"], default="median",
                    help="statistic for GB/s, '× read' and the ratios (default: median; gpu_us: "
                         "the GPU benchmark's CUDA-event time)")
    args = ap.parse_args(argv)
    with open(args.json) as f:
        data = json.load(f)
    rows, bw = load(data)
    sampler = load_sampler(data)
    if not rows and not sampler:
        print("no bench_verify or bench_sample_gpu results in " + args.json, file=sys.stderr)
        return 1
    if rows:
        try:
            print(table(rows, bw, args.stat))
        except ValueError as e:
            print(e, file=sys.stderr)
            return 2
    if sampler:
        print(("\n" if rows else "") + sampler_table(sampler))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
