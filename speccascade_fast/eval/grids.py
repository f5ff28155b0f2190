"""Pre-registered evaluation grids: what a run will measure, fixed before it starts.

A *grid* names a task, the run's settings, every configuration (each rule's α points from its
lossless end to its drafter end, both bonus modes of ``token_v3``, the baselines: the verifier,
the drafter, lossless ``spec``, the verifier with min-p truncation at thresholds matched to
``token_v3``'s α, Hugging Face's ensemble mode) and the latency protocol. :func:`build_plan` turns
it into a *plan*, a JSON document written to ``<out>/plan.json`` (``speccascade eval --grid NAME
--plan``) together with a compute-budget estimate *before* any generation runs. Every later run
into that folder is checked against it (:func:`check_folder_plan`): other settings, other
configurations, another latency protocol or another analysis are refused, so what the run
reports is what was registered.

The α points (docs/semantics.md §4 gives each rule's exact ends):

* ``token_v3``: 0 (A = argmax p only; the lossless end is any α < 0, i.e. ``spec``) … 1 (every
  token acceptable: the drafter);
* ``lossy``: 0 (= ``spec``) … 0.99 (→ 1 is the drafter);
* ``opt``: −100 (defers wherever TV > 0: ``spec``) … 100 (practically never defers);
* ``diff``: −1 (= ``spec``) … 1 (= the drafter); ``chow``: 0 … 1; ``bild``: 0 … 50 (nats);
* ``ensemble`` (HF's ``assistant_ensemble_weight``, with HF's bonus from the verifier): w = 1
  (= ``spec``) … 0 (= the drafter);
* min-p: ``min_p = 1 − α`` for ``token_v3``'s α < 1, the verifier truncated to the tokens whose
  probability is at least ``min_p`` times the largest, the set ``token_v3`` accepts outright.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .configs import EvalConfig, as_config

PLAN_FILE = "plan.json"
PLAN_VERSION = 1
#: plan entries that are not registered content (may differ between two writes of one plan)
UNREGISTERED = ("budget", "created", "plan_sha256")
#: run settings a plan fixes (run.json's names)
PLAN_SETTINGS = ("task", "gamma", "temperature", "top_k", "top_p", "max_new_tokens", "seed",
                 "bonus", "seq_score", "samples")
#: the value a run's settings (or a grid's) imply for a plan setting they leave out
SETTING_DEFAULTS = {"samples": 1}

TOKEN_V3 = (0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)


@dataclass(frozen=True)
class Grid:
    """A pre-registered grid: ``task``, run ``settings`` (γ, T, max new tokens, seed, limit,
    chat, …), the ``curves`` (name -> configurations in α order), the latency protocol
    (``latency_limit`` examples × ``latency_trials`` trials at batch 1), the quality batch size
    and the analysis options."""

    name: str
    task: str
    settings: Mapping[str, Any]
    curves: Mapping[str, Sequence[str]]
    latency_limit: int
    latency_trials: int
    batch_size: int = 8
    analysis: Mapping[str, Any] = field(default_factory=lambda: {
        "table2_tol": 0.0, "table2_envelope": "polyline", "bootstrap": 2000, "ci": 0.95,
        "holm_family": "every configuration against the verifier"})
    description: str = ""

    @property
    def configs(self) -> list[str]:
        """Every configuration, in run order (the references first, then curve by curve)."""
        out: list[str] = []
        for keys in self.curves.values():
            out += [k for k in (as_config(c).key for c in keys) if k not in out]
        return out


def _curve(method_rule: str, levels: Sequence[float], extra: str = "") -> list[str]:
    return [f"{method_rule}:{a!r}{extra}" for a in levels]


def _main_curves(*, token_v3=TOKEN_V3, token_v3_verifier=(0.0, 0.2, 0.3, 0.5, 1.0),
                 lossy=(0.0, 0.3, 0.5, 0.7, 0.9, 0.99), opt=(-100.0, -1.0, 0.0, 0.3, 1.0, 100.0),
                 ensemble=(1.0, 0.9, 0.7, 0.5, 0.3, 0.0), secondary=True) -> dict[str, list[str]]:
    curves = {
        "references": ["autoregressive", "spec_cascade:spec", "drafter_only"],
        "spec_cascade[token_v3]": _curve("spec_cascade:token_v3", token_v3),
        "spec_cascade[lossy]": _curve("spec_cascade:lossy", lossy),
        "spec_cascade[opt]": _curve("spec_cascade:opt", opt),
        "spec_cascade[ensemble,bonus=verifier]": _curve("spec_cascade:ensemble", ensemble,
                                                        ":bonus=verifier"),
        "autoregressive[min_p]": [f"autoregressive:min_p={round(1 - a, 10)!r}"
                                  for a in token_v3 if a < 1],
        "spec_cascade[token_v3,bonus=verifier]": _curve("spec_cascade:token_v3",
                                                        token_v3_verifier, ":bonus=verifier"),
    }
    if secondary:
        curves.update({
            "spec_cascade[diff]": _curve("spec_cascade:diff", (-1.0, 0.0, 0.1, 0.3, 1.0)),
            "spec_cascade[chow]": _curve("spec_cascade:chow", (0.0, 0.1, 0.3, 0.5, 1.0)),
            "spec_cascade[bild]": _curve("spec_cascade:bild", (0.0, 0.5, 1.0, 2.0, 50.0)),
        })
    return curves


GRIDS: dict[str, Grid] = {
    "humaneval-main": Grid(
        name="humaneval-main", task="humaneval",
        settings={"gamma": 5, "temperature": 1.0, "max_new_tokens": 512, "seed": 0,
                  "limit": None, "chat": "auto", "top_k": None, "top_p": None, "bonus": None,
                  "samples": 3},
        curves=_main_curves(), latency_limit=12, latency_trials=2, batch_size=8,
        description="HumanEval, all 164 problems × 3 samples (seeds), T = 1, γ = 5: every rule of the paper's main "
                    "comparison from its lossless to its drafter end, both bonus modes of "
                    "token_v3, diff / chow / BiLD*, HF's ensemble mode and min-p truncation."),
    "humaneval-completion": Grid(
        name="humaneval-completion", task="humaneval",
        settings={"gamma": 5, "temperature": 1.0, "max_new_tokens": 512, "seed": 0,
                  "limit": None, "chat": False, "top_k": None, "top_p": None, "bonus": None,
                  "samples": 3},
        curves=_main_curves(secondary=False), latency_limit=12, latency_trials=2, batch_size=8,
        description="HumanEval in completion mode (the bare prompt, no chat template), all 164 "
                    "problems × 3 samples, T = 1, γ = 5: the main rules, both bonus modes of "
                    "token_v3, HF's ensemble mode and min-p."),
    "gsm8k-main": Grid(
        name="gsm8k-main", task="gsm8k",
        settings={"gamma": 5, "temperature": 1.0, "max_new_tokens": 256, "seed": 0,
                  "limit": 500, "chat": "auto", "top_k": None, "top_p": None, "bonus": None},
        curves=_main_curves(token_v3=(0.0, 0.1, 0.3, 0.5, 1.0),
                            lossy=(0.0, 0.3, 0.6, 0.9, 0.99), opt=(-100.0, 0.0, 0.3, 1.0, 100.0),
                            ensemble=(1.0, 0.7, 0.5, 0.3, 0.0), token_v3_verifier=(0.0, 0.3, 1.0),
                            secondary=False),
        latency_limit=8, latency_trials=2, batch_size=8,
        description="GSM8K, 500 problems, 8-shot, T = 1, γ = 5: the main rules, HF's ensemble "
                    "mode and min-p."),
    "wmt14-main": Grid(
        name="wmt14-main", task="wmt14",
        settings={"gamma": 5, "temperature": 1.0, "max_new_tokens": 128, "seed": 0,
                  "limit": 500, "chat": "auto", "top_k": None, "top_p": None, "bonus": None},
        curves=_main_curves(token_v3=(0.0, 0.1, 0.3, 0.5, 1.0),
                            lossy=(0.0, 0.3, 0.6, 0.9, 0.99), opt=(-100.0, 0.0, 0.3, 1.0, 100.0),
                            ensemble=(1.0, 0.7, 0.5, 0.3, 0.0), token_v3_verifier=(0.0, 0.3, 1.0),
                            secondary=False),
        latency_limit=16, latency_trials=2, batch_size=8,
        description="WMT14 English→German, 500 sentences, 4-shot, T = 1, γ = 5: the main "
                    "rules, HF's ensemble mode and min-p (corpus BLEU, compared by the paired "
                    "bootstrap over segments)."),
}


def get_grid(name: str | Grid) -> Grid:
    if isinstance(name, Grid):
        return name
    try:
        return GRIDS[name]
    except KeyError:
        raise ValueError(f"unknown grid {name!r}; choose from {', '.join(sorted(GRIDS))}") \
            from None


# --------------------------------------------------------------------------- compute budget

#: seconds per new token at batch 1 on the 2-core CPU box with the default Qwen2.5-Coder
#: 0.5B -> 1.5B pair (bf16), from docs/results/2026-11-23-cpu2-humaneval-T1-n40 (40 problems
#: x 23 configurations, prefill included): the verifier 0.161, the drafter 0.060, the
#: speculative configurations 0.087-0.099 (0.093 on average)
SECONDS_PER_TOKEN = {"autoregressive": 0.161, "drafter_only": 0.060, "spec_cascade": 0.093}
#: assumed: the min-p baseline costs what the verifier alone does; ensemble's float64
#: reference verification adds about a tenth (not measured)
SECONDS_PER_TOKEN_ASSUMED = {"min_p": 0.161, "ensemble": 0.093 * 1.1}
#: mean new tokens per example (HumanEval measured in the same run; the others assumed)
TOKENS_PER_EXAMPLE = {"humaneval": 160, "gsm8k": 130, "wmt14": 40}
EXAMPLES = {"humaneval": 164, "gsm8k": 1319, "wmt14": 3003}


def seconds_per_generation(cfg: EvalConfig, task: str, max_new_tokens: int) -> float:
    tokens = min(TOKENS_PER_EXAMPLE.get(task, max_new_tokens), max_new_tokens)
    if cfg.min_p is not None:
        rate = SECONDS_PER_TOKEN_ASSUMED["min_p"]
    elif cfg.rule == "ensemble":
        rate = SECONDS_PER_TOKEN_ASSUMED["ensemble"]
    else:
        rate = SECONDS_PER_TOKEN.get(cfg.method, SECONDS_PER_TOKEN["autoregressive"])
    return rate * tokens


def estimate_budget(grid: Grid, n_examples: int) -> dict[str, Any]:
    """The plan's compute estimate: generations and hours of the quality grid (at batch 1: an
    upper bound, the batched speed-up is not assumed) and of the latency protocol."""
    cfgs = [as_config(k) for k in grid.configs]
    mnt = grid.settings["max_new_tokens"]
    samples = int(grid.settings.get("samples", SETTING_DEFAULTS["samples"]))
    per = {c.key: seconds_per_generation(c, grid.task, mnt) for c in cfgs}
    quality_s = n_examples * samples * sum(per.values())
    lat_n = min(grid.latency_limit, n_examples) * grid.latency_trials
    latency_s = lat_n * sum(per.values())
    return {
        "quality_generations": n_examples * samples * len(cfgs),
        "quality_hours_at_batch_1": round(quality_s / 3600, 1),
        "latency_generations": lat_n * len(cfgs),
        "latency_hours": round(latency_s / 3600, 1),
        "total_hours_upper_bound": round((quality_s + latency_s) / 3600, 1),
        "seconds_per_generation": {k: round(v, 1) for k, v in per.items()},
        "assumptions": (
            "2-core CPU, default Qwen2.5-Coder 0.5B -> 1.5B pair, bf16; seconds per token at "
            "batch 1 from docs/results/2026-11-23-cpu2-humaneval-T1-n40 (verifier 0.161, "
            "drafter 0.060, speculative 0.093); min-p assumed at the verifier's rate, ensemble "
            f"at 1.1x the speculative rate; {TOKENS_PER_EXAMPLE.get(grid.task, mnt)} new tokens "
            "per example; the quality grid runs batched, whose speed-up is not assumed (the "
            "quality hours are an upper bound); scoring time not included"),
    }


# --------------------------------------------------------------------------- plans


def registered(plan: Mapping[str, Any]) -> dict[str, Any]:
    """The registered content of a plan: everything but its budget, date and hash."""
    return {k: v for k, v in plan.items() if k not in UNREGISTERED}


def _measured(plan: Mapping[str, Any]) -> dict[str, Any]:
    """What a plan fixes about the measurement: its registered content without the prose
    ``description`` (mending a description does not make a folder's plan another plan; the
    hash still protects the file's whole content from edits)."""
    return {k: v for k, v in registered(plan).items() if k != "description"}


def plan_sha(plan: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(registered(plan), sort_keys=True).encode()).hexdigest()


def build_plan(grid: str | Grid, *, drafter: str | None, verifier: str | None,
               n_examples: int | None = None, batch_size: int | None = None) -> dict[str, Any]:
    """The plan of ``grid`` for a pair of models (names as given to the CLI), with its budget.
    ``n_examples``: the examples the task has within the grid's limit (default: the known size
    of the task)."""
    g = get_grid(grid)
    limit = g.settings.get("limit")
    if n_examples is None:
        n_examples = EXAMPLES.get(g.task, limit or 0)
        if limit is not None:
            n_examples = min(n_examples, limit)
    levels = {}
    for name, keys in g.curves.items():
        if name != "references":
            levels[name] = [as_config(k).level for k in keys]
    plan = {
        "plan_version": PLAN_VERSION,
        "grid": g.name,
        "description": g.description,
        "task": g.task,
        "settings": {k: v for k, v in g.settings.items()},
        "models": {"drafter": drafter, "verifier": verifier},
        "n_examples": n_examples,
        "configs": g.configs,
        "curves": levels,
        "quality": {"batch_size": batch_size or g.batch_size, "order":
                    "configurations outer (in this order), examples in task order, in chunks"
                    + (", each example's samples together"
                       if g.settings.get("samples", SETTING_DEFAULTS["samples"]) > 1 else "")},
        "latency": {"limit": g.latency_limit, "trials": g.latency_trials, "batch_size": 1,
                    "order": "per (example, trial) the configurations in a shuffled order"},
        "analysis": dict(g.analysis),
        "budget": estimate_budget(g, n_examples),
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
    plan["plan_sha256"] = plan_sha(plan)
    return plan


def _model_id(name: Any) -> str | None:
    return None if not isinstance(name, str) or not name else Path(name).name.lower()


def check_plan_matches(plan: Mapping[str, Any], settings: Mapping[str, Any],
                       cfgs: Sequence[EvalConfig], example_ids: Sequence[str] | None = None,
                       ) -> None:
    """ValueError unless a run with ``settings`` (run.json's form) and ``cfgs`` is one the plan
    registered: the same task and settings, the same models (by folder or hub name), every
    configuration in the plan, and (when given) the plan's number of examples."""
    where = f"the pre-registered plan {plan.get('grid')!r}"
    if settings.get("task") != plan.get("task"):
        raise ValueError(f"{where} is for task {plan.get('task')!r}, not {settings.get('task')!r}")
    ps = plan.get("settings", {})
    for k in PLAN_SETTINGS:
        got = settings.get(k, SETTING_DEFAULTS.get(k))
        want = ps.get(k, SETTING_DEFAULTS.get(k))
        if (k in ps or k in SETTING_DEFAULTS) and k != "task" and want != got:
            raise ValueError(f"{where} registered {k}={want!r}; this run has "
                             f"{k}={got!r} (a registered plan cannot change)")
    if isinstance(ps.get("chat"), bool) and ps["chat"] != settings.get("chat"):
        raise ValueError(f"{where} registered chat={ps['chat']!r}")
    for role, name in (plan.get("models") or {}).items():
        want, got = _model_id(name), _model_id(settings.get(role))
        if want is not None and got is not None and want != got:
            raise ValueError(f"{where} registered {role} {name!r}; this run has "
                             f"{settings.get(role)!r}")
    allowed = set(plan.get("configs", []))
    extra = [c.key for c in cfgs if c.key not in allowed]
    if extra:
        raise ValueError(f"{where} does not register {', '.join(extra)} (a registered plan "
                         f"cannot change; use another output folder)")
    n = plan.get("n_examples")
    if example_ids is not None and n is not None and len(example_ids) != n:
        raise ValueError(f"{where} registered {n} examples; this run has {len(example_ids)} "
                         f"(its --limit)")


def check_latency_plan(plan: Mapping[str, Any], settings: Mapping[str, Any],
                       cfgs: Sequence[EvalConfig], limit: int | None, trials: int) -> None:
    """:func:`check_plan_matches` for a latency run, plus the plan's latency protocol."""
    check_plan_matches(plan, settings, cfgs)
    lat = plan.get("latency", {})
    if (lat.get("limit"), lat.get("trials")) != (limit, trials):
        raise ValueError(f"the pre-registered plan {plan.get('grid')!r} registered latency on "
                         f"{lat.get('limit')} examples x {lat.get('trials')} trials; this run "
                         f"asks for {limit} x {trials}")


def load_plan(out: str | Path) -> dict[str, Any] | None:
    path = Path(out) / PLAN_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def check_folder_plan(out: str | Path, plan: Mapping[str, Any] | None,
                      settings: Mapping[str, Any], cfgs: Sequence[EvalConfig]) -> None:
    """Before a run writes into ``out``: the plan it brings must be the folder's (if the folder
    has one), and a run without a plan must fit the folder's plan. A plan cannot be registered
    into a folder that already holds rows."""
    out = Path(out)
    existing = load_plan(out)
    if existing is not None:
        if existing.get("plan_sha256") != plan_sha(existing):
            raise ValueError(f"{out / PLAN_FILE} was edited after it was registered (its "
                             f"plan_sha256 does not match its content)")
        new, old = _measured(plan or {}), _measured(existing)
        if plan is not None and new != old:
            diff = sorted(k for k in set(new) | set(old) if new.get(k) != old.get(k))
            raise ValueError(f"{out / PLAN_FILE} registers another plan (differs in: "
                             f"{', '.join(diff)}); a registered plan cannot change: use another "
                             f"output folder")
        check_plan_matches(existing, settings, cfgs)
    elif plan is not None and any((out / f).exists() for f in ("rows.jsonl", "latency.jsonl")):
        raise ValueError(f"{out} already holds rows of a run that was not pre-registered; "
                         f"register the plan into a new output folder")


def write_plan(out: str | Path, plan: Mapping[str, Any]) -> Path:
    """``--plan``: write ``plan`` to ``out/plan.json`` (created), or check it equals the one
    there. Returns the path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    check_folder_plan(out, plan, {"task": plan["task"], **plan["settings"]},
                      [as_config(k) for k in plan["configs"]])
    path = out / PLAN_FILE
    if not path.exists():
        path.write_text(json.dumps(plan, indent=2) + "\n")
    return path


__all__ = ["GRIDS", "Grid", "PLAN_FILE", "SETTING_DEFAULTS", "build_plan", "check_folder_plan",
           "check_latency_plan", "check_plan_matches", "estimate_budget", "get_grid", "load_plan",
           "write_plan"]
