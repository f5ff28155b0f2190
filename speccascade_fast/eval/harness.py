"""``run_eval``: every configuration on every example, one JSONL row each, then the summary.

Files in ``out_dir``:

* ``run.json``: the run's settings (task, models, γ, T, top-k/p, max new tokens, seed, chat, bonus).
  A later call with the same ``out_dir`` must use the same settings (else ValueError): rows of
  different settings never mix.
* ``rows.jsonl``: one row per (configuration, example), appended, flushed and fsync'ed as soon as
  the example is scored, so an interrupted run loses at most the row being computed (a torn last
  line is dropped on the next start). Rows already present for a (configuration, example) are not
  recomputed: re-running the same command resumes.
* ``summary.json`` / ``summary.md`` and the three PNGs (see :mod:`.summary`, :mod:`.plots`).
* ``.lock``: held (``fcntl.flock``) while a run or a summary writes to the folder; it names the
  holder's pid and host, and a second writer is refused with them.

Every argument is checked before anything is written (a ValueError names the argument and its
allowed range), so a mistyped command leaves no ``run.json`` behind to pin its settings. A task
that runs generated code (HumanEval) needs the bubblewrap sandbox, or ``unsafe_local_exec=True``
(``--unsafe-local-exec``) to run it unsandboxed; the summary of such rows says so
(``summary["sandbox"]`` and a line in ``summary.md``).

Order and timing. The loop is examples outer, configurations inner, so all configurations see
the same examples and drifting machine speed affects them alike; an interrupted run leaves at
most one example incomplete. Each ``generate`` call is timed with ``time.perf_counter`` around the
call (CUDA synchronised before and after when a model is on a GPU), batch size 1. Unless
``warmup=False``, each distinct (method, rule) with work left first generates once, untimed and
unrecorded, on the first pending example (compilation, CUDA graphs and allocator warm-up stay out
of the timings).

Randomness. Example ``i`` (position in the task's example list) gets the engine seed
``(seed * 1_000_003 + i) mod 2**31``: the same for every configuration (common random numbers
make the comparison between configurations paired) and different across examples.

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
import json
import math
import os
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .configs import EvalConfig, as_config, dedupe
from .summary import summarize, to_markdown
from .tasks import Task, get_task

ROWS_FILE = "rows.jsonl"
RUN_FILE = "run.json"
LOCK_FILE = ".lock"
#: settings that must agree between a run and the rows it resumes from
RESUME_KEYS = ("task", "task_kwargs", "drafter", "verifier", "gamma", "temperature", "top_k",
               "top_p", "max_new_tokens", "seed", "chat", "bonus", "eos_token_id", "stop_tokens",
               "seq_score")


def example_seed(seed: int, index: int) -> int:
    """The engine seed of the example at position ``index`` (see the module docstring)."""
    return (int(seed) * 1_000_003 + int(index)) % (2**31)


def model_name(model: Any) -> str | None:
    """A model's hub id or path (``name_or_path`` or ``config._name_or_path``), else its class."""
    if model is None:
        return None
    for obj in (model, getattr(model, "config", None)):
        for attr in ("name_or_path", "_name_or_path"):
            v = getattr(obj, attr, None)
            if isinstance(v, str) and v:
                return v
    return type(model).__name__


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
        DecodeConfig(**kw, **c.generate_kwargs())


