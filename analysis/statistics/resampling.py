"""Seeded percentile bootstrap shared by every statistic that reports a confidence interval."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


def bootstrap_ci(
    statistic: Callable[..., float],
    arrays: Sequence[np.ndarray],
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, float]:
    """Percentile bootstrap CI of ``statistic(*arrays)``.

    The same resampled row indices are used for every array, so paired data (two models scored on the
    same examples) stay paired. Returns ``{"estimate", "low", "high", "n_resamples", "confidence"}``.
    """
    arrays = [np.asarray(a) for a in arrays]
    n = len(arrays[0])
    if n == 0:
        raise ValueError("bootstrap_ci needs at least one row")
    if any(len(a) != n for a in arrays):
        raise ValueError("bootstrap_ci needs arrays of equal length (paired rows)")
    rng = np.random.default_rng(seed)
    indices = rng.integers(0, n, size=(n_resamples, n))
    samples = np.array([statistic(*(a[idx] for a in arrays)) for idx in indices], dtype=float)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.nanquantile(samples, [alpha, 1.0 - alpha])
    return {
        "estimate": float(statistic(*arrays)),
        "low": float(low),
        "high": float(high),
        "n_resamples": int(n_resamples),
        "confidence": float(confidence),
    }
