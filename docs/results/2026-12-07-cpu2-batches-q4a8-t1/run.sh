#!/bin/bash
# q4a8, T = 1 against the verifier alone at T = 1 (verifier-t1): fixed gamma 5 and 2 and the
# goodput controller (confidence), batch 1/4/8/16, 16 prompts x 32 tokens, 2 interleaved rounds,
# warm engines, the WMT14 quality job paused (SIGSTOP) for all of it
cd /tmp
PYTHONPATH=/work/wt-bench exec /work/main/.venv/bin/python -m speccascade_fast bench \
  --weights q4a8 --threads 2 --prompts 16 --max-new-tokens 32 --batch 4 8 16 --rounds 2 \
  --gamma 5 --warmup-tokens 16 --per-config-rss --no-hf \
  --configs verifier,verifier-t1,spec-t1,spec-t1@g2,spec-t1-goodput-conf \
  --out /work/runs/batches-t1
