"""The ``speccascade`` command line (also ``python -m speccascade_fast``).

Subcommands are registered from :data:`SUBCOMMANDS`: each entry names a module and a function
``add_<name>_subcommand(subparsers)`` that adds its parser and sets ``func`` (called with the
parsed ``args``; its return value is the exit status). Adding a subcommand is one small module
and one line here. A listed module that is not installed is skipped.

``speccascade generate "PROMPT"`` decodes one prompt and prints the completion as its blocks are
accepted (``--no-stream``: all at the end), then one line of statistics on standard error
(``--json``: one JSON object with the completion and the statistics, at the end)::

    speccascade generate "def fib(n):" --rule token_v3 --alpha 0.3 --gamma 5 --max-new-tokens 64
    speccascade generate "Write a haiku about caches." --chat --temperature 1 --json
    speccascade generate "x = " --drafter path/to/hf_folder --verifier path/to/other --json

Defaults: the pair of :mod:`speccascade_fast.models` (Qwen2.5-Coder 0.5B drafting for 1.5B),
method ``spec_cascade``, rule ``token_v3`` with its default alpha (0.3, see
:data:`speccascade_fast.config.DEFAULT_ALPHA`), gamma 5, greedy decoding (``--temperature 0``).

Errors. A user error (a bad argument, a missing model, drafter and verifier with different
vocabularies, a prompt longer than the context, ``--device cuda`` without CUDA, a missing
extra) prints one line ``speccascade: error: ...`` on standard error and exits with status 2;
``speccascade --debug ...`` shows the traceback instead. Every decoding argument is checked
(:class:`speccascade_fast.config.DecodeConfig`) before any model is loaded.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import re
import sys
from collections.abc import Callable, Sequence

from . import __version__
from .config import BONUS, GAMMA_POLICIES, METHODS, DecodeConfig
from .generation import generate
from .models import IntegrityError
from .rules import RULES

PROG = "speccascade"

SUBCOMMANDS: tuple[tuple[str, str], ...] = (
    ("speccascade_fast.cli", "add_generate_subcommand"),
    ("speccascade_fast.bench.cli", "add_bench_subcommand"),
    ("speccascade_fast.eval.cli", "add_eval_subcommand"),
    ("speccascade_fast.eval.calibrate_cli", "add_calibrate_subcommand"),
)


class CLIError(Exception):
    """A user error the command line reports as one line (exit status 2)."""


#: The exceptions :func:`run_command` reports as one line: the CLI's own, bad values
#: (ValueError, raised by every check of the package), missing files and models
#: (FileNotFoundError, models.MissingWheelsError, models.ModelNotFoundError), other OS errors
#: (an unwritable --out) and a corrupt model download (models.IntegrityError).
USER_ERRORS = (CLIError, ValueError, OSError, IntegrityError)


class _Version(argparse.Action):
    """``--version``: one line, never wrapped (argparse's own action wraps at the terminal's
    width): the version and whether the C++ kernels are in use."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, **kw):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        from . import _ext

        kernels = "loaded" if _ext.HAS_CPU_EXT else (
            "not loaded, verification runs the slower pure-torch reference")
        print(f"speccascade_fast {__version__} (C++ kernels: {kernels})")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Speculative cascades: decoding, benchmarks, evaluation.")
    parser.add_argument("--version", action=_Version, help="print the version and exit")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error instead of one line")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name, func_name in SUBCOMMANDS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name and module_name.startswith(e.name):
                continue  # that subcommand is not part of this installation
            raise
        getattr(module, func_name)(sub)
    for p in sub.choices.values():  # `speccascade generate ... --debug` works too
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the traceback of an error instead of one line")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(args.func, args, debug=args.debug)


def one_line(error: BaseException | str) -> str:
    """An error's text on one line (its whitespace runs, newlines included, become spaces)."""
    text = " ".join(str(error).split())
    return text or type(error).__name__


def run_command(func: Callable[[argparse.Namespace], int | None], args: argparse.Namespace, *,
                debug: bool = False, prog: str = PROG) -> int:
    """``func(args)``'s exit status; a user error (:data:`USER_ERRORS`, or a SystemExit with a
    message) prints ``<prog>: error: <message>`` on one line and returns 2, an interruption
    returns 130. With ``debug`` they propagate (with their traceback)."""
    try:
        status = func(args)
    except SystemExit as e:
        if debug or e.code is None or isinstance(e.code, int):
            raise
        return _error(prog, e.code)
    except USER_ERRORS as e:
        if debug:
            raise
        return _error(prog, e)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return 0 if status is None else int(status)


