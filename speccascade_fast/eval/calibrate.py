"""Choose a rule's lenience for a quality target: ``speccascade calibrate``.

:func:`calibrate` runs the verifier alone and a grid of α values of one rule (lossless end
first) on the *calibration split* of a task, through :func:`.harness.run_eval` (batched quality
mode), and picks the cheapest α whose one-sided lower confidence bound on the paired difference
``quality(α) − quality(verifier)`` is at least ``−target_drop``. It writes a calibration file
(:mod:`speccascade_fast.calibration`) that ``generate``, ``Engine``, ``DecodeConfig`` and
``speccascade generate --calibration`` accept in place of ``rule`` / ``alpha``.
:func:`validate` runs the chosen setting and the verifier on the complementary *validation
split* and reports the realised difference with its confidence interval and the cost ratio.

Definitions (docs/evaluation.md, "Calibrating α"):

* **Split.** The task's examples (the first ``limit``) are ranked by
  ``sha256(f"{split_seed}:{example_id}")``; the first ``round(fraction · n)`` form the
  calibration split, the rest the validation split; both keep the task's order. The split
  depends only on the ids, the fraction and the seed. Within a split, example ``i`` gets the
  harness's seed for position ``i`` (every configuration the same: the comparison is paired).
* **Cost.** ``(Σ verifier calls + drafter_cost · Σ drafter calls) / Σ new tokens`` over the
  split, from the statistics the harness records per row (no wall clock); ``drafter_cost`` is
  what a drafter call costs relative to a verifier call (default 0: verifier calls per token,
  the paper's "deferrals per token"). ``cost_ratio`` is that over the verifier's own.
* **Bound.** Per example ``d_i = score_i(α) − score_i(verifier)``, same example, same seed.
  ``bound="normal"``: the one-sided normal bound ``mean(d) − z_c · sd(d)/√n`` with
  ``z_c = Φ⁻¹(c)``; for pass/fail scores the matched-pairs interval of Agresti and Min (2005):
  half an example added to each cell of the 2×2 table, so that a split with no discordant
  example still has a bound below 0. ``bound="bootstrap"``: the ``1 − c`` quantile of the
  paired bootstrap distribution of ``mean(d)`` (seeded).
* **Selection.** ``multiplicity="fixed_sequence"`` (default): the α values are tested in their
  order from the lossless end, each at level ``c``, and testing stops at the first α whose bound
  is below ``−target_drop`` (a fixed-sequence procedure: the probability that any α it accepts
  has a true drop larger than ``target_drop`` is at most ``1 − c``); among the accepted α the
  cheapest is chosen, ties going to the one nearer the lossless end. ``"bonferroni"``: every α
  tested at level ``1 − (1 − c)/K``; ``"none"``: every α at level ``c`` on its own (no
  guarantee for the chosen one). With ``include_lossless`` the lossless ``spec`` is measured
  too and an α is chosen only if it is strictly cheaper. No accepted α: the lossless ``spec``
  is chosen (``fallback: true``).

With ``budgets`` the knob is ``divergence_budget`` instead (the total variation each response
may spend) at one fixed α: the same runs, bound and selection over the budgets, from 0 (the
lossless end) up.

Files in ``out_dir``: ``calibration/`` (the harness folder of the calibration split: rows,
``run.json``, ``summary.*``, and ``split.json``), ``calibration.json`` (the calibration file),
``calibration.md``; after :func:`validate`, ``validation/``, ``validation.json`` and
``validation.md``. Rerunning the same call resumes (finished rows are never recomputed); a
folder holding another split or other settings is refused.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from statistics import NormalDist
from typing import Any

from speccascade_fast.calibration import FORMAT, VERSION, load_calibration, write_calibration
from speccascade_fast.rules import ALPHA_RANGES, check_alpha, check_rule

from .configs import EvalConfig
from .harness import load_rows, run_eval
from .summary import paired_vs
from .tasks import get_task

CALIBRATION_DIR = "calibration"
VALIDATION_DIR = "validation"
CALIBRATION_FILE = "calibration.json"
SPLIT_FILE = "split.json"
BOUNDS = ("normal", "bootstrap")
MULTIPLICITY = ("fixed_sequence", "bonferroni", "none")
VERIFIER = EvalConfig("autoregressive")
LOSSLESS = EvalConfig("spec_cascade", "spec")

#: the default α grid of the rules the pre-registered grids do not sweep, lossless end first
_OTHER_ALPHAS: dict[str, tuple[float, ...]] = {
    "token_v1": (0.0, 0.1, 0.2, 0.3, 0.5, 1.0),
    "token_v2": (0.0, 0.1, 0.2, 0.3, 0.5, 1.0),
    "lossy_star": (0.0, 0.3, 0.5, 0.7, 0.9, 0.99),
    "opt_log": (-100.0, -1.0, 0.0, 0.3, 1.0, 100.0),
    "diff_log": (-100.0, -1.0, 0.0, 0.3, 1.0),
    "chow_log": (0.0, 0.5, 1.0, 2.0, 4.0),
}


def _registered_alphas() -> dict[str, tuple[float, ...]]:
    """Each rule's α points in the pre-registered grids' ``spec_cascade[RULE]`` curves (from
    the lossless end toward the drafter end; :mod:`.grids`)."""
    from .configs import as_config
    from .grids import _main_curves

    out: dict[str, tuple[float, ...]] = {}
    for keys in _main_curves().values():
        cfgs = [as_config(k) for k in keys]
        if all(c.method == "spec_cascade" and c.alpha is not None for c in cfgs) \
                and len({c.rule for c in cfgs}) == 1:
            out.setdefault(cfgs[0].rule, tuple(c.alpha for c in cfgs))
    return out


#: the default α grid per rule, lossless end first: the pre-registered grids' curves
#: (docs/evaluation.md) where they have one, else :data:`_OTHER_ALPHAS`
DEFAULT_ALPHAS: dict[str, tuple[float, ...]] = {**_OTHER_ALPHAS, **_registered_alphas()}
#: rules whose lenience grows as α falls (ensemble: α is the verifier's weight)
DECREASING = frozenset({"ensemble"})


# --------------------------------------------------------------------------- split


def split_ids(ids: Sequence[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """``(calibration ids, validation ids)``: the ``round(fraction · n)`` ids of lowest
    ``sha256(f"{seed}:{id}")`` (at least 1, and at least 1 left for validation), then the rest;
    each in the order of ``ids``."""
    ids = [str(i) for i in ids]
    if len(set(ids)) != len(ids):
        raise ValueError("the task's example ids are not unique; cannot split them")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) \
            or not 0 < fraction < 1:
        raise ValueError(f"calib_fraction must be a number in (0, 1), got {fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"split_seed must be an int, got {seed!r}")
    n = len(ids)
    if n < 2:
        raise ValueError(f"a split needs at least 2 examples, the task has {n}")
    k = min(max(round(fraction * n), 1), n - 1)
    ranked = sorted(ids, key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).hexdigest())
    chosen = set(ranked[:k])
    return [i for i in ids if i in chosen], [i for i in ids if i not in chosen]


def ids_sha(ids: Sequence[str]) -> str:
    """sha256 of the JSON list of ``ids`` (in order)."""
    return hashlib.sha256(json.dumps(list(ids)).encode()).hexdigest()


def subset_task(task: Any, ids: Sequence[str]) -> Any:
    """A shallow copy of ``task`` whose ``examples()`` are those of ``ids`` (task order)."""
    import copy

    keep = set(ids)
    examples = [e for e in task.examples(None) if e.id in keep]
    sub = copy.copy(task)
    sub.examples = lambda limit=None: examples[:limit]
    return sub


def make_split(task: Any, limit: int | None, fraction: float, seed: int) -> dict[str, Any]:
    """The split definition of ``task``'s first ``limit`` examples (ids and their hashes)."""
    ids = [e.id for e in task.examples(limit)]
    cal, val = split_ids(ids, fraction, seed)
    return {"method": "sha256(f'{seed}:{example_id}') ranking", "fraction": float(fraction),
            "seed": seed, "limit": limit, "n_examples": len(ids), "n_calibration": len(cal),
            "n_validation": len(val), "examples_sha256": ids_sha(ids),
            "calibration_ids_sha256": ids_sha(cal), "validation_ids_sha256": ids_sha(val),
            "calibration_ids": cal, "validation_ids": val}


