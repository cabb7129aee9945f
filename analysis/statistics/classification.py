"""Classification metrics, calibration and paired model comparison on label-token probabilities.

Every function takes ``y_true`` (gold label indices, shape (n,)) and ``probs`` (probabilities over the C
label tokens, shape (n, C)); the prediction is the argmax of each row (ties go to the lower index).
Standard metrics come from ``torchmetrics.functional``; only ECE and McNemar are computed here.

Macro averages in bootstrap resamples: torchmetrics leaves a class out of the macro average when it has
no gold *and* no predicted example (tp + fp + fn == 0), and scores it 0 when it is predicted but has no
gold example. So macro F1 is always defined and is the mean over the classes that occur in the resample.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from scipy.stats import binom
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_confusion_matrix,
    multiclass_f1_score,
    multiclass_matthews_corrcoef,
    multiclass_precision,
    multiclass_recall,
)

from analysis.statistics.resampling import bootstrap_ci

ECE_BINS = 15
Metric = Callable[[np.ndarray, np.ndarray], float]


def _check_inputs(y_true: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Turn user input into (int64 labels, float64 probabilities) or say what is wrong with it."""
    y_true = np.asarray(y_true)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] < 2:
        raise ValueError(f"probs must have shape (n_examples, n_labels >= 2), got {probs.shape}")
    if y_true.ndim != 1 or len(y_true) != len(probs):
        raise ValueError(f"y_true must have shape ({len(probs)},) to match probs, got {y_true.shape}")
    if len(y_true) == 0:
        raise ValueError("need at least one example to compute metrics, got 0")
    if not np.issubdtype(y_true.dtype, np.integer):
        raise ValueError(f"y_true must hold integer label indices, got dtype {y_true.dtype}")
    if y_true.min() < 0 or y_true.max() >= probs.shape[1]:
        raise ValueError(f"y_true must lie in [0, {probs.shape[1] - 1}], got {y_true.min()}..{y_true.max()}")
    if not np.isfinite(probs).all():
        raise ValueError("probs contains NaN or infinite values; check the model's label-token logits")
    return y_true.astype(np.int64), probs


