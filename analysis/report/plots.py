"""Figures: headline metrics with CIs, confusion matrices, reliability diagrams, top SHAP tokens, deletion curves,
ROAR curves.

Figures are built with ``matplotlib.figure.Figure`` rather than pyplot, so no GUI backend or global figure
state is involved and nothing needs ``matplotlib.use``. Every PNG is written atomically by ``save_figure``.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from analysis.statistics.classification import ECE_BINS, expected_calibration_error, reliability_bins
from analysis.statistics.explanations import FAITHFULNESS_MODES
from foundation.atomic_files import write_bytes_atomic


def save_figure(fig: Figure, path: str | os.PathLike) -> Path:
    """Write ``fig`` as PNG to ``path`` atomically; readers never see half a file."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=150, bbox_inches="tight")
    return write_bytes_atomic(path, buffer.getvalue())


def _require_models(by_model: Mapping) -> None:
    if not by_model:
        raise ValueError("need at least one model to plot, got an empty mapping")


def plot_metric_comparison(
    metrics_by_model: Mapping[str, Mapping],
    path: str | os.PathLike,
    metric_names: Sequence[str] = ("accuracy", "macro_f1", "f1", "mcc"),
) -> Path:
    """Grouped bars (one group per metric, one bar per model) with bootstrap CI whiskers where available."""
    _require_models(metrics_by_model)
    fig = Figure(figsize=(1.6 + 1.4 * len(metric_names), 4.0))
    ax = fig.add_subplot()
    x = np.arange(len(metric_names))
    width = 0.8 / len(metrics_by_model)
    for i, (model, metrics) in enumerate(metrics_by_model.items()):
        positions = x - 0.4 + width * (i + 0.5)
        values = np.array([metrics.get(name, np.nan) for name in metric_names], dtype=float)
        bars = ax.bar(positions, values, width, label=model)
        intervals = metrics.get("confidence_intervals", {})
        with_ci = [k for k, name in enumerate(metric_names) if name in intervals and np.isfinite(values[k])]
        if with_ci:
            low = np.array([intervals[metric_names[k]]["low"] for k in with_ci])
            high = np.array([intervals[metric_names[k]]["high"] for k in with_ci])
            # A percentile interval need not contain the estimate; clip so matplotlib gets non-negative arms.
            yerr = np.clip([values[with_ci] - low, high - values[with_ci]], 0.0, None)
            ax.errorbar(positions[with_ci], values[with_ci], yerr=yerr, fmt="none", ecolor="black", capsize=3)
        ax.bar_label(bars, fmt="%.2f", fontsize=7, label_type="center")  # inside: whiskers sit on top
    ax.axhline(0.0, color="grey", linewidth=0.8)  # MCC can be negative
    ax.set_xticks(x, list(metric_names))
    ax.set_ylabel("score (95% bootstrap CI)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return save_figure(fig, path)


def plot_confusion_matrices(
    metrics_by_model: Mapping[str, Mapping],
    label_names: Sequence[str],
    path: str | os.PathLike,
) -> Path:
    """Side-by-side confusion matrices: colour is the row-normalised rate, text is the raw count."""
    _require_models(metrics_by_model)
    n_models = len(metrics_by_model)
    fig = Figure(figsize=(1.2 + 3.4 * n_models, 3.8), layout="constrained")
    axes = fig.subplots(1, n_models, squeeze=False, sharey=True)[0]
    for ax, (model, metrics) in zip(axes, metrics_by_model.items(), strict=True):
        counts = np.asarray(metrics["confusion_matrix"], dtype=float)
        if counts.shape != (len(label_names), len(label_names)):
            raise ValueError(f"{model}: confusion matrix has shape {counts.shape}, expected {len(label_names)} labels")
        rows = counts.sum(axis=1, keepdims=True)
        rates = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
        image = ax.imshow(rates, vmin=0.0, vmax=1.0, cmap="Blues")
        for (i, j), count in np.ndenumerate(counts):
            colour = "white" if rates[i, j] > 0.5 else "black"  # stay readable on dark cells
            ax.text(j, i, f"{int(count)}", ha="center", va="center", color=colour)
        ax.set_xticks(range(len(label_names)), list(label_names), rotation=30)
        ax.set_yticks(range(len(label_names)), list(label_names))
        ax.set_xlabel("predicted")
        ax.set_title(model)
    axes[0].set_ylabel("gold")
    fig.colorbar(image, ax=list(axes), label="fraction of gold row", shrink=0.8)
    return save_figure(fig, path)


def plot_reliability(
    y_true: np.ndarray,
    probs_by_model: Mapping[str, np.ndarray],
    path: str | os.PathLike,
    n_bins: int = ECE_BINS,
) -> Path:
    """Reliability diagram: accuracy against mean confidence per bin for each model, ECE in the legend."""
    _require_models(probs_by_model)
    fig = Figure(figsize=(5.0, 5.5))
    ax, ax_count = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    for model, probs in probs_by_model.items():
        bins = reliability_bins(y_true, probs, n_bins)
        count = np.asarray(bins["count"])
        filled = count > 0
        ece = expected_calibration_error(y_true, probs, n_bins)
        ax.plot(
            np.asarray(bins["confidence"])[filled],
            np.asarray(bins["accuracy"])[filled],
            marker="o",
            label=f"{model} (ECE={ece:.3f})",
        )
        ax_count.stairs(count, bins["edges"], label=model)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy in bin")
    ax.legend(fontsize=8, loc="upper left")
    ax_count.set_xlabel("confidence (max label probability)")
    ax_count.set_ylabel("examples")
    return save_figure(fig, path)


# ---- explanations ----------------------------------------------------------------------------------------------
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


def plot_roar(
    conditions: Mapping[str, Mapping], explainers: Sequence[str], model: str, path: str | os.PathLike
) -> Path:
    """ROAR: accuracy and macro-F1 after retraining against the share of words removed, per explainer and for the
    random control, all starting from the unchanged rows (`none`), with bootstrap CI whiskers."""
    fig = Figure(figsize=(10.0, 4.0), layout="constrained")
    axes = fig.subplots(1, 2)
    none = conditions["none"]
    colours = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c"]
    for ax, metric, label in zip(axes, ("accuracy", "macro_f1"), ("accuracy", "macro-F1")):
        for k, removal in enumerate(["random", *explainers]):
            rows = [none] + sorted(
                (row for row in conditions.values() if row["removal"] == removal), key=lambda row: row["fraction"]
            )
            x = [100 * row["fraction"] for row in rows]
            y = np.array([row[metric] for row in rows])
            low = np.array([row["confidence_intervals"][metric]["low"] for row in rows])
            high = np.array([row["confidence_intervals"][metric]["high"] for row in rows])
            ax.errorbar(
                x,
                y,
                yerr=np.clip([y - low, high - y], 0.0, None),
                fmt="--o" if removal == "random" else "-o",
                color="grey" if removal == "random" else colours[k % len(colours)],
                capsize=3,
                label="random (control)" if removal == "random" else removal,
            )
        ax.set_xlabel("% of each tweet's words removed (train and eval)")
        ax.set_ylabel(f"{label} after retraining (95% CI)")
        ax.legend(fontsize=8)
    fig.suptitle(f"ROAR: {model} explained, LoRA retrained on the remaining words", fontsize=10)
    return save_figure(fig, path)


def plot_explainer_agreement(agreement: Mapping[str, Mapping], names: Mapping[str, str], path: str | os.PathLike):
    """Per model, the mean per-tweet Spearman between every two explainers as a matrix (1 on the diagonal)."""
    fig = Figure(figsize=(4.6 * len(agreement), 4.2), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(agreement)))
    for ax, (model, pairs) in zip(axes, agreement.items()):
        explainers = list(dict.fromkeys(e for row in pairs.values() for e in row["explainers"]))
        index = {e: k for k, e in enumerate(explainers)}
        matrix = np.eye(len(explainers))
        for row in pairs.values():
            a, b = (index[e] for e in row["explainers"])
            mean = row["spearman"]["mean"]
            matrix[a, b] = matrix[b, a] = np.nan if mean is None else mean
        image = ax.imshow(matrix, vmin=-1, vmax=1, cmap="RdBu")
        for (i, j), value in np.ndenumerate(matrix):
            ax.text(j, i, "n/a" if np.isnan(value) else f"{value:.2f}", ha="center", va="center", fontsize=8)
        labels = [e.replace("integrated_gradients", "IG") for e in explainers]
        ax.set_xticks(range(len(explainers)), labels, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(explainers)), labels, fontsize=8)
        ax.set_title(f"{names.get(model, model)}: mean Spearman per tweet", fontsize=9)
    fig.colorbar(image, ax=list(axes), shrink=0.8)
    return save_figure(fig, path)