# --------------------------------------------------------------------------- statistics


def _binary(xs: Sequence[float]) -> bool:
    return all(x in (0.0, 1.0) for x in xs)


def paired_bound(scores: Sequence[float], base: Sequence[float], level: float, *,
                 method: str = "normal", side: str = "lower", reps: int = 2000,
                 seed: int = 0) -> float | tuple[float, float]:
    """A confidence bound on ``mean(scores − base)`` (paired, same examples in order).

    ``side="lower"``: the one-sided lower bound at confidence ``level``; ``side="two"``: the
    two-sided interval ``(low, high)`` at ``level``. ``method`` ``"normal"`` (Agresti–Min's
    adjusted matched-pairs interval for 0/1 scores, else mean ± z·SE) or ``"bootstrap"``
    (percentile of ``reps`` paired resamples, generator seeded with ``seed``)."""
    if method not in BOUNDS:
        raise ValueError(f"bound must be one of {', '.join(BOUNDS)}, got {method!r}")
    if side not in ("lower", "two"):
        raise ValueError(f"side must be 'lower' or 'two', got {side!r}")
    if not 0 < level < 1:
        raise ValueError(f"confidence must be in (0, 1), got {level!r}")
    s, b = [float(x) for x in scores], [float(x) for x in base]
    if len(s) != len(b) or not s:
        raise ValueError(f"need paired scores of the same examples, got {len(s)} and {len(b)}")
    n = len(s)
    d = [x - y for x, y in zip(s, b)]
    if method == "bootstrap":
        import numpy as np

        rng = np.random.default_rng(seed)
        arr = np.asarray(d)
        means = arr[rng.integers(0, n, size=(reps, n))].mean(1)
        if side == "lower":
            return float(np.quantile(means, 1 - level))
        return (float(np.quantile(means, (1 - level) / 2)),
                float(np.quantile(means, (1 + level) / 2)))
    z = NormalDist().inv_cdf(level if side == "lower" else (1 + level) / 2)
    if _binary(s) and _binary(b):
        better, worse = sum(x > 0 for x in d), sum(x < 0 for x in d)
        p12, p21 = (better + 0.5) / (n + 2), (worse + 0.5) / (n + 2)
        centre = p12 - p21
        se = math.sqrt(max((p12 + p21) - centre ** 2, 0.0) / (n + 2))
    else:
        centre = sum(d) / n
        se = math.sqrt(sum((x - centre) ** 2 for x in d) / (n - 1) / n) if n > 1 else 0.0
    if side == "lower":
        return centre - z * se
    return (centre - z * se, centre + z * se)