def _tensors(y_true: np.ndarray, probs: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(predicted indices, gold indices, number of classes) as torch tensors for torchmetrics."""
    preds = torch.from_numpy(np.argmax(probs, axis=1))
    return preds, torch.from_numpy(np.asarray(y_true, dtype=np.int64)), probs.shape[1]


def _headline(metric: Callable[..., torch.Tensor], y_true: np.ndarray, probs: np.ndarray) -> float:
    """Positive class (index 1) for binary tasks, support-weighted average for multiclass ones."""
    preds, target, n_classes = _tensors(y_true, probs)
    if n_classes == 2:
        return float(metric(preds, target, num_classes=2, average=None, validate_args=False)[1])
    return float(metric(preds, target, num_classes=n_classes, average="weighted", validate_args=False))


def accuracy(y_true: np.ndarray, probs: np.ndarray) -> float:
    preds, target, n_classes = _tensors(y_true, probs)
    return float(multiclass_accuracy(preds, target, num_classes=n_classes, average="micro", validate_args=False))


def precision(y_true: np.ndarray, probs: np.ndarray) -> float:
    return _headline(multiclass_precision, y_true, probs)


def recall(y_true: np.ndarray, probs: np.ndarray) -> float:
    return _headline(multiclass_recall, y_true, probs)


def f1(y_true: np.ndarray, probs: np.ndarray) -> float:
    return _headline(multiclass_f1_score, y_true, probs)


def weighted_f1(y_true: np.ndarray, probs: np.ndarray) -> float:
    preds, target, n_classes = _tensors(y_true, probs)
    return float(multiclass_f1_score(preds, target, num_classes=n_classes, average="weighted", validate_args=False))


def macro_f1(y_true: np.ndarray, probs: np.ndarray) -> float:
    preds, target, n_classes = _tensors(y_true, probs)
    return float(multiclass_f1_score(preds, target, num_classes=n_classes, average="macro", validate_args=False))


def macro_recall(y_true: np.ndarray, probs: np.ndarray) -> float:
    preds, target, n_classes = _tensors(y_true, probs)
    return float(multiclass_recall(preds, target, num_classes=n_classes, average="macro", validate_args=False))


def mcc(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Matthews correlation; 0 when all predictions or all gold labels are one class (0/0)."""
    preds, target, n_classes = _tensors(y_true, probs)
    # torchmetrics' 2x2 path replaces 0/0 by an epsilon limit (0.129 for a constant "positive" predictor on
    # 6 positives / 4 negatives) while its multiclass path returns 0; a constant zero-shot model is common
    # here, so use the usual convention (0) for both.
    if len(torch.unique(preds)) < 2 or len(torch.unique(target)) < 2:
        return 0.0
    return float(multiclass_matthews_corrcoef(preds, target, num_classes=n_classes, validate_args=False))


def reliability_bins(y_true: np.ndarray, probs: np.ndarray, n_bins: int = ECE_BINS) -> dict[str, list[float]]:
    """Per confidence bin: edges, example count, accuracy and mean confidence (NaN for empty bins).

    Bins are equal-width ``[k/B, (k+1)/B)`` on the max probability; confidence 1.0 joins the last bin.
    """
    y_true, probs = _check_inputs(y_true, probs)
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y_true).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    index = np.digitize(confidence, edges[1:-1], right=False)
    count = np.bincount(index, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        bin_accuracy = np.bincount(index, weights=correct, minlength=n_bins) / count
        bin_confidence = np.bincount(index, weights=confidence, minlength=n_bins) / count
    return {
        "edges": edges.tolist(),
        "count": count.tolist(),
        "accuracy": bin_accuracy.tolist(),
        "confidence": bin_confidence.tolist(),
    }


def expected_calibration_error(y_true: np.ndarray, probs: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """ECE = sum_b |B_b|/n * |acc_b - conf_b| over equal-width bins of the max probability.

    Written here rather than taken from torchmetrics' ``multiclass_calibration_error``, which gives
    confidence exactly 1.0 a bin of its own (saturated fine-tuned models produce that); elsewhere the two
    agree (see the tests).
    """
    bins = reliability_bins(y_true, probs, n_bins)
    count = np.asarray(bins["count"])
    filled = count > 0
    gaps = np.abs(np.asarray(bins["accuracy"])[filled] - np.asarray(bins["confidence"])[filled])
    return float(np.sum(count[filled] / count.sum() * gaps))


# Metrics that get a bootstrap CI in classification_metrics and a paired difference in compare_predictions.
INTERVAL_METRICS: dict[str, Metric] = {"accuracy": accuracy, "macro_f1": macro_f1, "f1": f1, "mcc": mcc}
COMPARED_METRICS: dict[str, Metric] = {
    "accuracy": accuracy,
    "macro_f1": macro_f1,
    "f1": f1,
    "weighted_f1": weighted_f1,
    "mcc": mcc,
    "ece": expected_calibration_error,
}


def classification_metrics(
    y_true: np.ndarray,
    probs: np.ndarray,
    label_names: Sequence[str],
    label_space_mass: np.ndarray | None = None,
    top_token_is_label: np.ndarray | None = None,
    n_resamples: int = 1000,
    seed: int = 0,
) -> dict:
    """Headline, per-class and calibration metrics with seeded bootstrap CIs, as a JSON-ready dict.

    ``precision``/``recall``/``f1`` are of the positive class (index 1) when there are two labels and
    support-weighted otherwise. ``label_space_mass`` and ``format_compliance`` appear only when the
    per-example arrays from the unconstrained next-token distribution are given.
    """
    y_true, probs = _check_inputs(y_true, probs)
    label_names = [str(name) for name in label_names]
    n, n_classes = probs.shape
    if len(label_names) != n_classes or len(set(label_names)) != n_classes:
        raise ValueError(f"label_names must be {n_classes} distinct names (one per probs column), got {label_names}")

    preds, target, _ = _tensors(y_true, probs)
    per_class_scores = {
        name: metric(preds, target, num_classes=n_classes, average=None)
        for name, metric in (
            ("precision", multiclass_precision),
            ("recall", multiclass_recall),
            ("f1", multiclass_f1_score),
        )
    }
    support = np.bincount(y_true, minlength=n_classes)
    result: dict = {
        "accuracy": accuracy(y_true, probs),
        "precision": precision(y_true, probs),
        "recall": recall(y_true, probs),
        "f1": f1(y_true, probs),
        "per_class": {
            name: {
                "precision": float(per_class_scores["precision"][k]),
                "recall": float(per_class_scores["recall"][k]),
                "f1": float(per_class_scores["f1"][k]),
                "support": int(support[k]),
            }
            for k, name in enumerate(label_names)
        },
        "confusion_matrix": multiclass_confusion_matrix(preds, target, num_classes=n_classes).tolist(),
        "mean_max_probability": float(probs.max(axis=1).mean()),
    }
    if n_classes == 2:
        result["positive_probability_mean"] = float(probs[:, 1].mean())
    result["macro_f1"] = macro_f1(y_true, probs)
    result["macro_recall"] = macro_recall(y_true, probs)
    result["mcc"] = mcc(y_true, probs)
    result["ece"] = expected_calibration_error(y_true, probs)
    for key, values in (("label_space_mass", label_space_mass), ("format_compliance", top_token_is_label)):
        if values is None:
            continue
        values = np.asarray(values, dtype=np.float64)
        if values.shape != (n,):
            raise ValueError(f"{key} must have one value per example, shape ({n},), got {values.shape}")
        result[key] = float(values.mean())
    result["confidence_intervals"] = {
        name: bootstrap_ci(metric, [y_true, probs], n_resamples=n_resamples, seed=seed)
        for name, metric in INTERVAL_METRICS.items()
    }
    result["n_examples"] = int(n)
    result["label_names"] = label_names
    return result


def mcnemar_exact(correct_a: np.ndarray, correct_b: np.ndarray) -> dict:
    """Exact two-sided McNemar test on paired per-example correctness of two models.

    p = min(1, 2 * P(X <= min(b, c))) with X ~ Binomial(b + c, 1/2); p = 1 when there are no discordant pairs.
    """
    correct_a, correct_b = np.asarray(correct_a), np.asarray(correct_b)
    if correct_a.ndim != 1 or correct_a.shape != correct_b.shape:
        raise ValueError(f"correctness arrays must be 1-D and paired, got {correct_a.shape} and {correct_b.shape}")
    for values in (correct_a, correct_b):
        if not np.isin(values, (0, 1)).all():
            raise ValueError("correctness arrays must hold booleans (or 0/1), one per example")
    correct_a, correct_b = correct_a.astype(bool), correct_b.astype(bool)
    b = int(np.sum(correct_a & ~correct_b))
    c = int(np.sum(~correct_a & correct_b))
    k = min(b, c)
    p_value = 1.0 if b + c == 0 else min(1.0, 2.0 * float(binom.cdf(k, b + c, 0.5)))
    return {
        "b_only_first_correct": b,
        "c_only_second_correct": c,
        "n_discordant": b + c,
        "p_value": p_value,
        "statistic": k,
    }


def holm_adjust(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the given order: the i-th smallest times (m - i), running max, <= 1."""
    p = np.asarray(p_values, dtype=np.float64)
    order = np.argsort(p, kind="stable")
    scaled = p[order] * (len(p) - np.arange(len(p)))
    adjusted = np.empty_like(p)
    adjusted[order] = np.minimum(np.maximum.accumulate(scaled), 1.0)
    return adjusted.tolist()


def _difference(metric: Metric) -> Callable[[np.ndarray, np.ndarray, np.ndarray], float]:
    return lambda y_true, probs_a, probs_b: metric(y_true, probs_b) - metric(y_true, probs_a)


def compare_predictions(
    y_true: np.ndarray,
    probs_a: np.ndarray,
    probs_b: np.ndarray,
    name_a: str,
    name_b: str,
    n_resamples: int = 1000,
    seed: int = 0,
) -> dict:
    """Model b minus model a on each metric in ``COMPARED_METRICS``, with a paired bootstrap CI, plus McNemar.

    Examples are resampled jointly (same indices for both models), so the CI reflects the paired design.
    For ``ece`` a negative difference means model b is better calibrated.
    """
    y_true, probs_a = _check_inputs(y_true, probs_a)
    _, probs_b = _check_inputs(y_true, probs_b)
    if probs_a.shape != probs_b.shape:
        raise ValueError(
            f"both models must score the same examples and labels, got {probs_a.shape} and {probs_b.shape}"
        )
    differences = {}
    for name, metric in COMPARED_METRICS.items():
        ci = bootstrap_ci(_difference(metric), [y_true, probs_a, probs_b], n_resamples=n_resamples, seed=seed)
        differences[name] = {
            "difference": ci["estimate"],
            "ci_low": ci["low"],
            "ci_high": ci["high"],
            "baseline_value": metric(y_true, probs_a),
            "model_value": metric(y_true, probs_b),
        }
    return {
        "baseline": name_a,
        "model": name_b,
        "differences": differences,
        "mcnemar": mcnemar_exact(probs_a.argmax(axis=1) == y_true, probs_b.argmax(axis=1) == y_true),
        "n_examples": len(y_true),
        "n_resamples": int(n_resamples),
        "confidence": ci["confidence"],
    }
