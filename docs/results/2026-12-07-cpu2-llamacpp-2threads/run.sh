#!/bin/bash
# ours (q4) against llama.cpp at 2 threads on a quiet machine, 2 interleaved rounds.
cd /work/main
.venv/bin/python bench/llamacpp.py --threads 2 --prompts 2 --max-new-tokens 64 \
    --temps 0,1 --draft-max default,5 --draft-max-t1 default --rounds 2 --bench-reps 2 \
    --no-bench-drafter --our-configs verifier,spec-greedy,spec-t1,spec-greedy-goodput-conf,spec-t1-goodput-conf \
    --ours-commit $(git rev-parse HEAD) --out /work/runs/llamacpp2
