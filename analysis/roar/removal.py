"""Which words ROAR removes from a tweet: the top share by an explainer's attributions, or as many at random.

Pure rules on arrays (no model): the ROAR run and its test both read them, and a test checks them by hand.
"""

from __future__ import annotations

import math

import numpy as np


def removal_count(n_words: int, fraction: float) -> int:
    """round(fraction x n), halves up, at least one word removed and one kept; a one-word tweet keeps its word
    (it would otherwise vanish from the data, and the conditions would no longer hold the same tweets)."""
    if n_words < 2:
        return 0
    return int(min(n_words - 1, max(1, math.floor(fraction * n_words + 0.5))))


def ranked_removal(attributions: np.ndarray, fraction: float) -> np.ndarray:
    """The indices of the words removed: the largest |attribution| first, ties to the earlier word."""
    attributions = np.asarray(attributions, dtype=float)
    order = np.argsort(-np.abs(attributions), kind="stable")
    return np.sort(order[: removal_count(len(attributions), fraction)])


def random_removal(n_words: int, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """As many words as `ranked_removal` removes, chosen uniformly at random."""
    return np.sort(rng.permutation(n_words)[: removal_count(n_words, fraction)])


def keep_mask(n_words: int, removed: np.ndarray) -> np.ndarray:
    keep = np.ones(n_words, dtype=bool)
    keep[np.asarray(removed, dtype=int)] = False
    return keep
