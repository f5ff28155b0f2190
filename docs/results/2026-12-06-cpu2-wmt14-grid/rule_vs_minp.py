"""token_v3 against the verifier with min-p truncation at the matched threshold (min_p = 1 - α),
on the sentences both have rows for: corpus BLEU of each and the paired bootstrap over segments
(2,000 resamples, the summary's method: per-segment sacrebleu statistics summed over resampled
segments; two-sided p = share of centred replicates at least as far from 0 as Δ), Holm over the
pairs compared here. Reads rows.jsonl beside this file; prints a markdown table.

    python docs/results/2026-12-06-cpu2-wmt14-grid/rule_vs_minp.py
"""
import json
import pathlib

import numpy as np

from speccascade_fast.eval.summary import holm
from speccascade_fast.eval.tasks import get_task

HERE = pathlib.Path(__file__).parent
PAIRS = [("spec_cascade/token_v3/alpha=0.0", "autoregressive/min_p=1.0"),
         ("spec_cascade/token_v3/alpha=0.1", "autoregressive/min_p=0.9"),
         ("spec_cascade/token_v3/alpha=0.3", "autoregressive/min_p=0.7"),
         ("spec_cascade/token_v3/alpha=0.5", "autoregressive/min_p=0.5")]
REPS, SEED = 2000, 0


def main() -> None:
    task = get_task("wmt14")
    rows: dict[str, dict[str, dict]] = {}
    for line in (HERE / "rows.jsonl").read_text().splitlines():
        r = json.loads(line)
        rows.setdefault(r["config"], {})[r["example_id"]] = r
    out = []
    for rule, base in PAIRS:
        if rule not in rows or base not in rows:
            continue
        ids = sorted(set(rows[rule]) & set(rows[base]), key=lambda e: rows[base][e]["example_index"])
        stats = {k: np.asarray(task.segment_stats([rows[k][e]["scoring"] for e in ids]),
                               dtype=np.float64) for k in (rule, base)}
        point = {k: float(task.score_from_stats(stats[k].sum(0))) for k in stats}
        rng = np.random.default_rng(SEED)
        idx = rng.integers(0, len(ids), size=(REPS, len(ids)))
        counts = np.stack([np.bincount(i, minlength=len(ids)) for i in idx]).astype(np.float64)
        rep = {k: np.array([task.score_from_stats(t) for t in counts @ stats[k]]) for k in stats}
        d = rep[rule] - rep[base]
        diff = point[rule] - point[base]
        p = (1 + int(np.sum(np.abs(d - d.mean()) >= abs(diff)))) / (1 + REPS)
        out.append({"rule": rule, "base": base, "n": len(ids), "bleu_rule": point[rule],
                    "bleu_base": point[base], "diff": diff, "se": float(np.std(d, ddof=1)),
                    "ci": [float(np.quantile(d, 0.025)), float(np.quantile(d, 0.975))], "p": p})
    for o, ph in zip(out, holm([o["p"] for o in out])):
        o["p_holm"] = ph
    print("| token_v3 | min-p baseline | n | BLEU token_v3 | BLEU min-p | Δ | ± SE | 95 % CI | p "
          "| Holm p |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for o in out:
        print(f"| `{o['rule']}` | `{o['base']}` | {o['n']} | {o['bleu_rule']:.2f} | "
              f"{o['bleu_base']:.2f} | {o['diff']:+.2f} | {o['se']:.2f} | "
              f"[{o['ci'][0]:+.2f}, {o['ci'][1]:+.2f}] | {o['p']:.4f} | {o['p_holm']:.4f} |")
    (HERE / "rule_vs_minp.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
