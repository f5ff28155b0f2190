#!/bin/bash
# The default pair with q4a8 weights: adaptive gamma (drafter-confidence predictor, warm
# controller) against fixed gamma (5 and 2) and no speculation, ours and HF generate, at batch
# 1/4/8/16, greedy and T = 1, one interleaved run (2 rounds), quiet machine. Runs from a
# worktree at the commit under test, so edits to /work/main do not reach it.
cd /tmp
PYTHONPATH=/work/wt-bench exec /work/main/.venv/bin/python -m speccascade_fast bench \
  --weights q4a8 --threads 2 --prompts 16 --max-new-tokens 32 --batch 4 8 16 --rounds 2 \
  --gamma 5 --alpha 0.3 --warmup-tokens 16 --per-config-rss \
  --configs verifier,spec-greedy,spec-greedy@g2,spec-greedy-goodput-conf,spec-t1,spec-t1@g2,spec-t1-goodput-conf,token_v3-t1,token_v3-t1@g2,token_v3-t1-goodput-conf \
  --out /work/runs/batches-q4a8
