"""Contextual calibration (Zhao et al., 2021, "Calibrate Before Use") of label-token probabilities."""

from __future__ import annotations

import numpy as np

CONTENT_FREE_INPUTS = ("", "N/A", "[MASK]")


def content_free_prior(content_free_probs: np.ndarray) -> np.ndarray:
    """The model's label prior: the mean label distribution over content-free inputs, shape (classes,)."""
    probs = np.asarray(content_free_probs, dtype=np.float64)
    if probs.ndim != 2 or len(probs) == 0:
        raise ValueError("content_free_probs must have shape (n_inputs >= 1, n_labels)")
    prior = probs.mean(axis=0)
    return prior / prior.sum()


def calibrate(probs: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """Divide each row by the prior (W = diag(prior)^-1, b = 0) and renormalise to sum to one."""
    probs = np.asarray(probs, dtype=np.float64)
    prior = np.asarray(prior, dtype=np.float64)
    if prior.shape != probs.shape[-1:] or (prior <= 0).any():
        raise ValueError("prior must be a positive vector with one entry per label")
    scaled = probs / prior
    return scaled / scaled.sum(axis=-1, keepdims=True)
