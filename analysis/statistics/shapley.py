"""Exact Shapley values by enumeration of every coalition: the reference the explainer's Owen values are checked
against on short tweets. Pure: coalition values in, attributions out."""

from __future__ import annotations

import math
from itertools import product

import numpy as np

MAX_EXACT_FEATURES = 10  # 2^10 = 1,024 coalitions per tweet and model


def all_coalitions(n_features: int) -> np.ndarray:
    """Every keep-mask over `n_features` features, shape (2^n, n); row k keeps feature i where bit i of k is set."""
    if n_features > MAX_EXACT_FEATURES:
        raise ValueError(f"exact Shapley values enumerate 2^n coalitions; n = {n_features} > {MAX_EXACT_FEATURES}")
    return np.array([[bool(k >> i & 1) for i in range(n_features)] for k in range(2**n_features)], dtype=bool)


def shapley_values(coalition_values: np.ndarray) -> np.ndarray:
    """phi_i = sum over S not containing i of |S|! (n - |S| - 1)! / n! * (v(S + i) - v(S)), for the coalition values
    in `all_coalitions` order, shape (2^n,) or (2^n, outputs); returns (n,) or (n, outputs)."""
    values = np.asarray(coalition_values, dtype=float)
    n = int(round(math.log2(len(values))))
    if 2**n != len(values):
        raise ValueError("coalition_values must hold one value per coalition (2^n rows)")
    phi = np.zeros((n, *values.shape[1:]))
    for i in range(n):
        for rest in product((False, True), repeat=n - 1):
            members = list(rest[:i]) + [False] + list(rest[i:])
            without = sum(1 << j for j, keep in enumerate(members) if keep)
            size = sum(members)
            weight = math.factorial(size) * math.factorial(n - size - 1) / math.factorial(n)
            phi[i] += weight * (values[without | 1 << i] - values[without])
    return phi


def distance(approximate: np.ndarray, exact: np.ndarray) -> dict:
    """How far one attribution vector is from the exact one: relative L2 error, largest absolute difference."""
    approximate, exact = np.asarray(approximate, dtype=float), np.asarray(exact, dtype=float)
    norm = float(np.linalg.norm(exact))
    return {
        "relative_l2": float(np.linalg.norm(approximate - exact) / norm) if norm > 0 else None,
        "max_abs_difference": float(np.abs(approximate - exact).max()) if exact.size else 0.0,
    }