def cost_per_token(rows: Sequence[Mapping[str, Any]], drafter_cost: float = 0.0) -> float | None:
    """``(Σ verifier calls + drafter_cost · Σ drafter calls) / Σ tokens`` of ``rows``' per-row
    statistics (None when a row lacks a counter or no token was emitted)."""
    v = d = t = 0.0
    for r in rows:
        st = r.get("stats") or {}
        vc, dc = st.get("verifier_calls"), st.get("drafter_calls", 0)
        tok = st.get("tokens", r.get("new_tokens"))
        if vc is None or tok is None or (drafter_cost and dc is None):
            return None
        v, d, t = v + vc, d + (dc or 0), t + tok
    return (v + drafter_cost * d) / t if t else None


def level_for(confidence: float, multiplicity: str, k: int) -> float:
    """The confidence each of ``k`` settings is tested at."""
    if multiplicity == "bonferroni":
        return 1 - (1 - confidence) / max(k, 1)
    return confidence


def select(table: list[dict[str, Any]], target_drop: float, multiplicity: str,
           lossless_cost: float | None = None) -> int | None:
    """Mark ``tested`` / ``qualifies`` on ``table`` (entries in lossless-first order, each with
    ``lower_bound`` and ``cost_per_token``) and return the index of the chosen entry (None: the
    lossless fallback). Module docstring: *Selection*."""
    if multiplicity not in MULTIPLICITY:
        raise ValueError(f"multiplicity must be one of {', '.join(MULTIPLICITY)}, got "
                         f"{multiplicity!r}")
    stopped = False
    for e in table:
        e["tested"] = not stopped
        e["qualifies"] = bool(not stopped and e["lower_bound"] is not None
                              and e["lower_bound"] >= -target_drop)
        if multiplicity == "fixed_sequence" and e["tested"] and not e["qualifies"]:
            stopped = True
    best = None
    for i, e in enumerate(table):
        c = e["cost_per_token"]
        if not e["qualifies"] or c is None:
            continue
        if lossless_cost is not None and not c < lossless_cost:
            continue
        if best is None or c < table[best]["cost_per_token"]:
            best = i
    for i, e in enumerate(table):
        e["chosen"] = i == best
    return best


# --------------------------------------------------------------------------- calibrate


def default_alphas(rule: str) -> list[float]:
    """The default α grid of ``rule``, lossless end first."""
    check_rule(rule)
    if rule not in DEFAULT_ALPHAS:
        raise ValueError(f"rule={rule!r} has no alpha to calibrate; choose one of "
                         f"{', '.join(DEFAULT_ALPHAS)}")
    return list(DEFAULT_ALPHAS[rule])


def order_alphas(rule: str, alphas: Sequence[float]) -> list[float]:
    """``alphas`` checked against ``rule``'s range, deduplicated, lossless end first."""
    if rule not in DEFAULT_ALPHAS or ALPHA_RANGES.get(rule) is None:
        check_rule(rule)
        raise ValueError(f"rule={rule!r} has no alpha to calibrate; choose one of "
                         f"{', '.join(DEFAULT_ALPHAS)}")
    out = sorted({float(a) for a in alphas}, reverse=rule in DECREASING)
    if not out:
        raise ValueError("alphas: give at least one value")
    for a in out:
        try:
            check_alpha(rule, a)
        except ValueError as e:
            raise ValueError(f"alphas: {e}") from None
    return out


def order_budgets(rule: str, budgets: Sequence[float],
                  alpha: float | None) -> tuple[list[float], float | None]:
    """``(budgets sorted from 0 up, the fixed α)`` of a divergence-budget calibration."""
    import dataclasses

    from speccascade_fast.config import DEFAULT_ALPHA, DecodeConfig

    if "divergence_budget" not in {f.name for f in dataclasses.fields(DecodeConfig)}:
        raise ValueError("budgets: this version's DecodeConfig has no divergence_budget")
    check_rule(rule)
    if ALPHA_RANGES.get(rule) is None:
        raise ValueError(f"rule={rule!r} has no alpha; a budget calibrates a lenient rule")
    out = sorted({_check_number("budgets", b, 0.0) for b in budgets})
    if not out:
        raise ValueError("budgets: give at least one value")
    alpha = DEFAULT_ALPHA[rule] if alpha is None else alpha
    try:
        check_alpha(rule, alpha)
    except ValueError as e:
        raise ValueError(f"alpha: {e}") from None
    return out, float(alpha)


