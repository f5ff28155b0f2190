#!/usr/bin/env bash
# End to end, batch 1, weights q4a8: the quantised kernel before (commit 7d81f40) and after the
# vectorised group factors, in alternating processes (A B B A A B), each `speccascade bench` on
# the same prompts. Run from the repository root on a quiet machine:
#   bash docs/results/2026-12-07-cpu2-qmatmul-factors/run.sh
# It measures the kernel change at commit 34e5a10 only (check that out first): from 86c4744 on a
# layer keeps the kernel function of its prepared call, so step_ab.py's library swap no longer
# switches kernels, and the working tree's kernel is a later one.
set -euo pipefail
OUT=docs/results/2026-12-07-cpu2-qmatmul-factors
PY=${PY:-.venv/bin/python}
git show 7d81f40:speccascade_fast/quant/qmatmul.cpp > /tmp/qmatmul-before.cpp
cp speccascade_fast/quant/qmatmul.cpp /tmp/qmatmul-after.cpp
run() {  # $1: before|after, $2: round
  "$PY" - "$1" "$2" "$OUT" <<'PY'
import pathlib, sys
import speccascade_fast.quant.kernels as k
which, rnd, out = sys.argv[1:]
k.SOURCE = pathlib.Path(f"/tmp/qmatmul-{which}.cpp")  # built on first use, keyed by its bytes
from speccascade_fast.cli import main
sys.exit(main(["bench", "--weights", "q4a8", "--threads", "2", "--prompts", "2",
               "--max-new-tokens", "64", "--batch", "1", "--no-hf", "--rounds", "1",
               "--configs", "verifier,drafter,spec-greedy-goodput-conf,spec-t1-goodput-conf",
               "--out", f"{out}/{which}-r{rnd}"]))
PY
}
for r in 1 2 3; do
  if [ $((r % 2)) = 1 ]; then run before $r; run after $r; else run after $r; run before $r; fi
done
# the same two builds inside one process, one decoding step of the 1.5B at a time
"$PY" "$OUT/step_ab.py" | tee "$OUT/step_ab.txt"
