"""Quality-versus-cost plots (matplotlib, Agg backend) from a summary dict.

Four PNGs:

* ``quality_vs_latency.png``: x = relative latency at batch 1 (wall time ÷ the verifier's, ratio
  of sums; 1 = the verifier alone);
* ``quality_vs_rejection.png``: x = rejection rate (rejected ÷ verified drafts);
* ``quality_vs_verifier_calls.png``: x = verifier calls per new token;
* ``table2.png``: the Table-2 figures per curve, (a) the speed-up at the verifier's quality and
  (b) the best quality within the verifier's latency minus the verifier's, with their bootstrap
  CIs.
* ``quality_vs_budget.png`` (only when some configuration has a divergence budget): per budget
  curve (a rule at one α, its budget B varying), against B on a symmetric-log axis, (a) the
  quality, (b) verifier calls per new token, (c) the mean and the largest divergence a response
  spent, under the line "spent = B" that bounds every response; the same rule and α without a
  budget, where it ran, as a dashed line of the curve's colour.

Every method (curve) has one fixed colour and marker in every figure (:func:`style`); a curve's
points are joined in the order of its α (or min-p), never re-sorted by the x axis, with α written
beside each point; error bars are the quality's confidence interval (the level is in the
caption). The references: the verifier alone (black square) with a dotted line at the pooled
verifier quality and its CI band, lossless ``spec`` (black diamond), the drafter alone (grey
star). Titles give the task, the number of examples, T, γ and the models.
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

PLOTS = {
    "relative_latency": ("quality_vs_latency.png",
                         "relative latency at batch 1 (wall time ÷ verifier's, ratio of sums)"),
    "rejection_rate": ("quality_vs_rejection.png", "rejection rate (rejected ÷ verified drafts)"),
    "verifier_calls_per_token": ("quality_vs_verifier_calls.png",
                                 "verifier calls per new token"),
}
TABLE2_PLOT = "table2.png"
BUDGET_PLOT = "quality_vs_budget.png"

#: fixed (colour, marker, line style) per curve
STYLES: dict[str, tuple[str, str, str]] = {
    "autoregressive": ("black", "s", "none"),
    "spec_cascade[spec]": ("black", "D", "none"),
    "drafter_only": ("tab:gray", "*", "none"),
    "spec_cascade[token_v3]": ("tab:blue", "o", "-"),
    "spec_cascade[token_v3,bonus=verifier]": ("tab:cyan", "o", "--"),
    "spec_cascade[lossy]": ("tab:orange", "s", "-"),
    "spec_cascade[lossy_star]": ("goldenrod", "s", "--"),
    "spec_cascade[opt]": ("tab:green", "^", "-"),
    "spec_cascade[diff]": ("tab:red", "v", "-"),
    "spec_cascade[chow]": ("tab:purple", "D", "-"),
    "spec_cascade[bild]": ("tab:brown", "P", "-"),
    "spec_cascade[ensemble,bonus=verifier]": ("tab:pink", "X", "-"),
    "spec_cascade[ensemble]": ("hotpink", "X", "--"),
    "autoregressive[min_p]": ("tab:olive", "h", "-"),
    "token_cascade[chow]": ("indigo", "<", "-"),
    "seq_cascade": ("darkslategray", ">", "-"),
}
_FALLBACK_COLOURS = ("teal", "crimson", "navy", "darkorange", "darkgreen", "maroon", "slateblue",
                     "sienna", "deeppink", "steelblue")
_FALLBACK_MARKERS = ("o", "s", "^", "v", "D", "P", "X", "h", "<", ">")


def style(curve: str) -> tuple[str, str, str]:
    """The (colour, marker, line style) of a curve: fixed for the known methods (a budget sweep,
    ``method[rule,alpha=…,budget]``, in its rule's colour, dash-dotted), else a stable function
    of its name (the same in every figure and every run)."""
    if curve in STYLES:
        return STYLES[curve]
    if curve.endswith(",budget]"):
        inside = [x for x in curve[curve.index("[") + 1:-1].split(",")
                  if x != "budget" and not x.startswith("alpha=")]
        base = f"{curve[:curve.index('[')]}[{','.join(inside)}]"
        if base in STYLES:
            return STYLES[base][0], STYLES[base][1], "-."
    h = int(hashlib.md5(curve.encode()).hexdigest(), 16)
    return (_FALLBACK_COLOURS[h % len(_FALLBACK_COLOURS)],
            _FALLBACK_MARKERS[(h // 7) % len(_FALLBACK_MARKERS)], "-")


def _scale(metric: str) -> tuple[float, str]:
    return (100.0, f"{metric} (%)") if metric in ("pass@1", "accuracy") else (1.0, metric)


def _short(name: Any) -> str:
    return Path(str(name)).name if name else "?"


def title_of(summary: Mapping[str, Any]) -> str:
    st = summary.get("settings") or {}
    samples = summary.get("samples", 1)
    return (f"{summary.get('task', '')}: n = {summary.get('n_examples')}"
            + (f" × {samples} samples" if samples > 1 else "") + ", "
            f"T = {st.get('temperature', '?')}, γ = {st.get('gamma', '?')}, "
            f"{_short(st.get('drafter'))} → {_short(st.get('verifier'))}")


def caption_of(summary: Mapping[str, Any]) -> str:
    level = int(round(100 * summary.get("ci", 0.95)))
    pooled = summary.get("verifier_pooled") or {}
    lat = summary.get("latency") or {}
    how = ("quality ± z · its bootstrap SE over segments" if summary.get("metric") == "BLEU"
           else "Wilson's interval for pass/fail scores, else quality ± z · SE")
    parts = [f"error bars: {level} % CI of the quality ({how})",
             f"dotted line and band: the verifier's quality pooled from "
             f"{' + '.join(pooled.get('sources', [])) or '–'} and its {level} % CI"]
    if lat.get("source"):
        parts.append(f"latency: {lat['n_examples']} examples × {lat['trials']} trial(s) at "
                     "batch 1")
    return "; ".join(parts)


def _errors(points, scale):
    lo, hi = [], []
    for p in points:
        c = p.get("quality_ci")
        q = p["quality"] * scale
        if c and None not in c:
            lo.append(max(0.0, q - c[0] * scale))
            hi.append(max(0.0, c[1] * scale - q))
        else:
            lo.append(0.0)
            hi.append(0.0)
    return [lo, hi]


def plot_summary(summary: Mapping[str, Any], out_dir: str | Path) -> list[Path]:
    """Write the four PNGs into ``out_dir`` and return their paths."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    scale, ylabel = _scale(summary.get("metric", "quality"))
    curves: dict[str, list[Mapping[str, Any]]] = {}
    refs: list[Mapping[str, Any]] = []
    for p in summary["configs"]:
        if p["curve"] in ("autoregressive", "drafter_only", "spec_cascade[spec]"):
            refs.append(p)
        else:
            curves.setdefault(p["curve"], []).append(p)
    pooled = summary.get("verifier_pooled")
    written = []
    for field, (fname, xlabel) in PLOTS.items():
        fig, ax = plt.subplots(figsize=(7.6, 5.4), dpi=120)
        drawn = 0
        for name, pts in sorted(curves.items()):
            pts = [p for p in pts if p.get(field) is not None]
            pts.sort(key=lambda p: (p.get("level") is None, p.get("level") or 0.0))
            if not pts:
                continue
            colour, marker, ls = style(name)
            xs = [p[field] for p in pts]
            ys = [p["quality"] * scale for p in pts]
            ax.errorbar(xs, ys, yerr=_errors(pts, scale), marker=marker, ms=5, capsize=2,
                        color=colour, ls=ls, lw=1.2, label=name, elinewidth=0.8)
            for p, x, y in zip(pts, xs, ys):
                if p.get("level") is not None:
                    ax.annotate(f"{p['level']:g}", (x, y), fontsize=6, color=colour,
                                xytext=(3, 3), textcoords="offset points")
            drawn += 1
        if pooled is not None:
            q = pooled["quality"] * scale
            ax.axhline(q, color="black", ls=":", lw=1)
            c = pooled.get("quality_ci")
            if c and None not in c:
                ax.axhspan(c[0] * scale, c[1] * scale, color="black", alpha=0.06, lw=0)
        for p in refs:
            colour, marker, _ = style(p["curve"])
            label = {"autoregressive": "verifier alone", "drafter_only": "drafter alone",
                     "spec_cascade[spec]": "spec (lossless)"}[p["curve"]]
            if p.get(field) is not None:
                ax.errorbar([p[field]], [p["quality"] * scale], yerr=_errors([p], scale),
                            marker=marker, ms=8, color=colour, ls="none", capsize=2,
                            label=label)
                drawn += 1
        if field == "relative_latency":
            ax.axvline(1.0, color="black", ls=":", lw=1)
        if not drawn:
            ax.text(0.5, 0.5, f"no configuration has a {field.replace('_', ' ')} yet",
                    transform=ax.transAxes, ha="center", va="center")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title_of(summary), fontsize=9)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6, loc="best")
        fig.text(0.01, 0.005, caption_of(summary), fontsize=5.5, ha="left", va="bottom",
                 wrap=True)
        fig.tight_layout(rect=(0, 0.03, 1, 1))
        path = out_dir / fname
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    written.append(_table2_plot(summary, out_dir / TABLE2_PLOT, plt, scale))
    if any(p.get("divergence_budget") is not None for p in summary["configs"]):
        written.append(_budget_plot(summary, out_dir / BUDGET_PLOT, plt, scale))
    return written


