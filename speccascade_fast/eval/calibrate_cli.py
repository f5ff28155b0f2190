"""``speccascade calibrate``: choose a rule's α for a quality target on a task, and validate it.

Calibrate (the verifier alone and the α grid on the calibration split, batched; writes
OUT/calibration.json, which ``speccascade generate --calibration`` takes)::

    speccascade calibrate --task humaneval --rule token_v3 --target-drop 0.05 --confidence 0.9 \\
        --alphas 0.1,0.3,0.5 --calib-fraction 0.5 --split-seed 0 --batch-size 8 \\
        --max-new-tokens 384 --out runs/cal

Validate (the chosen setting and the verifier on the validation split; the file fixes the
task, split and settings; writes validation.json / validation.md beside it or into --out)::

    speccascade calibrate --validate runs/cal/calibration.json

The chosen α is the cheapest (verifier calls per token, plus --drafter-cost per drafter call)
whose one-sided lower confidence bound on quality − verifier quality, paired on the same
examples and seeds, is at least −TARGET_DROP; tested from the lossless end, stopping at the
first α that fails (--multiplicity). None: the lossless rule spec. --budgets B1,B2,...
calibrates a per-response divergence budget at a fixed --alpha instead (knob
divergence_budget).

The bound is a statement about the task's mean score on data like the calibration split, at
the calibrated settings (T, γ, max new tokens, models; recorded in the file), not about each
response (docs/evaluation.md, "Calibrating α"). Decode at those settings: `speccascade
generate` is greedy unless given --temperature.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .calibrate import BOUNDS, MULTIPLICITY
from .cli import comma_numbers
from .tasks import TASKS

#: options that belong to calibrating (not allowed with --validate)
_CALIBRATE_ONLY = ("task", "rule", "target_drop", "alphas", "budgets", "alpha", "calib_fraction", "split_seed",
                   "max_new_tokens", "gamma", "temperature", "seed", "chat", "bound",
                   "multiplicity", "drafter_cost", "include_lossless", "bootstrap")


def add_calibrate_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--task", default=None, choices=sorted(TASKS), help="required to calibrate")
    p.add_argument("--rule", default=None,
                   help="the rule whose alpha is calibrated (default: token_v3)")
    p.add_argument("--target-drop", type=float, default=None, metavar="D",
                   help="the largest acceptable drop of the task's mean score below the "
                        "verifier's, in score units (0.05 = 5 points of pass@1); required")
    p.add_argument("--confidence", type=float, default=None, metavar="C",
                   help="one-sided confidence of each bound, in (0, 1) (default: 0.9)")
    p.add_argument("--alphas", default=None, metavar="A1,A2,...",
                   help="the alpha grid (default: the rule's grid from its lossless end toward "
                        "its drafter end, e.g. token_v3 0,0.1,0.2,0.3,0.5,0.7,1)")
    p.add_argument("--budgets", default=None, metavar="B1,B2,...",
                   help="calibrate divergence_budget instead of alpha: the budgets to try (total "
                        "variation per response, >= 0), at the fixed --alpha")
    p.add_argument("--alpha", type=float, default=None,
                   help="with --budgets: the rule's alpha (default: the rule's default)")
    p.add_argument("--calib-fraction", type=float, default=None, metavar="F",
                   help="share of the examples in the calibration split, in (0, 1) "
                        "(default: 0.5); the rest is the validation split")
    p.add_argument("--split-seed", type=int, default=None, help="the split's seed (default 0)")
    p.add_argument("--limit", type=int, default=None,
                   help="split the task's first N examples (default: all); with --validate: "
                        "only the first N examples of the validation split")
    p.add_argument("--batch-size", type=int, default=None,
                   help="quality mode batch size (default 8; validation: the calibration's)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="default: the task's (humaneval 512, gsm8k 256, wmt14 128)")
    p.add_argument("--gamma", type=int, default=None, help="default 5")
    p.add_argument("--temperature", type=float, default=None, help="default 1.0")
    p.add_argument("--seed", type=int, default=None, help="run seed (default 0)")
    p.add_argument("--chat", choices=("auto", "on", "off"), default=None)
    p.add_argument("--bound", choices=BOUNDS, default=None,
                   help="normal (Agresti-Min for pass/fail scores; default) or bootstrap")
    p.add_argument("--multiplicity", choices=MULTIPLICITY, default=None,
                   help="fixed_sequence (default: test from the lossless end, stop at the first "
                        "failure), bonferroni, or none (each alpha on its own)")
    p.add_argument("--drafter-cost", type=float, default=None, metavar="R",
                   help="a drafter call's cost in verifier calls, for the cost measure "
                        "(default 0: verifier calls per token)")
    p.add_argument("--include-lossless", action="store_true",
                   help="also run lossless spec; an alpha must then be cheaper than it")
    p.add_argument("--bootstrap", type=int, default=None,
                   help="resamples of --bound bootstrap (default 2000)")
    p.add_argument("--validate", default=None, metavar="CAL_FILE",
                   help="validate CAL_FILE on its validation split instead of calibrating")
    p.add_argument("--ci", type=float, default=0.95,
                   help="--validate: level of the two-sided CI of the difference (default 0.95)")
    p.add_argument("--out", default=None,
                   help="output folder (required to calibrate; --validate: default the "
                        "file's folder); resumed if it exists")
    p.add_argument("--drafter", default=None, help="model name, HF folder, .gguf or HF id")
    p.add_argument("--verifier", default=None, help="model name, HF folder, .gguf or HF id")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--plots", action="store_true", help="also write the harness's plots")
    p.add_argument("--unsafe-local-exec", action="store_true",
                   help="humaneval without bubblewrap: run the generated code unsandboxed")
    return p


def add_calibrate_subcommand(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "calibrate", help="choose a rule's alpha for a quality target on a task (and validate)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_calibrate_arguments(p)
    p.set_defaults(func=calibrate_command)
    return p


def parse_alpha_list(text: str | None, option: str = "--alphas") -> list[float] | None:
    """``"0.1,0.3"`` -> ``[0.1, 0.3]`` (None stays None); a CLI-worded ValueError otherwise."""
    if text is None:
        return None
    out = comma_numbers(text, option, "A1,A2,...")
    if not out:
        raise ValueError(f"argument {option}: give at least one number")
    return out


def _models(args: argparse.Namespace, drafter: str | None, verifier: str | None):
    import torch

    from speccascade_fast import models

    return models.load_pair(args.drafter or drafter or models.DEFAULT_DRAFTER,
                            args.verifier or verifier or models.DEFAULT_VERIFIER,
                            dtype=getattr(torch, args.dtype), device=args.device)


def calibrate_command(args: argparse.Namespace, argv: Sequence[str] | None = None) -> int:
    from ..cli import CLIError, at_least, check_device, check_seed

    if args.validate is not None:
        given = [f"--{k.replace('_', '-')}" for k in _CALIBRATE_ONLY
                 if getattr(args, k) not in (None, False)]
        if given:
            raise CLIError(f"argument --validate: the calibration file fixes the task, split "
                           f"and settings (drop {', '.join(given)})")
        return _validate(args)
    if args.task is None:
        raise CLIError("the following arguments are required: --task (or --validate CAL_FILE)")
    if args.target_drop is None:
        raise CLIError("the following arguments are required: --target-drop")
    if args.out is None:
        raise CLIError("the following arguments are required: --out")
    at_least("--batch-size", args.batch_size, 1)
    at_least("--max-new-tokens", args.max_new_tokens, 1)
    at_least("--limit", args.limit, 2)
    at_least("--gamma", args.gamma, 1)
    check_seed(args.seed or 0)
    from .calibrate import (
        _check_number,
        default_alphas,
        make_split,
        order_alphas,
        order_budgets,
    )
    from .tasks import get_task

    rule = args.rule or "token_v3"
    try:
        _check_number("target_drop", args.target_drop, 0.0)
        _check_number("confidence", 0.9 if args.confidence is None else args.confidence, 0.0,
                      1.0, open_lo=True)
        _check_number("drafter_cost", args.drafter_cost or 0.0, 0.0)
        alphas = parse_alpha_list(args.alphas)
        budgets = parse_alpha_list(args.budgets, "--budgets")
        if budgets is None:
            if args.alpha is not None:
                raise CLIError("argument --alpha: goes with --budgets (to calibrate alpha, give "
                               "--alphas)")
            order_alphas(rule, default_alphas(rule) if alphas is None else alphas)
        else:
            if alphas is not None:
                raise CLIError("argument --budgets: --alphas and --budgets are alternatives "
                               "(one knob is calibrated)")
            order_budgets(rule, budgets, args.alpha)
        make_split(get_task(args.task), args.limit,
                   0.5 if args.calib_fraction is None else args.calib_fraction,
                   args.split_seed or 0)
    except ValueError as e:
        raise CLIError(_option(str(e))) from None
    args.device = check_device(args.device)
    if args.task == "humaneval":
        from .sandbox import sandbox_mode

        sandbox_mode(args.unsafe_local_exec)
    from .calibrate import calibrate

    drafter, verifier, tokenizer = _models(args, None, None)
    chat = {"auto": "auto", "on": True, "off": False}[args.chat or "auto"]
    argv = sys.argv[1:] if argv is None else argv
    doc = calibrate(
        args.task, drafter=drafter, verifier=verifier, tokenizer=tokenizer, out_dir=args.out,
        target_drop=args.target_drop,
        confidence=0.9 if args.confidence is None else args.confidence, rule=rule,
        alphas=alphas, budgets=budgets, alpha=args.alpha,
        calib_fraction=0.5 if args.calib_fraction is None else args.calib_fraction,
        split_seed=args.split_seed or 0, limit=args.limit,
        batch_size=8 if args.batch_size is None else args.batch_size,
        max_new_tokens=args.max_new_tokens, gamma=5 if args.gamma is None else args.gamma,
        temperature=1.0 if args.temperature is None else args.temperature,
        seed=args.seed or 0, chat=chat, bound=args.bound or "normal",
        multiplicity=args.multiplicity or "fixed_sequence",
        drafter_cost=args.drafter_cost or 0.0, include_lossless=args.include_lossless,
        bootstrap=args.bootstrap or 2000, unsafe_local_exec=args.unsafe_local_exec,
        progress=not args.no_progress, plots=args.plots,
        command="speccascade " + " ".join(map(shlex.quote, argv)))
    print((Path(args.out) / "calibration.md").read_text())
    print(json.dumps({"calibration": str(Path(args.out) / "calibration.json"),
                      "knob": doc["knob"], "rule": doc["rule"], "alpha": doc["alpha"],
                      "divergence_budget": doc.get("divergence_budget"),
                      "fallback": doc["fallback"]}))
    return 0


def _validate(args: argparse.Namespace) -> int:
    from speccascade_fast.calibration import load_calibration

    from ..cli import CLIError, at_least, check_device

    at_least("--batch-size", args.batch_size, 1)
    at_least("--limit", args.limit, 1)
    cal = load_calibration(args.validate)
    if not 0 < args.ci < 1:
        raise CLIError(f"argument --ci: must be in (0, 1), got {args.ci}")
    args.device = check_device(args.device)
    if cal.data.get("task") == "humaneval":
        from .sandbox import sandbox_mode

        sandbox_mode(args.unsafe_local_exec)
    from .calibrate import validate

    models = cal.data.get("models") or {}
    drafter, verifier, tokenizer = _models(args, models.get("drafter"), models.get("verifier"))
    out = Path(args.out) if args.out else Path(args.validate).parent
    validate(cal, drafter=drafter, verifier=verifier, tokenizer=tokenizer, out_dir=out,
             batch_size=args.batch_size, ci=args.ci, limit=args.limit, progress=not args.no_progress,
             plots=args.plots, unsafe_local_exec=args.unsafe_local_exec)
    print((out / "validation.md").read_text())
    return 0


_OPTIONS = {"target_drop": "--target-drop", "confidence": "--confidence",
            "budgets": "--budgets", "alpha": "--alpha",
            "drafter_cost": "--drafter-cost", "alphas": "--alphas", "rule": "--rule",
            "calib_fraction": "--calib-fraction", "split_seed": "--split-seed"}


def _option(message: str) -> str:
    """``message`` prefixed with the option its first word names, if any."""
    import re

    m = re.match(r"\w+", message)
    flag = _OPTIONS.get(m.group(0)) if m else None
    return f"argument {flag}: {message}" if flag else message


def main(argv: Sequence[str] | None = None) -> int:
    from ..cli import run_command

    p = argparse.ArgumentParser(prog="speccascade calibrate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_calibrate_arguments(p)
    p.add_argument("--debug", action="store_true")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    return run_command(lambda a: calibrate_command(a, ["calibrate", *argv]), args,
                       debug=args.debug,
                       prog="speccascade calibrate")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
