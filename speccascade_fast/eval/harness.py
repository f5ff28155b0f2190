"""``run_eval`` and ``run_latency``: configurations on a task's examples, one JSONL row each, then
the summary.

Three modes, into one output folder:

* **batch 1** (``run_eval`` without ``batch_size``): examples outer, configurations inner, every
  ``generate`` call timed at batch 1; the rows carry quality and latency (the original mode).
* **quality** (``run_eval(..., batch_size=N)``, ``--batch-size N``): configurations outer, one
  batched :class:`speccascade_fast.Engine` per configuration, the pending examples in chunks of N
  (task order, left-padded), each row with the seed the batch-1 mode gives it, hence the same
  tokens (a row's tokens do not depend on its batch: docs/semantics.md §6, up to floating-point
  near-ties of the batched GEMMs). Configurations the Engine does not run (a logits processor;
  the sequential methods) go through ``generate`` with the chunk, which
  decodes its rows one by one. Rows are not timed (``wall_s`` is ``None``; the chunk's wall time
  and size are kept), so a quality grid never pays for batch-1 decoding.
* **latency** (``run_latency``, ``--latency``): batch 1, ``trials`` trials of the first ``limit``
  examples, the configurations in an order shuffled per (example, trial), in one process, into
  ``latency.jsonl``. The summary takes each (configuration, example)'s median over its trials.

Files in ``out_dir``:

* ``plan.json``: a pre-registered plan (:mod:`.grids`), if the run has one: written before
  anything else; every later run into the folder must match it.
* ``run.json``: the run's settings (task, models, γ, T, top-k/p, max new tokens, seed, chat, bonus).
  A later call with the same ``out_dir`` must use the same settings (else ValueError): rows of
  different settings never mix.
* ``rows.jsonl``: one quality row per (configuration, example, sample), appended, flushed and fsync'ed as
  soon as the example is scored, so an interrupted run loses at most the rows being computed (a
  torn last line is dropped on the next start). Rows already present for a (configuration,
  example, sample) are not recomputed: re-running the same command resumes.
* ``latency.jsonl``: one row per (configuration, example, trial) of the latency mode, resumable
  the same way.
* ``summary.json`` / ``summary.md`` and the four PNGs (see :mod:`.summary`, :mod:`.plots`).
* ``.lock``: held (``fcntl.flock``) while a run or a summary writes to the folder; it names the
  holder's pid and host, and a second writer is refused with them.

Every argument is checked before anything is written (a ValueError names the argument and its
allowed range), so a mistyped command leaves no ``run.json`` behind to pin its settings. A task
that runs generated code (HumanEval) needs the bubblewrap sandbox, or ``unsafe_local_exec=True``
(``--unsafe-local-exec``) to run it unsandboxed; the summary of such rows says so
(``summary["sandbox"]`` and a line in ``summary.md``).

Timing. Each timed ``generate`` call is timed with ``time.perf_counter`` around the call (CUDA
synchronised before and after when a model is on a GPU), batch size 1. Unless ``warmup=False``,
each distinct kind of configuration (method, rule, bonus, min-p or not) with work left first
generates once, untimed and unrecorded (compilation, CUDA graphs and allocator warm-up stay out
of the timings).

Randomness. Example ``i`` (position in the task's example list) gets the engine seed
``(seed * 1_000_003 + i) mod 2**31`` in every mode: the same for every configuration (common
random numbers make the comparison between configurations paired) and different across
examples. With ``samples=S > 1`` (tasks scored per example) each example is generated S times;
sample 0 keeps that seed and sample ``s >= 1`` gets the first four bytes (little-endian) of
``sha256(f"{seed}:{i}:{s}")`` mod 2**31 — again the same for every configuration, so the samples
are paired too; the summary averages each example's S scores before any statistic (the example
stays the unit of every test and resample). The latency mode times sample 0. Each row keeps a
hash of its new tokens (``output_sha``), so quality and latency rows of one (configuration,
example) can be compared.

Stopping. ``generate`` stops at an end-of-sequence id or after ``max_new_tokens``; the task's
stop strings are applied afterwards by truncating the decoded text. With ``stop_tokens=True``
(default) every vocabulary token whose text contains a one-character stop string (WMT's ``"\n"``)
is added to the end-of-sequence ids, so such tasks stop as soon as the stop string appears (the
truncated text is the same). Longer stop strings (``"\ndef"``, ``"\n\nQuestion:"``) cannot be
single tokens: generation runs on to EOS or the budget and the timings include tokens generated
past the stop string, for every method alike.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import random
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from speccascade_fast import model_facts

from .configs import EvalConfig, as_config, dedupe
from .grids import (
    PLAN_FILE,
    check_folder_plan,
    check_latency_plan,
    check_plan_matches,
    load_plan,
)
from .summary import summarize, to_markdown
from .tasks import Task, get_task

ROWS_FILE = "rows.jsonl"
LATENCY_FILE = "latency.jsonl"
RUN_FILE = "run.json"
LOCK_FILE = ".lock"
#: settings that must agree between a run and the rows it resumes from
RESUME_KEYS = ("task", "task_kwargs", "drafter", "verifier", "gamma", "temperature", "top_k",
               "top_p", "max_new_tokens", "seed", "chat", "bonus", "eos_token_id", "stop_tokens",
               "seq_score", "samples")


def example_seed(seed: int, index: int, sample: int = 0) -> int:
    """The engine seed of sample ``sample`` of the example at position ``index`` (see the
    module docstring)."""
    if sample == 0:
        return (int(seed) * 1_000_003 + int(index)) % (2**31)
    digest = hashlib.sha256(f"{int(seed)}:{int(index)}:{int(sample)}".encode()).digest()
    return int.from_bytes(digest[:4], "little") % (2**31)


def model_name(model: Any) -> str | None:
    """A model's hub id or path (``name_or_path`` or ``config._name_or_path``), else its class;
    with `` (q4 weights)`` / `` (int8 weights)`` when it was loaded quantised, so that a run
    never resumes from rows of the same model with other weights."""
    if model is None:
        return None
    quantised = model_facts.quantised_weights(model)
    suffix = f" ({quantised} weights)" if quantised else ""
    for obj in (model, getattr(model, "config", None)):
        for attr in ("name_or_path", "_name_or_path"):
            v = getattr(obj, attr, None)
            if isinstance(v, str) and v:
                return v + suffix
    return type(model).__name__ + suffix


def _device(model: Any):
    dev = getattr(model, "device", None)
    if dev is not None:
        return dev
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration, TypeError):
        return None


def _sync(*models: Any) -> None:
    for m in models:
        dev = _device(m)
        if dev is not None and getattr(dev, "type", None) == "cuda":
            import torch

            torch.cuda.synchronize(dev)


def _jsonable(v: Any) -> Any:
    """Plain JSON types from tensors, numpy scalars, tuples and dicts thereof."""
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if hasattr(v, "tolist"):
        return _jsonable(v.tolist())
    if hasattr(v, "item"):
        return v.item()
    return v


def load_rows(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a ``rows.jsonl``; a torn last line (no newline) is cut off the file."""
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        with open(path, "r+b") as f:
            f.truncate(keep)
        data = data[:keep]
    rows = []
    for line in data.decode("utf-8").splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def default_chat(tokenizer: Any, models: Sequence[Any]) -> bool:
    """``chat="auto"``: use the chat template iff the tokenizer has one and a model's name says
    it is an instruction-tuned model (``instruct``, ``-it``, ``chat`` in its name)."""
    if not getattr(tokenizer, "chat_template", None):
        return False
    names = [(model_name(m) or "").lower() for m in models]
    names.append((getattr(tokenizer, "name_or_path", "") or "").lower())
    return any("instruct" in n or n.endswith("-it") or "-it-" in n or "chat" in n for n in names)