def _unbudgeted(p: Mapping[str, Any], configs) -> Mapping[str, Any] | None:
    """The configuration of budget point ``p``'s rule, α and bonus without a budget, if it ran."""
    for c in configs:
        if c.get("divergence_budget") is None and c.get("min_p") is None and all(
                c.get(k) == p.get(k) for k in ("method", "rule", "alpha", "bonus")):
            return c
    return None


def _budget_plot(summary, path: Path, plt, scale: float) -> Path:
    """Quality, verifier calls per token and the divergence spent against the budget B."""
    configs = summary["configs"]
    curves: dict[str, list[Mapping[str, Any]]] = {}
    for p in configs:
        if p.get("divergence_budget") is not None:
            curves.setdefault(p["curve"], []).append(p)
    budgets = sorted({p["divergence_budget"] for pts in curves.values() for p in pts})
    positive = [b for b in budgets if b > 0]
    linthresh = min(positive) if positive else 1.0
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(13.5, 4.6), dpi=120)
    _, ylabel = _scale(summary.get("metric", "quality"))
    pooled = summary.get("verifier_pooled")
    if pooled is not None:
        a.axhline(pooled["quality"] * scale, color="black", ls=":", lw=1,
                  label="verifier (pooled)")
        ci = pooled.get("quality_ci")
        if ci and None not in ci:
            a.axhspan(ci[0] * scale, ci[1] * scale, color="black", alpha=0.06, lw=0)
    for name, pts in sorted(curves.items()):
        pts = sorted(pts, key=lambda p: p["divergence_budget"])
        colour, marker, ls = style(name)
        xs = [p["divergence_budget"] for p in pts]
        a.errorbar(xs, [p["quality"] * scale for p in pts], yerr=_errors(pts, scale),
                   marker=marker, ms=5, capsize=2, color=colour, ls=ls, lw=1.2, label=name)
        b.plot(xs, [p["verifier_calls_per_token"] for p in pts], marker=marker, color=colour,
               ls=ls, lw=1.2, label=name)
        means = [p.get("divergence_spent_mean") for p in pts]
        if None not in means:
            c.plot(xs, means, marker=marker, color=colour, lw=1.2, label=f"{name}: mean")
            c.plot(xs, [p["divergence_spent_max"] for p in pts], marker=marker, color=colour,
                   lw=0.8, ls="--", mfc="none", label=f"{name}: largest")
        free = _unbudgeted(pts[0], configs)
        if free is not None:
            a.axhline(free["quality"] * scale, color=colour, ls="--", lw=0.8,
                      label=f"{free['config']} (no budget)")
            if free.get("verifier_calls_per_token") is not None:
                b.axhline(free["verifier_calls_per_token"], color=colour, ls="--", lw=0.8,
                          label=f"{free['config']} (no budget)")
    top = max(budgets) if budgets else 1.0
    # through the budgets run, as the curves are: a curve at or under its budgets stays under
    c.plot(budgets, budgets, color="black", ls=":", lw=1, label="spent = B (the bound)")
    spent = [p.get("divergence_spent_max") for pts in curves.values() for p in pts]
    spent = [x for x in spent if x is not None]
    if spent:
        c.set_ylim(0, 1.15 * max(max(spent), linthresh))
    for ax, label in ((a, ylabel), (b, "verifier calls per new token (lower: faster; the "
                                      "verifier alone: 1)"),
                      (c, "divergence spent per response (total variation)")):
        ax.set_xscale("symlog", linthresh=linthresh)
        ax.set_xlim(-0.15 * linthresh, 2 * top)
        ax.set_xticks(budgets, [f"{x:g}" for x in budgets], fontsize=7)
        ax.minorticks_off()
        ax.set_xlabel("divergence budget B per response (symmetric log axis)")
        ax.set_ylabel(label, fontsize=8)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6, loc="lower right" if ax is a else "best")
    a.set_title("(a) quality", fontsize=9)
    b.set_title("(b) cost", fontsize=9)
    c.set_title("(c) what responses spent", fontsize=9)
    fig.suptitle(title_of(summary), fontsize=9)
    fig.text(0.01, 0.005, caption_of(summary) + "; dashed lines in (c): the largest spending "
             "of any response", fontsize=5.5, ha="left", va="bottom", wrap=True)
    fig.tight_layout(rect=(0, 0.03, 1, 0.97))
    fig.savefig(path)
    plt.close(fig)
    return path


