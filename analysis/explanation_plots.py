"""Figures of explanations: the tokens a model relies on most, and the faithfulness (deletion) curves.

Built on `matplotlib.figure.Figure` and written atomically by `analysis.plots.save_figure`, like every figure.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.figure import Figure

from analysis.explanation_stats import FAITHFULNESS_MODES
from analysis.plots import save_figure

MODE_LABELS = {
    "comprehensiveness": "comprehensiveness: top tokens removed\n(higher = more faithful)",
    "sufficiency": "sufficiency: only top tokens kept\n(lower = more faithful)",
}


def plot_top_tokens(top_tokens: Sequence[Mapping], title: str, path: str | os.PathLike) -> Path:
    """Horizontal bars of total |SHAP| (target class) per token, largest on top; `top_tokens` as in model_statistics."""
    rows = list(top_tokens)[::-1]
    fig = Figure(figsize=(6.0, 1.0 + 0.28 * max(len(rows), 1)))
    ax = fig.add_subplot()
    if rows:
        ax.barh(range(len(rows)), [row["total_abs"] for row in rows], color="#c2410c")
        ax.set_yticks(range(len(rows)), [f"{row['token']} (n={row['count']})" for row in rows], fontsize=8)
    else:
        ax.text(0.5, 0.5, "no tokens", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("total |SHAP value| for the target class, summed over examples")
    ax.set_title(title)
    return save_figure(fig, path)


def plot_deletion_curves(summary_by_model: Mapping[str, Mapping], path: str | os.PathLike) -> Path:
    """Mean perturbation curves per mode: attribution ranking (solid) vs random ranking (dashed), per model."""
    fig = Figure(figsize=(10.0, 4.0), layout="constrained")
    axes = fig.subplots(1, len(FAITHFULNESS_MODES), sharey=True)
    colours = ["#2563eb", "#dc2626", "#16a34a", "#9333ea"]
    for ax, mode in zip(axes, FAITHFULNESS_MODES):
        for colour, (model, summary) in zip(colours, summary_by_model.items()):
            for suffix, style, label in (("", "-", "SHAP order"), ("_random", "--", "random order")):
                curve = summary[f"{mode}{suffix}"]
                fractions = [100 * f for f in curve["fractions"]]
                aopc = curve["mean_aopc"]
                ax.plot(
                    fractions,
                    curve["mean_curve"],
                    style,
                    marker="o",
                    color=colour,
                    label=f"{model}, {label} (AOPC {aopc:.3f})",
                )
        ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.set_xlabel("% of tweet tokens " + ("removed" if mode == "comprehensiveness" else "kept"))
        ax.set_title(MODE_LABELS[mode], fontsize=9)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("drop in target-class probability")
    return save_figure(fig, path)
