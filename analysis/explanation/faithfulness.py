"""Faithfulness of SHAP explanations: AOPC when the top tokens are removed or kept, against random rankings.

The scoring glue only: tokens are removed exactly as the explainer masks them (`mask_tweet`), scored by the same
value function, and the curves and their summaries come from `analysis.statistics.explanations`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from analysis.explanation.shap_values import TweetMasker, mask_tweet
from analysis.statistics.explanations import FAITHFULNESS_MODES, aopc, paired_test, random_order, summarize_faithfulness

FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5)
RANDOM_ORDERS = 3  # random rankings averaged per example: one alone makes a noisy baseline


def example_faithfulness(
    text: str,
    attributions: np.ndarray,
    target: int,
    full_score: float,
    value_function: Callable[[Sequence[str]], np.ndarray],
    masker: TweetMasker,
    rng: np.random.Generator,
    fractions: Sequence[float] = FRACTIONS,
    random_orders: int = RANDOM_ORDERS,
) -> dict:
    """Comprehensiveness and sufficiency AOPC of one example's target-class attributions, and of random rankings.

    Returns `{mode: aopc-result, f"{mode}_random": aopc-result averaged over the random rankings}`.
    """

    def score(keep_masks: np.ndarray) -> np.ndarray:
        return value_function([mask_tweet(masker, text, keep) for keep in keep_masks])[:, target]

    attributions = np.asarray(attributions, dtype=float)
    result = {}
    for mode in FAITHFULNESS_MODES:
        result[mode] = aopc(score, attributions, full_score, fractions, mode)
        randoms = [
            aopc(score, attributions, full_score, fractions, mode, order=random_order(attributions.size, rng))
            for _ in range(random_orders)
        ]
        result[f"{mode}_random"] = {
            "fractions": randoms[0]["fractions"],
            "k": randoms[0]["k"],
            "curve": np.mean([r["curve"] for r in randoms], axis=0).tolist(),
            "aopc": float(np.mean([r["aopc"] for r in randoms])),
            "n_orders": random_orders,
        }
    return result


def _attribution_vs_random(attribution: list[float], random: list[float], n_resamples: int, seed: int) -> dict:
    test = paired_test(random, attribution, n_resamples=n_resamples, seed=seed)
    renamed = {"zero_shot_mean": "random_mean", "fine_tuned_mean": "attribution_mean"}
    return {renamed.get(key, key): value for key, value in test.items()}


def summarize_model_faithfulness(per_example: list[dict], n_resamples: int = 1000, seed: int = 0) -> dict:
    """Mean AOPC with CIs for the attributions and the random baseline, and a paired test of the two."""
    summary = {}
    for mode in FAITHFULNESS_MODES:
        attribution = [row[mode] for row in per_example]
        random = [row[f"{mode}_random"] for row in per_example]
        summary[mode] = summarize_faithfulness(attribution, n_resamples, seed)
        summary[f"{mode}_random"] = summarize_faithfulness(random, n_resamples, seed)
        # mean_difference = attribution - random: > 0 beats random for comprehensiveness, < 0 for sufficiency.
        summary[f"{mode}_attribution_vs_random"] = _attribution_vs_random(
            [row["aopc"] for row in attribution], [row["aopc"] for row in random], n_resamples, seed
        )
    return summary


def compare_model_faithfulness(
    zero_shot: list[dict],
    fine_tuned: list[dict],
    n_resamples: int = 1000,
    seed: int = 0,
    names: tuple[str, str] = ("zero_shot", "fine_tuned"),
) -> dict:
    """Paired AOPC per mode, second minus first: bootstrap CI of the mean difference, Wilcoxon, Cohen's d."""
    return {
        mode: paired_test(
            [row[mode]["aopc"] for row in zero_shot],
            [row[mode]["aopc"] for row in fine_tuned],
            n_resamples=n_resamples,
            seed=seed,
            names=names,
        )
        for mode in FAITHFULNESS_MODES
    }
