"""From JSONL rows to the quality-versus-cost summary and the paper's Table-2 figures.

Per configuration (all sums run over the *common examples*: those that have a quality row for
every configuration being summarised, so every point is measured on the same inputs). Rows of
several samples (seeds) per example (``run_eval(samples=S)``) are first merged per (configuration,
example) by :func:`merge_samples`: the score is the mean of the S samples' scores, the counters
add up, and everything below treats the example, not the sample, as the unit:

* ``quality`` ± ``quality_se``: the task's ``aggregate`` (mean ± std/√n for pass@1 and exact
  match; corpus BLEU ± bootstrap SE over segments for WMT), and ``quality_ci`` at level ``ci``
  (Wilson's score interval when every score is 0 or 1, else quality ± z·SE).
* ``rejection_rate`` = Σ rejected / (Σ accepted + Σ rejected) (docs/semantics.md §7: rejected drafts over
  verified drafts); ``None`` when the method verifies no drafts (``autoregressive``).
* ``deferral_rate`` = Σ deferred positions / Σ tokens (the engine's ``deferred`` counter);
* ``verifier_calls_per_token`` = Σ verifier calls / Σ tokens ("deferrals per token");
  ``tokens_per_verifier_call`` its inverse; ``drafter_calls_per_token`` likewise.
* Latency, at batch 1, from ``latency.jsonl`` (the latency mode: per (configuration, example)
  the median of its trials) or, without it, from quality rows timed at batch 1; over the
  examples every timed configuration has:
  ``relative_latency`` = Σ wall time / Σ wall time of ``autoregressive`` (a ratio of sums, so
  long examples weigh more) and ``relative_latency_per_token`` = mean seconds per new token /
  the verifier's (each example weighs the same; outputs of different lengths are compared per
  token). ``None`` without timed ``autoregressive`` rows.

Paired with the verifier (tasks whose quality is a mean of per-example scores: pass@1, exact
match), ``vs_verifier``: over the same examples, d_i = score_i - score_i(autoregressive);
``diff`` = mean d ± ``diff_se`` = sd(d)/√n (the paired standard error), ``better`` / ``worse`` =
how many examples go each way, ``sign_p``, the exact two-sided sign test over those discordant
examples (for pass/fail scores: McNemar's exact test), and ``sign_p_holm``, Holm's step-down
adjustment over every configuration of the summary but the verifier (one family), with
``resolved`` = ``sign_p_holm < 1 - ci``. ``vs_verifier_pooled``: the difference to the pooled
verifier (below) with its bootstrap CI.

The verifier's quality ``verifier_pooled``: the configurations whose law is exactly the
verifier's, ``autoregressive``, lossless ``spec_cascade/spec`` (docs/semantics.md §3) and a
divergence budget of 0 (§9), are samples of one law, so their per-example scores are averaged
(SE and CI from those per-example means). It is the target of Table 2.

Table 2, per curve ``method[rule]`` (its α sweep; α-free configurations form one-point curves):
the measured points (relative latency L_i, quality Q_i) are sorted by (L, Q) and joined by straight
lines, giving a polyline C (linear interpolation along the measured curve). Non-monotone curves are
handled through the *running-maximum upper envelope* E(L) = max{Q : (L', Q) ∈ C, L' ≤ L}: the
best quality some interpolated setting reaches at a cost no larger than L. Then

(i) ``latency_at_verifier_quality`` L* = min{L : E(L) ≥ Q_v} = the smallest L on C whose
    interpolated quality reaches the pooled verifier quality Q_v (minus an optional tolerance);
    ``speedup_at_verifier_quality`` = 1 / L*. ``None`` ("not reached") when no point of C
    reaches Q_v. C is not extrapolated: if even the cheapest point reaches Q_v, L* is its
    latency. A curve of the verifier's law (``spec``) is at Q_v by construction: L* is its
    latency (``reached = "lossless"``).
(ii) ``best_quality_within_verifier_latency`` = E(1) = max of C over L ≤ 1, i.e. the largest of
    the Q_i with L_i ≤ 1 and, if a segment crosses L = 1, its interpolated value there. ``None``
    ("not reached") when every point is slower than the verifier.

Both figures are computed for both latency definitions (``..._per_token``). Their CIs
(``speedup_ci``, ``best_quality_gain_ci`` = CI of E(1) − Q_v) are percentile bootstrap intervals:
the quality examples and the latency examples are resampled (independently: they are separate
samples), every configuration and Q_v on the same resample, the figures recomputed; a resample
that does not reach Q_v counts as speed-up 0. ``reached`` is *reached* only when at least
(1 + ci)/2 of the resamples reach Q_v (the CI allows no other reading), *not reached* when at
most (1 − ci)/2 do, else *unresolved* (``reached_fraction`` gives the share). Tasks with a
corpus-level metric (BLEU) have no per-example scores: their ``segment_stats`` (per-segment
sufficient statistics) are summed over resamples of the segments instead (the paired bootstrap:
``vs_verifier`` then holds Δ, its bootstrap SE and CI, the two-sided bootstrap ``p`` and
``p_holm``; the pooled verifier is the corpus of every verifier-law configuration's hypotheses),
and the Table-2 CIs use the same replicates.

``envelope="concave"`` uses the upper concave hull of the points instead of C (also an
achievable frontier: choosing between two α settings at random per query realises any point on
the chord between them); the default, ``"polyline"``, follows the measured curve only.
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from statistics import NormalDist
from typing import Any

from .configs import EvalConfig, as_config
from .tasks.base import mean_and_se

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
    walls = [r.get("wall_s") for r in rows]
    wall = float(sum(walls)) if walls and None not in walls else None
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


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of ``pvalues`` (family-wise error), in the given order."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    out = [1.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        out[i] = running
    return out


def _z(ci: float) -> float:
    return NormalDist().inv_cdf((1 + ci) / 2)


def wilson(successes: float, n: int, ci: float = 0.95) -> tuple[float, float]:
    """Wilson's score interval of a binomial proportion."""
    if n == 0:
        return (float("nan"), float("nan"))
    z = _z(ci)
    p = successes / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, mid - half), min(1.0, mid + half))


