"""Statistics of SHAP explanations: sparsity, model-vs-model agreement, and faithfulness (AOPC).

Every function is pure: arrays of target-class SHAP values in, plain JSON-ready dicts out. Undefined
quantities are reported as ``None`` (never NaN) together with how many examples were used, so that a
report can say honestly what was measured.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
from scipy import stats

from analysis.statistics.resampling import bootstrap_ci

PAIRED_EXAMPLE_STATISTICS = (
    "cosine_similarity",
    "top5_overlap",
    "top10_overlap",
    "top_token_jaccard",
    "pearson",
    "spearman",
    "mean_abs_delta",
)
PAIRED_TEST_STATISTICS = ("mean_abs", "gini", "entropy")
FAITHFULNESS_MODES = ("comprehensiveness", "sufficiency")
# Fewer points make a per-example correlation degenerate (two points always give r = +-1).
MIN_TOKENS_FOR_CORRELATION = 3


def _as_vector(values: np.ndarray) -> np.ndarray:
    """1-D finite float copy of ``values``; empty or non-finite input is a bug upstream, so it raises."""
    vector = np.asarray(values, dtype=float)
    if vector.ndim != 1:
        raise ValueError(f"expected a 1-D vector of SHAP values, got shape {vector.shape}")
    if vector.size == 0:
        raise ValueError("expected at least one token's SHAP value, got an empty vector")
    if not np.all(np.isfinite(vector)):
        raise ValueError("SHAP values contain NaN or infinity")
    return vector


def gini(values: np.ndarray) -> float:
    """Gini sparsity of ``|values|``: sum_ij |x_i - x_j| / (2 n^2 mean).

    0 for a uniform vector, (n-1)/n for a one-hot one. An all-zero vector carries no attribution, so it
    is defined as 0.0 (not sparse) instead of 0/0.
    """
    x = np.sort(np.abs(_as_vector(values)))
    n = x.size
    total = x.sum()
    if total == 0.0:
        return 0.0
    # Sorted identity: sum_ij |x_i - x_j| = 2 * sum_i (2i - n - 1) x_(i), i = 1..n; O(n log n).
    ranks = np.arange(1, n + 1)
    pairwise_sum = 2.0 * np.sum((2 * ranks - n - 1) * x)
    return float(pairwise_sum / (2.0 * n * total))  # 2 n^2 mean == 2 n * sum


def entropy(values: np.ndarray) -> float:
    """Shannon entropy (nats) of p = |v| / sum|v|; ln n when uniform, 0 when one-hot.

    An all-zero vector has no attribution mass to spread, so it is defined as 0.0 (keeps means finite).
    """
    x = np.abs(_as_vector(values))
    total = x.sum()
    if total == 0.0:
        return 0.0
    p = x[x > 0] / total  # 0 * log 0 = 0
    return float(-np.sum(p * np.log(p)))


def example_statistics(values: np.ndarray) -> dict[str, float | int]:
    """Descriptive statistics of one example's target-class SHAP values (std is of signed values, ddof=0)."""
    vector = _as_vector(values)
    magnitude = np.abs(vector)
    return {
        "mean_abs": float(magnitude.mean()),
        "std": float(vector.std()),
        "median_abs": float(np.median(magnitude)),
        "max_abs": float(magnitude.max()),
        "gini": gini(vector),
        "entropy": entropy(vector),
        "n_tokens": int(vector.size),
    }


def _check_paired_lengths(values_per_example: Sequence[np.ndarray], tokens_per_example: Sequence) -> None:
    if len(values_per_example) != len(tokens_per_example):
        raise ValueError(
            f"{len(values_per_example)} SHAP vectors but {len(tokens_per_example)} token lists; "
            "pass one token list per explained example"
        )
    for index, (values, tokens) in enumerate(zip(values_per_example, tokens_per_example)):
        if np.asarray(values).shape[0] != len(tokens):
            raise ValueError(f"example {index}: {np.asarray(values).shape[0]} SHAP values but {len(tokens)} tokens")


def _token_totals(
    values_per_example: Sequence[np.ndarray], tokens_per_example: Sequence[Sequence[str]]
) -> dict[str, list[float]]:
    """Token -> [total |SHAP|, count]; tokens are stripped and lower-cased, empty strings skipped."""
    totals: dict[str, list[float]] = {}
    for values, tokens in zip(values_per_example, tokens_per_example):
        for value, token in zip(np.abs(_as_vector(values)), tokens):
            key = token.strip().lower()
            if not key:
                continue
            entry = totals.setdefault(key, [0.0, 0])
            entry[0] += float(value)
            entry[1] += 1
    return totals


