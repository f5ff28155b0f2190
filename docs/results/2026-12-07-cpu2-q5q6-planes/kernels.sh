#!/bin/bash
# The kernel microbenchmark at the pair's shapes (2 threads, int8 activations too), any WMT14
# quality job paused for the whole script. Run from the repository root.
JOBS=$(pgrep -f "speccascade eval")
[ -n "$JOBS" ] && kill -STOP $JOBS
trap '[ -n "$JOBS" ] && kill -CONT $JOBS' EXIT
sleep 5
.venv/bin/python bench/bench_quant.py --shapes 0.5b,1.5b --rows 1,6 --threads 2 --rounds 3 \
    --pool-mib 256 --a8 --no-precision --out docs/results/2026-12-07-cpu2-q5q6-planes/kernels