def _error(prog: str, error) -> int:
    print(f"{prog}: error: {one_line(error)}", file=sys.stderr, flush=True)
    return 2


# --- checks shared by the subcommands (all run before any model is loaded) --------------------
#: DecodeConfig's field -> the option that sets it
FLAGS = {"method": "--method", "rule": "--rule", "alpha": "--alpha", "gamma": "--gamma",
         "temperature": "--temperature", "top_k": "--top-k", "top_p": "--top-p",
         "min_p": "--min-p", "bonus": "--bonus", "draft_confidence": "--draft-confidence",
         "seq_score": "--seq-score", "gamma_policy": "--gamma-policy",
         "exact_prefix": "--exact-prefix", "divergence_budget": "--divergence-budget",
         "calibration": "--calibration"}


def decode_config(flags: dict[str, str] | None = None, **fields) -> DecodeConfig:
    """``DecodeConfig(**fields)``, its ValueError a :class:`CLIError` naming the option
    (``flags`` overrides :data:`FLAGS`, e.g. ``{"alpha": "--alphas"}``)."""
    try:
        return DecodeConfig(**fields)
    except ValueError as e:
        raise CLIError(_for_option(str(e), {**FLAGS, **(flags or {})})) from None


def _for_option(message: str, flags: dict[str, str]) -> str:
    m = re.match(r"\w+", message)
    flag = flags.get(m.group(0)) if m else None
    return f"argument {flag}: {message}" if flag else message


def at_least(name: str, value, low: int, what: str = "") -> None:
    """CLIError unless ``value`` (of option ``name``) is None or an int >= ``low``."""
    if value is not None and value < low:
        raise CLIError(f"argument {name}: must be an int >= {low}{what}, got {value}")


def check_seed(value: int, name: str = "--seed") -> None:
    if not 0 <= value < 2**63:
        raise CLIError(f"argument {name}: must be an int in [0, 2**63), got {value}")