def eos_ids(tokenizer: Any, models: Sequence[Any], eos_token_id: Any = None) -> list[int]:
    """End-of-sequence ids: ``eos_token_id`` if given, else the union of the models'
    ``generation_config.eos_token_id`` and the tokenizer's ``eos_token_id``."""
    if eos_token_id is not None:
        vals = eos_token_id if isinstance(eos_token_id, (list, tuple, set)) else [eos_token_id]
        return sorted({int(v) for v in vals})
    out: set[int] = set()
    for m in models:
        gc = getattr(m, "generation_config", None)
        v = getattr(gc, "eos_token_id", None) if gc is not None else None
        if v is not None:
            out.update(int(x) for x in (v if isinstance(v, (list, tuple)) else [v]))
    if getattr(tokenizer, "eos_token_id", None) is not None:
        out.add(int(tokenizer.eos_token_id))
    return sorted(out)


_STOP_TOKEN_CACHE: dict[tuple[int, str], list[int]] = {}


def stop_token_ids(tokenizer: Any, stop_strings: Sequence[str]) -> list[int]:
    """Ids of the vocabulary tokens whose decoded text contains a one-character stop string."""
    chars = "".join(sorted({s for s in stop_strings if len(s) == 1}))
    if not chars:
        return []
    key = (id(tokenizer), chars)
    if key not in _STOP_TOKEN_CACHE:
        n = len(tokenizer)
        texts = tokenizer.batch_decode([[i] for i in range(n)])
        _STOP_TOKEN_CACHE[key] = [i for i, t in enumerate(texts) if any(c in t for c in chars)]
    return _STOP_TOKEN_CACHE[key]


class OutputLockedError(OSError):
    """Another run or summary is writing to the output folder."""


class _FolderLock:
    """An exclusive ``fcntl.flock`` on ``<out>/.lock`` that records the holder (pid, host)."""

    def __init__(self, out: Path):
        self.path = out / LOCK_FILE
        self.fd: int | None = None

    def __enter__(self) -> _FolderLock:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: no locking
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = json.loads(os.pread(fd, 4096, 0).decode("utf-8") or "{}")
            except (ValueError, OSError):
                holder = {}
            os.close(fd)
            who = (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} since "
                   f"{holder.get('since', '?')}")
            raise OutputLockedError(
                f"{self.path.parent} is being written by another run ({who}; lock file "
                f"{self.path}); wait for it to finish or use another output folder") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "since": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode("utf-8"), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            try:
                os.ftruncate(self.fd, 0)  # not unlinked: another opener may be waiting on it
            finally:
                os.close(self.fd)  # releases the flock
                self.fd = None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def validate_run_args(*, limit: Any, seed: Any, max_new_tokens: Any, chat: Any,
                      eos_token_id: Any, table2_tol: Any, table2_envelope: Any,
                      out_dir: Any) -> None:
    """The ValueErrors of :func:`run_eval`'s own arguments (decoding settings are checked by
    :class:`speccascade_fast.config.DecodeConfig`, per configuration)."""
    if limit is not None and (not _is_int(limit) or limit < 1):
        raise ValueError(f"limit must be None (all examples) or an int >= 1, got {limit!r}")
    if not _is_int(seed):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if max_new_tokens is not None and (not _is_int(max_new_tokens) or max_new_tokens < 1):
        raise ValueError(f"max_new_tokens must be None (the task's default) or an int >= 1, got "
                         f"{max_new_tokens!r}")
    if chat not in (True, False, "auto") or chat in (0, 1) and not isinstance(chat, bool):
        raise ValueError(f"chat must be True, False or 'auto', got {chat!r}")
    if eos_token_id is not None:
        vals = eos_token_id if isinstance(eos_token_id, (list, tuple, set)) else [eos_token_id]
        if not vals or not all(_is_int(v) and v >= 0 for v in vals):
            raise ValueError(f"eos_token_id must be None, an int >= 0 or a non-empty list of "
                             f"them, got {eos_token_id!r}")
    if isinstance(table2_tol, bool) or not isinstance(table2_tol, (int, float)) or not (
            math.isfinite(table2_tol) and table2_tol >= 0):
        raise ValueError(f"table2_tol must be a finite number >= 0, got {table2_tol!r}")
    if table2_envelope not in ("polyline", "concave"):
        raise ValueError(f"table2_envelope must be 'polyline' or 'concave', got "
                         f"{table2_envelope!r}")
    if not isinstance(out_dir, (str, os.PathLike)) or not str(out_dir):
        raise ValueError(f"out_dir must be a folder path, got {out_dir!r}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir {out} exists and is not a folder")


