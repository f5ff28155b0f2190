"""Hugging Face's ensemble mode against ours (run.py's two folders): pass@1 of each with its
Wilson CI, the difference on the problems both have (paired by problem; the random streams
differ, so this is not a common-random-numbers pairing) with a normal CI and McNemar's exact
test, and the new tokens per problem.

    python compare.py /work/runs/ensemble-hf
"""
import json
import math
import sys
from pathlib import Path

from scipy.stats import binomtest


def load(folder: Path) -> dict:
    return {r["example_id"]: r for r in map(json.loads, open(folder / "rows.jsonl"))}


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    p, d = k / n, 1 + z * z / n
    centre = (p + z * z / (2 * n)) / d
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return centre - half, centre + half


def mean_ci(xs: list[float]) -> tuple[float, float, float]:
    n = len(xs)
    m = sum(xs) / n
    se = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1) / n) if n > 1 else 0.0
    return m, m - 1.96 * se, m + 1.96 * se


root = Path(sys.argv[1] if len(sys.argv) > 1 else "/work/runs/ensemble-hf")
ours, hf = load(root / "ours"), load(root / "hf")
common = [e for e in ours if e in hf]
n = len(common)
for name, rows in (("ours", ours), ("hf", hf)):
    k = sum(bool(rows[e]["scoring"]["passed"]) for e in common)
    lo, hi = wilson(k, n)
    m, tlo, thi = mean_ci([rows[e]["new_tokens"] for e in common])
    print(f"{name}: pass@1 {k}/{n} = {100 * k / n:.1f} % (Wilson 95 % CI {100 * lo:.1f}-"
          f"{100 * hi:.1f}); new tokens per problem {m:.1f} (95 % CI {tlo:.1f}-{thi:.1f})")
d = [int(hf[e]["scoring"]["passed"]) - int(ours[e]["scoring"]["passed"]) for e in common]
m, lo, hi = mean_ci(d)
better, worse = sum(x > 0 for x in d), sum(x < 0 for x in d)
p = binomtest(better, better + worse).pvalue if better + worse else 1.0
print(f"hf - ours (n = {n}): {100 * m:+.1f} points, 95 % CI [{100 * lo:+.1f}, {100 * hi:+.1f}]; "
      f"hf better on {better}, worse on {worse}; McNemar exact p = {p:.3f}")
t = [hf[e]["new_tokens"] - ours[e]["new_tokens"] for e in common]
m, lo, hi = mean_ci(t)
print(f"new tokens hf - ours: {m:+.1f} (95 % CI {lo:+.1f} to {hi:+.1f})")
