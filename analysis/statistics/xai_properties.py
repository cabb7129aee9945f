"""XAI properties of attributions, measured per tweet (never assumed), and the agreement between explainers.

Pure functions: attribution vectors in, plain dicts out; undefined values are None. The formulas (also in
docs/xai_properties.md) for one tweet with n features and attributions phi (the explained class t unless named):

- selectivity: Gini of |phi| (0: credit spread evenly, (n-1)/n: on one feature).
- compactness: k / n, k the fewest features whose |phi| hold at least 80 % of sum |phi| (small: compact).
- contrastivity: (1 - cos(phi_t, phi_r)) / 2 for the runner-up class r (0: the same explanation for both classes,
  1: opposite ones).
- target sensitivity: mean over pairs of classes of the Jensen-Shannon divergence (base 2, in [0, 1]) between
  |phi_a| / sum |phi_a| and |phi_b| / sum |phi_b| (0: every class credits the same features).
- monotonicity: the share of steps of the deletion curve (top-k features removed, k growing) on which the drop
  of the explained probability does not shrink.
- stability: Spearman between phi(x) and phi(x') over the features x' keeps, x' a meaning-preserving edit of x.
- identity: Spearman between two explanations of x with different explainer seeds (1 for identical vectors).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import combinations

import numpy as np
from scipy import stats
from scipy.spatial.distance import jensenshannon

from analysis.statistics.explanations import (
    MIN_TOKENS_FOR_CORRELATION,
    gini,
    mean_with_ci,
    paired_example_statistics,
)

COMPACTNESS_SHARE = 0.8
MONOTONICITY_TOLERANCE = 1e-9  # a flat step (float noise) is not a reversal


def selectivity(values: np.ndarray) -> float:
    return gini(values)


def compactness(values: np.ndarray, share: float = COMPACTNESS_SHARE) -> float | None:
    magnitude = np.sort(np.abs(np.asarray(values, dtype=float)))[::-1]
    total = magnitude.sum()
    if total == 0:
        return None
    needed = int(np.searchsorted(np.cumsum(magnitude), share * total - 1e-12 * total) + 1)
    return min(needed, magnitude.size) / magnitude.size


def contrastivity(target_values: np.ndarray, runner_up_values: np.ndarray) -> float | None:
    a, b = np.asarray(target_values, dtype=float), np.asarray(runner_up_values, dtype=float)
    norm = np.linalg.norm(a) * np.linalg.norm(b)
    if norm == 0:
        return None
    return float((1 - np.dot(a, b) / norm) / 2)


def target_sensitivity(values_per_class: np.ndarray) -> float | None:
    """`values_per_class`: (features, classes)."""
    magnitude = np.abs(np.asarray(values_per_class, dtype=float))
    totals = magnitude.sum(axis=0)
    pairs = [(a, b) for a, b in combinations(range(magnitude.shape[1]), 2) if totals[a] > 0 and totals[b] > 0]
    if not pairs:
        return None
    return float(np.mean([jensenshannon(magnitude[:, a], magnitude[:, b], base=2) ** 2 for a, b in pairs]))


def monotonicity(curve: Sequence[float], ks: Sequence[int]) -> float | None:
    """`curve[i]`: f(x) - f(x without its top ks[i] features); steps between equal k are not steps."""
    points = [(k, c) for i, (k, c) in enumerate(zip(ks, curve)) if i == 0 or k != ks[i - 1]]
    curve_points = [0.0] + [c for _, c in points]  # nothing removed: no drop
    steps = np.diff(curve_points)
    return float(np.mean(steps >= -MONOTONICITY_TOLERANCE)) if steps.size else None


def rank_agreement(first: np.ndarray, second: np.ndarray) -> float | None:
    """Spearman of two attribution vectors of the same features; 1 when identical, None when undefined."""
    a, b = np.asarray(first, dtype=float), np.asarray(second, dtype=float)
    if np.array_equal(a, b):
        return 1.0
    if a.size < MIN_TOKENS_FOR_CORRELATION or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    return float(stats.spearmanr(a, b)[0])


def summarize(values: Sequence[float | None], n_resamples: int, seed: int) -> dict:
    """Mean over the tweets where the property is defined, with a bootstrap CI, and how many those were."""
    defined = [float(v) for v in values if v is not None and not math.isnan(v)]
    return {**mean_with_ci(defined, n_resamples, seed), "n_undefined": len(values) - len(defined)}


def explainer_agreement(
    values_by_explainer: dict[str, Sequence[np.ndarray]], n_resamples: int = 1000, seed: int = 0
) -> dict:
    """Per pair of explainers, mean per-tweet Spearman and top-5 overlap of their attributions (the same tweets,
    features and class), with bootstrap CIs over tweets."""
    out = {}
    for a, b in combinations(values_by_explainer, 2):
        rows = [paired_example_statistics(x, y) for x, y in zip(values_by_explainer[a], values_by_explainer[b])]
        out[f"{a}_vs_{b}"] = {
            "explainers": [a, b],
            "spearman": mean_with_ci([row["spearman"] for row in rows], n_resamples, seed),
            "top5_overlap": mean_with_ci([row["top5_overlap"] for row in rows], n_resamples, seed),
        }
    return out