def _top_tokens(
    values_per_example: Sequence[np.ndarray], tokens_per_example: Sequence[Sequence[str]], top_k: int
) -> list[dict[str, float | int | str]]:
    totals = _token_totals(values_per_example, tokens_per_example)
    # Ties broken alphabetically so the list (and the Jaccard built on it) is deterministic.
    ranked = sorted(totals.items(), key=lambda item: (-item[1][0], item[0]))[:top_k]
    return [
        {"token": token, "total_abs": total, "mean_abs": total / count, "count": int(count)}
        for token, (total, count) in ranked
    ]


def model_statistics(
    values_per_example: list[np.ndarray], tokens_per_example: list[list[str]], top_k: int = 20
) -> dict:
    """Pooled and per-example statistics of one model's target-class SHAP values."""
    if not values_per_example:
        raise ValueError("model_statistics needs at least one explained example")
    _check_paired_lengths(values_per_example, tokens_per_example)
    per_example = [example_statistics(values) for values in values_per_example]
    pooled = np.abs(np.concatenate([_as_vector(values) for values in values_per_example]))
    return {
        "mean_abs_importance": float(pooled.mean()),
        "std_abs_importance": float(pooled.std()),
        "median_abs_importance": float(np.median(pooled)),
        "mean_token_importance_std": float(np.mean([row["std"] for row in per_example])),
        "mean_gini": float(np.mean([row["gini"] for row in per_example])),
        "mean_entropy": float(np.mean([row["entropy"] for row in per_example])),
        "top_tokens": _top_tokens(values_per_example, tokens_per_example, top_k),
        "per_example": per_example,
        "n_examples": len(values_per_example),
    }


def _top_positions(values: np.ndarray, k: int) -> set[int]:
    # Stable sort: equal |v| resolve to the earlier token, so results do not depend on sort internals.
    return set(np.argsort(-np.abs(values), kind="stable")[:k].tolist())


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    norm = np.linalg.norm(a) * np.linalg.norm(b)
    return float(np.dot(a, b) / norm) if norm > 0 else math.nan


def _correlation(a: np.ndarray, b: np.ndarray, method: Callable) -> float:
    """Per-example correlation, NaN where undefined (too few tokens or a constant vector)."""
    if a.size < MIN_TOKENS_FOR_CORRELATION or np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan
    return float(method(a, b)[0])


def paired_example_statistics(zero_shot: np.ndarray, fine_tuned: np.ndarray) -> dict[str, float]:
    """Agreement of two explanations of the same example; NaN marks a statistic undefined here."""
    zs, ft = _as_vector(zero_shot), _as_vector(fine_tuned)
    if zs.shape != ft.shape:
        raise ValueError(f"paired SHAP vectors differ in length: {zs.size} vs {ft.size}")
    n = zs.size
    overlaps = {}
    for k in (5, 10):
        k_eff = min(k, n)
        overlaps[f"top{k}_overlap"] = len(_top_positions(zs, k_eff) & _top_positions(ft, k_eff)) / k_eff
    k_eff = min(5, n)
    top_zs, top_ft = _top_positions(zs, k_eff), _top_positions(ft, k_eff)
    return {
        "cosine_similarity": _cosine(zs, ft),
        **overlaps,
        "top_token_jaccard": len(top_zs & top_ft) / len(top_zs | top_ft),
        "pearson": _correlation(zs, ft, stats.pearsonr),
        "spearman": _correlation(zs, ft, stats.spearmanr),
        "mean_abs_delta": float(np.abs(ft).mean() - np.abs(zs).mean()),
    }


def mean_with_ci(values: Sequence[float], n_resamples: int, seed: int) -> dict[str, float | int | None]:
    """Mean and bootstrap CI over examples where the statistic is defined (NaN rows dropped first)."""
    defined = np.asarray(values, dtype=float)
    defined = defined[~np.isnan(defined)]
    if defined.size == 0:
        return {"mean": None, "ci_low": None, "ci_high": None, "n": 0}
    ci = bootstrap_ci(np.mean, [defined], n_resamples=n_resamples, seed=seed)
    return {"mean": ci["estimate"], "ci_low": ci["low"], "ci_high": ci["high"], "n": int(defined.size)}


