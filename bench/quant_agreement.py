"""How close the quantised models' distributions are to the bf16 ones (a cheap proxy, not a
substitute for HumanEval pass@1).

    python bench/quant_agreement.py --prompts 4 --new-tokens 64 --out docs/results/DATE-cpu2-quant-e2e

For each model of the default pair and each of ``int8`` and ``q4``: the first ``--prompts``
HumanEval prompts, each followed by the bf16 model's own greedy continuation of
``--new-tokens`` tokens, are scored once by the bf16 model and once by the quantised one
(teacher forcing, one forward over prompt + continuation); over the continuation's positions it
reports how often the two argmax tokens agree, the mean and largest KL(bf16 || quantised) in
nats, and the mean total-variation distance (fp32 softmax of both).

The quantised models score every position with the decoding kernel (``DIRECT_ROWS`` raised for
this script): with more rows a forward de-quantises slices to bf16 for ``F.linear``, and for
``q4`` those are the bf16 model's own weights (both are the GGUF de-quantised, then rounded to
bf16), which would hide the difference decoding sees.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from speccascade_fast import generate, models  # noqa: E402
from speccascade_fast.bench.e2e import humaneval_prompts  # noqa: E402
from speccascade_fast.quant import modules  # noqa: E402

modules.DIRECT_ROWS = 1 << 30  # every forward through the decoding kernel


def compare(spec: str, weights: list[str], n_prompts: int, new_tokens: int, say) -> list[dict]:
    dense, tok = models.load_model(spec, progress=False)
    prompts = humaneval_prompts(tok, n_prompts)
    seqs, starts = [], []
    for p in prompts:
        out = generate(None, dense, p[None], method="autoregressive", temperature=0,
                       max_new_tokens=new_tokens, eos_token_id=[])
        seqs.append(torch.cat([p, torch.tensor(out.new_tokens[0])]))
        starts.append(p.numel())
    with torch.no_grad():
        ref = [dense(s[None]).logits[0, st - 1:-1].float() for s, st in zip(seqs, starts)]
    del dense
    rows = []
    for w in weights:
        model, _ = models.load_model(spec, weights=w, progress=False)
        agree = n = 0
        kls, tvs = [], []
        with torch.no_grad():
            for s, st, r in zip(seqs, starts, ref):
                q = model(s[None]).logits[0, st - 1:-1].float()
                lp, lq = r.log_softmax(-1), q.log_softmax(-1)
                kls.append((lp.exp() * (lp - lq)).sum(-1))
                tvs.append(0.5 * (lp.exp() - lq.exp()).abs().sum(-1))
                agree += int((r.argmax(-1) == q.argmax(-1)).sum())
                n += r.shape[0]
        kl, tv = torch.cat(kls), torch.cat(tvs)
        rows.append({"model": spec, "weights": w, "positions": n,
                     "top1_agreement": round(agree / n, 4), "mean_kl": round(kl.mean().item(), 5),
                     "max_kl": round(kl.max().item(), 4), "mean_tv": round(tv.mean().item(), 5)})
        say(json.dumps(rows[-1]))
        del model
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--weights", default="int8,q4")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    say = lambda s: print(s, file=sys.stderr, flush=True)
    rows = []
    for spec in (models.DEFAULT_DRAFTER, models.DEFAULT_VERIFIER):
        rows += compare(spec, args.weights.split(","), args.prompts, args.new_tokens, say)
    lines = ["| model | weights | positions | top-1 = bf16 | mean KL(bf16 ‖ q), nats | "
             "max KL | mean TV |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['weights']} | {r['positions']} | "
                     f"{r['top1_agreement']} | {r['mean_kl']} | {r['max_kl']} | {r['mean_tv']} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        out = pathlib.Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "agreement.json").write_text(json.dumps({"rows": rows, "settings": vars(args)},
                                                       indent=1))
        (out / "agreement.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