def _check_decoding(cfgs: Sequence[EvalConfig], common: Mapping[str, Any]) -> None:
    """Build each configuration's DecodeConfig now, so a bad γ/T/top-k/top-p/bonus/seq_score
    or rule/α combination fails before anything is written."""
    try:
        from speccascade_fast.config import DecodeConfig
    except ImportError:  # pragma: no cover - the package without its engine
        return
    for c in cfgs:
        kw = {k: v for k, v in common.items() if v is not None}
        kw.update(c.generate_kwargs())
        DecodeConfig(**kw)


def _default_generate() -> Callable[..., Any]:
    from speccascade_fast.generation import generate

    return generate


def _check_int(name: str, value: Any, low: int, what: str) -> None:
    if value is not None and (not _is_int(value) or value < low):
        raise ValueError(f"{name} must be None ({what}) or an int >= {low}, got {value!r}")


@dataclass
class _Run:
    """Everything a run of one mode needs, checked, before anything is written."""

    out: Path
    task: Task
    cfgs: list[EvalConfig]
    examples: list
    drafter: Any
    verifier: Any
    tokenizer: Any
    seed: int
    settings: dict[str, Any]
    common: dict[str, Any]  # generate's keyword arguments shared by every configuration
    chat: bool
    eos_list: list[int]
    generate: Callable[..., Any]
    custom_generate: bool  # generate_fn was given: always call it (never build an Engine)
    progress: bool
    warmup: bool
    plots: bool
    tol: float
    envelope: str
    plan: Mapping[str, Any] | None
    samples: int = 1
    _prompts: dict = field(default_factory=dict)

    def items(self, done: set | None = None, key: str | None = None) -> list:
        """``(index, example, sample)`` in task order, each example's samples together;
        with ``done`` and a configuration ``key``, only those without a row yet."""
        return [(i, e, s) for i, e in enumerate(self.examples) for s in range(self.samples)
                if done is None or (key, e.id, s) not in done]

    def encode(self, ex) -> tuple[str, Any, Any]:
        """(prompt text, ids [1, L], mask) of an example, on the models' device."""
        if ex.id not in self._prompts:
            text = self.task.build_prompt(ex, chat=self.chat, tokenizer=self.tokenizer)
            enc = self.tokenizer(text, return_tensors="pt", add_special_tokens=not self.chat)
            dev = _device(self.verifier if self.verifier is not None else self.drafter)
            ids, mask = enc["input_ids"], enc.get("attention_mask")
            if dev is not None:
                ids = ids.to(dev)
                mask = mask.to(dev) if mask is not None else None
            if len(self._prompts) > 4096:
                self._prompts.clear()
            self._prompts[ex.id] = (text, ids, mask)
        return self._prompts[ex.id]

    def kwargs(self, cfg: EvalConfig) -> dict[str, Any]:
        return dict(self.common, **cfg.generate_kwargs())

    def call(self, cfg: EvalConfig, ids, mask, ex_seed):
        """One timed generate call at batch 1: (result, wall seconds)."""
        kw = self.kwargs(cfg)
        if mask is not None:
            kw["attention_mask"] = mask
        _sync(self.drafter, self.verifier)
        t0 = time.perf_counter()
        result = self.generate(self.drafter, self.verifier, ids, seed=ex_seed, **kw)
        _sync(self.drafter, self.verifier)
        return result, time.perf_counter() - t0

    def warm(self, cfgs: Sequence[EvalConfig], ex_index: int, ex) -> None:
        """One untimed, unrecorded generate per distinct (method, rule, bonus, min-p or not)."""
        _, ids, mask = self.encode(ex)
        warmed = set()
        for c in cfgs:
            kind = (c.method, c.rule, c.bonus, c.min_p is not None)
            if kind not in warmed:
                warmed.add(kind)
                self.call(c, ids, mask, example_seed(self.seed, ex_index))

    def bar(self, total: int, initial: int, desc: str):
        if not self.progress:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc, unit="gen")