def quality_ci(scores: Sequence[float] | None, quality: float, se: float,
               ci: float) -> tuple[float, float] | None:
    """Wilson's interval when every per-example score is 0 or 1, else quality ± z·SE."""
    if scores is not None and scores and all(s in (0.0, 1.0) for s in scores):
        return wilson(sum(scores), len(scores), ci)
    if quality is None or se is None or math.isnan(quality) or math.isnan(se):
        return None
    z = _z(ci)
    return (quality - z * se, quality + z * se)


def clipped_to_scores(band: tuple[float, float] | None,
                      values: Sequence[float] | None) -> tuple[float, float] | None:
    """``band`` cut to [0, 1] when every value it describes lies in [0, 1] (a normal interval
    of per-example means may reach past the scores' range)."""
    if band is None or not values or not all(0 <= x <= 1 for x in values):
        return band
    return (max(band[0], 0.0), min(band[1], 1.0))


def _percentile(values: Sequence[float], q: float) -> float:
    v = sorted(values)
    if not v:
        return float("nan")
    k = (len(v) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


#: configurations whose law is exactly the verifier's (docs/semantics.md §3: spec = pT; §9: a
#: divergence budget of 0 verifies every position losslessly)
def is_verifier_law(cfg: EvalConfig) -> bool:
    return (cfg.method == "autoregressive" and cfg.min_p is None) or (
        cfg.method == "spec_cascade" and (cfg.rule == "spec" or cfg.divergence_budget == 0))


def latency_table(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, tuple[float, int]]]:
    """``config -> example -> (median wall seconds over its trials, median new tokens)`` from
    rows that carry a wall time (latency rows, or quality rows timed at batch 1)."""
    walls: dict[str, dict[str, list[tuple[float, int]]]] = {}
    for r in rows:
        w = r.get("wall_s")
        if w is None:
            continue
        tokens = r.get("new_tokens")
        if tokens is None:
            tokens = (r.get("stats") or {}).get("tokens", 0)
        walls.setdefault(r["config"], {}).setdefault(r["example_id"], []).append(
            (float(w), int(tokens)))
    out: dict[str, dict[str, tuple[float, int]]] = {}
    for k, per in walls.items():
        out[k] = {e: (statistics.median(w for w, _ in v), int(statistics.median(t for _, t in v)))
                  for e, v in per.items()}
    return out


def _latencies(table, keys, ref_key, examples) -> dict[str, tuple[float | None, float | None]]:
    """Per key: (ratio of summed wall times, ratio of mean seconds per token) against
    ``ref_key`` over ``examples``."""
    out: dict[str, tuple[float | None, float | None]] = {}
    if ref_key not in table or not examples:
        return {k: (None, None) for k in keys}
    ref = [table[ref_key][e] for e in examples]
    ref_sum = sum(w for w, _ in ref)
    ref_tok = sum(w / max(t, 1) for w, t in ref) / len(ref)
    for k in keys:
        if k not in table:
            out[k] = (None, None)
            continue
        vals = [table[k][e] for e in examples]
        out[k] = (_ratio(sum(w for w, _ in vals), ref_sum),
                  _ratio(sum(w / max(t, 1) for w, t in vals) / len(vals), ref_tok))
    return out


#: per-row counters that add up over an example's samples
_COUNTERS = ("tokens", "verifier_calls", "drafter_calls", "drafted", "accepted", "rejected",
             "deferred")


