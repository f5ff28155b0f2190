"""End to end with bf16, int8 and q4 weights: ``speccascade bench --weights W`` once per weights
setting, each in a process of its own (so that each one's peak resident memory is its own),
then one table.

    python bench/bench_quant_e2e.py --out docs/results/DATE-cpu2-quant-e2e
    python bench/bench_quant_e2e.py --weights q4,bf16 --prompts 2 --max-new-tokens 32 \\
        --passes 2 --out /tmp/q

Each process runs our verifier alone and lossless ``spec`` greedy at batch 1 (no HF rows),
``--rounds`` interleaved rounds inside it. ``--passes 2`` runs the weights settings a second
time in reverse order (bf16, int8, q4, q4, int8, bf16), so that a drift of the machine's speed
over the run biases no setting; a setting's figures are then its totals over its passes.
The table gives tok/s, tokens per verifier call, the speed-up of spec over the verifier alone
(same process), each setting's speed relative to bf16, the greedy outputs' agreement with the
same weights' verifier alone, and the peak resident memory (VmHWM: loading plus decoding) of
each process. The load average before and after each process says how busy the machine was.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def loadavg() -> list[float] | None:
    try:
        return [float(v) for v in open("/proc/loadavg").read().split()[:3]]
    except OSError:
        return None


def run_one(weights: str, out: pathlib.Path, args) -> dict:
    cmd = [sys.executable, "-m", "speccascade_fast", "bench", "--weights", weights,
           "--batch", "1", "--no-hf", "--configs", "verifier,spec-greedy",
           "--prompts", str(args.prompts), "--max-new-tokens", str(args.max_new_tokens),
           "--rounds", str(args.rounds), "--out", str(out)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    before, t0 = loadavg(), time.time()
    print(f"[bench_quant_e2e] {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    with open(out.with_suffix(".log"), "w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    data = json.loads((out / "e2e.json").read_text())
    data["process"] = {"loadavg_before": before, "loadavg_after": loadavg(),
                       "wall_s": round(time.time() - t0, 1)}
    (out / "e2e.json").write_text(json.dumps(data, indent=1))
    return data


def summarize(runs: dict[str, list[dict]]) -> list[dict]:
    out = []
    for weights, datas in runs.items():
        tot = {}
        for data in datas:
            for row in data["rows"]:
                t = tot.setdefault(row["name"], {"tokens": 0, "wall_s": 0.0, "calls": 0})
                t["tokens"] += row["tokens"]
                t["wall_s"] += row["wall_s"]
                t["calls"] += row["verifier_calls"] or 0
        v, s = tot["ours:verifier"], tot["ours:spec greedy"]
        agree = [d["greedy_agreement"].get("ours:spec greedy (batch 1)") for d in datas]
        out.append({
            "weights": weights,
            "verifier_tok_s": round(v["tokens"] / v["wall_s"], 3),
            "spec_tok_s": round(s["tokens"] / s["wall_s"], 3),
            "spec_vs_verifier": round((s["tokens"] / s["wall_s"]) / (v["tokens"] / v["wall_s"]),
                                      3),
            "tokens_per_verifier_call": round(s["tokens"] / s["calls"], 3),
            "greedy_agreement": ", ".join(a for a in agree if a),
            "peak_rss_mib": max(d["memory"]["peak_rss_mib"] for d in datas),
            "rss_end_mib": max(d["memory"]["rss_mib"] for d in datas),
            "loadavg": [d["process"]["loadavg_before"] for d in datas]
                       + [datas[-1]["process"]["loadavg_after"]],
            "wall_s": sum(d["process"]["wall_s"] for d in datas)})
    base = next((d for d in out if d["weights"] == "bf16"), None)
    for d in out:
        if base is not None:
            d["verifier_vs_bf16"] = round(d["verifier_tok_s"] / base["verifier_tok_s"], 3)
            d["spec_vs_bf16"] = round(d["spec_tok_s"] / base["spec_tok_s"], 3)
    return out


def markdown(rows: list[dict]) -> str:
    cols = [("weights", "weights"), ("verifier_tok_s", "verifier alone, tok/s"),
            ("spec_tok_s", "spec greedy, tok/s"), ("spec_vs_verifier", "spec / verifier"),
            ("tokens_per_verifier_call", "tokens per verifier call"),
            ("verifier_vs_bf16", "verifier vs bf16"), ("spec_vs_bf16", "spec vs bf16"),
            ("greedy_agreement", "spec greedy = verifier greedy"),
            ("peak_rss_mib", "peak RSS, MiB"), ("rss_end_mib", "RSS at the end, MiB"),
            ("loadavg", "load average (1/5/15 min) before each process, after the last")]
    lines = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * len(cols)]
    for d in rows:
        cells = []
        for key, _ in cols:
            v = d.get(key)
            if key == "loadavg":
                v = "; ".join("/".join(f"{x:.1f}" for x in la) for la in v if la)
            cells.append("" if v is None else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--weights", default="bf16,int8,q4")
    p.add_argument("--prompts", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--passes", type=int, default=1, choices=(1, 2))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    order = args.weights.split(",")
    order = order + order[::-1] if args.passes == 2 else order
    runs: dict[str, list[dict]] = {w: [] for w in dict.fromkeys(order)}
    seen: dict[str, int] = {}
    for w in order:
        seen[w] = seen.get(w, 0) + 1
        folder = out / (w if args.passes == 1 else f"{w}-pass{seen[w]}")
        runs[w].append(run_one(w, folder, args))
    rows = summarize(runs)
    table = markdown(rows)
    print(table)
    (out / "summary.json").write_text(json.dumps(
        {"rows": rows, "settings": vars(args), "order": order,
         "cpu_count": os.cpu_count()}, indent=1))
    (out / "summary.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
