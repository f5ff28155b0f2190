#!/bin/bash
# Ours (q4a8, Q5_0/Q6_K as a nibble plus bit planes) against llama.cpp,
# the protocol of ../2026-12-07-cpu2-llamacpp-q4a8-v2/ (section 3 of ../2026-12-07-cpu2-q4a8/), on a quiet machine (any WMT14 quality
# job paused for the whole script). Run from the repository root: bash run.sh [SUBFOLDER]
# (default llamacpp; llamacpp-rows2 holds the rerun after the two-rows-per-block change).
JOBS=$(pgrep -f "speccascade eval")
[ -n "$JOBS" ] && kill -STOP $JOBS
trap '[ -n "$JOBS" ] && kill -CONT $JOBS' EXIT
cd "$(git rev-parse --show-toplevel)"
OUT=docs/results/2026-12-07-cpu2-q5q6-planes
SUB=${1:-llamacpp}
mkdir -p runs
sleep 10
echo "start $(date -u +%FT%TZ) load $(cut -d' ' -f1-3 /proc/loadavg)"
rm -rf runs/$SUB
.venv/bin/python bench/llamacpp.py --threads 2 --prompts 2 --max-new-tokens 64 \
    --temps 0,1 --draft-max default --draft-max-t1 default --rounds 2 --bench-reps 2 \
    --no-bench-drafter --our-weights q4a8 \
    --our-configs verifier,spec-greedy,spec-greedy-goodput-conf,spec-t1-goodput-conf \
    --ours-commit "$(git rev-parse --short HEAD)" --out runs/$SUB > runs/$SUB.log 2>&1
echo "done $(date -u +%FT%TZ) load $(cut -d' ' -f1-3 /proc/loadavg)"
cp -r runs/$SUB/. "$OUT/$SUB/"
