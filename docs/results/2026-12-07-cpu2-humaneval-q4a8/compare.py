"""The paired comparisons of this folder's README: pass@1 of the verifier with q4a8 weights
(this folder's q4a8/, and q4a8-planes/: the same weights after Q6_K moved to bit planes, when
present) against bf16 and q4 (../2026-12-06-cpu2-humaneval-quantised-verifier/), and the two
q4a8 runs against each other, on the problems every run has; Holm over the comparisons (run
from anywhere)."""
import importlib.util
import json
import math
from pathlib import Path

from scipy.stats import binomtest

HERE = Path(__file__).parent
EARLIER = HERE.parent / "2026-12-06-cpu2-humaneval-quantised-verifier"
FOLDERS = {"bf16": EARLIER / "bf16", "q4": EARLIER / "q4", "q4a8": HERE / "q4a8"}
if (HERE / "q4a8-planes" / "rows.jsonl").is_file():
    FOLDERS["q4a8-planes"] = HERE / "q4a8-planes"
PAIRS = [(a, b) for a in FOLDERS if a.startswith("q4a8") for b in ("bf16", "q4")]
PAIRS += [("q4a8-planes", "q4a8")] if "q4a8-planes" in FOLDERS else []


def _earlier():  # the earlier folder's row reading and Wilson interval, run on its own rows
    spec = importlib.util.spec_from_file_location("earlier_compare", EARLIER / "compare.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_E = _earlier()
wilson, passed, order = _E.wilson, _E.passed, _E.order


def load(folder: Path) -> dict:
    return _E.load(folder.name) if folder.parent == EARLIER else {
        r["example_id"]: r for r in (json.loads(line) for line in open(folder / "rows.jsonl"))}


runs = {w: load(f) for w, f in FOLDERS.items()}
common = sorted(set.intersection(*(set(r) for r in runs.values())), key=order)
print(f"problems all {len(runs)} runs have: {len(common)} ({common[0]} .. {common[-1]})")
for w, run in runs.items():
    n, k = len(common), sum(passed(run[e]) for e in common)
    lo, hi = wilson(k, n)
    print(f"{w}: {k}/{n} = {100 * k / n:.1f} % (Wilson 95 % CI {100 * lo:.1f}-{100 * hi:.1f})")
pvalues = {}
for name, base in PAIRS:  # paired on the common problems
    a, b = runs[name], runs[base]
    n = len(common)
    diff = [passed(a[e]) - passed(b[e]) for e in common]
    better, worse = sum(d > 0 for d in diff), sum(d < 0 for d in diff)
    mean = sum(diff) / n
    se = math.sqrt(sum((d - mean) ** 2 for d in diff) / (n - 1) / n)
    pvalues[f"{name} - {base}"] = (binomtest(better, better + worse).pvalue if better + worse
                                   else 1.0)
    same = sum(a[e]["output_sha"] == b[e]["output_sha"] for e in common)
    print(f"{name} - {base} (n = {n}): {100 * mean:+.2f} +- {100 * se:.2f} points, 95 % CI "
          f"[{100 * (mean - 1.96 * se):+.1f}, {100 * (mean + 1.96 * se):+.1f}], better {better} "
          f"worse {worse}, McNemar p {pvalues[f'{name} - {base}']:.3f}, identical outputs "
          f"{same}/{n}")
ranked = sorted(pvalues.items(), key=lambda kv: kv[1])
holm, running = {}, 0.0
for i, (w, p) in enumerate(ranked):
    running = max(running, min(1.0, p * (len(ranked) - i)))
    holm[w] = running
print("Holm-adjusted:", holm)
