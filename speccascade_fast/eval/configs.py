"""Decoding configurations: one (method, rule, α[, bonus][, min-p]) each, and the sweep that
builds them."""
from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

METHODS = (
    "autoregressive", "drafter_only", "spec_cascade", "token_cascade", "oracle_cascade",
    "seq_cascade",
)
#: methods with no rule and no α: the reference points of every plot.
REFERENCE_METHODS = ("autoregressive", "drafter_only")
PREFIX_RULES = ("chow", "chow_log", "diff", "diff_log", "opt", "opt_log", "bild")
#: which rules each rule-taking method accepts (None: any rule the engine knows).
RULES_FOR: dict[str, tuple[str, ...] | None] = {
    "spec_cascade": None,
    "oracle_cascade": PREFIX_RULES + ("spec", "drafter"),
    "token_cascade": ("chow", "chow_log"),
}
#: spec_cascade rules whose target does not depend on α (one configuration, no sweep).
ALPHA_FREE_RULES = ("spec", "drafter")
BONUS_MODES = ("cascade", "verifier")


def _fmt_alpha(alpha: float) -> str:
    return repr(float(alpha))


@dataclass(frozen=True)
class EvalConfig:
    """One decoding configuration.

    ``method`` is an engine method; ``rule`` the deferral rule (``None`` for ``autoregressive``,
    ``drafter_only`` and ``seq_cascade``, or to use the engine's default); ``alpha`` the lenience
    (``None``: the engine's default, or not used). ``bonus`` (``spec_cascade`` only) overrides
    the run's bonus-token mode for this configuration (``None``: the run's). ``min_p``
    (``autoregressive`` only): the verifier alone with Hugging Face's min-p truncation
    (``generate``'s ``min_p``), a baseline at matched thresholds. ``divergence_budget`` (``spec_cascade`` only):
    the total variation each response may spend (``generate``'s argument); a sweep of it at a
    fixed α is one curve, its level the budget.
    """

    method: str
    rule: str | None = None
    alpha: float | None = None
    bonus: str | None = None
    min_p: float | None = None
    divergence_budget: float | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose from {METHODS}")
        if self.alpha is not None:
            object.__setattr__(self, "alpha", float(self.alpha))
        if self.bonus is not None:
            if self.bonus not in BONUS_MODES:
                raise ValueError(f"bonus={self.bonus!r} is not known; choose cascade or verifier")
            if self.method != "spec_cascade":
                raise ValueError(f"a configuration's bonus applies to spec_cascade, not "
                                 f"{self.method}")
        if self.min_p is not None:
            if self.method != "autoregressive":
                raise ValueError(f"min_p is a baseline of the verifier alone (autoregressive), "
                                 f"not of {self.method}")
            p = self.min_p
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
                raise ValueError(f"min_p must be None or a number in (0, 1], got {p!r}")
            object.__setattr__(self, "min_p", float(p))
        if self.divergence_budget is not None:
            b = self.divergence_budget
            if self.method != "spec_cascade":
                raise ValueError(f"divergence_budget applies to spec_cascade, not {self.method}")
            if isinstance(b, bool) or not isinstance(b, (int, float)) or not (
                    math.isfinite(b) and b >= 0):
                raise ValueError(f"divergence_budget must be a finite number >= 0, got {b!r}")
            object.__setattr__(self, "divergence_budget", float(b))

    @property
    def key(self) -> str:
        """Stable text id, e.g. ``spec_cascade/token_v3/alpha=0.3``,
        ``spec_cascade/ensemble/alpha=0.5/bonus=verifier``, ``autoregressive/min_p=0.7`` or
        ``autoregressive``."""
        parts = [self.method]
        if self.rule is not None:
            parts.append(self.rule)
        if self.alpha is not None:
            parts.append(f"alpha={_fmt_alpha(self.alpha)}")
        if self.bonus is not None:
            parts.append(f"bonus={self.bonus}")
        if self.min_p is not None:
            parts.append(f"min_p={_fmt_alpha(self.min_p)}")
        if self.divergence_budget is not None:
            parts.append(f"budget={_fmt_alpha(self.divergence_budget)}")
        return "/".join(parts)

    @property
    def curve(self) -> str:
        """The trade-off curve this point belongs to: ``method[rule]`` (α varies along it),
        ``method[rule,bonus=…]`` with a bonus override, ``autoregressive[min_p]``."""
        if self.min_p is not None:
            return f"{self.method}[min_p]"
        inside = [x for x in (self.rule, self.bonus and f"bonus={self.bonus}") if x]
        if self.divergence_budget is not None:
            inside.append(f"alpha={self.alpha!r},budget")
        return f"{self.method}[{','.join(inside)}]" if inside else self.method

    @property
    def level(self) -> float | None:
        """The value that varies along the curve: α, min-p for the min-p baseline, the budget
        for a budget sweep."""
        if self.divergence_budget is not None:
            return self.divergence_budget
        return self.alpha if self.alpha is not None else self.min_p

    @property
    def is_reference(self) -> bool:
        """The verifier alone or the drafter alone, untruncated: a reference point."""
        return self.method in REFERENCE_METHODS and self.min_p is None

    def generate_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``generate`` this configuration sets."""
        kw: dict[str, Any] = {"method": self.method}
        if self.rule is not None:
            kw["rule"] = self.rule
        if self.alpha is not None:
            kw["alpha"] = self.alpha
        if self.bonus is not None:
            kw["bonus"] = self.bonus
        if self.min_p is not None:
            kw["min_p"] = self.min_p
        if self.divergence_budget is not None:
            kw["divergence_budget"] = self.divergence_budget
        return kw

    def to_dict(self) -> dict[str, Any]:
        d = {"method": self.method, "rule": self.rule, "alpha": self.alpha,
             "bonus": self.bonus, "min_p": self.min_p}
        if self.divergence_budget is not None:  # absent otherwise: older rows read the same
            d["divergence_budget"] = self.divergence_budget
        return d

    @classmethod
    def parse(cls, text: str) -> EvalConfig:
        """``method``, ``method:alpha`` (seq_cascade) or ``method:rule[:alpha]``, each optionally
        followed by ``:bonus=verifier`` / ``:min_p=0.7`` / ``:budget=0.1`` (a divergence
        budget); also the ``key`` form."""
        sep = "/" if "/" in text else ":"
        parts = text.split(sep)
        opts = {}
        for p in [p for p in parts[1:] if "=" in p]:
            name, value = p.split("=", 1)
            if name not in ("alpha", "bonus", "min_p", "budget") or name in opts:
                raise ValueError(f"cannot parse configuration {text!r}: {p!r}")
            opts[name] = value
        pos = [parts[0]] + [p for p in parts[1:] if "=" not in p]
        method, rule, alpha = pos[0], None, None
        if len(pos) == 2:
            try:
                alpha = float(pos[1])
            except ValueError:
                rule = pos[1]
        elif len(pos) == 3:
            rule, alpha = pos[1] or None, float(pos[2])
        elif len(pos) > 3:
            raise ValueError(f"cannot parse configuration {text!r}")
        if "alpha" in opts:
            if alpha is not None:
                raise ValueError(f"cannot parse configuration {text!r}: two alphas")
            alpha = float(opts["alpha"])
        min_p = float(opts["min_p"]) if "min_p" in opts else None
        budget = float(opts["budget"]) if "budget" in opts else None
        return cls(method, rule, alpha, opts.get("bonus"), min_p, budget)


def as_config(c: EvalConfig | str | Mapping[str, Any]) -> EvalConfig:
    """An :class:`EvalConfig` from itself, its text form or a mapping of its fields."""
    if isinstance(c, EvalConfig):
        return c
    if isinstance(c, str):
        return EvalConfig.parse(c)
    return EvalConfig(c["method"], c.get("rule"), c.get("alpha"), c.get("bonus"), c.get("min_p"),
                      c.get("divergence_budget"))


def make_configs(
    methods: Sequence[str],
    rules: Sequence[str] = ("token_v3",),
    alphas: Sequence[float] | Mapping[str, Sequence[float]] = (),
    *,
    include_references: bool = True,
) -> list[EvalConfig]:
    """The cross product methods × rules × α, keeping only valid combinations.

    * ``autoregressive`` / ``drafter_only``: one configuration each; with ``include_references``
      both are added even when not listed (every relative latency needs ``autoregressive``).
    * ``spec_cascade``, ``oracle_cascade``, ``token_cascade``: every rule the method accepts
      (:data:`RULES_FOR`; others are skipped with a warning) × its α values. ``alphas`` is either
      one list for every rule or a mapping ``rule -> list`` (a ``"*"`` key is the fallback). No α
      (an empty list) means one configuration with the engine's default α. The α-free rules
      ``spec``/``drafter`` give one configuration.
    * ``seq_cascade``: no rule; α from ``alphas["seq_cascade"]`` (mapping) or the common list.
    """
    def alphas_for(name: str) -> list[float | None]:
        if isinstance(alphas, Mapping):
            vals = alphas.get(name, alphas.get("*", ()))
        else:
            vals = alphas
        return [float(a) for a in vals] or [None]

    out: list[EvalConfig] = []
    if include_references:
        methods = [m for m in REFERENCE_METHODS if m not in methods] + list(methods)
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; choose from {METHODS}")
        if m in REFERENCE_METHODS:
            out.append(EvalConfig(m))
        elif m == "seq_cascade":
            out.extend(EvalConfig(m, None, a) for a in alphas_for(m))
        else:
            allowed = RULES_FOR[m]
            for r in rules:
                if allowed is not None and r not in allowed:
                    warnings.warn(f"skipping {m} with rule {r!r}: {m} takes {allowed}",
                                  stacklevel=2)
                    continue
                if r in ALPHA_FREE_RULES:
                    out.append(EvalConfig(m, r))
                else:
                    out.extend(EvalConfig(m, r, a) for a in alphas_for(r))
    return dedupe(out)


def dedupe(configs: Iterable[EvalConfig]) -> list[EvalConfig]:
    """``configs`` in order, each key once."""
    seen: set[str] = set()
    out = []
    for c in configs:
        if c.key not in seen:
            seen.add(c.key)
            out.append(c)
    return out
