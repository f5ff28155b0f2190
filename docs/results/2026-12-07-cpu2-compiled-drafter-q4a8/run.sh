#!/bin/bash
# batch 1, q4a8: the drafter eager and torch.compile'd (one graph around the quantised
# modules), spec greedy at gamma 5 and 3, goodput (confidence) greedy and T = 1; 2 rounds
cd /tmp
PYTHONPATH=/work/wt-bench exec /work/main/.venv/bin/python -m speccascade_fast bench \
  --weights q4a8 --threads 2 --prompts 8 --max-new-tokens 32 --batch 1 --rounds 2 \
  --gamma 5 --warmup-tokens 16 --no-hf --compile-drafter \
  --configs verifier,spec-greedy,spec-greedy@g3,spec-greedy-goodput-conf,spec-t1-goodput-conf \
  --out /work/runs/compiled-q4a8  # (copied here afterwards)