def merge_samples(rows: Sequence[Mapping[str, Any]], samples: int | None = None,
                  ) -> tuple[list[Mapping[str, Any]], int, int]:
    """Rows with several ``sample`` s per (configuration, example) -> one row per pair whose
    score is the mean of its samples' scores (the example stays the unit of every statistic:
    S samples of one problem are not S independent problems), its counters and new tokens
    summed, its wall time summed (``None`` if a sample is untimed) and ``samples`` = S.
    ``samples``: the run's S (its ``run.json``); default: every sample index the rows have. A
    pair without a row for each of the S samples is left out (like a missing example) until it
    is complete. Returns ``(rows, S, incomplete pairs)``; one-sample rows come back unchanged."""
    want = (list(range(samples)) if samples is not None
            else sorted({r.get("sample", 0) for r in rows}))
    if want in ([], [0]):
        return [r for r in rows if r.get("sample", 0) == 0], 1, 0
    groups: dict[tuple[str, str], dict[int, Mapping[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["config"], r["example_id"]), {})[r.get("sample", 0)] = r
    out, incomplete = [], 0
    for g in groups.values():
        if sorted(g) != want:
            incomplete += 1
            continue
        rs = [g[x] for x in want]
        stats = dict(rs[0].get("stats") or {})
        for key in _COUNTERS:
            vals = [(r.get("stats") or {}).get(key) for r in rs]
            stats[key] = None if any(v is None for v in vals) else sum(vals)
        walls = [r.get("wall_s") for r in rs]
        out.append({**rs[0], "scoring": {"score": sum(float(r["scoring"]["score"]) for r in rs)
                                         / len(rs)},
                    "stats": stats, "new_tokens": sum(int(r.get("new_tokens", 0)) for r in rs),
                    "wall_s": None if None in walls else float(sum(walls)),
                    "samples": len(rs), "sample_rows": rs})
    return out, len(want), incomplete


def summarize(
    rows: Sequence[Mapping[str, Any]],
    task: Any,
    configs: Sequence[EvalConfig | str] | None = None,
    *,
    tol: float = 0.0,
    envelope: str = "polyline",
    latency_rows: Sequence[Mapping[str, Any]] | None = None,
    bootstrap: int = 2000,
    ci: float = 0.95,
    seed: int = 0,
    samples: int | None = None,
    holm_family: int | None = None,
) -> dict[str, Any]:
    """The summary dict written to ``summary.json`` (module docstring for every definition).

    Args:
        rows: JSONL quality rows (``config``, ``example_id``, ``scoring``, ``stats``, ``wall_s``
            (``None`` for rows of the batched quality mode) …).
        task: the task object (its ``aggregate``, ``name``, ``metric`` and ``per_example``).
        configs: the configurations to summarise (default: every one present in ``rows``).
        tol: quality tolerance of Table-2 figure (i): reaching ``Q_v - tol`` counts.
        envelope: ``"polyline"`` (default) or ``"concave"``; see the module docstring.
        latency_rows: rows of ``latency.jsonl`` (batch 1, several trials); without them the
            latencies come from quality rows timed at batch 1, if any.
        bootstrap: resamples of the examples for the confidence intervals (0: none).
        ci: the confidence level of every interval (and 1 - ci the level of the tests).
        seed: the bootstrap's seed.
        samples: the run's samples per example (``run.json``; default: what the rows have);
            see :func:`merge_samples`.
        holm_family: the number of comparisons with the verifier Holm's adjustment counts
            (default: the configurations summarised; a registered plan's whole grid, so that a
            partial run is not adjusted for fewer comparisons than it registered).
    """
    incomplete = 0
    if getattr(task, "per_example", False):
        rows, samples, incomplete = merge_samples(rows, samples)
    else:
        samples = 1
    by_key: dict[str, dict[str, Mapping[str, Any]]] = {}
    cfg_of: dict[str, EvalConfig] = {}
    for r in rows:
        by_key.setdefault(r["config"], {})[r["example_id"]] = r
        cfg_of.setdefault(r["config"], as_config(r["config"]))
    lat_table = latency_table(latency_rows) if latency_rows else {}
    latency_source = "latency.jsonl" if lat_table else None
    if not lat_table:
        lat_table = latency_table(rows)
        latency_source = "quality rows (batch 1)" if lat_table else None
    if configs is None:
        keys = list(by_key) + [k for k in lat_table if k not in by_key]
    else:
        keys = [as_config(c).key for c in configs]
    for k in keys:
        cfg_of.setdefault(k, as_config(k))
    present = [k for k in keys if by_key.get(k)]
    common = set.intersection(*(set(by_key[k]) for k in present)) if present else set()
    order = [eid for eid in by_key[present[0]] if eid in common] if present else []

    ar_key = EvalConfig("autoregressive").key
    timed = [k for k in keys if k in lat_table]
    lat_common = (set.intersection(*(set(lat_table[k]) for k in timed)) if timed else set())
    lat_order = sorted(lat_common, key=str)
    lat = _latencies(lat_table, timed, ar_key, lat_order)
    per_example = bool(getattr(task, "per_example", False))

    per_config = []
    for k in present:
        c = cfg_of[k]
        crow = [by_key[k][e] for e in order]
        m = config_metrics(crow, task.aggregate, None)
        m["relative_latency"], m["relative_latency_per_token"] = lat.get(k, (None, None))
        m["wall_s"] = sum(lat_table[k][e][0] for e in lat_order) if k in lat else None
        scores = [float(r["scoring"]["score"]) for r in crow] if per_example else None
        m["quality_ci"] = clipped_to_scores(
            quality_ci(scores, m["quality"], m["quality_se"], ci), scores)
        m["level"] = c.level
        if c.divergence_budget is not None:  # what each response spent of its budget
            spent = [s.get("stats", {}).get("divergence_spent") for r in crow
                     for s in r.get("sample_rows", [r])]
            known = bool(spent) and None not in spent  # else not measured: no figure
            m["divergence_spent_mean"] = sum(spent) / len(spent) if known else None
            m["divergence_spent_max"] = max(spent) if known else None
        per_config.append({"config": k, "curve": c.curve, **c.to_dict(), **m})
    missing = [k for k in keys if k not in present]
    family = []
    if ar_key in present and per_example:
        base = [by_key[ar_key][e] for e in order]
        for p in per_config:
            p["vs_verifier"] = paired_vs([by_key[p["config"]][e] for e in order], base)
            if p["config"] != ar_key:
                family.append(p)
        for p, adj in zip(family, holm(_padded([p["vs_verifier"]["sign_p"] for p in family],
                                               holm_family))):
            p["vs_verifier"]["sign_p_holm"] = adj
            p["vs_verifier"]["resolved"] = adj < 1 - ci

    metrics_of = {p["config"]: p for p in per_config}
    verifier = metrics_of.get(ar_key)
    drafter = metrics_of.get(EvalConfig("drafter_only").key)
    pooled_keys = [k for k in present if is_verifier_law(cfg_of[k])]
    pooled = None
    if per_example and verifier is not None:
        per_ex = [sum(float(by_key[k][e]["scoring"]["score"]) for k in pooled_keys)
                  / len(pooled_keys) for e in order]
        q, se = mean_and_se(per_ex)
        # normal on the per-example means (0, 1/2, 1 with two sources: not binomial trials),
        # clipped to [0, 1] for scores in [0, 1]
        band = clipped_to_scores(quality_ci(None, q, se, ci), per_ex)
        pooled = {"quality": q, "quality_se": se, "sources": pooled_keys, "n": len(order),
                  "quality_ci": band}
    elif verifier is not None:
        pooled = {"quality": verifier["quality"], "quality_se": verifier["quality_se"],
                  "sources": [ar_key], "n": len(order), "quality_ci": verifier["quality_ci"]}
    corpus = None
    if not per_example and verifier is not None and order:
        corpus = _corpus_bootstrap(task, by_key, order, present, pooled_keys, ar_key,
                                   reps=bootstrap, ci=ci, seed=seed, holm_family=holm_family)
    if corpus is not None:
        pooled = corpus["pooled"]
        for p in per_config:
            p.update(corpus["paired"].get(p["config"], {}))
    target = pooled["quality"] if pooled else None

    curves: dict[str, list[dict[str, Any]]] = {}
    for p in per_config:
        if not cfg_of[p["config"]].is_reference:
            curves.setdefault(p["curve"], []).append(p)
    table2 = []
    for name, pts in curves.items():
        pts = sorted(pts, key=lambda p: (p["level"] is None, p["level"] or 0.0))
        entry: dict[str, Any] = {
            "curve": name, "method": pts[0]["method"], "rule": pts[0]["rule"],
            "points": [{"config": p["config"], "alpha": p["alpha"], "level": p["level"],
                        "relative_latency": p["relative_latency"],
                        "relative_latency_per_token": p["relative_latency_per_token"],
                        "quality": p["quality"]} for p in pts],
        }
        lossless = all(is_verifier_law(cfg_of[p["config"]]) for p in pts)
        if lossless:  # the verifier's law by construction: at its quality wherever it runs
            entry["reached"] = entry["reached_per_token"] = "lossless"
        for suffix, field in (("", "relative_latency"),
                              ("_per_token", "relative_latency_per_token")):
            xy = [(p[field], p["quality"]) for p in pts if p[field] is not None]
            if lossless:
                lat_v = min((x for x, _ in xy), default=None)
            else:
                lat_v = latency_to_reach(xy, target, tol=tol, envelope=envelope) \
                    if target is not None and xy else None
            entry["latency_at_verifier_quality" + suffix] = lat_v
            entry["speedup_at_verifier_quality" + suffix] = None if not lat_v else 1.0 / lat_v
            entry["best_quality_within_verifier_latency" + suffix] = best_quality_within(
                xy, 1.0, envelope=envelope) if target is not None and xy else None
        table2.append(entry)

    summary = {
        "task": getattr(task, "name", str(task)),
        "metric": getattr(task, "metric", "score"),
        "n_examples": len(order),
        "samples": samples,
        "incomplete_samples": incomplete,
        "holm_family": max(holm_family or 0, sum("vs_verifier" in p and p["config"] != ar_key
                                                 for p in per_config)),
        "examples": order,
        "missing_configs": missing,
        "verifier": verifier,
        "verifier_pooled": pooled,
        "drafter": drafter,
        "configs": per_config,
        "table2": table2,
        "table2_options": {"tol": tol, "envelope": envelope},
        "latency": {"source": latency_source, "n_examples": len(lat_order),
                    "examples": lat_order,
                    "trials": _trials(latency_rows) if latency_source == "latency.jsonl" else 1,
                    "timed_configs": len(timed)},
        "ci": ci,
        "bootstrap": 0,
        "batch_invariance": _agreement(rows, latency_rows),
    }
    if bootstrap and per_example and order and target is not None:
        _bootstrap_table2(summary, *_per_example_replicates(summary, by_key, order, pooled_keys,
                                                           reps=bootstrap, ci=ci, seed=seed),
                          lat_table, lat_order, tol=tol, envelope=envelope, reps=bootstrap,
                          ci=ci)
    elif corpus is not None and bootstrap and target is not None:
        summary["paired_test"] = "paired bootstrap"
        _bootstrap_table2(summary, corpus["row"], corpus["Q"], corpus["T"], corpus["rng"],
                          lat_table, lat_order, tol=tol, envelope=envelope, reps=bootstrap,
                          ci=ci)
    return summary


def _trials(rows) -> int:
    if not rows:
        return 0
    return len({r.get("trial", 0) for r in rows})


def _agreement(rows, latency_rows) -> dict[str, Any] | None:
    """How many batch-1 latency rows emitted exactly the tokens of the quality row of the same
    configuration and example (same seed): batch invariance, up to floating-point near-ties."""
    if not latency_rows:
        return None
    sha = {(r["config"], r["example_id"]): r.get("output_sha") for r in rows
           if r.get("output_sha")}
    pairs = [(sha.get((r["config"], r["example_id"])), r.get("output_sha"))
             for r in latency_rows if (r["config"], r["example_id"]) in sha]
    return {"compared": len(pairs), "equal": sum(a == b for a, b in pairs)}


def _per_example_replicates(summary, by_key, order, pooled_keys, *, reps, ci, seed):
    """Bootstrap replicates of per-example-mean qualities: ``(row, Q [configs, reps], T [reps],
    rng)``, every configuration and the pooled verifier on the same resamples of the examples;
    sets each configuration's ``vs_verifier_pooled``."""
    import numpy as np

    rng = np.random.default_rng(seed)
    keys = [k for k in by_key if all(e in by_key[k] for e in order)]
    S = np.array([[float(by_key[k][e]["scoring"]["score"]) for e in order] for k in keys])
    row = {k: i for i, k in enumerate(keys)}
    V = S[[row[k] for k in pooled_keys]].mean(0)
    n = len(order)
    lo_q, hi_q = (1 - ci) / 2, (1 + ci) / 2
    reps_q = rng.integers(0, n, size=(reps, n))
    Q = S[:, reps_q].mean(-1)  # [configs, reps]
    T = V[reps_q].mean(-1)  # [reps]
    for p in summary["configs"]:
        if p["config"] in row:
            d = Q[row[p["config"]]] - T
            p["vs_verifier_pooled"] = {
                "diff": float(S[row[p["config"]]].mean() - V.mean()),
                "ci": [float(np.quantile(d, lo_q)), float(np.quantile(d, hi_q))]}
    return row, Q, T, rng


def _padded(pvalues: list[float], family: int | None) -> list[float]:
    """``pvalues`` with p = 1 for the comparisons of a ``family`` of that size that have no
    rows yet (a partial run of a registered grid is adjusted for the whole grid: Holm's
    adjustment can only grow)."""
    return pvalues + [1.0] * max(0, (family or 0) - len(pvalues))


def _corpus_bootstrap(task, by_key, order, present, pooled_keys, ar_key, *, reps, ci, seed,
                      holm_family=None):
    """Corpus-level metrics (BLEU): the pooled verifier and the paired bootstrap over segments.

    The pooled verifier is the corpus of every verifier-law configuration's hypotheses: their
    per-segment sufficient statistics (``task.segment_stats``) summed per segment, its quality
    ``task.score_from_stats`` of the total (whether or not the bootstrap runs). With ``reps``
    > 0 every configuration's statistics are also summed over ``reps`` resamples of the
    segments (the same resamples for every configuration, so a resampled segment brings all
    pooled hypotheses of it), giving per configuration ``vs_verifier`` (against
    ``autoregressive``: Δ, the replicates' SD as its SE, the percentile CI and the two-sided
    bootstrap p-value — the share of centred replicates at least as far from 0 as Δ,
    (1 + count) / (1 + reps) — with Holm's adjustment over the family), ``vs_verifier_pooled``
    (Δ to the pooled verifier and its CI) and the pooled verifier's SE and CI. ``None`` if the
    task has no segment statistics (or sacrebleu's statistics API is not there)."""
    import numpy as np

    stats_of = getattr(task, "segment_stats", None)
    if stats_of is None or not hasattr(task, "score_from_stats"):
        return None
    keys = [k for k in present if all(e in by_key[k] for e in order)]

    def metric(totals) -> float:  # sums of integer statistics (exact in float64)
        return float(task.score_from_stats(totals))

    try:
        stats = {k: np.asarray(stats_of([by_key[k][e]["scoring"] for e in order]),
                               dtype=np.float64) for k in keys}
        point = {k: metric(stats[k].sum(0)) for k in keys}
    except (AttributeError, TypeError):  # sacrebleu's private statistics API changed
        return None
    V = sum(stats[k] for k in pooled_keys)
    q_v = metric(V.sum(0))
    pooled = {"quality": q_v, "quality_se": None, "sources": pooled_keys, "n": len(order),
              "quality_ci": None}
    out = {"pooled": pooled, "paired": {}, "row": None, "Q": None, "T": None, "rng": None}
    if not reps:
        return out
    rng = np.random.default_rng(seed)
    n = len(order)
    idx = rng.integers(0, n, size=(reps, n))
    counts = np.stack([np.bincount(r, minlength=n) for r in idx]).astype(np.float64)
    lo_q, hi_q = (1 - ci) / 2, (1 + ci) / 2

    def replicates(st) -> np.ndarray:
        return np.array([metric(t) for t in counts @ st])

    def sd(x) -> float:
        return float(np.std(x, ddof=1)) if len(x) > 1 else 0.0

    row = {k: i for i, k in enumerate(keys)}
    Q = np.stack([replicates(stats[k]) for k in keys])
    T = replicates(V)
    pooled.update(quality_se=sd(T),
                  quality_ci=[float(np.quantile(T, lo_q)), float(np.quantile(T, hi_q))])
    paired: dict[str, dict[str, Any]] = out["paired"]
    family = []
    for k in keys:
        d_pool = Q[row[k]] - T
        paired[k] = {"vs_verifier_pooled": {
            "diff": point[k] - q_v,
            "ci": [float(np.quantile(d_pool, lo_q)), float(np.quantile(d_pool, hi_q))]}}
        if k == ar_key or ar_key not in row:
            continue
        d = Q[row[k]] - Q[row[ar_key]]
        diff = point[k] - point[ar_key]
        far = int(np.sum(np.abs(d - d.mean()) >= abs(diff)))
        paired[k]["vs_verifier"] = {
            "diff": diff, "diff_se": sd(d),
            "ci": [float(np.quantile(d, lo_q)), float(np.quantile(d, hi_q))],
            "p": (1 + far) / (1 + reps), "test": "paired bootstrap"}
        family.append(paired[k]["vs_verifier"])
    for v, adj in zip(family, holm(_padded([v["p"] for v in family], holm_family))):
        v["p_holm"] = adj
        v["resolved"] = adj < 1 - ci
    out.update(row=row, Q=Q, T=T, rng=rng)
    return out


def _bootstrap_table2(summary, row, Q, T, rng, lat_table, lat_order, *, tol, envelope, reps,
                      ci) -> None:
    """Bootstrap CIs (percentile, ``ci``) of the Table-2 figures from quality replicates ``Q``
    (``[configs, reps]``, configuration ``k`` in row ``row[k]``) and the pooled verifier's
    ``T`` (``[reps]``), the same resamples for all; the latency examples are resampled here
    with ``rng`` (independently: they are a separate sample)."""
    import numpy as np

    m = len(lat_order)
    timed = [k for k in lat_table if all(e in lat_table[k] for e in lat_order)]
    ar = EvalConfig("autoregressive").key
    have_lat = m > 0 and ar in timed
    if have_lat:
        W = np.array([[lat_table[k][e][0] for e in lat_order] for k in timed])
        P = np.array([[lat_table[k][e][0] / max(lat_table[k][e][1], 1) for e in lat_order]
                      for k in timed])
        trow = {k: i for i, k in enumerate(timed)}
    lo_q, hi_q = (1 - ci) / 2, (1 + ci) / 2
    reps_l = rng.integers(0, m, size=(reps, m)) if have_lat else None
    if have_lat:
        Lsum = W[:, reps_l].sum(-1) / W[trow[ar]][reps_l].sum(-1)  # [timed, reps]
        Ltok = P[:, reps_l].mean(-1) / P[trow[ar]][reps_l].mean(-1)
    for entry in summary["table2"]:
        pts = [p["config"] for p in entry["points"]]
        for suffix, L in (("", Lsum if have_lat else None),
                          ("_per_token", Ltok if have_lat else None)):
            if L is None or not all(k in trow and k in row for k in pts):
                continue
            lossless = entry.get("reached") == "lossless"
            speed, best = [], []
            for b in range(reps):
                xy = [(float(L[trow[k], b]), float(Q[row[k], b])) for k in pts]
                lat_v = (min(x for x, _ in xy) if lossless else
                         latency_to_reach(xy, float(T[b]), tol=tol, envelope=envelope))
                speed.append(0.0 if not lat_v else 1.0 / lat_v)
                bq = best_quality_within(xy, 1.0, envelope=envelope)
                best.append(float("nan") if bq is None else bq - float(T[b]))
            reached = sum(s > 0 for s in speed) / reps
            entry["speedup_ci" + suffix] = [_percentile(speed, lo_q), _percentile(speed, hi_q)]
            entry["reached_fraction" + suffix] = reached
            if not lossless:
                entry["reached" + suffix] = ("reached" if reached >= hi_q else
                                             "not reached" if reached <= lo_q else "unresolved")
            finite = [x for x in best if not math.isnan(x)]
            entry["best_quality_gain_ci" + suffix] = (
                [_percentile(finite, lo_q), _percentile(finite, hi_q)]
                if len(finite) == reps else None)
    summary["bootstrap"] = reps


# --------------------------------------------------------------------------- markdown


def _f(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.{digits}f}"
    return str(v)


def _ci(v: Any, scale: float = 1.0, digits: int = 2) -> str:
    if not v or any(x is None or (isinstance(x, float) and math.isnan(x)) for x in v):
        return "–"
    return f"[{v[0] * scale:.{digits}f}, {v[1] * scale:.{digits}f}]"


def to_markdown(summary: Mapping[str, Any], settings: Mapping[str, Any] | None = None) -> str:
    """``summary.md``: the per-configuration table, the paired comparisons and Table 2."""
    metric = summary["metric"]
    scale = 100.0 if metric in ("pass@1", "accuracy") else 1.0
    unit = " (%)" if scale == 100.0 else ""
    level = int(round(100 * summary.get("ci", 0.95)))

    def q(v: float | None) -> str:
        return "–" if v is None else _f(v * scale, 2)

    lines = [f"# {summary['task']}: quality versus cost", ""]
    if settings:
        lines.append("Settings: " + ", ".join(f"`{k}={v}`" for k, v in settings.items()))
        lines.append("")
    lat = summary.get("latency") or {}
    src = lat.get("source")
    lines += [
        f"{summary['n_examples']} examples common to every configuration"
        + (f", {summary['samples']} samples (seeds) each: an example's score is the mean of its "
           "samples', and the example is the unit of every SE, test and resample"
           if summary.get("samples", 1) > 1 else "") + f". Quality: {metric}{unit}"
        " ± standard error" + (" (bootstrap over segments)" if metric == "BLEU" else "") +
        f", {level} % CI (Wilson's for pass/fail scores, else ± z·SE).",
        "Relative latency, at batch 1: Σ wall time / Σ wall time of `autoregressive` (ratio of "
        "sums), and mean seconds per new token / the verifier's (per token); "
        + (f"from {src}: {lat.get('n_examples')} examples × {lat.get('trials')} trial(s), the "
           "median of the trials per example." if src else "not measured (no timed rows)."),
        "",
        f"| configuration | n | {metric}{unit} | ± SE | {level} % CI | rejection rate "
        "| verifier calls / token | tokens / verifier call | relative latency (sum) "
        "| relative latency (per token) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for p in summary["configs"]:
        lines.append(
            f"| `{p['config']}` | {p['n']} | {q(p['quality'])} | {q(p['quality_se'])} | "
            f"{_ci(p.get('quality_ci'), scale)} | "
            f"{_f(p['rejection_rate'])} | {_f(p['verifier_calls_per_token'])} | "
            f"{_f(p['tokens_per_verifier_call'], 2)} | {_f(p['relative_latency'])} | "
            f"{_f(p.get('relative_latency_per_token'))} |"
        )
    budgeted = [p for p in summary["configs"] if p.get("divergence_budget") is not None]
    if budgeted:
        lines += [
            "",
            "## Divergence budgets",
            "",
            "Per response, the total variation its cascade decisions spent (docs/semantics.md "
            "§9): every response's spending is at most its budget B, so its law is within total "
            "variation B of the verifier's.",
            "",
            "| configuration | B | mean spent | most spent | verifier calls / token |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for p in budgeted:
            lines.append(f"| `{p['config']}` | {p['divergence_budget']:g} | "
                         f"{_f(p.get('divergence_spent_mean'))} | "
                         f"{_f(p.get('divergence_spent_max'))} | "
                         f"{_f(p['verifier_calls_per_token'])} |")
    if summary.get("incomplete_samples"):
        lines += ["", f"{summary['incomplete_samples']} (configuration, example) pairs lack some "
                      f"of their {summary['samples']} samples and are not summarised yet."]
    if summary["missing_configs"]:
        lines += ["", "No rows yet: " + ", ".join(f"`{k}`" for k in summary["missing_configs"])]
    agree = summary.get("batch_invariance")
    if agree:
        lines += ["", f"Batch invariance: {agree['equal']} of {agree['compared']} batch-1 "
                      "latency rows emitted exactly the tokens of their quality row."]
    pooled = summary.get("verifier_pooled")
    paired = [p for p in summary["configs"] if p.get("vs_verifier")
              and p["config"] != "autoregressive"]
    if paired and summary.get("paired_test") == "paired bootstrap":
        lines += [
            "",
            "## Paired with the verifier",
            "",
            f"Per configuration, over the same segments and seeds: Δ {metric} against "
            "`autoregressive`, the paired bootstrap over segments "
            f"({summary.get('bootstrap', 0)} resamples, the same for every configuration): "
            f"the replicates' SD, their {level} % percentile CI, the two-sided p-value (share "
            "of centred replicates at least as far from 0 as Δ) and its Holm adjustment over "
            f"the {summary.get('holm_family') or len(paired)} comparisons of the grid (resolved: "
            "Holm p < "
            f"{1 - summary.get('ci', 0.95):.2f}); then Δ against the pooled verifier (the "
            f"corpus of {', '.join(f'`{k}`' for k in (pooled or {}).get('sources', []))}) "
            f"with its {level} % CI.",
            "",
            f"| configuration | Δ {metric} | ± SE | {level} % CI | p | Holm p | resolved "
            f"| Δ vs pooled verifier | {level} % CI |",
            "| --- | ---: | ---: | ---: | ---: | ---: | :---: | ---: | ---: |",
        ]
        for p in paired:
            d = p["vs_verifier"]
            dp = p.get("vs_verifier_pooled") or {}
            lines.append(f"| `{p['config']}` | {_f(d['diff'], 2)} | {_f(d['diff_se'], 2)} | "
                         f"{_ci(d.get('ci'))} | {_f(d['p'], 4)} | {_f(d.get('p_holm'), 4)} | "
                         f"{'yes' if d.get('resolved') else 'no'} | {q(dp.get('diff'))} | "
                         f"{_ci(dp.get('ci'), scale)} |")
    elif paired:
        lines += [
            "",
            "## Paired with the verifier",
            "",
            f"Per configuration, over the same examples and seeds: Δ {metric}{unit} against "
            "`autoregressive` ± its paired standard error, the examples that go each way, the "
            "exact two-sided sign test on them (McNemar's for pass/fail) and its Holm "
            f"adjustment over the {summary.get('holm_family') or len(paired)} comparisons of the "
            "grid (resolved: Holm p < "
            f"{1 - summary.get('ci', 0.95):.2f}); then Δ against the pooled verifier "
            f"({', '.join(f'`{k}`' for k in (pooled or {}).get('sources', []))}) with its "
            f"{level} % bootstrap CI.",
            "",
            f"| configuration | Δ {metric}{unit} | ± paired SE | better | worse | sign-test p "
            f"| Holm p | resolved | Δ vs pooled verifier | {level} % CI |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | :---: | ---: | ---: |",
        ]
        for p in paired:
            d = p["vs_verifier"]
            dp = p.get("vs_verifier_pooled") or {}
            lines.append(f"| `{p['config']}` | {_f(d['diff'] * scale, 2)} | "
                         f"{_f(d['diff_se'] * scale, 2)} | {d['better']} | {d['worse']} | "
                         f"{_f(d['sign_p'], 3)} | {_f(d.get('sign_p_holm'), 3)} | "
                         f"{'yes' if d.get('resolved') else 'no'} | "
                         f"{q(dp.get('diff'))} | {_ci(dp.get('ci'), scale)} |")
    v = summary["verifier"]
    target = pooled["quality"] if pooled else None
    lines += [
        "",
        "## Table 2",
        "",
        "Per curve (its α sweep), by linear interpolation along the measured (relative latency, "
        "quality) points sorted by latency, through their running-maximum envelope "
        f"(envelope `{summary['table2_options']['envelope']}`, "
        f"tolerance {summary['table2_options']['tol']}). The verifier's quality is pooled from "
        f"{', '.join(f'`{k}`' for k in (pooled or {}).get('sources', [])) or '–'} (one law): "
        f"{q(target)} ± {q(pooled['quality_se']) if pooled else '–'}.",
        f"CIs: {level} % percentile bootstrap over examples ({summary.get('bootstrap', 0)} "
        "resamples; quality and latency examples resampled independently); *reached* only when "
        f"at least {(1 + summary.get('ci', 0.95)) / 2:.1%} of the resamples reach the "
        "verifier's quality, *not reached* when at most "
        f"{(1 - summary.get('ci', 0.95)) / 2:.1%} do, else *unresolved*.",
        "",
        "| curve | points | speed-up at verifier quality (sum) | CI | reached | speed-up (per "
        "token) | CI | best quality within verifier latency | Δ best − verifier CI |",
        "| --- | ---: | ---: | ---: | :---: | ---: | ---: | ---: | ---: |",
    ]
    na = ("not reached" if v and src else "n/a (no autoregressive rows)" if not v
          else "n/a (no latency measured)")
    for t in summary["table2"]:
        s_, st = t["speedup_at_verifier_quality"], t.get("speedup_at_verifier_quality_per_token")
        b = t["best_quality_within_verifier_latency"]
        lines.append(
            f"| `{t['curve']}` | {len(t['points'])} | "
            f"{na if s_ is None else _f(s_, 2) + '×'} | {_ci(t.get('speedup_ci'), 1.0)} | "
            f"{t.get('reached', '–')} | {na if st is None else _f(st, 2) + '×'} | "
            f"{_ci(t.get('speedup_ci_per_token'), 1.0)} | {na if b is None else q(b)} | "
            f"{_ci(t.get('best_quality_gain_ci'), scale)} |"
        )
    return "\n".join(lines) + "\n"