def _check_number(name: str, v: Any, lo: float, hi: float | None = None,
                  open_lo: bool = False) -> float:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and (
        v > lo if open_lo else v >= lo) and (hi is None or v < hi)
    if not ok:
        rng = f"in ({lo:g}, {hi:g})" if hi is not None else f"{'>' if open_lo else '>='} {lo:g}"
        raise ValueError(f"{name} must be a number {rng}, got {v!r}")
    return float(v)


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def _precheck(folder: Path, task: Any, *, seed: Any, max_new_tokens: Any, chat: Any,
              batch_size: Any, unsafe_local_exec: Any) -> None:
    """The harness's own checks of a run, before the split file is written (so a mistyped
    command leaves nothing that pins a folder)."""
    from .harness import _check_int, validate_run_args

    validate_run_args(limit=None, seed=seed, max_new_tokens=max_new_tokens, chat=chat,
                      eos_token_id=None, table2_tol=0.0, table2_envelope="polyline",
                      out_dir=folder)
    _check_int("batch_size", batch_size, 1, "batch 1, timed")
    if not isinstance(unsafe_local_exec, bool):
        raise ValueError(f"unsafe_local_exec must be True or False, got {unsafe_local_exec!r}")
    if getattr(task, "runs_generated_code", False):
        task.unsafe_local_exec = unsafe_local_exec
        task.check_runnable()  # no sandbox and no opt-out: refused here


def _check_split_file(folder: Path, split: Mapping[str, Any], extra: Mapping[str, Any]) -> None:
    """Write ``folder/split.json`` or check that the one there has the same split and
    ``extra`` settings (rows of one split never mix with another's)."""
    want = {"split": {k: v for k, v in split.items() if not k.endswith("_ids")}, **extra}
    path = folder / SPLIT_FILE
    if path.exists():
        have = json.loads(path.read_text())
        diff = {k: (have.get(k), want.get(k)) for k in set(have) | set(want)
                if have.get(k) != want.get(k)}
        if diff:
            raise ValueError(f"{folder} holds rows of another split or setting {diff} (old, "
                             f"new); use another out_dir")
        return
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(want, indent=2) + "\n")


def _rows_by(folder: Path, ids: Sequence[str]) -> dict[str, dict[str, Mapping[str, Any]]]:
    keep = set(ids)
    out: dict[str, dict[str, Mapping[str, Any]]] = {}
    for r in load_rows(folder / "rows.jsonl"):
        if r["example_id"] in keep:
            out.setdefault(r["config"], {})[r["example_id"]] = r
    return out


def _scores(rows: Mapping[str, Mapping[str, Any]], ids: Sequence[str]) -> list[float]:
    return [float(rows[i]["scoring"]["score"]) for i in ids]