def _prepare(task, configs, *, drafter, verifier, tokenizer, limit, seed, out_dir, gamma,
             temperature, max_new_tokens, progress, top_k, top_p, bonus, chat, eos_token_id,
             stop_tokens, warmup, generate_fn, task_kwargs, plots, table2_tol, table2_envelope,
             seq_score, unsafe_local_exec, plan, samples=1) -> _Run:
    """Check every argument (nothing is written yet) and gather what a run needs."""
    validate_run_args(limit=limit, seed=seed, max_new_tokens=max_new_tokens, chat=chat,
                      eos_token_id=eos_token_id, table2_tol=table2_tol,
                      table2_envelope=table2_envelope, out_dir=out_dir)
    if task_kwargs is not None and not isinstance(task_kwargs, Mapping):
        raise ValueError(f"task_kwargs must be a mapping, got {type(task_kwargs).__name__}")
    if plan is not None and not isinstance(plan, Mapping):
        raise ValueError(f"plan must be a mapping (a plan.json), got {type(plan).__name__}")
    _check_int("samples", samples, 1, "not allowed")
    if samples is None:
        raise ValueError("samples must be an int >= 1, got None")
    task_kwargs = dict(task_kwargs or {})
    task_obj = get_task(task, **task_kwargs)
    if samples > 1 and not getattr(task_obj, "per_example", True):
        raise ValueError(f"samples={samples}: task {task_obj.name!r} has a corpus-level metric; "
                         f"several samples per example need a task scored per example "
                         f"(samples=1)")
    cfgs = dedupe(as_config(c) for c in configs)
    if not cfgs:
        raise ValueError("no configurations to evaluate")
    _check_decoding(cfgs, {"gamma": gamma, "temperature": temperature, "top_k": top_k,
                           "top_p": top_p, "bonus": bonus, "seq_score": seq_score})
    if not isinstance(unsafe_local_exec, bool):
        raise ValueError(f"unsafe_local_exec must be True or False, got {unsafe_local_exec!r}")
    if getattr(task_obj, "runs_generated_code", False):
        task_obj.unsafe_local_exec = unsafe_local_exec
        task_obj.check_runnable()  # SandboxUnavailableError: no bwrap and no opt-out
    generate = generate_fn or _default_generate()
    if max_new_tokens is None:
        max_new_tokens = task_obj.default_max_new_tokens
    if chat == "auto":
        chat = default_chat(tokenizer, [verifier, drafter])
    chat = bool(chat)
    eos_list = eos_ids(tokenizer, [verifier, drafter], eos_token_id)
    stop_list = stop_token_ids(tokenizer, task_obj.stop_strings) if stop_tokens else []
    gen_eos = sorted(set(eos_list) | set(stop_list))
    examples = task_obj.examples(limit)  # a missing data file fails here, before any write
    settings = {
        "task": task_obj.name, "task_kwargs": task_kwargs,
        "drafter": model_name(drafter), "verifier": model_name(verifier),
        "gamma": gamma, "temperature": temperature, "top_k": top_k, "top_p": top_p,
        "max_new_tokens": max_new_tokens, "seed": seed, "chat": chat, "bonus": bonus,
        "eos_token_id": eos_list, "stop_tokens": bool(stop_tokens),
    }
    if seq_score is not None:  # absent from run.json when unset: older runs resume unchanged
        settings["seq_score"] = seq_score
    if samples > 1:  # likewise
        settings["samples"] = samples
    settings = _jsonable(settings)
    if plan is not None:
        check_plan_matches(plan, settings, cfgs, [e.id for e in examples])
    common = {"gamma": gamma, "temperature": temperature, "max_new_tokens": max_new_tokens,
              "eos_token_id": gen_eos}
    for k, v in (("top_k", top_k), ("top_p", top_p), ("bonus", bonus), ("seq_score", seq_score)):
        if v is not None:
            common[k] = v
    return _Run(Path(out_dir), task_obj, cfgs, examples, drafter, verifier, tokenizer, seed,
                settings, common, chat, eos_list, generate, generate_fn is not None, progress,
                warmup, plots, table2_tol, table2_envelope, plan, samples)


def _start(run: _Run) -> tuple[list[dict[str, Any]], set]:
    """Under the folder lock: the pre-registered plan (written, or checked against the one
    there), ``run.json`` (written, or checked), and the rows so far with their done set."""
    out = run.out
    check_folder_plan(out, run.plan, run.settings, run.cfgs)
    if run.plan is not None and not (out / PLAN_FILE).exists():
        (out / PLAN_FILE).write_text(json.dumps(run.plan, indent=2) + "\n")
    run_path = out / RUN_FILE
    if run_path.exists():
        old = json.loads(run_path.read_text())
        diff = {k: (old.get(k), run.settings.get(k)) for k in RESUME_KEYS
                if old.get(k) != run.settings.get(k)}
        if diff:
            raise ValueError(
                f"{out} holds a run with other settings {diff} (old, new); use another out_dir"
            )
    else:
        run_path.write_text(json.dumps(run.settings, indent=2) + "\n")
    rows = load_rows(out / ROWS_FILE)
    return rows, {(r["config"], r["example_id"], r.get("sample", 0)) for r in rows}


