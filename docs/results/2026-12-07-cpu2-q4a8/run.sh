#!/bin/bash
# q4a8 measurements on a quiet machine (the WMT14 job paused for the whole script)
WMT=$(pgrep -f "speccascade_fast.cli eval")
[ -n "$WMT" ] && kill -STOP $WMT
trap '[ -n "$WMT" ] && kill -CONT $WMT' EXIT
cd "$(git rev-parse --show-toplevel)"
mkdir -p runs/q4a8
sleep 10
echo "start $(date -u +%FT%TZ) load $(cut -d' ' -f1-3 /proc/loadavg)"
.venv/bin/python bench/bench_quant.py --threads 2 --a8 --rounds 3 --pool-mib 192 --no-precision \
    --out runs/q4a8/kernels > runs/q4a8/kernels.log 2>&1
echo "kernels done $(date -u +%FT%TZ)"
.venv/bin/python bench/quant_agreement.py --prompts 4 --new-tokens 64 --weights q4,q4a8 \
    --out runs/q4a8/agreement > runs/q4a8/agreement.log 2>&1
echo "agreement done $(date -u +%FT%TZ)"
rm -rf runs/q4a8/llamacpp
.venv/bin/python bench/llamacpp.py --threads 2 --prompts 2 --max-new-tokens 64 \
    --temps 0,1 --draft-max default --draft-max-t1 default --rounds 2 --bench-reps 2 \
    --no-bench-drafter --our-weights q4,q4a8 \
    --our-configs verifier,spec-greedy,spec-greedy-goodput-conf,spec-t1-goodput-conf \
    --ours-commit b5cf587 --out runs/q4a8/llamacpp > runs/q4a8/llamacpp.log 2>&1
echo "llamacpp done $(date -u +%FT%TZ) load $(cut -d' ' -f1-3 /proc/loadavg)"