def check_device(name: str | None) -> str:
    """The device to run on: ``name`` checked (CUDA present for ``cuda``, ...), or cuda when
    available else cpu."""
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise CLIError(f"argument --device: {name!r} is not a device (cpu, cuda, cuda:1, "
                       f"mps, ...)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else \
                f"built for CUDA {torch.version.cuda}, but no GPU is visible"
            raise CLIError(f"argument --device: {name!r} needs CUDA, which this machine's torch "
                           f"{torch.__version__} ({build}) does not have; use --device cpu")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise CLIError(f"argument --device: {name!r}: this machine has {n} CUDA device(s), "
                           f"cuda:0 to cuda:{n - 1}")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise CLIError(f"argument --device: {name!r}: MPS is not available here; use --device "
                       f"cpu")
    elif dev.type == "meta":
        raise CLIError("argument --device: 'meta' holds no data; use cpu or cuda")
    return name


def check_weights_device(weights: str, device: str) -> None:
    """--weights int8/q4 run on the CPU only: a CLIError for another --device."""
    import torch

    if weights != "bf16" and torch.device(device).type != "cpu":
        raise CLIError(f"argument --weights: {weights} runs on the CPU only, not on "
                       f"--device {device}; use --device cpu")


def weights_device(name: str | None, weights: str) -> str:
    """The device for ``--device name`` with ``--weights weights``: as :func:`check_device`,
    but the CPU when none is named and the weights are quantised (they run there only)."""
    device = check_device(name if weights == "bf16" else name or "cpu")
    check_weights_device(weights, device)
    return device


def missing_modules(*names: str) -> list[str]:
    """Those of the top-level modules ``names`` that cannot be imported (not installed)."""
    out = []
    for name in names:
        if name in sys.modules:
            if sys.modules[name] is None:  # an import of it is blocked
                out.append(name)
        elif importlib.util.find_spec(name) is None:
            out.append(name)
    return out


# --- generate ---------------------------------------------------------------------------------
def add_generate_subcommand(subparsers) -> argparse.ArgumentParser:
    from .models import DEFAULT_DRAFTER, DEFAULT_VERIFIER

    p = subparsers.add_parser(
        "generate", help="decode one prompt and print the completion and its statistics",
        description="Decode PROMPT with a drafter/verifier pair; print the completion, then one "
                    "line of statistics (or, with --json, one JSON object).")
    p.add_argument("prompt", help="the prompt text ('-' reads standard input)")
    p.add_argument("--drafter", default=DEFAULT_DRAFTER,
                   help=f"named model, HF folder, .gguf file or HF id org/name (default: "
                        f"{DEFAULT_DRAFTER})")
    p.add_argument("--verifier", default=DEFAULT_VERIFIER,
                   help=f"named model, HF folder, .gguf file or HF id org/name (default: "
                        f"{DEFAULT_VERIFIER})")
    p.add_argument("--early-exit", type=int, default=None, metavar="LAYERS",
                   help="use the verifier's first LAYERS layers as the drafter (ignores --drafter)")
    p.add_argument("--method", default="spec_cascade", choices=METHODS)
    p.add_argument("--rule", default=None, choices=RULES,
                   help="deferral rule (default: token_v3 for spec_cascade, chow for "
                        "token_cascade, diff for oracle_cascade)")
    p.add_argument("--alpha", type=float, default=None,
                   help="the rule's lenience (default: per rule, token_v3: 0.3)")
    p.add_argument("--calibration", default=None, metavar="FILE",
                   help="a calibration file of 'speccascade calibrate': its rule and alpha, "
                        "chosen for a quality target on a task (instead of --rule/--alpha)")
    p.add_argument("--gamma", type=int, default=5, help="drafts per verifier call (default: 5)")
    p.add_argument("--draft-confidence", type=float, default=None, metavar="P",
                   help="spec_cascade: end a block after the first draft the drafter gave a "
                        "probability below P, in (0, 1) (at most --gamma drafts; default: off)")
    p.add_argument("--gamma-policy", default="fixed", choices=GAMMA_POLICIES,
                   help="spec_cascade: 'goodput' picks each block's drafts (at most --gamma) for "
                        "the most tokens per second, 'goodput_confidence' the same with "
                        "acceptance predicted from the drafter's confidence (default: fixed)")
    p.add_argument("--exact-prefix", type=int, default=0, metavar="L",
                   help="spec_cascade: the first L tokens keep the verifier's law exactly "
                        "(default: 0)")
    p.add_argument("--divergence-budget", type=float, default=None, metavar="B",
                   help="spec_cascade: the total variation distance from the verifier's law "
                        "the response may spend, >= 0 (inf: no limit); positions that would "
                        "overspend are verified losslessly (default: off)")
    p.add_argument("--bonus", default="cascade", choices=BONUS)
    p.add_argument("--temperature", type=float, default=0.0,
                   help="sampling temperature; 0 = greedy (default: 0)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--min-p", type=float, default=None,
                   help="autoregressive / drafter_only: keep the tokens whose probability is at "
                        "least this fraction of the largest, in (0, 1] (default: off)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chat", action="store_true",
                   help="wrap PROMPT as a user message with the tokenizer's chat template")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (completion, tokens, statistics) at the end")
    p.add_argument("--no-stream", action="store_true",
                   help="print the completion at the end instead of as its blocks are accepted")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--weights", default="bf16", choices=("bf16", "int8", "q4", "q4a8"),
                   help="both models' weights: bf16 (dense), int8 (weight-only, per output "
                        "channel), q4 (the GGUF files' own quantised blocks: Q4_K, Q6_K, ...) or "
                        "q4a8 (q4 with int8 activations and integer dot products; AVX-512 VNNI "
                        "or AVX2 + FMA); "
                        "quantised weights run on the CPU (default: bf16)")
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

    # every argument first: loading the models takes minutes on a first run
    cfg = decode_config(method=args.method, rule=args.rule, alpha=args.alpha, gamma=args.gamma,
                        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                        min_p=args.min_p, bonus=args.bonus,
                        draft_confidence=args.draft_confidence,
                        gamma_policy=args.gamma_policy, exact_prefix=args.exact_prefix,
                        divergence_budget=args.divergence_budget,
                        calibration=args.calibration)
    at_least("--max-new-tokens", args.max_new_tokens, 1)
    at_least("--early-exit", args.early_exit, 1, " (verifier layers)")
    check_seed(args.seed)
    device = weights_device(args.device, args.weights)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt:
        raise CLIError("argument prompt: the prompt is empty" + (
            " (nothing on standard input)" if args.prompt == "-" else ""))

    load = dict(dtype=getattr(torch, args.dtype), device=device, progress=not args.quiet,
                weights=args.weights)
    drafter, verifier, tokenizer = _load(args, models, load)
    if tokenizer is None:
        raise CLIError(f"{args.verifier if verifier is not None else args.drafter}: the model "
                       f"folder has no tokenizer files (tokenizer.json, tokenizer_config.json)")
    text = _apply_chat(tokenizer, prompt) if args.chat else prompt
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=not args.chat)
    if enc["input_ids"].numel() == 0:
        raise CLIError(f"argument prompt: {prompt!r} has no tokens")
    streamer = None
    if not args.json and not args.no_stream:
        from transformers import TextStreamer

        streamer = TextStreamer(tokenizer, skip_prompt=False, skip_special_tokens=True)
    try:
        out = _named(generate,
            drafter, verifier, enc["input_ids"].to(device),
            attention_mask=enc.get("attention_mask"), method=cfg.method, rule=cfg.rule,
            alpha=cfg.alpha, gamma=cfg.gamma, bonus=cfg.bonus, temperature=cfg.temperature,
            top_k=cfg.top_k, top_p=cfg.top_p, min_p=cfg.min_p,
            max_new_tokens=args.max_new_tokens,
            seed=args.seed, attention=None if args.attention == "sdpa" else args.attention,
            draft_confidence=cfg.draft_confidence, gamma_policy=cfg.gamma_policy,
            exact_prefix=cfg.exact_prefix, divergence_budget=cfg.divergence_budget,
            on_tokens=None if streamer is None else
            (lambda b, tokens: streamer.put(torch.tensor(tokens))))
    finally:
        if streamer is not None and streamer.token_cache:
            streamer.end()  # the text so far, and its line ended, even when decoding failed
    if args.json:
        completion = tokenizer.decode(out.new_tokens[0], skip_special_tokens=True)
        print(json.dumps({"completion": completion, "new_tokens": out.new_tokens[0],
                          "stats": out.stats}, ensure_ascii=False))
        return 0
    from .stats import format_line

    if streamer is None:
        print(tokenizer.decode(out.new_tokens[0], skip_special_tokens=True), flush=True)
    elif not out.new_tokens[0]:
        print(flush=True)  # nothing was streamed: the (empty) completion's line
    print(format_line(out.stats), file=sys.stderr)
    return 0