def run_eval(
    task: str | Task,
    configs: Sequence[EvalConfig | str | Mapping[str, Any]],
    *,
    drafter: Any,
    verifier: Any,
    tokenizer: Any,
    limit: int | None,
    seed: int,
    out_dir: str | Path,
    gamma: int = 5,
    temperature: float = 1.0,
    max_new_tokens: int | None = None,
    progress: bool = True,
    top_k: int | None = None,
    top_p: float | None = None,
    bonus: str | None = None,
    chat: bool | str = "auto",
    eos_token_id: int | Sequence[int] | None = None,
    stop_tokens: bool = True,
    warmup: bool = True,
    generate_fn: Callable[..., Any] | None = None,
    task_kwargs: Mapping[str, Any] | None = None,
    plots: bool = True,
    table2_tol: float = 0.0,
    table2_envelope: str = "polyline",
    seq_score: str | None = None,
    unsafe_local_exec: bool = False,
    batch_size: int | None = None,
    plan: Mapping[str, Any] | None = None,
    samples: int = 1,
) -> dict[str, Any]:
    """Evaluate ``configs`` on ``task`` and write rows, summary and plots into ``out_dir``.

    Args:
        task: ``"humaneval"``, ``"gsm8k"``, ``"wmt14"`` or a task object (see ``tasks.base``).
        configs: :class:`EvalConfig` objects, their text form (``"spec_cascade:token_v3:0.3"``)
            or mappings. Include ``autoregressive`` for relative latencies (``make_configs``
            adds it); duplicates are dropped.
        drafter, verifier: the two causal LMs (``drafter`` may be ``None`` only if no
            configuration uses it); tokenizer: their shared tokenizer.
        limit: evaluate the first ``limit`` examples (``None``: all; else an int >= 1).
        seed: run seed; example ``i`` gets ``example_seed(seed, i)``.
        out_dir: output folder (created; resumed if it holds rows of the same settings).
        gamma, temperature, top_k, top_p, bonus: passed to ``generate`` (``bonus``/``top_*`` only
            when not ``None``; a configuration's own ``bonus`` overrides the run's).
        max_new_tokens: per example (default: the task's ``default_max_new_tokens``).
        progress: show a tqdm bar over configurations × examples.
        chat: ``True``/``False``, or ``"auto"`` (:func:`default_chat`).
        eos_token_id: end-of-sequence id(s) (default: :func:`eos_ids`).
        stop_tokens: also end at tokens containing a one-character stop string (module doc).
        warmup: one untimed generate per distinct (method, rule) before the timed ones
            (batch-1 mode only).
        generate_fn: the generate function (default: ``speccascade_fast.generate``, and with
            ``batch_size`` the batched :class:`speccascade_fast.Engine`); tests inject a fake
            one with the same signature (then it is called for batches too).
        task_kwargs: keyword arguments of the task's constructor (``k``, ``timeout_s`` …).
        plots: write the PNGs.
        table2_tol, table2_envelope: see :func:`.summary.summarize`.
        seq_score: ``seq_cascade``'s score, ``"prob"`` or ``"mean_logprob"`` (``None``: the
            engine's default, ``"prob"``).
        unsafe_local_exec: a task that runs generated code (HumanEval) may run it without the
            bubblewrap sandbox when bwrap is missing (no isolation at all; the summary says so).
            Without it, such a run is refused before anything is written.
        batch_size: ``None`` (default): every generate call at batch 1, timed (the rows carry
            latencies). An int N >= 1: *quality mode*: one batched Engine per configuration,
            the pending examples in chunks of N, each row with the seed the batch-1 run gives
            it (so the same tokens, up to floating-point near-ties); no row is timed (latency
            comes from :func:`run_latency`).
        plan: a pre-registered plan (:func:`.grids.build_plan`): written to ``plan.json``
            before anything else, or checked against the one in ``out_dir``; the run's
            settings and configurations must be the plan's.
        samples: generations per example (each with its own seed, the same for every
            configuration; module docstring); the summary averages an example's samples.
            Only for tasks scored per example.

    Returns:
        The summary dict (also in ``summary.json``).
    """
    _check_int("batch_size", batch_size, 1, "batch 1, timed")
    registered = (plan or {}).get("quality", {}).get("batch_size")
    if plan is not None and registered is not None and batch_size != registered:
        raise ValueError(f"batch_size={batch_size!r}: the pre-registered plan "
                         f"{plan.get('grid')!r} runs its quality rows at batch_size={registered}")
    run = _prepare(task, configs, drafter=drafter, verifier=verifier, tokenizer=tokenizer,
                   limit=limit, seed=seed, out_dir=out_dir, gamma=gamma,
                   temperature=temperature, max_new_tokens=max_new_tokens, progress=progress,
                   top_k=top_k, top_p=top_p, bonus=bonus, chat=chat, eos_token_id=eos_token_id,
                   stop_tokens=stop_tokens, warmup=warmup, generate_fn=generate_fn,
                   task_kwargs=task_kwargs, plots=plots, table2_tol=table2_tol,
                   table2_envelope=table2_envelope, seq_score=seq_score,
                   unsafe_local_exec=unsafe_local_exec, plan=plan, samples=samples)
    run.out.mkdir(parents=True, exist_ok=True)
    with _FolderLock(run.out):
        rows, done = _start(run)
        if batch_size is None:
            _run_batch1(run, rows, done)
        else:
            _run_batched(run, rows, done, batch_size)
        return _write_summary(run.out, run.task, rows, run.cfgs, settings=run.settings,
                              plots=run.plots, tol=run.tol, envelope=run.envelope,
                              example_ids=[e.id for e in run.examples])


def _append(f, row: Mapping[str, Any]) -> None:
    f.write(json.dumps(row, ensure_ascii=False) + "\n")
    f.flush()
    os.fsync(f.fileno())


def _run_batch1(run: _Run, rows: list, done: set) -> None:
    """Examples (and their samples) outer, configurations inner, every call timed at batch 1."""
    cfgs, items = run.cfgs, run.items()
    total = len(cfgs) * len(items)
    n_done = sum((c.key, e.id, s) in done for c in cfgs for _, e, s in items)
    pending = [(i, e, s) for i, e, s in items if any((c.key, e.id, s) not in done for c in cfgs)]
    if run.warmup and pending:
        needed = [c for c in cfgs if any((c.key, e.id, s) not in done for _, e, s in pending)]
        run.warm(needed, *pending[0][:2])
    bar = run.bar(total, n_done, f"eval {run.task.name}")
    try:
        with open(run.out / ROWS_FILE, "a", encoding="utf-8") as f:
            for i, ex, s in pending:
                for cfg in cfgs:
                    if (cfg.key, ex.id, s) in done:
                        continue
                    text, ids, mask = run.encode(ex)
                    ex_seed = example_seed(run.seed, i, s)
                    result, wall = run.call(cfg, ids, mask, ex_seed)
                    row = _make_row(run, cfg, ex, i, text, ids.shape[-1], _new_tokens(result, 0,
                                    ids.shape[-1]), dict(_get(result, "stats") or {}), ex_seed,
                                    s)
                    row["wall_s"] = wall
                    _append(f, row)
                    rows.append(row)
                    done.add((cfg.key, ex.id, s))
                    if bar is not None:
                        bar.update(1)
    finally:
        if bar is not None:
            bar.close()


