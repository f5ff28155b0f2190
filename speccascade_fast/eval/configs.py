"""Decoding configurations: one (method, rule, α) triple each, and the sweep that builds them."""
from __future__ import annotations

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


def _fmt_alpha(alpha: float) -> str:
    return repr(float(alpha))


@dataclass(frozen=True)
class EvalConfig:
    """One decoding configuration.

    ``method`` is an engine method; ``rule`` the deferral rule (``None`` for ``autoregressive``,
    ``drafter_only`` and ``seq_cascade``, or to use the engine's default); ``alpha`` the lenience
    (``None``: the engine's default, or not used).
    """

    method: str
    rule: str | None = None
    alpha: float | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose from {METHODS}")
        if self.alpha is not None:
            object.__setattr__(self, "alpha", float(self.alpha))

    @property
    def key(self) -> str:
        """Stable text id, e.g. ``spec_cascade/token_v3/alpha=0.3`` or ``autoregressive``."""
        parts = [self.method]
        if self.rule is not None:
            parts.append(self.rule)
        if self.alpha is not None:
            parts.append(f"alpha={_fmt_alpha(self.alpha)}")
        return "/".join(parts)

    @property
    def curve(self) -> str:
        """The trade-off curve this point belongs to: ``method[rule]`` (α varies along it)."""
        return f"{self.method}[{self.rule}]" if self.rule is not None else self.method

    def generate_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``engine.generate`` this configuration sets."""
        kw: dict[str, Any] = {"method": self.method}
        if self.rule is not None:
            kw["rule"] = self.rule
        if self.alpha is not None:
            kw["alpha"] = self.alpha
        return kw

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "rule": self.rule, "alpha": self.alpha}

    @classmethod
    def parse(cls, text: str) -> EvalConfig:
        """``method``, ``method:alpha`` (seq_cascade) or ``method:rule[:alpha]``; also ``key``."""
        if "/" in text:
            parts = text.split("/")
            method, rest = parts[0], parts[1:]
            rule = next((p for p in rest if not p.startswith("alpha=")), None)
            alpha = next((float(p[6:]) for p in rest if p.startswith("alpha=")), None)
            return cls(method, rule, alpha)
        parts = text.split(":")
        if len(parts) == 1:
            return cls(parts[0])
        if len(parts) == 2:
            try:
                return cls(parts[0], None, float(parts[1]))
            except ValueError:
                return cls(parts[0], parts[1])
        if len(parts) == 3:
            return cls(parts[0], parts[1] or None, float(parts[2]))
        raise ValueError(f"cannot parse configuration {text!r}")


def as_config(c: EvalConfig | str | Mapping[str, Any]) -> EvalConfig:
    """An :class:`EvalConfig` from itself, its text form or a mapping of its fields."""
    if isinstance(c, EvalConfig):
        return c
    if isinstance(c, str):
        return EvalConfig.parse(c)
    return EvalConfig(c["method"], c.get("rule"), c.get("alpha"))


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
