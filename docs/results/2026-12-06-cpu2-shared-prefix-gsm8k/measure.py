"""Prefill of a batch of GSM8K 8-shot chat prompts on the default pair, with and without the
Engine's shared-prefix prefill: interleaved rounds (ABBA...), one process, one token generated
per row (so the time is the prefill and one step). Writes results.json next to this file.

    python docs/results/2026-12-06-cpu2-shared-prefix-gsm8k/measure.py --batch 8 --rounds 3
"""
import argparse
import json
import platform
import time
from pathlib import Path

import torch

from speccascade_fast import Engine
from speccascade_fast import engine as engine_mod
from speccascade_fast.eval.harness import _left_padded
from speccascade_fast.eval.tasks.gsm8k import GSM8K
from speccascade_fast.models import DEFAULT_DRAFTER, DEFAULT_VERIFIER, load_model

HERE = Path(__file__).parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    drafter, tok = load_model(DEFAULT_DRAFTER, progress=False)
    verifier, _ = load_model(DEFAULT_VERIFIER, progress=False)
    task = GSM8K()
    examples = task.examples(args.batch)
    prompts = [tok(task.build_prompt(ex, chat=True, tokenizer=tok), return_tensors="pt",
                   add_special_tokens=False).input_ids[0] for ex in examples]
    ids, mask = _left_padded(prompts, tok.pad_token_id or 0)
    longest = max(p.numel() for p in prompts)
    engine = Engine(drafter, verifier, max_batch_size=args.batch, max_seq_len=longest + 16,
                    rule="spec", gamma=5, temperature=0.0)
    default_min = engine_mod.MIN_SHARED_PREFIX

    def run(shared: bool) -> dict:
        engine_mod.MIN_SHARED_PREFIX = default_min if shared else 10**9
        start = time.perf_counter()
        out = engine.generate(ids, attention_mask=mask, max_new_tokens=1, eos_token_id=[])
        return {"shared": shared, "wall_s": time.perf_counter() - start,
                "prefill_s": out.stats["prefill_s"],
                "shared_prefix_tokens": out.stats["shared_prefix_tokens"],
                "tokens": out.new_tokens}

    run(True)  # warm-up, not recorded
    rows = []
    for r in range(args.rounds):
        order = (True, False) if r % 2 == 0 else (False, True)
        rows += [dict(run(s), round=r) for s in order]
    same = all(a["tokens"] == rows[0]["tokens"] for a in rows)
    summary = {}
    for s in (True, False):
        xs = [x["prefill_s"] for x in rows if x["shared"] == s]
        summary["shared" if s else "unshared"] = {"prefill_s_total": sum(xs), "per_round": xs}
    summary["ratio_unshared_over_shared"] = (summary["unshared"]["prefill_s_total"]
                                             / summary["shared"]["prefill_s_total"])
    result = {"batch": args.batch, "rounds": args.rounds, "threads": args.threads,
              "prompt_tokens": [p.numel() for p in prompts],
              "shared_prefix_tokens": rows[0]["shared_prefix_tokens"] if rows[0]["shared"]
              else rows[1]["shared_prefix_tokens"],
              "same_first_tokens": same, "summary": summary,
              "rows": [{k: v for k, v in x.items() if k != "tokens"} for x in rows],
              "machine": platform.processor() or platform.machine(),
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    (HERE / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("prompt_tokens", "shared_prefix_tokens",
                                              "same_first_tokens", "summary")}, indent=1))


if __name__ == "__main__":
    main()
