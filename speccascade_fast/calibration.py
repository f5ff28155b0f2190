"""Calibration files: a rule's lenience chosen for a quality target, loaded into the decoding
settings in place of ``rule`` / ``alpha``.

``speccascade calibrate`` (:func:`speccascade_fast.eval.calibrate`) writes one; everything that
takes decoding settings takes it instead of ``rule`` and ``alpha``::

    speccascade generate "def fib(n):" --calibration runs/cal/calibration.json
    speccascade_fast.generate(drafter, verifier, ids, calibration="runs/cal/calibration.json")
    speccascade_fast.Engine(drafter, verifier, calibration="runs/cal/calibration.json")
    speccascade_fast.DecodeConfig(calibration="runs/cal/calibration.json").alpha

A calibration only sets ``method`` (``spec_cascade``), ``rule`` and the knob it calibrated
(``alpha``; the format reserves ``knob: "divergence_budget"`` for a per-request divergence
budget); there is no other decoding path. Giving ``alpha`` as well is an error naming both
arguments, and so is a ``rule`` other than the file's.

The file is JSON (:data:`FORMAT`, :data:`VERSION`). The fields decoding reads: ``knob``,
``method``, ``rule`` and the knob's value (``alpha``: a number in the rule's range, or null
for the α-free rule ``spec`` chosen as the lossless fallback). The others are the record of how
the value was chosen (task, split, target drop, confidence, the per-α table, models, command);
they are checked for type when present. Any malformed file is a ValueError naming the file and
the field.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .rules import ALPHA_RANGES, RULES, check_alpha

FORMAT = "speccascade-calibration"
VERSION = 1
#: what a calibration may set: the rule's lenience, or a per-request divergence budget
KNOBS = ("alpha", "divergence_budget")


@dataclass(frozen=True)
class Calibration:
    """A loaded calibration file: the decoding fields (``method``, ``rule``, ``knob`` and its
    ``value``) and the whole document (``data``) as read from ``path``."""

    path: str
    method: str
    rule: str
    knob: str
    value: float | None
    data: Mapping[str, Any] = field(repr=False, compare=False)

    #: the rule's alpha: the calibrated value (knob ``alpha``) or the one a budget was
    #: calibrated at (knob ``divergence_budget``); None for the alpha-free rules
    alpha_setting: float | None = None

    @property
    def alpha(self) -> float | None:
        return self.alpha_setting

    @property
    def fallback(self) -> bool:
        """True when no calibrated setting met the target and the lossless rule was chosen."""
        return bool(self.data.get("fallback", False))

    @property
    def divergence_budget(self) -> float | None:
        return self.value if self.knob == "divergence_budget" else None

    def decode_fields(self) -> dict[str, Any]:
        """The :class:`~speccascade_fast.config.DecodeConfig` fields the file sets: method,
        rule and alpha, and with the ``divergence_budget`` knob the budget too."""
        out = {"method": self.method, "rule": self.rule, "alpha": self.alpha_setting}
        if self.knob == "divergence_budget":
            out["divergence_budget"] = self.value
        return out


def _bad(path: Any, name: str, message: str) -> ValueError:
    return ValueError(f"calibration file {path}: field {name!r}: {message}")


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def parse_calibration(data: Any, path: Any = "<calibration>") -> Calibration:
    """A :class:`Calibration` from a decoded JSON document (ValueErrors name ``path`` and the
    field)."""
    if not isinstance(data, Mapping):
        raise ValueError(f"calibration file {path}: must hold a JSON object, got "
                         f"{type(data).__name__}")
    if data.get("format") != FORMAT:
        raise _bad(path, "format", f"must be {FORMAT!r}, got {data.get('format')!r}")
    version = data.get("version")
    if version != VERSION or isinstance(version, bool):
        raise _bad(path, "version", f"this version reads version {VERSION}, got {version!r}")
    knob = data.get("knob")
    if knob not in KNOBS:
        raise _bad(path, "knob", f"must be one of {', '.join(map(repr, KNOBS))}, got {knob!r}")
    method = data.get("method", "spec_cascade")
    if method != "spec_cascade":
        raise _bad(path, "method", f"a calibration sets spec_cascade's rule, got {method!r}")
    rule = data.get("rule")
    if rule not in RULES:
        raise _bad(path, "rule", f"{rule!r} is not a known rule; choose one of {', '.join(RULES)}")
    if knob not in data:
        raise _bad(path, knob, f"missing (the file's knob is {knob!r})")
    alpha = data.get("alpha")
    if alpha is None:
        if "alpha" not in data:
            raise _bad(path, "alpha", "missing (null for a rule without alpha)")
        if ALPHA_RANGES[rule] is not None:
            raise _bad(path, "alpha", f"null, but rule {rule!r} needs an alpha")
    elif not _number(alpha):
        raise _bad(path, "alpha", f"must be a finite number or null, got {alpha!r}")
    else:
        try:
            check_alpha(rule, alpha)
        except ValueError as e:
            raise _bad(path, "alpha", str(e)) from None
        alpha = float(alpha)
    if knob == "alpha":
        value = alpha
        if data.get("divergence_budget") is not None:
            raise _bad(path, "divergence_budget", "must be absent or null when the knob is "
                       "'alpha'")
    else:
        value = data[knob]
        if not _number(value) or value < 0:
            raise _bad(path, knob, f"must be a finite number >= 0, got {value!r}")
        value = float(value)
    for name, ok, what in (
            ("target_drop", lambda v: _number(v) and v >= 0, "a finite number >= 0"),
            ("confidence", lambda v: _number(v) and 0 < v < 1, "a number in (0, 1)"),
            ("fallback", lambda v: isinstance(v, bool), "true or false"),
            ("n", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
             "an int >= 0"),
            ("task", lambda v: isinstance(v, str), "a task name"),
            ("split", lambda v: isinstance(v, Mapping), "an object"),
            ("table", lambda v: isinstance(v, list), "a list"),
            ("settings", lambda v: isinstance(v, Mapping), "an object"),
            ("models", lambda v: isinstance(v, Mapping), "an object")):
        if name in data and not ok(data[name]):
            raise _bad(path, name, f"must be {what}, got {data[name]!r}")
    return Calibration(str(path), method, rule, knob, value, dict(data), alpha)


def load_calibration(path: str | os.PathLike | Calibration) -> Calibration:
    """Read and check a calibration file (a :class:`Calibration` passes through)."""
    if isinstance(path, Calibration):
        return path
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise ValueError(f"calibration must be a calibration file's path, got {path!r}")
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"calibration file {p}: not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"calibration file {p}: cannot be read ({e})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"calibration file {p}: not JSON ({e})") from None
    return parse_calibration(data, p)


def write_calibration(path: str | os.PathLike, data: Mapping[str, Any]) -> Calibration:
    """Check ``data`` as a calibration document, write it to ``path`` (atomically) and return
    it as loaded."""
    parse_calibration(data, path)
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, p)
    return load_calibration(p)


def resolve(calibration: Any, *, method: str, rule: str | None, alpha: Any,
            divergence_budget: Any = None, supported: tuple[str, ...] = ("alpha",)
            ) -> dict[str, Any]:
    """The decoding fields of ``calibration`` for a configuration built with ``method``,
    ``rule``, ``alpha`` and ``divergence_budget``: a ValueError naming both arguments when the
    calibration comes with ``alpha`` or ``divergence_budget`` (the calibration fixes them), a
    ``rule`` or ``method`` other than the file's, or a knob not in ``supported`` (the fields
    the caller's configuration has)."""
    cal = load_calibration(calibration)
    for name, v in (("alpha", alpha), ("divergence_budget", divergence_budget)):
        if v is not None:
            raise ValueError(f"{name} and calibration are alternatives: {name}={v!r} was given "
                             f"with calibration={cal.path} (which sets {cal.knob}="
                             f"{cal.value!r}); pass one of them")
    if rule is not None and rule != cal.rule:
        raise ValueError(f"rule and calibration disagree: rule={rule!r} was given with "
                         f"calibration={cal.path}, calibrated for rule={cal.rule!r}; leave "
                         f"rule unset")
    if method != cal.method:
        raise ValueError(f"method and calibration disagree: method={method!r} was given with "
                         f"calibration={cal.path}, which sets method={cal.method!r}")
    fields = cal.decode_fields()
    missing = [k for k in fields if k not in ("method", "rule") and k not in supported]
    if missing:
        raise ValueError(f"calibration file {cal.path}: field 'knob': {cal.knob!r} is not a "
                         f"setting of this version's decoding configuration")
    return fields


def apply(config: Any) -> dict[str, Any]:
    """The fields a :class:`~speccascade_fast.config.DecodeConfig` under construction takes from
    its ``calibration`` (see :func:`resolve`)."""
    import dataclasses

    names = tuple(f.name for f in dataclasses.fields(config))
    return resolve(config.calibration, method=config.method, rule=config.rule,
                   alpha=config.alpha, divergence_budget=getattr(config, "divergence_budget", None),
                   supported=names)


__all__ = ["Calibration", "FORMAT", "KNOBS", "VERSION", "load_calibration", "parse_calibration",
           "resolve", "write_calibration"]
