"""From JSONL rows to the quality-versus-cost summary and the paper's Table-2 figures.

Per configuration (all sums run over the *common examples*: those that have a row for every
configuration being summarised, so every point is measured on the same inputs):

* ``quality`` ± ``quality_se``: the task's ``aggregate`` (mean ± std/√n for pass@1 and exact
  match; corpus BLEU ± bootstrap SE over segments for WMT).
* ``rejection_rate`` = Σ rejected / (Σ accepted + Σ rejected) (docs/semantics.md §7: rejected drafts over
  verified drafts); ``None`` when the method verifies no drafts (``autoregressive``).
* ``deferral_rate`` = Σ deferred positions / Σ tokens (the engine's ``deferred`` counter);
* ``verifier_calls_per_token`` = Σ verifier calls / Σ tokens ("deferrals per token");
  ``tokens_per_verifier_call`` its inverse; ``drafter_calls_per_token`` likewise.
* ``relative_latency`` = Σ wall time / Σ wall time of ``autoregressive`` (verifier-only decoding)
  over the same examples, in the same run (a ratio of sums, so long examples weigh more);
  ``None`` when the run has no ``autoregressive`` rows.

Paired with the verifier (tasks whose quality is a mean of per-example scores: pass@1, exact
match), ``vs_verifier``: over the same examples, d_i = score_i - score_i(autoregressive);
``diff`` = mean d ± ``diff_se`` = sd(d)/√n (the paired standard error: the same problems, the same
seeds, so it is much smaller than the two unpaired SEs combined), ``better`` / ``worse`` = how
many examples go each way, and ``sign_p``, the exact two-sided sign test over those discordant
examples (for pass/fail scores: McNemar's exact test). It says whether a quality gap is resolved
at this sample size.

Table 2, per curve ``method[rule]`` (its α sweep; α-free configurations form one-point curves):
the measured points (relative latency L_i, quality Q_i) are sorted by (L, Q) and joined by straight
lines, giving a polyline C (linear interpolation along the measured curve). Non-monotone curves are
handled through the *running-maximum upper envelope* E(L) = max{Q : (L', Q) ∈ C, L' ≤ L}: the
best quality some interpolated setting reaches at a cost no larger than L. Then

(i) ``latency_at_verifier_quality`` L* = min{L : E(L) ≥ Q_v} = the smallest L on C whose
    interpolated quality reaches the verifier's (``autoregressive``) quality Q_v (minus an optional
    tolerance); ``speedup_at_verifier_quality`` = 1 / L*. ``None`` ("not reached") when no point of
    C reaches Q_v. C is not extrapolated: if even the cheapest point reaches Q_v, L* is its latency.
(ii) ``best_quality_within_verifier_latency`` = E(1) = max of C over L ≤ 1, i.e. the largest of
    the Q_i with L_i ≤ 1 and, if a segment crosses L = 1, its interpolated value there. ``None``
    ("not reached") when every point is slower than the verifier.

``envelope="concave"`` uses the upper concave hull of the points instead of C (also an
achievable frontier: choosing between two α settings at random per query realises any point on
the chord between them); the default, ``"polyline"``, follows the measured curve only.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from .configs import REFERENCE_METHODS, EvalConfig, as_config

Point = tuple[float, float]


# --------------------------------------------------------------------------- interpolation


def upper_concave_hull(points: Iterable[Point]) -> list[Point]:
    """The upper concave hull of ``points``, sorted by latency (Andrew's monotone chain)."""
    pts = sorted(set((float(x), float(y)) for x, y in points))
    hull: list[Point] = []
    for p in pts:
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            # drop hull[-1] if it lies on or below the chord hull[-2] -> p
            if (x2 - x1) * (p[1] - y1) - (y2 - y1) * (p[0] - x1) >= 0:
                hull.pop()
            else:
                break
        hull.append(p)
    # keep only the rising part: beyond the highest point more cost cannot buy quality
    top = max(range(len(hull)), key=lambda i: (hull[i][1], -hull[i][0])) if hull else 0
    return hull[: top + 1]


def _curve(points: Iterable[Point], envelope: str) -> list[Point]:
    pts = [(float(x), float(y)) for x, y in points
           if x is not None and y is not None and math.isfinite(x) and math.isfinite(y)]
    if envelope == "polyline":
        return sorted(pts)
    if envelope == "concave":
        return upper_concave_hull(pts)
    raise ValueError(f"envelope must be 'polyline' or 'concave', not {envelope!r}")


def latency_to_reach(
    points: Iterable[Point], target: float, *, tol: float = 0.0, envelope: str = "polyline"
) -> float | None:
    """Smallest latency at which the interpolated curve reaches quality ``target - tol``.

    ``points`` are (relative latency, quality) pairs in any order. Returns ``None`` if the curve
    never reaches it (see the module docstring for the exact definition).
    """
    c = _curve(points, envelope)
    goal = target - tol
    for i, (x0, y0) in enumerate(c):
        if y0 >= goal:
            return x0
        if i + 1 < len(c):
            x1, y1 = c[i + 1]
            if y1 >= goal:
                return x0 + (goal - y0) / (y1 - y0) * (x1 - x0)
    return None


def best_quality_within(
    points: Iterable[Point], max_latency: float = 1.0, *, envelope: str = "polyline"
) -> float | None:
    """Maximum of the interpolated curve over latency ≤ ``max_latency`` (``None``: no point)."""
    c = _curve(points, envelope)
    best: float | None = None
    for i, (x0, y0) in enumerate(c):
        if x0 > max_latency:
            break
        best = y0 if best is None else max(best, y0)
        if i + 1 < len(c):
            x1, y1 = c[i + 1]
            if x1 > max_latency and x1 > x0:
                y = y0 + (max_latency - x0) / (x1 - x0) * (y1 - y0)
                best = max(best, y)
    return best


# --------------------------------------------------------------------------- per configuration


def _sum(rows: Sequence[Mapping[str, Any]], field: str) -> float | None:
    vals = [r.get("stats", {}).get(field) for r in rows]
    if not vals or any(v is None for v in vals):
        return None
    return float(sum(vals))


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den == 0:
        return None
    return num / den


def config_metrics(
    rows: Sequence[Mapping[str, Any]],
    aggregate: Callable[[Sequence[Mapping[str, Any]]], tuple[float, float]],
    reference_wall_s: float | None,
) -> dict[str, Any]:
    """Quality and cost of one configuration from its rows (see the module docstring)."""
    quality, se = aggregate([r["scoring"] for r in rows]) if rows else (float("nan"),) * 2
    tokens = _sum(rows, "tokens")
    if tokens is None:
        tokens = float(sum(r.get("new_tokens", 0) for r in rows))
    vcalls, dcalls = _sum(rows, "verifier_calls"), _sum(rows, "drafter_calls")
    acc, rej = _sum(rows, "accepted"), _sum(rows, "rejected")
    verified = None if acc is None or rej is None else acc + rej
    wall = float(sum(r["wall_s"] for r in rows))
    return {
        "n": len(rows),
        "quality": quality,
        "quality_se": se,
        "tokens": tokens,
        "verifier_calls": vcalls,
        "drafter_calls": dcalls,
        "drafted": _sum(rows, "drafted"),
        "accepted": acc,
        "rejected": rej,
        "rejection_rate": _ratio(rej, verified),
        "deferral_rate": _ratio(_sum(rows, "deferred"), tokens),
        "verifier_calls_per_token": _ratio(vcalls, tokens),
        "drafter_calls_per_token": _ratio(dcalls, tokens),
        "tokens_per_verifier_call": _ratio(tokens, vcalls),
        "wall_s": wall,
        "relative_latency": _ratio(wall, reference_wall_s),
    }


def sign_test_p(better: int, worse: int) -> float:
    """Exact two-sided sign test: P(a split at least this uneven | each way with probability ½)."""
    n, k = better + worse, min(better, worse)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0**n
    return min(1.0, 2.0 * tail)


def paired_vs(rows: Sequence[Mapping[str, Any]],
              base: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``vs_verifier`` of the module docstring: rows and base rows of the same examples, in order."""
    d = [float(r["scoring"]["score"]) - float(b["scoring"]["score"]) for r, b in zip(rows, base)]
    n = len(d)
    mean = sum(d) / n if n else float("nan")
    se = (math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1) / n) if n > 1 else 0.0)
    better, worse = sum(x > 0 for x in d), sum(x < 0 for x in d)
    return {"diff": mean, "diff_se": se, "better": better, "worse": worse,
            "sign_p": sign_test_p(better, worse)}


def summarize(
    rows: Sequence[Mapping[str, Any]],
    task: Any,
    configs: Sequence[EvalConfig | str] | None = None,
    *,
    tol: float = 0.0,
    envelope: str = "polyline",
) -> dict[str, Any]:
    """The summary dict written to ``summary.json`` (module docstring for every definition).

    Args:
        rows: JSONL rows (``config``, ``example_id``, ``scoring``, ``stats``, ``wall_s`` …).
        task: the task object (its ``aggregate``, ``name`` and ``metric`` are used).
        configs: the configurations to summarise (default: every one present in ``rows``).
        tol: quality tolerance of Table-2 figure (i): reaching ``Q_v - tol`` counts.
        envelope: ``"polyline"`` (default) or ``"concave"``; see the module docstring.
    """
    by_key: dict[str, dict[str, Mapping[str, Any]]] = {}
    cfg_of: dict[str, EvalConfig] = {}
    for r in rows:
        by_key.setdefault(r["config"], {})[r["example_id"]] = r
        cfg_of.setdefault(r["config"], as_config(r["config"]))
    if configs is None:
        keys = list(by_key)
    else:
        keys = [as_config(c).key for c in configs]
        for k in keys:
            cfg_of.setdefault(k, as_config(k))
    present = [k for k in keys if by_key.get(k)]
    common = set.intersection(*(set(by_key[k]) for k in present)) if present else set()
    order = [eid for eid in by_key[present[0]] if eid in common] if present else []

    ar_key = EvalConfig("autoregressive").key
    ref_wall = None
    if ar_key in present:
        ref_wall = float(sum(by_key[ar_key][e]["wall_s"] for e in order)) or None

    per_config = []
    for k in present:
        c = cfg_of[k]
        m = config_metrics([by_key[k][e] for e in order], task.aggregate, ref_wall)
        per_config.append({"config": k, "curve": c.curve, **c.to_dict(), **m})
    missing = [k for k in keys if k not in present]
    if ar_key in present and getattr(task, "per_example", False):
        base = [by_key[ar_key][e] for e in order]
        for p in per_config:
            p["vs_verifier"] = paired_vs([by_key[p["config"]][e] for e in order], base)

    metrics_of = {p["config"]: p for p in per_config}
    verifier = metrics_of.get(ar_key)
    drafter = metrics_of.get(EvalConfig("drafter_only").key)
    table2 = []
    curves: dict[str, list[dict[str, Any]]] = {}
    for p in per_config:
        if p["method"] not in REFERENCE_METHODS:
            curves.setdefault(p["curve"], []).append(p)
    for name, pts in curves.items():
        xy = [(p["relative_latency"], p["quality"]) for p in pts
              if p["relative_latency"] is not None]
        entry: dict[str, Any] = {
            "curve": name, "method": pts[0]["method"], "rule": pts[0]["rule"],
            "points": sorted(
                ({"alpha": p["alpha"], "relative_latency": p["relative_latency"],
                  "quality": p["quality"]} for p in pts),
                key=lambda d: (d["relative_latency"] is None, d["relative_latency"] or 0.0),
            ),
            "latency_at_verifier_quality": None,
            "speedup_at_verifier_quality": None,
            "best_quality_within_verifier_latency": None,
        }
        if verifier is not None and xy:
            lat = latency_to_reach(xy, verifier["quality"], tol=tol, envelope=envelope)
            entry["latency_at_verifier_quality"] = lat
            entry["speedup_at_verifier_quality"] = None if not lat else 1.0 / lat
            entry["best_quality_within_verifier_latency"] = best_quality_within(
                xy, 1.0, envelope=envelope)
        table2.append(entry)

    return {
        "task": getattr(task, "name", str(task)),
        "metric": getattr(task, "metric", "score"),
        "n_examples": len(order),
        "examples": order,
        "missing_configs": missing,
        "verifier": verifier,
        "drafter": drafter,
        "configs": per_config,
        "table2": table2,
        "table2_options": {"tol": tol, "envelope": envelope},
    }


# --------------------------------------------------------------------------- markdown


def _f(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.{digits}f}"
    return str(v)


def to_markdown(summary: Mapping[str, Any], settings: Mapping[str, Any] | None = None) -> str:
    """``summary.md``: the per-configuration table and the Table-2 figures."""
    metric = summary["metric"]
    scale = 100.0 if metric in ("pass@1", "accuracy") else 1.0
    unit = " (%)" if scale == 100.0 else ""

    def q(v: float | None) -> str:
        return "–" if v is None else _f(v * scale, 2)

    lines = [f"# {summary['task']}: quality versus cost", ""]
    if settings:
        lines.append("Settings: " + ", ".join(f"`{k}={v}`" for k, v in settings.items()))
        lines.append("")
    lines += [
        f"{summary['n_examples']} examples common to every configuration. Quality: {metric}{unit}"
        " ± standard error" + (" (bootstrap over segments)" if metric == "BLEU" else "") + ".",
        "Relative latency: Σ wall time / Σ wall time of `autoregressive` on the same examples.",
        "",
        f"| configuration | n | {metric}{unit} | ± SE | rejection rate | verifier calls / token "
        "| tokens / verifier call | relative latency |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for p in summary["configs"]:
        lines.append(
            f"| `{p['config']}` | {p['n']} | {q(p['quality'])} | {q(p['quality_se'])} | "
            f"{_f(p['rejection_rate'])} | {_f(p['verifier_calls_per_token'])} | "
            f"{_f(p['tokens_per_verifier_call'], 2)} | {_f(p['relative_latency'])} |"
        )
    if summary["missing_configs"]:
        lines += ["", "No rows yet: " + ", ".join(f"`{k}`" for k in summary["missing_configs"])]
    paired = [p for p in summary["configs"] if p.get("vs_verifier")
              and p["method"] != "autoregressive"]
    if paired:
        lines += [
            "",
            "## Paired with the verifier",
            "",
            f"Per configuration, over the same examples and seeds: Δ {metric}{unit} against "
            "`autoregressive` ± its paired standard error, the examples that go each way, and "
            "the exact two-sided sign test on them (McNemar's for pass/fail).",
            "",
            f"| configuration | Δ {metric}{unit} | ± paired SE | better | worse | sign-test p |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for p in paired:
            d = p["vs_verifier"]
            lines.append(f"| `{p['config']}` | {_f(d['diff'] * scale, 2)} | "
                         f"{_f(d['diff_se'] * scale, 2)} | {d['better']} | {d['worse']} | "
                         f"{_f(d['sign_p'], 3)} |")
    v = summary["verifier"]
    lines += [
        "",
        "## Table 2",
        "",
        "Per curve (α sweep), by linear interpolation along the measured (relative latency, "
        "quality) points sorted by latency, through their running-maximum envelope "
        f"(envelope `{summary['table2_options']['envelope']}`, "
        f"tolerance {summary['table2_options']['tol']}).",
        f"Verifier quality: {q(v['quality']) if v else '–'}.",
        "",
        "| curve | points | speed-up at verifier quality | best quality within verifier latency |",
        "| --- | ---: | ---: | ---: |",
    ]
    na = "not reached" if v else "n/a (no autoregressive rows)"
    for t in summary["table2"]:
        s = t["speedup_at_verifier_quality"]
        b = t["best_quality_within_verifier_latency"]
        lines.append(
            f"| `{t['curve']}` | {len(t['points'])} | "
            f"{na if s is None else _f(s, 2) + '×'} | {na if b is None else q(b)} |"
        )
    return "\n".join(lines) + "\n"