def calibrate(
    task: str | Any,
    *,
    drafter: Any,
    verifier: Any,
    tokenizer: Any,
    out_dir: str | Path,
    target_drop: float,
    confidence: float = 0.9,
    rule: str = "token_v3",
    alphas: Sequence[float] | None = None,
    budgets: Sequence[float] | None = None,
    alpha: float | None = None,
    calib_fraction: float = 0.5,
    split_seed: int = 0,
    limit: int | None = None,
    batch_size: int | None = 8,
    max_new_tokens: int | None = None,
    gamma: int = 5,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    bonus: str | None = None,
    seed: int = 0,
    chat: bool | str = "auto",
    bound: str = "normal",
    multiplicity: str = "fixed_sequence",
    drafter_cost: float = 0.0,
    include_lossless: bool = False,
    bootstrap: int = 2000,
    task_kwargs: Mapping[str, Any] | None = None,
    unsafe_local_exec: bool = False,
    progress: bool = True,
    plots: bool = False,
    generate_fn: Callable[..., Any] | None = None,
    command: str | None = None,
) -> dict[str, Any]:
    """Calibrate ``rule``'s α on ``task`` for ``quality(α) ≥ quality(verifier) − target_drop``
    at confidence ``confidence`` and write ``out_dir/calibration.json`` (returned as a dict).

    Args (the module docstring defines the split, the cost, the bound and the selection):
        task: a task name or object; ``limit``: its first N examples before the split.
        drafter, verifier, tokenizer: the pair, as for :func:`.harness.run_eval`.
        target_drop: D >= 0, in the task's score units (pass@1 0.05 = 5 points).
        confidence: c in (0, 1), the one-sided confidence of each bound.
        rule: the rule whose α is calibrated (any rule with an α range, not ``spec`` /
            ``drafter``); ``alphas``: its grid (default :data:`DEFAULT_ALPHAS`), sorted
            lossless end first.
        budgets: calibrate ``divergence_budget`` instead (knob ``"divergence_budget"``): the
            budgets B >= 0 to try (sorted, 0 = lossless end first) at the fixed ``alpha``
            (default: the rule's default α); needs a DecodeConfig with ``divergence_budget``.
        calib_fraction, split_seed: the split.
        batch_size: the harness's quality mode (None: batch 1, timed rows).
        max_new_tokens, gamma, temperature, top_k, top_p, bonus, seed, chat, task_kwargs,
            unsafe_local_exec, progress, plots, generate_fn: as in :func:`.harness.run_eval`.
        bound: ``"normal"`` or ``"bootstrap"`` (``bootstrap`` resamples);
            ``multiplicity``: ``"fixed_sequence"``, ``"bonferroni"`` or ``"none"``.
        drafter_cost: a drafter call's cost in verifier calls, >= 0 (the cost measure).
        include_lossless: also run lossless ``spec`` (an α must then be cheaper than it).
        command: the command line to record in the file.
    """
    target_drop = _check_number("target_drop", target_drop, 0.0)
    confidence = _check_number("confidence", confidence, 0.0, 1.0, open_lo=True)
    drafter_cost = _check_number("drafter_cost", drafter_cost, 0.0)
    if bound not in BOUNDS:
        raise ValueError(f"bound must be one of {', '.join(BOUNDS)}, got {bound!r}")
    if multiplicity not in MULTIPLICITY:
        raise ValueError(f"multiplicity must be one of {', '.join(MULTIPLICITY)}, got "
                         f"{multiplicity!r}")
    if isinstance(bootstrap, bool) or not isinstance(bootstrap, int) or bootstrap < 100:
        raise ValueError(f"bootstrap must be an int >= 100 (resamples), got {bootstrap!r}")
    knob = "alpha" if budgets is None else "divergence_budget"
    if knob == "alpha":
        if alpha is not None:
            raise ValueError("alpha (one fixed value) goes with budgets; to calibrate alpha "
                             "give alphas")
        grid = order_alphas(rule, default_alphas(rule) if alphas is None else alphas)
        points = [EvalConfig("spec_cascade", rule, a) for a in grid]
    else:
        if alphas is not None:
            raise ValueError("alphas and budgets are alternatives (one knob is calibrated): "
                             "give budgets with one fixed alpha")
        grid, fixed_alpha = order_budgets(rule, budgets, alpha)
        points = [EvalConfig("spec_cascade", rule, fixed_alpha, divergence_budget=b)
                  for b in grid]
    task_kwargs = dict(task_kwargs or {})
    task_obj = get_task(task, **task_kwargs)
    split = make_split(task_obj, limit, calib_fraction, split_seed)
    cal_ids = split["calibration_ids"]
    configs = [VERIFIER] + ([LOSSLESS] if include_lossless else []) + points
    out = Path(out_dir)
    folder = out / CALIBRATION_DIR
    run_kw = dict(drafter=drafter, verifier=verifier, tokenizer=tokenizer, limit=None,
                  seed=seed, gamma=gamma, temperature=temperature,
                  max_new_tokens=max_new_tokens, progress=progress, top_k=top_k, top_p=top_p,
                  bonus=bonus, chat=chat, task_kwargs=task_kwargs, plots=plots,
                  unsafe_local_exec=unsafe_local_exec, batch_size=batch_size,
                  generate_fn=generate_fn)
    # everything is checked before the split file is written
    from .harness import _check_decoding

    _check_decoding(configs, {"gamma": gamma, "temperature": temperature, "top_k": top_k,
                              "top_p": top_p, "bonus": bonus})
    _precheck(folder, task_obj, seed=seed, max_new_tokens=max_new_tokens, chat=chat,
              batch_size=batch_size, unsafe_local_exec=unsafe_local_exec)
    _check_split_file(folder, split, {"task": task_obj.name, "task_kwargs": task_kwargs})
    summary = run_eval(subset_task(task_obj, cal_ids), configs, out_dir=folder, **run_kw)
    settings = dict(summary.get("settings") or {})

    rows = _rows_by(folder, cal_ids)
    base_rows = rows.get(VERIFIER.key, {})
    base = _scores(base_rows, cal_ids)
    verifier_cost = cost_per_token([base_rows[i] for i in cal_ids], drafter_cost)
    lossless_cost = None
    lossless_entry = None
    if include_lossless:
        lr = rows.get(LOSSLESS.key, {})
        lossless_cost = cost_per_token([lr[i] for i in cal_ids], drafter_cost)
        ls = _scores(lr, cal_ids)
        lossless_entry = {"config": LOSSLESS.key, "quality": sum(ls) / len(ls),
                          "cost_per_token": lossless_cost,
                          "cost_ratio": _ratio(lossless_cost, verifier_cost)}
    level = level_for(confidence, multiplicity, len(grid))
    table = []
    for k, cfg in enumerate(points):
        r = rows.get(cfg.key, {})
        s = _scores(r, cal_ids)
        pv = paired_vs([r[i] for i in cal_ids], [base_rows[i] for i in cal_ids])
        lb = paired_bound(s, base, level, method=bound, reps=bootstrap, seed=seed + k)
        c = cost_per_token([r[i] for i in cal_ids], drafter_cost)
        table.append({"alpha": cfg.alpha, "divergence_budget": cfg.divergence_budget,
                      "value": grid[k], "config": cfg.key, "n": len(s),
                      "quality": sum(s) / len(s),
                      "diff": pv["diff"], "diff_se": pv["diff_se"], "better": pv["better"],
                      "worse": pv["worse"], "level": level, "lower_bound": lb,
                      "cost_per_token": c, "cost_ratio": _ratio(c, verifier_cost)})
    chosen = select(table, target_drop, multiplicity, lossless_cost)
    verifier_q = sum(base) / len(base)
    budget = None
    if chosen is None:
        alpha, out_rule, fallback, out_knob = None, "spec", True, "alpha"
        reason = (f"no {knob} of {rule} in the grid had a lower bound >= -{target_drop:g} "
                  f"({multiplicity}, confidence {confidence:g})" + (
                      " and a cost below lossless spec's" if include_lossless else "")
                  + ": the lossless rule spec (the verifier's law) is chosen")
    else:
        e = table[chosen]
        alpha, out_rule, fallback, out_knob = e["alpha"], rule, False, knob
        budget = e["divergence_budget"]
        reason = (f"{knob}={e['value']:g}: the cheapest tested {knob} whose {confidence:g} "
                  f"lower bound on quality - verifier quality ({e['lower_bound']:+.4f}) is >= "
                  f"-{target_drop:g}; cost ratio {_fmt(e['cost_ratio'])}")
    doc = {
        "format": FORMAT, "version": VERSION, "knob": out_knob, "method": "spec_cascade",
        "rule": out_rule, "alpha": alpha,
        **({"divergence_budget": budget} if out_knob == "divergence_budget" else {}),
        "fallback": fallback, "calibrated_rule": rule, "calibrated_knob": knob,
        "reason": reason, "target_drop": target_drop, "confidence": confidence,
        "bound": {"method": bound, "multiplicity": multiplicity, "level_per_setting": level,
                  "bootstrap": bootstrap if bound == "bootstrap" else None},
        "cost": {"measure": "(verifier calls + drafter_cost * drafter calls) / new tokens",
                 "drafter_cost": drafter_cost, "verifier_cost_per_token": verifier_cost},
        "task": task_obj.name, "task_kwargs": task_kwargs,
        "split": {k: v for k, v in split.items() if not k.endswith("_ids")},
        "n": len(cal_ids),
        "verifier": {"config": VERIFIER.key, "quality": verifier_q,
                     "cost_per_token": verifier_cost},
        "lossless": lossless_entry,
        "table": table,
        "settings": {**{k: settings.get(k) for k in ("gamma", "temperature", "top_k", "top_p",
                                                      "max_new_tokens", "seed", "chat", "bonus",
                                                      "stop_tokens")},
                     "batch_size": batch_size},
        "models": {"drafter": settings.get("drafter"), "verifier": settings.get("verifier")},
        "plan": {"configs": [c.key for c in configs], "rows": f"{CALIBRATION_DIR}/rows.jsonl",
                 "command": command},
        "created": _now(),
    }
    write_calibration(out / CALIBRATION_FILE, doc)
    (out / "calibration.md").write_text(calibration_markdown(doc))
    return doc


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def calibration_markdown(doc: Mapping[str, Any]) -> str:
    """``calibration.md``: the choice and the per-α table."""
    pct = 100.0 if doc.get("task") in ("humaneval", "gsm8k") else 1.0
    unit = " (points)" if pct == 100.0 else ""
    sp, b = doc["split"], doc["bound"]
    knob = doc.get("calibrated_knob", "alpha")
    lines = [
        f"# Calibration of {doc['calibrated_rule']} on {doc['task']}", "",
        f"Chosen: rule `{doc['rule']}`, alpha `{doc['alpha']}`"
        + (f", divergence_budget `{doc['divergence_budget']}`"
           if doc.get("knob") == "divergence_budget" else "")
        + (" (fallback: lossless)" if doc["fallback"] else "") + f". {doc['reason']}.", "",
        f"Target: quality >= verifier quality - {doc['target_drop']:g}, one-sided confidence "
        f"{doc['confidence']:g} per setting ({b['method']} bound, {b['multiplicity']}, level "
        f"{b['level_per_setting']:.4g}). Calibration split: {sp['n_calibration']} of "
        f"{sp['n_examples']} examples (fraction {sp['fraction']:g}, seed {sp['seed']}, ids "
        f"sha256 {sp['calibration_ids_sha256'][:12]}…). Cost: {doc['cost']['measure']} with "
        f"drafter_cost {doc['cost']['drafter_cost']:g}.", "",
        f"Verifier: quality {doc['verifier']['quality'] * pct:.2f}, cost per token "
        f"{_fmt(doc['verifier']['cost_per_token'])}.", "",
        f"| {knob} | n | quality | Δ vs verifier{unit} | ± paired SE | better | worse "
        f"| lower bound{unit} | cost / token | cost ratio | tested | qualifies | chosen |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | :---: | :---: "
        "| :---: |",
    ]
    for e in doc["table"]:
        lines.append(
            f"| {e['value']:g} | {e['n']} | {e['quality'] * pct:.2f} | {e['diff'] * pct:+.2f} | "
            f"{e['diff_se'] * pct:.2f} | {e['better']} | {e['worse']} | "
            f"{e['lower_bound'] * pct:+.2f} | {_fmt(e['cost_per_token'])} | "
            f"{_fmt(e['cost_ratio'])} | {'yes' if e['tested'] else 'no'} | "
            f"{'yes' if e['qualifies'] else 'no'} | {'**yes**' if e['chosen'] else ''} |")
    if doc.get("lossless"):
        ll = doc["lossless"]
        lines += ["", f"Lossless `spec`: quality {ll['quality'] * pct:.2f}, cost per token "
                      f"{_fmt(ll['cost_per_token'])} (ratio {_fmt(ll['cost_ratio'])})."]
    lines += ["", "The bound is a statement about the task's mean score on data like the "
                  "calibration split, at these settings; not about any single response."]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- validate


