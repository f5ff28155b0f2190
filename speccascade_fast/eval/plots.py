"""Quality-versus-cost plots (matplotlib, Agg backend) from a summary dict.

Three PNGs, one curve per ``method[rule]`` (points sorted along the x axis, α written beside
each point), the ``drafter_only`` point marked with a star and the ``autoregressive`` (verifier
only) point with a square plus a dotted horizontal line at its quality:

* ``quality_vs_latency.png``: x = relative latency (1 = the verifier alone);
* ``quality_vs_rejection.png``: x = rejection rate (the verifier-only run has none: line only);
* ``quality_vs_verifier_calls.png``: x = verifier calls per token.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

PLOTS = {
    "relative_latency": ("quality_vs_latency.png", "relative latency (verifier = 1)"),
    "rejection_rate": ("quality_vs_rejection.png", "rejection rate"),
    "verifier_calls_per_token": ("quality_vs_verifier_calls.png", "verifier calls per token"),
}


def plot_summary(summary: Mapping[str, Any], out_dir: str | Path) -> list[Path]:
    """Write the three PNGs into ``out_dir`` and return their paths."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metric = summary.get("metric", "quality")
    curves: dict[str, list[Mapping[str, Any]]] = {}
    for p in summary["configs"]:
        if p["method"] not in ("autoregressive", "drafter_only"):
            curves.setdefault(p["curve"], []).append(p)
    refs = {"verifier only": (summary.get("verifier"), "s", "black"),
            "drafter only": (summary.get("drafter"), "*", "tab:gray")}
    written = []
    for field, (fname, xlabel) in PLOTS.items():
        fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=120)
        for name, pts in sorted(curves.items()):
            pts = sorted((p for p in pts if p.get(field) is not None), key=lambda p: p[field])
            if not pts:
                continue
            xs, ys = [p[field] for p in pts], [p["quality"] for p in pts]
            errs = [p.get("quality_se") or 0.0 for p in pts]
            line = ax.errorbar(xs, ys, yerr=errs, marker="o", ms=4, capsize=2, label=name)
            color = line[0].get_color()
            for p in pts:
                if p.get("alpha") is not None:
                    ax.annotate(f"{p['alpha']:g}", (p[field], p["quality"]), fontsize=6,
                                color=color, xytext=(3, 3), textcoords="offset points")
        for label, (ref, marker, color) in refs.items():
            if ref is None:
                continue
            if label == "verifier only":
                ax.axhline(ref["quality"], color=color, ls=":", lw=1)
            if ref.get(field) is not None:
                ax.plot([ref[field]], [ref["quality"]], marker=marker, ms=10, color=color,
                        ls="none", label=label)
            elif label != "verifier only":
                ax.plot([], [], marker=marker, color=color, ls="none", label=label)
        if field == "relative_latency":
            ax.axvline(1.0, color="black", ls=":", lw=1)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(metric)
        ax.set_title(f"{summary.get('task', '')}: {metric} vs {xlabel}")
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / fname
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written
