"""The ``speccascade`` command line (also ``python -m speccascade_fast``).

Subcommands are registered from :data:`SUBCOMMANDS`: each entry names a module and a function
``add_<name>_subcommand(subparsers)`` that adds its parser and sets ``func`` (called with the
parsed ``args``; its return value is the exit status). Adding a subcommand is one small module
and one line here. A listed module that is not installed is skipped.

``speccascade generate "PROMPT"`` decodes one prompt and prints the completion, then one line of
statistics (``--json``: one JSON object with the completion and the statistics)::

    speccascade generate "def fib(n):" --rule token_v3 --alpha 0.3 --gamma 5 --max-new-tokens 64
    speccascade generate "Write a haiku about caches." --chat --temperature 1 --json
    speccascade generate "x = " --drafter path/to/hf_folder --verifier path/to/other --json

Defaults: the pair of :mod:`speccascade_fast.models` (Qwen2.5-Coder 0.5B drafting for 1.5B),
method ``spec_cascade``, rule ``token_v3`` with its default alpha (0.3, see
:data:`speccascade_fast.config.DEFAULT_ALPHA`), gamma 5, greedy decoding (``--temperature 0``).
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence

from .config import BONUS, METHODS
from .generation import generate
from .rules import RULES

SUBCOMMANDS: tuple[tuple[str, str], ...] = (
    ("speccascade_fast.cli", "add_generate_subcommand"),
    ("speccascade_fast.bench.cli", "add_bench_subcommand"),
    ("speccascade_fast.eval.cli", "add_eval_subcommand"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="speccascade", description="Speculative cascades: decoding, benchmarks, evaluation.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name, func_name in SUBCOMMANDS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name and module_name.startswith(e.name):
                continue  # that subcommand is not part of this installation
            raise
        getattr(module, func_name)(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    status = args.func(args)
    return 0 if status is None else int(status)


# --- generate ---------------------------------------------------------------------------------
def add_generate_subcommand(subparsers) -> argparse.ArgumentParser:
    from .models import DEFAULT_DRAFTER, DEFAULT_VERIFIER

    p = subparsers.add_parser(
        "generate", help="decode one prompt and print the completion and its statistics",
        description="Decode PROMPT with a drafter/verifier pair; print the completion, then one "
                    "line of statistics (or, with --json, one JSON object).")
    p.add_argument("prompt", help="the prompt text ('-' reads standard input)")
    p.add_argument("--drafter", default=DEFAULT_DRAFTER,
                   help=f"named model, HF folder or .gguf file (default: {DEFAULT_DRAFTER})")
    p.add_argument("--verifier", default=DEFAULT_VERIFIER,
                   help=f"named model, HF folder or .gguf file (default: {DEFAULT_VERIFIER})")
    p.add_argument("--early-exit", type=int, default=None, metavar="LAYERS",
                   help="use the verifier's first LAYERS layers as the drafter (ignores --drafter)")
    p.add_argument("--method", default="spec_cascade", choices=METHODS)
    p.add_argument("--rule", default=None, choices=RULES,
                   help="deferral rule (default: token_v3 for spec_cascade, chow for "
                        "token_cascade, diff for oracle_cascade)")
    p.add_argument("--alpha", type=float, default=None,
                   help="the rule's lenience (default: per rule, token_v3: 0.3)")
    p.add_argument("--gamma", type=int, default=5, help="drafts per verifier call (default: 5)")
    p.add_argument("--draft-confidence", type=float, default=None, metavar="P",
                   help="spec_cascade: end a block after the first draft the drafter gave a "
                        "probability below P, in (0, 1) (at most --gamma drafts; default: off)")
    p.add_argument("--bonus", default="cascade", choices=BONUS)
    p.add_argument("--temperature", type=float, default=0.0,
                   help="sampling temperature; 0 = greedy (default: 0)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chat", action="store_true",
                   help="wrap PROMPT as a user message with the tokenizer's chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--attention", default="sdpa", choices=("sdpa", "flash_attn"),
                   help="the batched engine's attention: the models' own (PyTorch SDPA) or "
                        "flash-attn's flash_attn_with_kvcache (CUDA, fp16/bf16, flash-attn "
                        "installed)")
    p.add_argument("--quiet", action="store_true", help="no loading progress on stderr")
    p.set_defaults(func=generate_command)
    return p


def generate_command(args: argparse.Namespace) -> int:
    import torch

    from . import models

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    load = dict(dtype=getattr(torch, args.dtype), device=device, progress=not args.quiet)
    drafter, verifier, tokenizer = _load(args, models, load)
    text = _apply_chat(tokenizer, prompt) if args.chat else prompt
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=not args.chat)
    out = generate(
        drafter, verifier, enc["input_ids"].to(device),
        attention_mask=enc.get("attention_mask"), method=args.method, rule=args.rule,
        alpha=args.alpha, gamma=args.gamma, bonus=args.bonus, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, max_new_tokens=args.max_new_tokens, seed=args.seed,
        attention=None if args.attention == "sdpa" else args.attention,
        draft_confidence=args.draft_confidence)
    completion = tokenizer.decode(out.new_tokens[0], skip_special_tokens=True)
    if args.json:
        print(json.dumps({"completion": completion, "new_tokens": out.new_tokens[0],
                          "stats": out.stats}, ensure_ascii=False))
    else:
        from .stats import format_line

        print(completion)
        print(format_line(out.stats))
    return 0


def _load(args, models, load):
    """``(drafter or None, verifier or None, tokenizer)`` for the method of ``args``."""
    need_q = args.method != "autoregressive"
    need_p = args.method != "drafter_only" or args.early_exit is not None
    if args.early_exit is not None:
        verifier, tokenizer = models.load_model(args.verifier, **load)
        return models.early_exit_drafter(verifier, args.early_exit), verifier, tokenizer
    if need_q and need_p:
        return models.load_pair(args.drafter, args.verifier, **load)
    if need_p:
        verifier, tokenizer = models.load_model(args.verifier, **load)
        return None, verifier, tokenizer
    drafter, tokenizer = models.load_model(args.drafter, **load)
    return drafter, None, tokenizer


def _apply_chat(tokenizer, prompt: str) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise SystemExit("--chat: this tokenizer has no chat template")
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


if __name__ == "__main__":
    sys.exit(main())
