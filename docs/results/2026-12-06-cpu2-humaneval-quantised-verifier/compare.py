"""The paired comparison of this folder's README: pass@1 of the verifier with q4 and int8 weights,
each against bf16 on the problems both runs have (run from this folder)."""
import json
import math
from pathlib import Path

from scipy.stats import binomtest

HERE = Path(__file__).parent
WEIGHTS = ("bf16", "q4", "int8")


def load(weights: str) -> dict:
    rows = (json.loads(line) for line in open(HERE / weights / "rows.jsonl"))
    return {r["example_id"]: r for r in rows}


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    p, d = k / n, 1 + z * z / n
    centre = (p + z * z / (2 * n)) / d
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return centre - half, centre + half


def passed(row: dict) -> int:
    return int(row["scoring"]["passed"])


runs = {w: load(w) for w in WEIGHTS}


def order(example_id: str) -> int:
    return int(example_id.split("/")[1])


for w in WEIGHTS:
    ids = sorted(runs[w], key=order)
    n, k = len(ids), sum(passed(runs[w][e]) for e in ids)
    lo, hi = wilson(k, n)
    print(f"{w}: {k}/{n} = {100 * k / n:.1f} % (Wilson 95 % CI {100 * lo:.1f}-{100 * hi:.1f}; "
          f"{ids[0]} .. {ids[-1]})")
pvalues = {}
for w in ("q4", "int8"):  # paired with bf16 on the problems both runs have
    common = sorted(set(runs[w]) & set(runs["bf16"]), key=order)
    n = len(common)
    diff = [passed(runs[w][e]) - passed(runs["bf16"][e]) for e in common]
    better, worse = sum(d > 0 for d in diff), sum(d < 0 for d in diff)
    mean = sum(diff) / n
    se = math.sqrt(sum((d - mean) ** 2 for d in diff) / (n - 1) / n)
    pvalues[w] = binomtest(better, better + worse).pvalue if better + worse else 1.0
    same = sum(runs[w][e]["output_sha"] == runs["bf16"][e]["output_sha"] for e in common)
    print(f"{w} - bf16 (n = {n}): {100 * mean:+.2f} +- {100 * se:.2f} points, 95 % CI "
          f"[{100 * (mean - 1.96 * se):+.1f}, {100 * (mean + 1.96 * se):+.1f}], better {better} "
          f"worse {worse}, McNemar p {pvalues[w]:.3f}, identical outputs {same}/{n}")
ranked = sorted(pvalues.items(), key=lambda kv: kv[1])
holm, running = {}, 0.0
for i, (w, p) in enumerate(ranked):
    running = max(running, min(1.0, p * (len(ranked) - i)))
    holm[w] = running
print("Holm-adjusted:", holm)