def validate(
    calibration: str | Path,
    *,
    drafter: Any,
    verifier: Any,
    tokenizer: Any,
    out_dir: str | Path | None = None,
    batch_size: int | None = None,
    ci: float = 0.95,
    progress: bool = True,
    plots: bool = False,
    unsafe_local_exec: bool = False,
    generate_fn: Callable[..., Any] | None = None,
    task: Any = None,
    limit: int | None = None,
) -> dict[str, Any]:
    """Run the calibration's chosen setting and the verifier on its validation split (the
    file's task, split and settings) and write ``validation.json`` / ``validation.md`` into
    ``out_dir`` (default: the file's folder): the realised difference ``quality − verifier
    quality`` with its two-sided ``ci`` interval and the one-sided lower bound at the file's
    confidence (same bound method), whether that bound meets ``−target_drop``, and the cost
    ratio with a percentile bootstrap CI over examples. ``task``: a task object to use
    instead of the file's task name (it must have that name). ``limit``: only the first N
    examples of the validation split (a later call without it adds the rest; the report says
    how many of the split it covers)."""
    cal = load_calibration(calibration)
    doc = cal.data
    for name in ("task", "split", "settings", "target_drop", "confidence"):
        if name not in doc:
            raise ValueError(f"calibration file {cal.path}: field {name!r}: missing (validate "
                             f"needs the record of the calibration run)")
    ci = _check_number("ci", ci, 0.0, 1.0, open_lo=True)
    sp, st = doc["split"], doc["settings"]
    task_kwargs = dict(doc.get("task_kwargs") or {})
    task_obj = get_task(doc["task"] if task is None else task, **task_kwargs)
    if task_obj.name != doc["task"]:
        raise ValueError(f"task {task_obj.name!r} is not the calibration's task "
                         f"{doc['task']!r} (calibration file {cal.path})")
    split = make_split(task_obj, sp.get("limit"), sp["fraction"], sp["seed"])
    for k in ("examples_sha256", "calibration_ids_sha256", "validation_ids_sha256"):
        if sp.get(k) is not None and split[k] != sp[k]:
            raise ValueError(f"calibration file {cal.path}: field 'split': the task's examples "
                             f"no longer give the calibrated split ({k} differs)")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be None (the whole validation split) or an int >= 1, got "
                         f"{limit!r}")
    val_ids = split["validation_ids"][:limit]
    chosen = EvalConfig("spec_cascade", cal.rule, cal.alpha,
                        divergence_budget=cal.divergence_budget)
    out = Path(out_dir) if out_dir is not None else Path(cal.path).parent
    folder = out / VALIDATION_DIR
    bs = batch_size if batch_size is not None else st.get("batch_size")
    drafter_cost = float((doc.get("cost") or {}).get("drafter_cost", 0.0))
    bound = (doc.get("bound") or {}).get("method", "normal")
    _precheck(folder, task_obj, seed=st.get("seed", 0), max_new_tokens=st.get("max_new_tokens"),
              chat=st.get("chat", "auto"), batch_size=bs, unsafe_local_exec=unsafe_local_exec)
    _check_split_file(folder, split, {"task": task_obj.name, "task_kwargs": task_kwargs})
    run_eval(subset_task(task_obj, val_ids), [VERIFIER, chosen], drafter=drafter,
             verifier=verifier, tokenizer=tokenizer, limit=None, seed=st.get("seed", 0),
             out_dir=folder, gamma=st.get("gamma", 5), temperature=st.get("temperature", 1.0),
             max_new_tokens=st.get("max_new_tokens"), progress=progress, top_k=st.get("top_k"),
             top_p=st.get("top_p"), bonus=st.get("bonus"), chat=st.get("chat", "auto"),
             stop_tokens=st.get("stop_tokens", True), task_kwargs=task_kwargs, plots=plots,
             unsafe_local_exec=unsafe_local_exec, batch_size=bs, generate_fn=generate_fn)
    rows = _rows_by(folder, val_ids)
    br, cr = rows[VERIFIER.key], rows[chosen.key]
    base, s = _scores(br, val_ids), _scores(cr, val_ids)
    conf = float(doc["confidence"])
    lo = paired_bound(s, base, conf, method=bound)
    two = paired_bound(s, base, ci, side="two", method=bound)
    pv = paired_vs([cr[i] for i in val_ids], [br[i] for i in val_ids])
    cv = cost_per_token([br[i] for i in val_ids], drafter_cost)
    cc = cost_per_token([cr[i] for i in val_ids], drafter_cost)
    result = {
        "calibration": str(cal.path),
        "calibration_sha256": hashlib.sha256(Path(cal.path).read_bytes()).hexdigest(),
        "task": task_obj.name, "config": chosen.key, "rule": cal.rule, "alpha": cal.alpha,
        "fallback": cal.fallback, "n": len(val_ids),
        "n_validation_split": len(split["validation_ids"]),
        "split": {k: v for k, v in split.items() if not k.endswith("_ids")},
        "quality": sum(s) / len(s), "verifier_quality": sum(base) / len(base),
        "diff": pv["diff"], "diff_se": pv["diff_se"], "better": pv["better"],
        "worse": pv["worse"], "sign_p": pv["sign_p"], "ci": ci, "diff_ci": list(two),
        "confidence": conf, "lower_bound": lo, "target_drop": doc["target_drop"],
        "meets_target": lo >= -float(doc["target_drop"]),
        "bound": bound, "drafter_cost": drafter_cost,
        "cost_per_token": cc, "verifier_cost_per_token": cv, "cost_ratio": _ratio(cc, cv),
        "cost_ratio_ci": _cost_ratio_ci([cr[i] for i in val_ids], [br[i] for i in val_ids],
                                        drafter_cost, ci),
        "batch_size": bs,
        "calibration_estimate": next(
            ({k: e.get(k) for k in ("n", "diff", "diff_se", "lower_bound", "cost_ratio")}
             for e in doc.get("table") or [] if isinstance(e, Mapping) and e.get("chosen")),
            None),
        "created": _now(),
    }
    (out / "validation.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "validation.md").write_text(validation_markdown(result))
    return result


def _cost_ratio_ci(rows, base_rows, drafter_cost, ci, reps=2000, seed=0):
    """Percentile bootstrap CI (examples resampled, paired) of the ratio of the two costs."""
    import numpy as np

    def parts(rs):
        st = [r.get("stats") or {} for r in rs]
        if any(s.get("verifier_calls") is None for s in st):
            return None
        num = np.array([s["verifier_calls"] + drafter_cost * (s.get("drafter_calls") or 0)
                        for s in st], dtype=float)
        tok = np.array([s.get("tokens", r.get("new_tokens", 0)) for s, r in zip(st, rs)],
                       dtype=float)
        return num, tok

    a, b = parts(rows), parts(base_rows)
    if a is None or b is None:
        return None
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(rows), size=(reps, len(rows)))
    with np.errstate(divide="ignore", invalid="ignore"):
        r = (a[0][idx].sum(1) / a[1][idx].sum(1)) / (b[0][idx].sum(1) / b[1][idx].sum(1))
    r = r[np.isfinite(r)]
    if not len(r):
        return None
    return [float(np.quantile(r, (1 - ci) / 2)), float(np.quantile(r, (1 + ci) / 2))]