#: the options of values that ``generate`` checks itself (against the loaded models)
GENERATE_FLAGS = {**FLAGS, "max_new_tokens": "--max-new-tokens", "seed": "--seed",
                  "attention": "--attention"}


def _named(func, *a, **kw):
    """``func(*a, **kw)``, a ValueError naming an argument (``top_k must be ... [1, V]``, only
    checkable against the models) a CLIError naming its option."""
    try:
        return func(*a, **kw)
    except ValueError as e:
        raise CLIError(_for_option(str(e), GENERATE_FLAGS)) from e


def _load(args, models, load):
    """``(drafter or None, verifier or None, tokenizer)`` for the method of ``args``."""
    need_q = args.method != "autoregressive"
    need_p = args.method != "drafter_only" or args.early_exit is not None
    if args.early_exit is not None:
        verifier, tokenizer = models.load_model(args.verifier, **load)
        try:
            drafter = models.early_exit_drafter(verifier, args.early_exit)
        except ValueError as e:
            raise CLIError(f"argument --early-exit: {e} (the verifier's layers)") from None
        return drafter, verifier, tokenizer
    if need_q and need_p:
        return models.load_pair(args.drafter, args.verifier, **load)
    if need_p:
        verifier, tokenizer = models.load_model(args.verifier, **load)
        return None, verifier, tokenizer
    drafter, tokenizer = models.load_model(args.drafter, **load)
    return drafter, None, tokenizer


def _apply_chat(tokenizer, prompt: str) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise CLIError("argument --chat: this tokenizer has no chat template")
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


if __name__ == "__main__":
    sys.exit(main())