def _default_generate() -> Callable[..., Any]:
    from speccascade_fast.generation import generate

    return generate


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
            when not ``None``).
        max_new_tokens: per example (default: the task's ``default_max_new_tokens``).
        progress: show a tqdm bar over configurations × examples.
        chat: ``True``/``False``, or ``"auto"`` (:func:`default_chat`).
        eos_token_id: end-of-sequence id(s) (default: :func:`eos_ids`).
        stop_tokens: also end at tokens containing a one-character stop string (module doc).
        warmup: one untimed generate per distinct (method, rule) before the timed ones.
        generate_fn: the generate function (default: ``speccascade_fast.generate``);
            tests inject a fake one with the same signature.
        task_kwargs: keyword arguments of the task's constructor (``k``, ``timeout_s`` …).
        plots: write the PNGs.
        table2_tol, table2_envelope: see :func:`.summary.summarize`.
        seq_score: ``seq_cascade``'s score, ``"prob"`` or ``"mean_logprob"`` (``None``: the
            engine's default, ``"prob"``).
        unsafe_local_exec: a task that runs generated code (HumanEval) may run it without the
            bubblewrap sandbox when bwrap is missing (no isolation at all; the summary says so).
            Without it, such a run is refused before anything is written.

    Returns:
        The summary dict (also in ``summary.json``).
    """
    # Everything is checked before anything is written.
    validate_run_args(limit=limit, seed=seed, max_new_tokens=max_new_tokens, chat=chat,
                      eos_token_id=eos_token_id, table2_tol=table2_tol,
                      table2_envelope=table2_envelope, out_dir=out_dir)
    if task_kwargs is not None and not isinstance(task_kwargs, Mapping):
        raise ValueError(f"task_kwargs must be a mapping, got {type(task_kwargs).__name__}")
    task_kwargs = dict(task_kwargs or {})
    task_obj = get_task(task, **task_kwargs)
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

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with _FolderLock(out):
        return _run_locked(
            out, task_obj, cfgs, examples, drafter=drafter, verifier=verifier, tokenizer=tokenizer,
            seed=seed, gamma=gamma, temperature=temperature,
            max_new_tokens=max_new_tokens, progress=progress, top_k=top_k, top_p=top_p,
            bonus=bonus, chat=chat, eos_list=eos_list, gen_eos=gen_eos, stop_tokens=stop_tokens,
            warmup=warmup, generate=generate, task_kwargs=task_kwargs, plots=plots,
            table2_tol=table2_tol, table2_envelope=table2_envelope, seq_score=seq_score)


def _run_locked(out: Path, task_obj: Task, cfgs: list[EvalConfig], examples: list, *, drafter,
                verifier, tokenizer, seed, gamma, temperature, max_new_tokens, progress, top_k,
                top_p, bonus, chat, eos_list, gen_eos, stop_tokens, warmup, generate,
                task_kwargs, plots, table2_tol, table2_envelope, seq_score) -> dict[str, Any]:
    settings = {
        "task": task_obj.name, "task_kwargs": task_kwargs,
        "drafter": model_name(drafter), "verifier": model_name(verifier),
        "gamma": gamma, "temperature": temperature, "top_k": top_k, "top_p": top_p,
        "max_new_tokens": max_new_tokens, "seed": seed, "chat": chat, "bonus": bonus,
        "eos_token_id": eos_list, "stop_tokens": bool(stop_tokens),
    }
    if seq_score is not None:  # absent from run.json when unset: older runs resume unchanged
        settings["seq_score"] = seq_score
    settings = _jsonable(settings)
    run_path = out / RUN_FILE
    if run_path.exists():
        old = json.loads(run_path.read_text())
        diff = {k: (old.get(k), settings.get(k)) for k in RESUME_KEYS
                if old.get(k) != settings.get(k)}
        if diff:
            raise ValueError(
                f"{out} holds a run with other settings {diff} (old, new); use another out_dir"
            )
    else:
        run_path.write_text(json.dumps(settings, indent=2) + "\n")

    rows_path = out / ROWS_FILE
    rows = load_rows(rows_path)
    done = {(r["config"], r["example_id"]) for r in rows}
    total = len(cfgs) * len(examples)
    n_done = sum((c.key, e.id) in done for c in cfgs for e in examples)

    common = {
        "gamma": gamma, "temperature": temperature, "max_new_tokens": max_new_tokens,
        "eos_token_id": gen_eos,
    }
    for k, v in (("top_k", top_k), ("top_p", top_p), ("bonus", bonus), ("seq_score", seq_score)):
        if v is not None:
            common[k] = v

    prompts: dict[str, tuple[str, Any, Any]] = {}

    def encode(ex):
        if ex.id not in prompts:
            text = task_obj.build_prompt(ex, chat=chat, tokenizer=tokenizer)
            enc = tokenizer(text, return_tensors="pt", add_special_tokens=not chat)
            dev = _device(verifier if verifier is not None else drafter)
            ids, mask = enc["input_ids"], enc.get("attention_mask")
            if dev is not None:
                ids = ids.to(dev)
                mask = mask.to(dev) if mask is not None else None
            prompts.clear()  # keep one example's tensors only
            prompts[ex.id] = (text, ids, mask)
        return prompts[ex.id]

    def call(cfg: EvalConfig, ids, mask, ex_seed: int):
        kw = dict(common, **cfg.generate_kwargs())
        if mask is not None:
            kw["attention_mask"] = mask
        _sync(drafter, verifier)
        t0 = time.perf_counter()
        result = generate(drafter, verifier, ids, seed=ex_seed, **kw)
        _sync(drafter, verifier)
        return result, time.perf_counter() - t0

    pending = [(i, e) for i, e in enumerate(examples)
               if any((c.key, e.id) not in done for c in cfgs)]
    if warmup and pending:
        i0, ex0 = pending[0]
        _, ids, mask = encode(ex0)
        warmed = set()
        for c in cfgs:
            needed = any((c.key, e.id) not in done for _, e in pending)
            if needed and (c.method, c.rule) not in warmed:
                warmed.add((c.method, c.rule))
                call(c, ids, mask, example_seed(seed, i0))

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=n_done, desc=f"eval {task_obj.name}", unit="gen")
    try:
        with open(rows_path, "a", encoding="utf-8") as f:
            for i, ex in pending:
                for cfg in cfgs:
                    if (cfg.key, ex.id) in done:
                        continue
                    text, ids, mask = encode(ex)
                    ex_seed = example_seed(seed, i)
                    result, wall = call(cfg, ids, mask, ex_seed)
                    row = _make_row(task_obj, cfg, ex, i, text, ids, result, wall, ex_seed,
                                    tokenizer, eos_list, chat)
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
                    rows.append(row)
                    done.add((cfg.key, ex.id))
                    if bar is not None:
                        bar.update(1)
    finally:
        if bar is not None:
            bar.close()

    return _write_summary(out, task_obj, rows, cfgs, settings=settings, plots=plots,
                          tol=table2_tol, envelope=table2_envelope,
                          example_ids=[e.id for e in examples])


def _get(result: Any, name: str, default: Any = None) -> Any:
    if isinstance(result, Mapping):
        return result.get(name, default)
    return getattr(result, name, default)


def _make_row(task_obj, cfg, ex, index, prompt, ids, result, wall, ex_seed, tokenizer,
              eos_list, chat) -> dict[str, Any]:
    stats = _get(result, "stats") or {}
    prompt_len = ids.shape[-1]
    new = _get(result, "new_tokens")
    if new:  # the engine's unpadded new tokens (ending with the EOS, if one was emitted)
        new = [int(t) for t in new[0]]
    else:
        new = [int(t) for t in _get(result, "sequences")[0, prompt_len:].tolist()]
    eos = set(eos_list)
    cut = next((j for j, t in enumerate(new) if t in eos), None)
    new_until_eos = new if cut is None else new[:cut]
    output = tokenizer.decode(new_until_eos, skip_special_tokens=True)
    prediction = task_obj.postprocess(ex, output, chat)
    scoring = task_obj.score(ex, prediction)
    return {
        "task": task_obj.name,
        "config": cfg.key,
        **cfg.to_dict(),
        "example_id": ex.id,
        "example_index": index,
        "seed": ex_seed,
        "prompt": prompt,
        "prompt_tokens": int(prompt_len),
        "new_tokens": len(new),
        "hit_eos": cut is not None,
        "output": output,
        "prediction": prediction,
        "scoring": _jsonable(scoring),
        "stats": _jsonable(dict(stats)),
        "wall_s": wall,
        "time": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
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
    if rows is None and not (out / ROWS_FILE).is_file():
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
    summary = summarize(rows, task, configs, tol=tol, envelope=envelope)
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
