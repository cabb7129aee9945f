"""The seed-noise null: do zero-shot and fine-tuned explanations disagree more than two fine-tuned seeds do?

Attributions of two models that differ only in their training seed already disagree (Zafar et al., 2021), so a
zero-shot-vs-fine-tuned difference is attributable to fine-tuning only where it exceeds the seed-to-seed one. Per
tweet and agreement statistic: `across` = the mean over seeds of stat(zero-shot, fine-tuned seed k), `null` = the
mean over seed pairs of stat(fine-tuned seed k, fine-tuned seed l); then a paired test over tweets of null - across.
Pure: per-tweet attribution vectors in, plain dicts out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import combinations

import numpy as np

from analysis.statistics.explanations import paired_example_statistics, paired_test

# Agreement statistics (higher = more alike); mean_abs_delta is a difference, not an agreement.
AGREEMENT_STATISTICS = (
    "cosine_similarity",
    "spearman",
    "pearson",
    "top5_overlap",
    "top10_overlap",
    "top_token_jaccard",
)
LABELS = {
    "cosine_similarity": "cosine",
    "spearman": "Spearman",
    "pearson": "Pearson",
    "top5_overlap": "top-5 overlap",
    "top10_overlap": "top-10 overlap",
    "top_token_jaccard": "top-token Jaccard",
}
ALPHA = 0.05


def _mean_defined(values: Sequence[float]) -> float:
    defined = [v for v in values if not math.isnan(v)]
    return float(np.mean(defined)) if defined else math.nan


def seed_null(
    zero_shot: Sequence[np.ndarray],
    fine_tuned_by_seed: Sequence[Sequence[np.ndarray]],
    n_resamples: int = 1000,
    seed: int = 0,
) -> dict:
    """Per statistic: mean agreement zero-shot vs fine-tuned (`across`) and fine-tuned vs fine-tuned (`null`), the
    paired test of null - across over tweets, and a one-line verdict. Needs two or more seeds."""
    seeds = len(fine_tuned_by_seed)
    if seeds < 2:
        raise ValueError("the seed null needs fine-tuned explanations from at least two seeds")
    n = len(zero_shot)
    if any(len(values) != n for values in fine_tuned_by_seed):
        raise ValueError("every seed must explain the same tweets as the zero-shot model")
    across_rows = [
        [paired_example_statistics(zero_shot[i], fine_tuned_by_seed[k][i]) for k in range(seeds)] for i in range(n)
    ]
    null_rows = [
        [
            paired_example_statistics(fine_tuned_by_seed[k][i], fine_tuned_by_seed[m][i])
            for k, m in combinations(range(seeds), 2)
        ]
        for i in range(n)
    ]
    result: dict = {
        "definition": "per tweet, across = mean over seeds of agreement(zero-shot, fine-tuned seed k); null = mean "
        "over seed pairs of agreement(fine-tuned seed k, fine-tuned seed l); the paired test is over tweets of "
        "null - across (> 0: fine-tuning changed the explanations more than the seed alone does)",
        "seeds": seeds,
        "n_examples": n,
        "statistics": {},
    }
    for name in AGREEMENT_STATISTICS:
        across = np.array([_mean_defined([row[name] for row in rows]) for rows in across_rows])
        null = np.array([_mean_defined([row[name] for row in rows]) for rows in null_rows])
        defined = ~(np.isnan(across) | np.isnan(null))
        if defined.sum() == 0:
            result["statistics"][name] = {"n": 0, "verdict": f"{LABELS[name]}: undefined on these tweets"}
            continue
        test = paired_test(across[defined], null[defined], n_resamples=n_resamples, seed=seed, names=("across", "null"))
        result["statistics"][name] = {**test, "verdict": verdict(LABELS[name], test)}
    return result


def verdict(label: str, test: dict) -> str:
    """One sentence: whether zero-shot vs fine-tuned disagree more than two fine-tuned seeds do, with the numbers."""
    p = test.get("wilcoxon_p")
    numbers = f"{label} {test['across_mean']:.2f} vs {test['null_mean']:.2f}"
    p_text = f"p = {p:.2g}" if p is not None else test.get("wilcoxon_note") or "no test"
    excludes_zero = test["ci_low"] > 0 or test["ci_high"] < 0
    if p is not None and p < ALPHA and excludes_zero and test["mean_difference"] > 0:
        return f"zero-shot vs fine-tuned disagree more than two fine-tuned seeds do: {numbers}, {p_text}"
    if p is not None and p < ALPHA and excludes_zero:
        return f"zero-shot vs fine-tuned agree more than two fine-tuned seeds do: {numbers}, {p_text}"
    return (
        f"no detectable difference from the seed-to-seed disagreement: {numbers}, {p_text} "
        f"(mean difference {test['mean_difference']:+.2f} [{test['ci_low']:+.2f}, {test['ci_high']:+.2f}])"
    )
