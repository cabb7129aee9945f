"""The fine-tuning effect explained directly, and the strata of tweets a comparison is split into.

With both models explained on identical coalitions and one common target class t, Shapley (and Owen) values are
linear in the value function, so dphi = phi_b - phi_a is the explanation of f_b - f_a: per tweet,
sum(dphi) = (f_b(x) - f_a(x)) - (f_b(empty) - f_a(empty)). Pure functions: arrays in, plain dicts out.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from analysis.statistics.resampling import bootstrap_ci

STRATA = ("both_correct", "fixed", "broken", "both_wrong")
STRATA_DEFINITION = (
    "both_correct: both models predict the gold label; fixed: only the second (reference) model does; broken: only "
    "the first does; both_wrong: neither does"
)
MIN_STRATUM = 5  # fewer tweets than this get a count, not a confidence interval
_EDGE_PUNCTUATION = re.compile(r"^[^\w@#]+|[^\w]+$")


def word_type(feature: str) -> str:
    """The type a feature counts under across tweets: lower-cased, the punctuation around it removed (a leading @ or
    # is kept); a feature of punctuation or emoji only is its own type. "Great!!" and "great" are one type."""
    text = feature.strip().lower()
    stripped = _EDGE_PUNCTUATION.sub("", text)
    return stripped or text


def delta_attributions(values_a: Sequence[np.ndarray], values_b: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Per tweet, phi_b - phi_a on the common target (second minus first)."""
    if len(values_a) != len(values_b):
        raise ValueError("delta_attributions needs the same tweets for both models")
    deltas = []
    for a, b in zip(values_a, values_b):
        a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
        if a.shape != b.shape:
            raise ValueError(f"the two explanations of a tweet differ in length: {a.size} vs {b.size}")
        deltas.append(b - a)
    return deltas


def fine_tuning_effect(
    values_a: Sequence[np.ndarray],
    values_b: Sequence[np.ndarray],
    base_a: Sequence[float],
    base_b: Sequence[float],
    full_a: Sequence[float],
    full_b: Sequence[float],
    features: Sequence[Sequence[str]],
    min_tweets: int = 3,
    top_k: int = 10,
    n_resamples: int = 1000,
    seed: int = 0,
) -> dict:
    """dphi per tweet (with its additivity check) and per word type across the tweets it occurs in.

    `base_*` are the models' values on the empty tweet and `full_*` on the whole tweet, for the common target.
    A type's effect in a tweet is the sum of dphi over its occurrences there; across tweets, the mean over the
    tweets it occurs in, with a bootstrap CI, for types in at least `min_tweets` tweets.
    """
    deltas = delta_attributions(values_a, values_b)
    per_example = []
    by_type: dict[str, list[tuple[float, float, float]]] = defaultdict(list)  # (dphi, phi_a, phi_b) per tweet
    for k, delta in enumerate(deltas):
        expected = (full_b[k] - full_a[k]) - (base_b[k] - base_a[k])
        per_example.append(
            {
                "delta": delta.tolist(),
                "sum_delta": float(delta.sum()),
                "delta_f": float(expected),
                "additivity_error": float(abs(delta.sum() - expected)),
            }
        )
        totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])
        for feature, d, a in zip(features[k], delta, np.asarray(values_a[k], dtype=float)):
            row = totals[word_type(feature)]
            row[0], row[1], row[2] = row[0] + d, row[1] + a, row[2] + a + d
        for name, (d, a, b) in totals.items():
            by_type[name].append((d, a, b))
    words = []
    for name, rows in by_type.items():
        if len(rows) < min_tweets:
            continue
        effect = np.array([row[0] for row in rows])
        ci = bootstrap_ci(np.mean, [effect], n_resamples=n_resamples, seed=seed)
        words.append(
            {
                "word": name,
                "n_tweets": len(rows),
                "mean_delta": ci["estimate"],
                "ci_low": ci["low"],
                "ci_high": ci["high"],
                "mean_first": float(np.mean([row[1] for row in rows])),
                "mean_second": float(np.mean([row[2] for row in rows])),
            }
        )
    words.sort(key=lambda row: (-row["mean_delta"], row["word"]))
    return {
        "definition": "delta = phi(second) - phi(first) on the common target class; by linearity the explanation "
        "of the difference of the two models' probabilities",
        "per_example": per_example,
        "max_additivity_error": max((row["additivity_error"] for row in per_example), default=0.0),
        "words": words,
        "raised": [row for row in words if row["mean_delta"] > 0][:top_k],
        "lowered": [row for row in reversed(words) if row["mean_delta"] < 0][:top_k],
        "min_tweets": min_tweets,
        "n_word_types": len(by_type),
        "n_examples": len(deltas),
    }


def stratum(correct_first: bool, correct_second: bool) -> str:
    """Which of `STRATA` a tweet falls in, from whether each model predicts its gold label."""
    if correct_first and correct_second:
        return "both_correct"
    if correct_second:
        return "fixed"
    if correct_first:
        return "broken"
    return "both_wrong"


def strata_members(correct_first: Sequence[bool], correct_second: Sequence[bool]) -> dict[str, list[int]]:
    """The positions of the tweets in each stratum, every stratum present (empty when no tweet falls in it)."""
    members: dict[str, list[int]] = {name: [] for name in STRATA}
    for k, (a, b) in enumerate(zip(correct_first, correct_second)):
        members[stratum(bool(a), bool(b))].append(k)
    return members