#: DecodeConfig's fields among generate's keyword arguments
_DECODE_KEYS = ("method", "rule", "alpha", "gamma", "temperature", "top_k", "top_p", "min_p",
                "bonus", "seq_score", "logits_processor", "max_drafter_run", "draft_confidence",
                "divergence_budget")


def _engine(run: _Run, cfg: EvalConfig, batch: int, max_seq_len: int):
    """The batched Engine of one configuration, or None where it cannot run it (a logits
    processor, methods or models the Engine does not take, or a custom ``generate_fn``)."""
    if run.custom_generate:
        return None
    from speccascade_fast import engine as batched
    from speccascade_fast.config import DecodeConfig

    kw = {k: v for k, v in run.kwargs(cfg).items() if k in _DECODE_KEYS}
    if "logits_processor" in kw or not batched.supports(cfg.method, run.drafter, run.verifier):
        return None
    limits = [c for c in (model_context(m) for m in (run.drafter, run.verifier)) if c]
    if limits and max_seq_len > min(limits):
        return None  # generate() checks each prompt against the context and explains
    return batched.Engine(run.drafter, run.verifier, config=DecodeConfig(**kw),
                          max_batch_size=batch, max_seq_len=max_seq_len)


def model_context(model: Any) -> int | None:
    """``max_position_embeddings`` of a model's config, if it has one."""
    cfg = getattr(model, "config", None)
    v = getattr(cfg, "max_position_embeddings", None) if cfg is not None else None
    return v if isinstance(v, int) else None


def _left_padded(seqs: Sequence[Any], pad: int):
    """``(ids [B, W], mask [B, W])`` of 1-D id tensors, left-padded with ``pad``."""
    import torch

    width = max(int(s.numel()) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long, device=seqs[0].device)
    mask = torch.zeros((len(seqs), width), dtype=torch.long, device=seqs[0].device)
    for b, s in enumerate(seqs):
        ids[b, width - s.numel():] = s
        mask[b, width - s.numel():] = 1
    return ids, mask


def _run_batched(run: _Run, rows: list, done: set, batch_size: int) -> None:
    """Quality mode: configurations outer, one Engine each, pending examples in chunks of
    ``batch_size`` (task order), each row with its batch-1 seed. Not timed per row: a row
    records its chunk's wall time and size only."""
    cfgs, items = run.cfgs, run.items()
    total = len(cfgs) * len(items)
    n_done = sum((c.key, e.id, s) in done for c in cfgs for _, e, s in items)
    pad = getattr(run.tokenizer, "pad_token_id", None)
    pad = pad if pad is not None else (run.eos_list[0] if run.eos_list else 0)
    budget = run.common["max_new_tokens"]
    bar = run.bar(total, n_done, f"eval {run.task.name} (batch {batch_size})")
    try:
        with open(run.out / ROWS_FILE, "a", encoding="utf-8") as f:
            for cfg in cfgs:
                todo = run.items(done, cfg.key)
                if not todo:
                    continue
                longest = max(run.encode(e)[1].shape[-1] for _, e, _ in todo)
                engine = _engine(run, cfg, min(batch_size, len(todo)), longest + budget)
                for start in range(0, len(todo), batch_size):
                    chunk = todo[start:start + batch_size]
                    for row in _chunk_rows(run, cfg, chunk, engine, pad, batch_size):
                        _append(f, row)
                        rows.append(row)
                        done.add((cfg.key, row["example_id"], row["sample"]))
                        if bar is not None:
                            bar.update(1)
                del engine
    finally:
        if bar is not None:
            bar.close()


def _chunk_rows(run: _Run, cfg: EvalConfig, chunk, engine, pad: int, batch_size: int):
    """Generate one chunk of examples in one batched call; its rows."""
    encoded = [run.encode(e) for _, e, _ in chunk]
    prompt_ids = [ids[0] if mask is None else ids[0][mask[0].bool()] for _, ids, mask in encoded]
    ids, mask = _left_padded(prompt_ids, pad)
    seeds = [example_seed(run.seed, i, s) for i, _, s in chunk]
    kw = run.kwargs(cfg)
    _sync(run.drafter, run.verifier)
    t0 = time.perf_counter()
    if engine is not None:
        result = engine.generate(ids, mask, max_new_tokens=kw["max_new_tokens"], seed=seeds,
                                 eos_token_id=kw["eos_token_id"], pad_token_id=pad)
    else:
        result = run.generate(run.drafter, run.verifier, ids, attention_mask=mask, seed=seeds,
                              **kw)
    _sync(run.drafter, run.verifier)
    wall = time.perf_counter() - t0
    stats = dict(_get(result, "stats") or {})
    per_seq = stats.pop("per_sequence", None)
    if per_seq is None or len(per_seq) != len(chunk):
        if len(chunk) != 1:
            raise RuntimeError("generate returned no per-sequence statistics for a batch")
        per_seq = [stats]
    settings = {k: stats[k] for k in ("method", "rule", "alpha", "gamma", "bonus", "temperature",
                                      "draft_confidence") if k in stats}
    out = []
    for b, ((i, ex, s), (text, _, _)) in enumerate(zip(chunk, encoded)):
        row_stats = {**settings, **dict(per_seq[b])}  # a sequence's own settings first
        row_stats["wall_s"] = None
        row_stats.pop("tokens_per_s", None)
        row = _make_row(run, cfg, ex, i, text, int(prompt_ids[b].numel()),
                        _new_tokens(result, b, ids.shape[-1]), row_stats, seeds[b], s)
        row.update(wall_s=None, batch_size=batch_size, batch_rows=len(chunk),
                   batch_wall_s=wall, engine="static" if engine is not None else "generate")
        out.append(row)
    return out


