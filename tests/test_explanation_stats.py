"""Explanation statistics checked against values worked out by hand."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from analysis.statistics.explanations import (
    aopc,
    compare_models,
    entropy,
    example_statistics,
    gini,
    model_statistics,
    paired_example_statistics,
    paired_test,
    random_order,
    summarize_faithfulness,
)


def _walk_floats(obj):
    if isinstance(obj, dict):
        for value in obj.values():
            yield from _walk_floats(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from _walk_floats(value)
    elif isinstance(obj, float):
        yield obj


# --- sparsity -------------------------------------------------------------------------------------


def test_gini_uniform_is_zero():
    assert gini(np.full(7, 0.3)) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("n", [1, 2, 5, 10])
def test_gini_one_hot_is_n_minus_one_over_n(n):
    vector = np.zeros(n)
    vector[n // 2] = -2.5  # sign must not matter: gini is of |v|
    assert gini(vector) == pytest.approx((n - 1) / n)


def test_gini_hand_worked_vector():
    # [1, 2, 3]: ordered pairs |xi - xj| sum to 2 * (1 + 2 + 1) = 8; mean = 2, n = 3
    # -> 8 / (2 * 9 * 2) = 2/9.  Signs are dropped first, so [-1, 2, -3] is the same.
    assert gini(np.array([-1.0, 2.0, -3.0])) == pytest.approx(2 / 9)


def test_gini_all_zero_is_zero_not_nan():
    assert gini(np.zeros(4)) == 0.0


def test_entropy_uniform_is_log_n():
    assert entropy(np.array([1.0, -1.0, 1.0, -1.0])) == pytest.approx(math.log(4))


def test_entropy_one_hot_is_zero_and_all_zero_is_zero():
    assert entropy(np.array([0.0, 3.0, 0.0])) == pytest.approx(0.0, abs=1e-12)
    assert entropy(np.zeros(3)) == 0.0


def test_entropy_hand_worked_vector():
    # |v| = [1, 1, 2] -> p = [1/4, 1/4, 1/2]; H = 2 * (1/4) ln 4 + (1/2) ln 2 = 1.5 ln 2
    assert entropy(np.array([1.0, -1.0, 2.0])) == pytest.approx(1.5 * math.log(2))


def test_example_statistics_hand_values():
    row = example_statistics(np.array([-1.0, 2.0, -3.0, 2.0]))
    # |v| = [1, 2, 3, 2]; signed mean = 0, signed var = (1 + 4 + 9 + 4) / 4 = 4.5
    assert row["mean_abs"] == pytest.approx(2.0)
    assert row["std"] == pytest.approx(math.sqrt(4.5))
    assert row["median_abs"] == pytest.approx(2.0)
    assert row["max_abs"] == pytest.approx(3.0)
    assert row["n_tokens"] == 4


def test_empty_or_nan_vector_raises():
    with pytest.raises(ValueError):
        example_statistics(np.array([]))
    with pytest.raises(ValueError):
        gini(np.array([1.0, np.nan]))


# --- one model ------------------------------------------------------------------------------------


def test_model_statistics_pooled_values_and_top_tokens():
    values = [np.array([1.0, -3.0]), np.array([2.0, 0.0, -2.0])]
    tokens = [[" Good", "bad "], ["good", "  ", "BAD"]]
    result = model_statistics(values, tokens, top_k=20)
    # pooled |v| = [1, 3, 2, 0, 2]: mean 8/5, median 2
    assert result["mean_abs_importance"] == pytest.approx(1.6)
    assert result["median_abs_importance"] == pytest.approx(2.0)
    assert result["std_abs_importance"] == pytest.approx(np.std([1, 3, 2, 0, 2]))
    # per-example signed std: [1, -3] -> 2; [2, 0, -2] -> sqrt(8/3)
    assert result["mean_token_importance_std"] == pytest.approx((2 + math.sqrt(8 / 3)) / 2)
    # "bad": 3 + 2 = 5 over 2; "good": 1 + 2 = 3 over 2; the whitespace-only token is skipped
    assert result["top_tokens"] == [
        {"token": "bad", "total_abs": 5.0, "mean_abs": 2.5, "count": 2},
        {"token": "good", "total_abs": 3.0, "mean_abs": 1.5, "count": 2},
    ]
    assert result["n_examples"] == 2
    assert len(result["per_example"]) == 2


def test_model_statistics_top_k_truncates():
    result = model_statistics([np.array([3.0, 2.0, 1.0])], [["a", "b", "c"]], top_k=2)
    assert [row["token"] for row in result["top_tokens"]] == ["a", "b"]


def test_all_zero_vectors_give_no_nan_in_model_means():
    values = [np.zeros(3), np.zeros(1), np.array([0.0, 1.0])]
    tokens = [["a", "b", "c"], ["d"], ["e", "f"]]
    result = model_statistics(values, tokens)
    assert not any(math.isnan(x) for x in _walk_floats(result))
    # gini: 0, 0, 1/2 ; entropy: 0, 0, 0
    assert result["mean_gini"] == pytest.approx(1 / 6)
    assert result["mean_entropy"] == pytest.approx(0.0)


def test_mismatched_tokens_raise():
    with pytest.raises(ValueError, match="example 0"):
        model_statistics([np.array([1.0, 2.0])], [["a"]])


# --- paired, one example --------------------------------------------------------------------------


def test_identical_and_negated_vectors():
    v = np.array([0.5, -1.0, 2.0, 0.1])
    same = paired_example_statistics(v, v)
    assert same["cosine_similarity"] == pytest.approx(1.0)
    assert same["pearson"] == pytest.approx(1.0)
    assert same["spearman"] == pytest.approx(1.0)
    assert same["top5_overlap"] == 1.0
    assert same["top_token_jaccard"] == 1.0
    assert same["mean_abs_delta"] == 0.0
    negated = paired_example_statistics(v, -v)
    assert negated["cosine_similarity"] == pytest.approx(-1.0)
    assert negated["pearson"] == pytest.approx(-1.0)
    # top-k uses |v|, so the same tokens are the most important for both
    assert negated["top5_overlap"] == 1.0


def test_overlap_and_jaccard_hand_case():
    zs = np.array([5.0, 4.0, 3.0, 2.0, 1.0, 0.5])  # top-5 positions {0, 1, 2, 3, 4}
    ft = np.array([0.5, 4.0, 3.0, 2.0, 1.0, 5.0])  # top-5 positions {1, 2, 3, 4, 5}
    row = paired_example_statistics(zs, ft)
    assert row["top5_overlap"] == pytest.approx(4 / 5)
    assert row["top_token_jaccard"] == pytest.approx(4 / 6)
    assert row["top10_overlap"] == 1.0  # k_eff = min(10, 6) = 6: every position


def test_zero_norm_and_short_examples_are_undefined():
    row = paired_example_statistics(np.zeros(4), np.array([1.0, 2.0, 3.0, 4.0]))
    assert math.isnan(row["cosine_similarity"])
    assert math.isnan(row["pearson"])
    short = paired_example_statistics(np.array([1.0, 2.0]), np.array([2.0, 1.0]))
    assert math.isnan(short["pearson"]) and math.isnan(short["spearman"])
    assert short["cosine_similarity"] == pytest.approx(0.8)  # (2 + 2) / 5


# --- paired tests across examples -----------------------------------------------------------------


def _exact_signed_rank_p(differences):
    """Two-sided exact Wilcoxon p by enumerating all 2^n sign assignments (no ties, no zeros)."""
    ranks = np.argsort(np.argsort(np.abs(differences))) + 1
    observed = sum(r for r, d in zip(ranks, differences) if d > 0)
    n = len(differences)
    total = n * (n + 1) / 2
    extreme = min(observed, total - observed)
    sums = [sum(subset) for k in range(n + 1) for subset in itertools.combinations(range(1, n + 1), k)]
    return min(1.0, 2 * sum(s <= extreme for s in sums) / len(sums))


def test_wilcoxon_matches_exact_enumeration():
    differences = [1.0, 2.0, 3.0, 4.0, -5.0]
    # W+ = 10, W- = 5; subsets of {1..5} summing to <= 5: {}, 1, 2, 3, 4, 5, 12, 13, 14, 23 -> 10 of 32
    assert _exact_signed_rank_p(differences) == pytest.approx(0.625)
    result = paired_test(np.zeros(5), differences)
    assert result["wilcoxon_p"] == pytest.approx(0.625)
    all_positive = paired_test(np.zeros(5), [1.0, 2.0, 3.0, 4.0, 5.0])
    assert all_positive["wilcoxon_p"] == pytest.approx(_exact_signed_rank_p([1, 2, 3, 4, 5]))
    assert all_positive["wilcoxon_p"] == pytest.approx(2 / 32)


def test_paired_cohens_d_and_means_by_hand():
    # differences [1, 2, 3]: mean 2, sd (ddof=1) 1 -> d = 2
    result = paired_test([10.0, 10.0, 10.0], [11.0, 12.0, 13.0], n_resamples=200)
    assert result["cohens_d"] == pytest.approx(2.0)
    assert result["mean_difference"] == pytest.approx(2.0)
    assert result["zero_shot_mean"] == 10.0 and result["fine_tuned_mean"] == 12.0
    assert 1.0 <= result["ci_low"] <= 2.0 <= result["ci_high"] <= 3.0
    assert result["n"] == 3


def test_paired_test_undefined_cases():
    zero = paired_test([1.0, 2.0], [1.0, 2.0])
    assert zero["wilcoxon_p"] is None and "zero" in zero["wilcoxon_note"]
    assert zero["cohens_d"] is None
    single = paired_test([1.0], [2.0])
    assert single["wilcoxon_p"] is None and single["wilcoxon_note"]
    assert single["cohens_d"] is None


def test_compare_models_wires_paired_tests_on_mean_abs():
    # constant vectors: per-example mean |v| differs by exactly [1, 2, 3, 4, -5]; gini/entropy identical
    deltas = [1.0, 2.0, 3.0, 4.0, -5.0]
    zs = [np.full(3, 10.0) for _ in deltas]
    ft = [np.full(3, 10.0 + d) for d in deltas]
    tokens = [["a", "b", "c"]] * len(deltas)
    result = compare_models(zs, ft, tokens, n_resamples=200)
    assert result["paired_tests"]["mean_abs"]["wilcoxon_p"] == pytest.approx(0.625)
    assert result["paired_tests"]["mean_abs"]["mean_difference"] == pytest.approx(1.0)
    assert result["paired_tests"]["gini"]["wilcoxon_p"] is None
    assert result["per_example_mean_abs_delta"] == pytest.approx(deltas)
    assert result["mean_abs_delta"]["mean"] == pytest.approx(1.0)
    # constant vectors: correlations undefined everywhere, reported as n = 0 rather than NaN
    assert result["pearson"] == {"mean": None, "ci_low": None, "ci_high": None, "n": 0}
    assert result["cosine_similarity"]["mean"] == pytest.approx(1.0)


def test_compare_models_counts_only_defined_examples():
    zs = [np.array([1.0, 2.0, 3.0]), np.zeros(3), np.array([1.0, 2.0])]
    ft = [np.array([2.0, 4.0, 6.0]), np.array([1.0, 0.0, 2.0]), np.array([2.0, 1.0])]
    tokens = [["a", "b", "c"], ["d", "e", "f"], ["g", "h"]]
    result = compare_models(zs, ft, tokens, n_resamples=100)
    assert result["cosine_similarity"]["n"] == 2  # the all-zero example has no direction
    assert result["pearson"]["n"] == 1  # zero vector is constant, 2 tokens are too few
    assert result["pearson"]["mean"] == pytest.approx(1.0)
    assert result["n_examples"] == 3
    assert result["top5_overlap"]["n"] == 3


def test_compare_models_pooled_statistics_by_hand():
    zs = [np.array([1.0, -3.0])]
    ft = [np.array([2.0, 4.0])]
    result = compare_models(zs, ft, [["x", "y"]], n_resamples=50)
    # |FT| = [2, 4], |ZS| = [1, 3]: difference of means 1; both variances (ddof=1) 2 -> d = 1 / sqrt(2)
    assert result["mean_abs_importance_difference"] == pytest.approx(1.0)
    assert result["cohens_d_abs_importance"] == pytest.approx(1 / math.sqrt(2))
    assert result["pooled_pearson"] is None  # two pooled tokens are too few for a correlation
    assert result["per_model"]["zero_shot"]["mean_gini"] == pytest.approx(gini(zs[0]))
    assert result["per_model"]["fine_tuned"]["mean_entropy"] == pytest.approx(entropy(ft[0]))


def test_pooled_correlations_span_examples():
    zs = [np.array([1.0, 2.0]), np.array([3.0])]
    ft = [np.array([-1.0, -2.0]), np.array([-3.0])]
    result = compare_models(zs, ft, [["a", "b"], ["c"]], n_resamples=50)
    assert result["pooled_pearson"] == pytest.approx(-1.0)
    assert result["pooled_spearman"] == pytest.approx(-1.0)
    assert result["pearson"]["n"] == 0  # no single example has three tokens


def test_overall_top_token_jaccard():
    zs = [np.array([3.0, 2.0, 1.0, 0.0])]
    ft = [np.array([0.0, 2.0, 1.0, 3.0])]
    tokens = [["a", "b", "c", "d"]]
    # top-2: ZS {a, b}, FT {d, b} -> 1 / 3
    result = compare_models(zs, ft, tokens, n_resamples=50, top_k=2)
    assert result["overall_top_token_jaccard"] == pytest.approx(1 / 3)


def test_compare_models_all_zero_has_no_nan():
    zs = [np.zeros(3), np.zeros(2)]
    ft = [np.zeros(3), np.zeros(2)]
    result = compare_models(zs, ft, [["a", "b", "c"], ["d", "e"]], n_resamples=50)
    assert not any(math.isnan(x) for x in _walk_floats(result))
    assert result["cosine_similarity"]["n"] == 0


# --- faithfulness ---------------------------------------------------------------------------------

ATTRIBUTIONS = np.array([4.0, 3.0, 2.0, 1.0])


def _sum_of_kept(masks):
    """Toy linear model: its score is the sum of the attributions it can still see."""
    return (masks * ATTRIBUTIONS).sum(axis=1)


def test_aopc_comprehensiveness_by_hand():
    # remove top 1, 2, 3 tokens -> drops 4, 7, 9 from the full score 10; mean 20/3
    result = aopc(_sum_of_kept, ATTRIBUTIONS, 10.0, fractions=(0.25, 0.5, 0.75))
    assert result["k"] == [1, 2, 3]
    assert result["curve"] == pytest.approx([4.0, 7.0, 9.0])
    assert result["aopc"] == pytest.approx(20 / 3)


def test_aopc_sufficiency_by_hand():
    # keep only top 1, 2, 3 -> scores 4, 7, 9; curve 10 - score = 6, 3, 1; mean 10/3
    result = aopc(_sum_of_kept, ATTRIBUTIONS, 10.0, fractions=(0.25, 0.5, 0.75), mode="sufficiency")
    assert result["curve"] == pytest.approx([6.0, 3.0, 1.0])
    assert result["aopc"] == pytest.approx(10 / 3)


def test_aopc_ranks_by_signed_attribution():
    attributions = np.array([-5.0, 1.0, 2.0])
    seen = []

    def score(masks):
        seen.append(masks.copy())
        return (masks * attributions).sum(axis=1)

    result = aopc(score, attributions, float(attributions.sum()), fractions=(0.3,))
    # ceil(0.3 * 3) = 1 token: the most positive (index 2), not the largest magnitude (index 0)
    assert seen[0].tolist() == [[True, True, False]]
    assert result["curve"] == pytest.approx([2.0])


def test_aopc_calls_score_fn_once_with_all_masks():
    calls = []

    def score(masks):
        calls.append(masks.shape)
        return np.zeros(len(masks))

    aopc(score, np.arange(10.0), 1.0)
    assert calls == [(5, 10)]


def test_aopc_k_for_default_and_noisy_fractions():
    assert aopc(lambda m: np.zeros(len(m)), np.arange(10.0), 0.0)["k"] == [1, 2, 3, 4, 5]
    # 0.14 * 50 == 7.000000000000001 in floating point; k must still be 7, not 8
    assert aopc(lambda m: np.zeros(len(m)), np.arange(50.0), 0.0, fractions=(0.14,))["k"] == [7]
    # a tiny fraction still removes one token
    assert aopc(lambda m: np.zeros(len(m)), np.arange(50.0), 0.0, fractions=(0.001,))["k"] == [1]


def test_random_order_baseline_is_lower_than_true_ranking():
    attributions = np.linspace(1.0, 0.1, 10)
    full = float(attributions.sum())

    def score(masks):
        return (masks * attributions).sum(axis=1)

    true = aopc(score, attributions, full)["aopc"]
    rng = np.random.default_rng(0)
    random = [aopc(score, attributions, full, order=random_order(10, rng))["aopc"] for _ in range(20)]
    assert np.mean(random) < true
    assert all(r <= true + 1e-12 for r in random)  # a linear model: the true ranking is optimal


def test_aopc_rejects_bad_mode_and_order():
    with pytest.raises(ValueError):
        aopc(_sum_of_kept, ATTRIBUTIONS, 10.0, mode="deletion")
    with pytest.raises(ValueError):
        aopc(_sum_of_kept, ATTRIBUTIONS, 10.0, order=np.array([0, 0, 1, 2]))


def test_summarize_faithfulness_means():
    rows = [
        {"fractions": [0.1, 0.2], "curve": [1.0, 3.0], "aopc": 2.0},
        {"fractions": [0.1, 0.2], "curve": [3.0, 5.0], "aopc": 4.0},
    ]
    summary = summarize_faithfulness(rows, n_resamples=100)
    assert summary["mean_aopc"] == pytest.approx(3.0)
    assert summary["mean_curve"] == pytest.approx([2.0, 4.0])
    assert 2.0 <= summary["ci_low"] <= 3.0 <= summary["ci_high"] <= 4.0
    assert summary["n"] == 2
    with pytest.raises(ValueError):
        summarize_faithfulness([rows[0], {**rows[1], "fractions": [0.5, 0.6]}])


# ---- the fine-tuning effect and strata ------------------------------------------------------------------------------
def test_word_types_fold_case_and_surrounding_punctuation():
    from analysis.statistics.fine_tuning_effect import word_type

    assert [word_type(w) for w in ["Great!!", "great", "(great)", "@United", "#Fail.", "can't", "😡😡", "!!!"]] == [
        "great",
        "great",
        "great",
        "@united",
        "#fail",
        "can't",
        "😡😡",
        "!!!",
    ]


def test_fine_tuning_effect_by_hand():
    from analysis.statistics.fine_tuning_effect import fine_tuning_effect

    features = [["Great", "bus"], ["great!", "day"], ["GREAT", "bus", "great"]]
    first = [np.array([0.1, 0.0]), np.array([0.2, 0.1]), np.array([0.0, 0.3, 0.1])]
    second = [np.array([0.4, -0.1]), np.array([0.5, 0.1]), np.array([0.2, 0.1, 0.3])]
    base_a, base_b = [0.3, 0.3, 0.3], [0.2, 0.2, 0.2]
    full_a = [b + v.sum() for b, v in zip(base_a, first)]  # additive explanations
    full_b = [b + v.sum() for b, v in zip(base_b, second)]
    effect = fine_tuning_effect(first, second, base_a, base_b, full_a, full_b, features, min_tweets=2, n_resamples=50)
    # tweet 1: dphi = [0.3, -0.1]; df(x) - df(empty) = (0.5 - 0.4) - (0.2 - 0.3) = 0.2 = sum(dphi)
    np.testing.assert_allclose(effect["per_example"][0]["delta"], [0.3, -0.1])
    assert effect["per_example"][0]["delta_f"] == pytest.approx(0.2)
    assert effect["max_additivity_error"] < 1e-12
    words = {row["word"]: row for row in effect["words"]}
    # "great" in all three tweets: 0.3, 0.3 and (0.2 + 0.2) summed within the third tweet -> mean 1.0 / 3
    assert words["great"]["n_tweets"] == 3 and words["great"]["mean_delta"] == pytest.approx(1.0 / 3)
    assert words["great"]["mean_first"] == pytest.approx((0.1 + 0.2 + 0.1) / 3)
    # "bus" in two tweets: -0.1 and -0.2; "day" in one tweet only: below min_tweets
    assert words["bus"]["mean_delta"] == pytest.approx(-0.15) and "day" not in words
    assert [row["word"] for row in effect["raised"]] == ["great"]
    assert [row["word"] for row in effect["lowered"]] == ["bus"]
    assert words["great"]["ci_low"] <= words["great"]["mean_delta"] <= words["great"]["ci_high"]


def test_strata_by_correctness():
    from analysis.statistics.fine_tuning_effect import strata_members

    first = [True, True, False, False, True]
    second = [True, False, True, False, True]
    assert strata_members(first, second) == {"both_correct": [0, 4], "fixed": [2], "broken": [1], "both_wrong": [3]}
    assert strata_members([], []) == {"both_correct": [], "fixed": [], "broken": [], "both_wrong": []}


def test_shapley_values_of_a_two_player_game_by_hand():
    from analysis.statistics.shapley import all_coalitions, distance, shapley_values

    assert all_coalitions(2).tolist() == [[False, False], [True, False], [False, True], [True, True]]
    # v(empty) = 0, v({0}) = 1, v({1}) = 2, v({0, 1}) = 4:
    # phi_0 = (v({0}) - v()) / 2 + (v({0,1}) - v({1})) / 2 = 1.5; phi_1 = (2 - 0) / 2 + (4 - 1) / 2 = 2.5
    np.testing.assert_allclose(shapley_values([0.0, 1.0, 2.0, 4.0]), [1.5, 2.5])
    # several outputs at once: a second, additive game (v = 3 x0 + 5 x1) gives its coefficients back
    both = shapley_values(np.array([[0.0, 0.0], [1.0, 3.0], [2.0, 5.0], [4.0, 8.0]]))
    np.testing.assert_allclose(both, [[1.5, 3.0], [2.5, 5.0]])
    assert distance([1.5, 2.0], [1.5, 2.5]) == pytest.approx(
        {"relative_l2": 0.5 / np.hypot(1.5, 2.5), "max_abs_difference": 0.5}
    )
    with pytest.raises(ValueError):
        all_coalitions(11)


def test_seed_null_by_hand():
    from analysis.statistics.seed_null import seed_null

    zero_shot = [np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0]), np.array([1.0, 1.0, 0.0])]
    seed_a = [np.array([0.0, 1.0, 0.0]), np.array([1.0, 0.0, 0.0]), np.array([0.0, 0.0, 1.0])]
    seed_b = [np.array([0.0, 2.0, 0.0]), np.array([3.0, 0.0, 0.0]), np.array([0.0, 0.0, 2.0])]
    result = seed_null(zero_shot, [seed_a, seed_b], n_resamples=50)
    cosine = result["statistics"]["cosine_similarity"]
    # zero-shot is orthogonal to both seeds on every tweet (across = 0); the seeds point the same way (null = 1)
    assert cosine["across_mean"] == pytest.approx(0.0) and cosine["null_mean"] == pytest.approx(1.0)
    assert cosine["mean_difference"] == pytest.approx(1.0) and cosine["n"] == 3
    assert cosine["verdict"].startswith("no detectable difference")  # 3 tweets: Wilcoxon cannot reach p < 0.05
    assert result["seeds"] == 2 and set(result["statistics"]) >= {"spearman", "top5_overlap"}
    with pytest.raises(ValueError):
        seed_null(zero_shot, [seed_a])


def test_seed_null_verdicts_follow_the_test():
    from analysis.statistics.seed_null import verdict

    test = {"across_mean": 0.12, "null_mean": 0.71, "mean_difference": 0.59, "ci_low": 0.4, "ci_high": 0.8}
    assert verdict("Spearman", {**test, "wilcoxon_p": 0.001}) == (
        "zero-shot vs fine-tuned disagree more than two fine-tuned seeds do: Spearman 0.12 vs 0.71, p = 0.001"
    )
    assert verdict("Spearman", {**test, "wilcoxon_p": 0.3}).startswith("no detectable difference")
    flipped = {**test, "across_mean": 0.71, "null_mean": 0.12, "mean_difference": -0.59, "ci_low": -0.8}
    flipped["ci_high"] = -0.4
    assert verdict("Spearman", {**flipped, "wilcoxon_p": 0.001}).startswith("zero-shot vs fine-tuned agree more")


# ---- XAI properties, each against a hand computation ------------------------------------------------------------
def test_xai_properties_by_hand():
    from analysis.statistics import xai_properties as props

    assert props.selectivity(np.array([0.0, 0.0, 3.0])) == pytest.approx(2 / 3)  # all on one of 3 features
    assert props.compactness(np.array([4.0, -3.0, 2.0, 1.0])) == 0.75  # 4 + 3 + 2 = 9 >= 0.8 x 10
    assert props.compactness(np.ones(4)) == 1.0  # 3 of 4 hold 75 % < 80 %
    assert props.compactness(np.zeros(3)) is None
    assert props.contrastivity(np.array([1.0, 0.0]), np.array([0.0, 1.0])) == pytest.approx(0.5)
    assert props.contrastivity(np.array([1.0, 2.0]), np.array([1.0, 2.0])) == pytest.approx(0.0)
    assert props.contrastivity(np.array([1.0, 2.0]), np.array([-1.0, -2.0])) == pytest.approx(1.0)
    assert props.target_sensitivity(np.array([[1.0, 0.0], [0.0, 1.0]])) == pytest.approx(1.0)
    # classes a = b = (1, 1), c = (2, 0): JS(a, c) = 1/2 KL(p||m) + 1/2 KL(q||m), m = (3/4, 1/4), in bits
    js = 0.5 * (0.5 * np.log2(0.5 / 0.75) + 0.5 * np.log2(0.5 / 0.25)) + 0.5 * np.log2(1 / 0.75)
    values = np.array([[1.0, 1.0, 2.0], [1.0, 1.0, 0.0]])
    assert props.target_sensitivity(values) == pytest.approx((0 + 2 * js) / 3)
    assert props.monotonicity([0.1, 0.05, 0.2], [1, 2, 3]) == pytest.approx(2 / 3)  # one of three steps reverses
    assert props.monotonicity([0.1, 0.1, 0.3], [1, 1, 2]) == 1.0  # a repeated k is no step
    assert props.rank_agreement(np.array([0.3, 0.1, 0.2]), np.array([0.3, 0.1, 0.2])) == 1.0
    assert props.rank_agreement(np.array([1.0, 2.0, 3.0]), np.array([3.0, 2.0, 1.0])) == pytest.approx(-1.0)
    assert props.rank_agreement(np.array([1.0, 2.0]), np.array([2.0, 1.0])) is None  # two points: undefined
    summary = props.summarize([0.2, None, 0.4], n_resamples=50, seed=0)
    assert summary["mean"] == pytest.approx(0.3) and summary["n"] == 2 and summary["n_undefined"] == 1


def test_explainer_agreement_by_hand():
    from analysis.statistics.xai_properties import explainer_agreement

    a = [np.array([0.5, 0.1, -0.2, 0.0]), np.array([1.0, 2.0, 3.0])]
    reversed_ = [np.array([0.0, -0.2, 0.1, 0.5]), np.array([3.0, 2.0, 1.0])]
    result = explainer_agreement({"x": a, "y": a, "z": reversed_}, n_resamples=50)
    assert set(result) == {"x_vs_y", "x_vs_z", "y_vs_z"}
    assert result["x_vs_y"]["spearman"]["mean"] == pytest.approx(1.0)
    assert result["x_vs_y"]["top5_overlap"]["mean"] == pytest.approx(1.0)
    # tweet 1: ranks (4, 3, 1, 2) vs (2, 1, 3, 4): rho = 1 - 6 x 16 / 60 = -0.6; tweet 2: -1
    assert result["x_vs_z"]["spearman"]["mean"] == pytest.approx((-0.6 - 1.0) / 2)


@pytest.mark.parametrize(
    ("difference", "ci", "p", "direction"),
    [
        (0.02, (0.005, 0.035), 0.002, "larger"),
        (-0.02, (-0.035, -0.005), 0.01, "smaller"),
        (0.015, (0.00105, 0.0287), 0.084, "the two tests disagree"),  # the README's integrated-gradients case
        (0.015, (-0.001, 0.03), 0.03, "the two tests disagree"),
        (0.001, (-0.01, 0.012), 0.6, "no detectable change"),
        (0.001, (0.0005, 0.002), None, "no detectable change"),  # too few tweets for the test: no verdict
    ],
)
def test_a_change_has_a_direction_only_where_both_tests_agree(difference, ci, p, direction):
    from analysis.explanation.properties import change_direction

    test = {"mean_difference": difference, "ci_low": ci[0], "ci_high": ci[1], "wilcoxon_p": p}
    assert change_direction(test) == direction