def validation_markdown(v: Mapping[str, Any]) -> str:
    pct = 100.0 if v.get("task") in ("humaneval", "gsm8k") else 1.0
    lvl = int(round(100 * v["ci"]))
    crci = v.get("cost_ratio_ci")
    return "\n".join([
        f"# Validation of {v['calibration']}", "",
        f"Setting `{v['config']}`" + (" (the lossless fallback)" if v["fallback"] else "")
        + f" against the verifier on the validation split: n = {v['n']} of its "
        f"{v.get('n_validation_split', v['n'])} examples "
        f"({v['task']}, ids sha256 {v['split']['validation_ids_sha256'][:12]}…).", "",
        "| | value |", "| --- | ---: |",
        f"| quality | {v['quality'] * pct:.2f} |",
        f"| verifier quality | {v['verifier_quality'] * pct:.2f} |",
        f"| Δ quality − verifier | {v['diff'] * pct:+.2f} ± {v['diff_se'] * pct:.2f} (paired SE)"
        f" |",
        f"| Δ {lvl} % CI ({v['bound']}) | [{v['diff_ci'][0] * pct:+.2f}, "
        f"{v['diff_ci'][1] * pct:+.2f}] |",
        f"| one-sided {v['confidence']:g} lower bound | {v['lower_bound'] * pct:+.2f} |",
        f"| target: Δ ≥ −{v['target_drop'] * pct:g} | "
        f"{'met' if v['meets_target'] else 'not shown'} |",
        f"| better / worse examples (sign test p) | {v['better']} / {v['worse']} "
        f"({v['sign_p']:.3f}) |",
        f"| cost per token: setting (verifier) | {_fmt(v['cost_per_token'])} "
        f"({_fmt(v['verifier_cost_per_token'])}) |",
        f"| cost ratio | {_fmt(v['cost_ratio'])} "
        + (f"[{crci[0]:.3f}, {crci[1]:.3f}] |" if crci else "|"),
        "",
        *([f"On the calibration split (n = {est['n']}) the same setting had Δ "
           f"{est['diff'] * pct:+.2f}, lower bound {est['lower_bound'] * pct:+.2f}, cost ratio "
           f"{_fmt(est['cost_ratio'])}.", ""] if (est := v.get("calibration_estimate")) else []),
        "Cost: (verifier calls + drafter_cost × drafter calls) / new tokens, drafter_cost "
        f"{v['drafter_cost']:g}; speed-up in verifier work = 1 / cost ratio. Not a wall-clock "
        "measurement.", ""])