def run_latency(
    task: str | Task,
    configs: Sequence[EvalConfig | str | Mapping[str, Any]],
    *,
    drafter: Any,
    verifier: Any,
    tokenizer: Any,
    limit: int | None,
    seed: int,
    out_dir: str | Path,
    trials: int = 3,
    gamma: int = 5,
    temperature: float = 1.0,
    max_new_tokens: int | None = None,
    progress: bool = True,
    top_k: int | None = None,
    top_p: float | None = None,
    bonus: str | None = None,
    chat: bool | str = "auto",
    eos_token_id: int | Sequence[int] | None = None,
    stop_tokens: bool = True,
    warmup: bool = True,
    generate_fn: Callable[..., Any] | None = None,
    task_kwargs: Mapping[str, Any] | None = None,
    plots: bool = True,
    table2_tol: float = 0.0,
    table2_envelope: str = "polyline",
    seq_score: str | None = None,
    unsafe_local_exec: bool = False,
    plan: Mapping[str, Any] | None = None,
    samples: int = 1,
) -> dict[str, Any]:
    """Latency mode: every configuration on the first ``limit`` examples at batch 1, ``trials``
    times each, in one process, into ``out_dir/latency.jsonl`` (then the summary is rewritten).

    For each (example, trial) the configurations run in an order shuffled by a generator seeded
    with (seed, example index, trial), so no configuration always runs first, last or after the
    same neighbour; each call is timed alone (CUDA synchronised around it). One untimed warm-up
    per kind of configuration comes first. The outputs are not scored (quality comes from the
    quality rows of the same folder, same seeds); each row keeps a hash of its new tokens so that
    the summary can count how many agree with the quality row of the same example. Resumes
    like :func:`run_eval`, per (configuration, example, trial). Arguments as in
    :func:`run_eval`; the settings must be those of the folder's ``run.json`` (``samples``
    included; only sample 0 is timed, with its seed).
    """
    _check_int("trials", trials, 1, "not allowed")
    if trials is None:
        raise ValueError("trials must be an int >= 1, got None")
    run = _prepare(task, configs, drafter=drafter, verifier=verifier, tokenizer=tokenizer,
                   limit=limit, seed=seed, out_dir=out_dir, gamma=gamma,
                   temperature=temperature, max_new_tokens=max_new_tokens, progress=progress,
                   top_k=top_k, top_p=top_p, bonus=bonus, chat=chat, eos_token_id=eos_token_id,
                   stop_tokens=stop_tokens, warmup=warmup, generate_fn=generate_fn,
                   task_kwargs=task_kwargs, plots=plots, table2_tol=table2_tol,
                   table2_envelope=table2_envelope, seq_score=seq_score,
                   unsafe_local_exec=unsafe_local_exec, plan=None, samples=samples)
    if plan is not None:
        check_latency_plan(plan, run.settings, run.cfgs, limit, trials)
        run.plan = plan
    run.out.mkdir(parents=True, exist_ok=True)
    with _FolderLock(run.out):
        rows, _ = _start(run)
        lat_path = run.out / LATENCY_FILE
        lat = load_rows(lat_path)
        done = {(r["config"], r["example_id"], r["trial"]) for r in lat}
        plan_ = [(i, e, t) for i, e in enumerate(run.examples) for t in range(trials)]
        pending = [(i, e, t) for i, e, t in plan_
                   if any((c.key, e.id, t) not in done for c in run.cfgs)]
        if run.warmup and pending:
            run.warm(run.cfgs, pending[0][0], pending[0][1])
        total = len(plan_) * len(run.cfgs)
        bar = run.bar(total, total - sum((c.key, e.id, t) not in done for c in run.cfgs
                                         for _, e, t in plan_), f"latency {run.task.name}")
        try:
            with open(lat_path, "a", encoding="utf-8") as f:
                for i, ex, t in pending:
                    order = list(run.cfgs)
                    random.Random(f"{seed}:{i}:{t}").shuffle(order)
                    for k, cfg in enumerate(order):
                        if (cfg.key, ex.id, t) in done:
                            continue
                        _, ids, mask = run.encode(ex)
                        ex_seed = example_seed(run.seed, i)
                        result, wall = run.call(cfg, ids, mask, ex_seed)
                        new = _new_tokens(result, 0, ids.shape[-1])
                        row = {"config": cfg.key, **cfg.to_dict(), "example_id": ex.id,
                               "example_index": i, "trial": t, "order": k, "seed": ex_seed,
                               "wall_s": wall, "new_tokens": len(new),
                               "output_sha": _tokens_sha(new),
                               "stats": _jsonable(dict(_get(result, "stats") or {})),
                               "time": _now()}
                        _append(f, row)
                        lat.append(row)
                        done.add((cfg.key, ex.id, t))
                        if bar is not None:
                            bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        return _write_summary(run.out, run.task, None, None, settings=run.settings,
                              plots=run.plots, tol=run.tol, envelope=run.envelope,
                              example_ids=None)


def _get(result: Any, name: str, default: Any = None) -> Any:
    if isinstance(result, Mapping):
        return result.get(name, default)
    return getattr(result, name, default)