def _paired_cohens_d(differences: np.ndarray) -> float | None:
    """mean(d) / std(d, ddof=1); undefined for fewer than two pairs or identical differences."""
    if differences.size < 2:
        return None
    spread = differences.std(ddof=1)
    return float(differences.mean() / spread) if spread > 0 else None


def paired_test(
    zero_shot: Sequence[float],
    fine_tuned: Sequence[float],
    n_resamples: int = 1000,
    seed: int = 0,
    names: tuple[str, str] = ("zero_shot", "fine_tuned"),
) -> dict:
    """Paired comparison of one per-example scalar: bootstrap CI of mean(second - first), Wilcoxon, Cohen's d.

    `names` label the two sides in the result (`<first>_mean`, `<second>_mean`).
    """
    zs, ft = np.asarray(zero_shot, dtype=float), np.asarray(fine_tuned, dtype=float)
    if zs.shape != ft.shape or zs.size == 0:
        raise ValueError("paired_test needs two non-empty sequences of equal length")
    differences = ft - zs
    ci = bootstrap_ci(np.mean, [differences], n_resamples=n_resamples, seed=seed)
    wilcoxon_p, note = None, None
    if differences.size < 2:
        note = "fewer than 2 paired examples"
    elif np.all(differences == 0):
        note = "all paired differences are zero"
    else:
        wilcoxon_p = float(stats.wilcoxon(differences).pvalue)
    return {
        f"{names[0]}_mean": float(zs.mean()),
        f"{names[1]}_mean": float(ft.mean()),
        "mean_difference": ci["estimate"],
        "ci_low": ci["low"],
        "ci_high": ci["high"],
        "wilcoxon_p": wilcoxon_p,
        "wilcoxon_note": note,
        "cohens_d": _paired_cohens_d(differences),
        "n": int(differences.size),
    }


def _pooled_correlation(a: np.ndarray, b: np.ndarray, method: Callable) -> float | None:
    value = _correlation(a, b, method)
    return None if math.isnan(value) else value


def _pooled_cohens_d(a: np.ndarray, b: np.ndarray) -> float | None:
    """(mean a - mean b) / pooled SD (ddof=1); None when the pooled SD is zero or undefined."""
    if a.size < 2 or b.size < 2:
        return None
    pooled_var = ((a.size - 1) * a.var(ddof=1) + (b.size - 1) * b.var(ddof=1)) / (a.size + b.size - 2)
    return float((a.mean() - b.mean()) / math.sqrt(pooled_var)) if pooled_var > 0 else None


def _jaccard(a: set, b: set) -> float | None:
    union = a | b
    return len(a & b) / len(union) if union else None


def compare_models(
    zero_shot: list[np.ndarray],
    fine_tuned: list[np.ndarray],
    tokens_per_example: list[list[str]],
    n_resamples: int = 1000,
    seed: int = 0,
    top_k: int = 20,
    names: tuple[str, str] = ("zero_shot", "fine_tuned"),
) -> dict:
    """Compare two models' explanations of the same examples (target class only): a baseline, then the model.

    Differences are second minus first; `names` label the sides. Pooled correlations carry no p-value: tokens of
    one tweet are not independent observations.
    """
    if not zero_shot or len(zero_shot) != len(fine_tuned):
        raise ValueError(
            f"compare_models needs the same non-zero number of examples per model, "
            f"got {len(zero_shot)} zero-shot and {len(fine_tuned)} fine-tuned"
        )
    _check_paired_lengths(zero_shot, tokens_per_example)
    _check_paired_lengths(fine_tuned, tokens_per_example)

    paired_rows = [paired_example_statistics(zs, ft) for zs, ft in zip(zero_shot, fine_tuned)]
    zs_stats = model_statistics(zero_shot, tokens_per_example, top_k=top_k)
    ft_stats = model_statistics(fine_tuned, tokens_per_example, top_k=top_k)

    result: dict = {
        name: mean_with_ci([row[name] for row in paired_rows], n_resamples, seed) for name in PAIRED_EXAMPLE_STATISTICS
    }
    result["paired_tests"] = {
        name: paired_test(
            [row[name] for row in zs_stats["per_example"]],
            [row[name] for row in ft_stats["per_example"]],
            n_resamples=n_resamples,
            seed=seed,
            names=names,
        )
        for name in PAIRED_TEST_STATISTICS
    }

    zs_pooled = np.concatenate([_as_vector(v) for v in zero_shot])
    ft_pooled = np.concatenate([_as_vector(v) for v in fine_tuned])
    result["pooled_pearson"] = _pooled_correlation(zs_pooled, ft_pooled, stats.pearsonr)
    result["pooled_spearman"] = _pooled_correlation(zs_pooled, ft_pooled, stats.spearmanr)
    result["mean_abs_importance_difference"] = float(np.abs(ft_pooled).mean() - np.abs(zs_pooled).mean())
    result["cohens_d_abs_importance"] = _pooled_cohens_d(np.abs(ft_pooled), np.abs(zs_pooled))
    result["overall_top_token_jaccard"] = _jaccard(
        {row["token"] for row in zs_stats["top_tokens"]}, {row["token"] for row in ft_stats["top_tokens"]}
    )
    result["per_model"] = {
        name: {key: model[key] for key in ("mean_abs_importance", "mean_gini", "mean_entropy")}
        for name, model in zip(names, (zs_stats, ft_stats))
    }
    result["per_example_mean_abs_delta"] = [row["mean_abs_delta"] for row in paired_rows]
    result["n_examples"] = len(zero_shot)
    result["models"] = list(names)
    return result