def _table2_plot(summary, path: Path, plt, scale: float) -> Path:
    """(a) speed-up at the verifier's quality, (b) best quality within the verifier's latency
    minus the verifier's, per curve, with the bootstrap CIs."""
    t2 = summary.get("table2") or []
    level = int(round(100 * summary.get("ci", 0.95)))
    fig, (a, b) = plt.subplots(1, 2, figsize=(9.5, 0.45 * max(len(t2), 3) + 1.6), dpi=120,
                               sharey=True)
    names = [t["curve"] for t in t2]
    pooled = summary.get("verifier_pooled") or {}
    target = pooled.get("quality")
    for i, t in enumerate(t2):
        colour, marker, _ = style(t["curve"])
        s, c = t.get("speedup_at_verifier_quality"), t.get("speedup_ci")
        if s is not None:
            err = [[s - c[0]], [c[1] - s]] if c else None
            a.errorbar([s], [i], xerr=err, marker=marker, color=colour, capsize=3, ms=7)
        else:
            a.plot([0], [i], marker=marker, color=colour, mfc="none", ms=7)
        a.annotate(t.get("reached") or ("not reached" if s is None else ""), (0, i),
                   xytext=(4, -9), textcoords="offset points", fontsize=6, color=colour)
        best = t.get("best_quality_within_verifier_latency")
        if best is not None and target is not None:
            d = (best - target) * scale
            g = t.get("best_quality_gain_ci")
            err = [[max(0.0, d - g[0] * scale)], [max(0.0, g[1] * scale - d)]] if g else None
            b.errorbar([d], [i], xerr=err, marker=marker, color=colour, capsize=3, ms=7)
    a.axvline(1.0, color="black", ls=":", lw=1)
    b.axvline(0.0, color="black", ls=":", lw=1)
    a.set_yticks(range(len(names)), names, fontsize=7)
    a.invert_yaxis()
    a.set_xlabel("(a) speed-up at the verifier's quality\n(× the verifier's speed, batch 1)",
                 fontsize=8)
    unit = "points" if scale == 100.0 else summary.get("metric", "")
    b.set_xlabel(f"(b) best quality within the verifier's latency\nminus the verifier's ({unit})",
                 fontsize=8)
    for ax in (a, b):
        ax.grid(True, axis="x", alpha=0.3)
    fig.suptitle("Table 2 — " + title_of(summary), fontsize=9)
    fig.text(0.01, 0.005, f"bars: {level} % percentile bootstrap CI over examples "
             f"({summary.get('bootstrap', 0)} resamples); hollow marker at 0: not reached at the "
             "point estimate", fontsize=6, ha="left", va="bottom")
    fig.tight_layout(rect=(0, 0.04, 1, 0.95))
    fig.savefig(path)
    plt.close(fig)
    return path