def _new_tokens(result: Any, b: int, prompt_width: int) -> list[int]:
    """Sequence b's new tokens: the engine's unpadded ``new_tokens`` (ending with the EOS, if
    one was emitted), else the tail of ``sequences``."""
    new = _get(result, "new_tokens")
    if new:
        return [int(t) for t in new[b]]
    return [int(t) for t in _get(result, "sequences")[b, prompt_width:].tolist()]


def _tokens_sha(tokens: Sequence[int]) -> str:
    return hashlib.sha256(json.dumps(list(tokens)).encode()).hexdigest()[:16]


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def _make_row(run: _Run, cfg, ex, index, prompt, prompt_len, new, stats,
              ex_seed, sample: int = 0) -> dict[str, Any]:
    eos = set(run.eos_list)
    cut = next((j for j, t in enumerate(new) if t in eos), None)
    new_until_eos = new if cut is None else new[:cut]
    output = run.tokenizer.decode(new_until_eos, skip_special_tokens=True)
    prediction = run.task.postprocess(ex, output, run.chat)
    scoring = run.task.score(ex, prediction)
    return {
        "task": run.task.name,
        "config": cfg.key,
        **cfg.to_dict(),
        "example_id": ex.id,
        "example_index": index,
        "sample": sample,
        "seed": ex_seed,
        "prompt": prompt,
        "prompt_tokens": int(prompt_len),
        "new_tokens": len(new),
        "hit_eos": cut is not None,
        "output": output,
        "output_sha": _tokens_sha(new),
        "prediction": prediction,
        "scoring": _jsonable(scoring),
        "stats": _jsonable(dict(stats)),
        "wall_s": None,
        "time": _now(),
    }


def write_summary(
    out_dir: str | Path,
    task: str | Task,
    rows: Sequence[Mapping[str, Any]] | None = None,
    configs: Sequence[EvalConfig | str] | None = None,
    *,
    settings: Mapping[str, Any] | None = None,
    plots: bool = True,
    tol: float = 0.0,
    envelope: str = "polyline",
    example_ids: Sequence[str] | None = None,
) -> dict[str, Any]:
    """(Re)write ``summary.json``, ``summary.md`` and the plots of ``out_dir`` from its rows.

    ``example_ids`` restricts the summary to those examples (``run_eval`` passes the ones of its
    ``limit``); ``rows`` default to the folder's ``rows.jsonl``; ``task`` a name or object.
    ``out_dir`` must be an existing folder (it is never created here: FileNotFoundError), and it
    is locked while the summary is written (OutputLockedError while a run writes to it).
    """
    out = Path(out_dir)
    if not out.is_dir():
        raise FileNotFoundError(
            f"{out}: no such output folder, nothing to summarise (run the evaluation into it "
            f"first)")
    if rows is None and not (out / ROWS_FILE).is_file() and not (out / LATENCY_FILE).is_file():
        raise FileNotFoundError(
            f"{out / ROWS_FILE} not found, nothing to summarise (run the evaluation into "
            f"{out} first)")
    with _FolderLock(out):
        return _write_summary(out, task, rows, configs, settings=settings, plots=plots, tol=tol,
                              envelope=envelope, example_ids=example_ids)


def _write_summary(out: Path, task, rows, configs, *, settings, plots, tol, envelope,
                   example_ids) -> dict[str, Any]:
    if settings is None and (out / RUN_FILE).exists():
        settings = json.loads((out / RUN_FILE).read_text())
    if isinstance(task, str):
        kw = (settings or {}).get("task_kwargs", {}) if settings else {}
        task = get_task(task, **kw)
    if rows is None:
        rows = load_rows(out / ROWS_FILE)
    if example_ids is not None:
        keep = set(example_ids)
        rows = [r for r in rows if r["example_id"] in keep]
    latency_rows = load_rows(out / LATENCY_FILE)
    plan = load_plan(out) or {}
    analysis = plan.get("analysis", {})
    ar = EvalConfig("autoregressive").key
    family = sum(k != ar for k in plan.get("configs", [])) or None
    summary = summarize(rows, task, configs, tol=tol, envelope=envelope,
                        latency_rows=latency_rows, bootstrap=int(analysis.get("bootstrap", 2000)),
                        ci=float(analysis.get("ci", 0.95)), seed=int((settings or {}).get("seed")
                                                                     or 0),
                        samples=None if settings is None else int(settings.get("samples", 1)),
                        holm_family=family)
    summary["settings"] = dict(settings or {})
    sandbox = sandbox_summary(rows)
    if sandbox is not None:
        summary["sandbox"] = sandbox
    if plots:
        from .plots import plot_summary

        summary["plots"] = [p.name for p in plot_summary(summary, out)]
    (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    md_settings = {k: v for k, v in (settings or {}).items() if k != "task_kwargs"}
    md = to_markdown(summary, md_settings)
    if sandbox is not None and sandbox["unsandboxed_rows"]:
        md = (f"> **UNSANDBOXED**: {sandbox['unsandboxed_rows']} of {sandbox['rows']} rows ran "
              f"generated code without the bubblewrap sandbox (--unsafe-local-exec): no "
              f"isolation from this machine.\n\n" + md)
    (out / "summary.md").write_text(md)
    return summary


def sandbox_summary(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """How the summarised rows' generated code ran: ``None`` for tasks that run none, else
    ``{"rows", "unsandboxed_rows", "mode"}`` (mode ``"bwrap"``, ``"unsafe-local"`` or
    ``"mixed"``)."""
    modes = [r.get("scoring", {}).get("sandbox") for r in rows]
    modes = [m for m in modes if m is not None]
    if not modes:
        return None
    unsafe = sum(m != "bwrap" for m in modes)
    mode = "bwrap" if not unsafe else ("unsafe-local" if unsafe == len(modes) else "mixed")
    return {"rows": len(modes), "unsandboxed_rows": unsafe, "mode": mode}