def random_order(n_tokens: int, rng: np.random.Generator) -> np.ndarray:
    """A random token ranking, the baseline an attribution's AOPC must beat."""
    return rng.permutation(n_tokens)


def _tokens_for_fraction(fraction: float, n_tokens: int) -> int:
    # Rounding first stops float noise from adding a token: 0.14 * 50 == 7.000000000000001.
    return min(n_tokens, max(1, math.ceil(round(fraction * n_tokens, 9))))


def aopc(
    score_fn: Callable[[np.ndarray], np.ndarray],
    attributions: np.ndarray,
    full_score: float,
    fractions: Sequence[float] = (0.1, 0.2, 0.3, 0.4, 0.5),
    mode: str = "comprehensiveness",
    order: np.ndarray | None = None,
) -> dict:
    """Area over the perturbation curve for one example.

    Tokens are ranked by signed attribution (strongest evidence for the target class first) unless
    ``order`` gives the ranking. For each fraction f the top k = max(1, ceil(f n)) tokens are removed
    (comprehensiveness; higher is more faithful) or kept alone (sufficiency; lower is more faithful),
    and the curve is ``full_score - score_fn(mask)``. ``score_fn`` gets every mask in one (m, n) batch.
    """
    if mode not in FAITHFULNESS_MODES:
        raise ValueError(f"mode must be one of {FAITHFULNESS_MODES}, got {mode!r}")
    if len(fractions) == 0:
        raise ValueError("aopc needs at least one fraction")
    values = _as_vector(attributions)
    n = values.size
    if order is None:
        order = np.argsort(-values, kind="stable")
    order = np.asarray(order)
    if order.shape != (n,) or not np.array_equal(np.sort(order), np.arange(n)):
        raise ValueError(f"order must be a permutation of range({n})")

    ks = [_tokens_for_fraction(f, n) for f in fractions]
    masks = np.full((len(ks), n), mode == "comprehensiveness", dtype=bool)
    for row, k in enumerate(ks):
        masks[row, order[:k]] = mode != "comprehensiveness"
    scores = np.asarray(score_fn(masks), dtype=float)
    if scores.shape != (len(ks),):
        raise ValueError(f"score_fn returned shape {scores.shape}, expected ({len(ks)},)")
    curve = full_score - scores
    return {
        "fractions": [float(f) for f in fractions],
        "k": ks,
        "curve": curve.tolist(),
        "aopc": float(curve.mean()),
    }


def summarize_faithfulness(per_example: list[dict], n_resamples: int = 1000, seed: int = 0) -> dict:
    """Mean AOPC over examples with a bootstrap CI, and the mean perturbation curve."""
    if not per_example:
        raise ValueError("summarize_faithfulness needs at least one example's aopc result")
    fractions = per_example[0]["fractions"]
    if any(row["fractions"] != fractions for row in per_example):
        raise ValueError("every example's aopc result must use the same fractions")
    ci = bootstrap_ci(np.mean, [np.array([row["aopc"] for row in per_example])], n_resamples, seed)
    return {
        "mean_aopc": ci["estimate"],
        "ci_low": ci["low"],
        "ci_high": ci["high"],
        "n": len(per_example),
        "fractions": fractions,
        "mean_curve": np.mean([row["curve"] for row in per_example], axis=0).tolist(),
    }
