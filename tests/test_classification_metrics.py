"""Classification metrics, ECE, McNemar, paired comparison and plots against hand-computed values."""

from __future__ import annotations

import math
import os

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from scipy.stats import binomtest
from torchmetrics.functional.classification import multiclass_calibration_error

from analysis.report.plots import plot_confusion_matrices, plot_metric_comparison, plot_reliability, save_figure
from analysis.statistics import classification as cm

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Binary: gold 1 1 1 1 0 0 0 0 0 0, predicted 1 1 1 0 1 1 0 0 0 0 -> tp=3, fn=1, fp=2, tn=4.
BINARY_Y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
BINARY_P1 = np.array([0.9, 0.8, 0.6, 0.3, 0.7, 0.55, 0.2, 0.1, 0.4, 0.35])
BINARY_PROBS = np.column_stack([1 - BINARY_P1, BINARY_P1])

# 3-class, supports 1/2/3 so that macro and weighted averages differ.
# gold      0  1  1  2  2  2
# predicted 0  1  0  2  2  1
THREE_Y = np.array([0, 1, 1, 2, 2, 2])
THREE_PROBS = np.array(
    [
        [0.7, 0.2, 0.1],
        [0.1, 0.6, 0.3],
        [0.5, 0.3, 0.2],
        [0.1, 0.1, 0.8],
        [0.2, 0.3, 0.5],
        [0.2, 0.45, 0.35],
    ]
)


def _metrics(y, probs, names, **kwargs):
    return cm.classification_metrics(y, probs, names, n_resamples=kwargs.pop("n_resamples", 200), **kwargs)


def test_binary_metrics_match_hand_computation():
    m = _metrics(BINARY_Y, BINARY_PROBS, ["negative", "positive"])
    assert m["accuracy"] == pytest.approx(7 / 10)  # (tp + tn) / n
    assert m["precision"] == pytest.approx(3 / 5)  # tp / (tp + fp), positive class
    assert m["recall"] == pytest.approx(3 / 4)  # tp / (tp + fn)
    assert m["f1"] == pytest.approx(2 / 3)  # 2 * 0.6 * 0.75 / 1.35
    # Negative class: precision tn/(tn+fn) = 4/5, recall tn/(tn+fp) = 4/6, F1 = (16/15) / (22/15) = 8/11.
    assert m["per_class"]["negative"] == pytest.approx(
        {"precision": 4 / 5, "recall": 2 / 3, "f1": 8 / 11, "support": 6}
    )
    assert m["per_class"]["positive"] == pytest.approx({"precision": 3 / 5, "recall": 3 / 4, "f1": 2 / 3, "support": 4})
    assert m["confusion_matrix"] == [[4, 2], [1, 3]]  # rows gold, columns predicted
    assert m["macro_f1"] == pytest.approx((2 / 3 + 8 / 11) / 2)  # = 23/33
    assert m["macro_recall"] == pytest.approx((3 / 4 + 2 / 3) / 2)  # = 17/24
    # max(p, 1-p) summed: .9+.8+.6+.7+.7+.55+.8+.9+.6+.65 = 7.2
    assert m["mean_max_probability"] == pytest.approx(0.72)
    assert m["positive_probability_mean"] == pytest.approx(0.49)  # 4.9 / 10
    assert m["n_examples"] == 10
    assert m["label_names"] == ["negative", "positive"]


def test_binary_mcc_matches_formula():
    tp, fn, fp, tn = 3, 1, 2, 4
    # (tp*tn - fp*fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn)) = 10 / sqrt(600) = 1/sqrt(6)
    expected = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert expected == pytest.approx(1 / math.sqrt(6))
    assert _metrics(BINARY_Y, BINARY_PROBS, ["negative", "positive"])["mcc"] == pytest.approx(expected)


def test_three_class_metrics_match_hand_computation():
    m = _metrics(THREE_Y, THREE_PROBS, ["negative", "neutral", "positive"])
    # class 0: tp=1 fp=1 fn=0 -> P=1/2 R=1   F1=2/3
    # class 1: tp=1 fp=1 fn=1 -> P=1/2 R=1/2 F1=1/2
    # class 2: tp=2 fp=0 fn=1 -> P=1   R=2/3 F1=4/5
    expected_per_class = {
        "negative": {"precision": 1 / 2, "recall": 1.0, "f1": 2 / 3, "support": 1},
        "neutral": {"precision": 1 / 2, "recall": 1 / 2, "f1": 1 / 2, "support": 2},
        "positive": {"precision": 1.0, "recall": 2 / 3, "f1": 4 / 5, "support": 3},
    }
    assert list(m["per_class"]) == list(expected_per_class)
    for name, expected in expected_per_class.items():
        assert m["per_class"][name] == pytest.approx(expected), name
    assert m["accuracy"] == pytest.approx(4 / 6)
    # Support-weighted (1, 2, 3 out of 6):
    assert m["precision"] == pytest.approx((1 * 1 / 2 + 2 * 1 / 2 + 3 * 1) / 6)  # = 3/4
    assert m["recall"] == pytest.approx((1 * 1 + 2 * 1 / 2 + 3 * 2 / 3) / 6)  # = 2/3 (= accuracy)
    assert m["f1"] == pytest.approx((1 * 2 / 3 + 2 * 1 / 2 + 3 * 4 / 5) / 6)  # = 61/90
    # Macro:
    assert m["macro_f1"] == pytest.approx((2 / 3 + 1 / 2 + 4 / 5) / 3)  # = 59/90
    assert m["macro_recall"] == pytest.approx((1 + 1 / 2 + 2 / 3) / 3)  # = 13/18
    assert m["confusion_matrix"] == [[1, 0, 0], [1, 1, 0], [0, 1, 2]]
    # Multiclass MCC (Gorodkin): correct c=4, n=6, gold counts t=(1,2,3), predicted counts p=(2,2,2):
    # (c*n - t.p) / sqrt((n^2 - p.p)(n^2 - t.t)) = (24 - 12) / sqrt(24 * 22) = 3/sqrt(33)
    assert m["mcc"] == pytest.approx(3 / math.sqrt(33))
    assert m["mean_max_probability"] == pytest.approx(3.55 / 6)
    assert "positive_probability_mean" not in m


def test_mcc_is_zero_for_a_constant_predictor():
    # 0/0 in the formula; torchmetrics' 2x2 path would report about 0.129 here.
    constant = np.tile([0.2, 0.8], (10, 1))
    assert cm.mcc(BINARY_Y, constant) == 0.0
    assert cm.mcc(THREE_Y, np.tile([0.2, 0.3, 0.5], (6, 1))) == 0.0


def test_macro_f1_with_classes_absent_from_a_resample():
    y = np.array([0, 0, 1, 1])
    perfect = np.eye(3)[[0, 0, 1, 1]]
    # Class 2 has no gold and no predicted example: left out of the macro average, not scored 0.
    assert cm.macro_f1(y, perfect) == pytest.approx(1.0)
    # Class 2 predicted once without gold examples scores 0: (1 + 2/3 + 0) / 3.
    assert cm.macro_f1(y, np.eye(3)[[0, 0, 1, 2]]) == pytest.approx(5 / 9)


def test_ece_on_a_hand_case():
    y = np.array([1, 0, 1, 0])
    probs = np.array([[0.1, 0.9], [0.1, 0.9], [0.35, 0.65], [0.7, 0.3]])
    # 15 bins of width 1/15: conf .9 -> bin 13 (2 examples, acc 1/2), .65 -> bin 9 (acc 1), .7 -> bin 10
    # ECE = 2/4 * |0.5 - 0.9| + 1/4 * |1 - 0.65| + 1/4 * |1 - 0.7| = 0.2 + 0.0875 + 0.075
    assert cm.expected_calibration_error(y, probs) == pytest.approx(0.3625)
    # One bin: |3/4 - mean conf 3.15/4| = 0.0375
    assert cm.expected_calibration_error(y, probs, n_bins=1) == pytest.approx(0.0375)
    bins = cm.reliability_bins(y, probs)
    assert [k for k, c in enumerate(bins["count"]) if c] == [9, 10, 13]
    assert bins["accuracy"][13] == pytest.approx(0.5)
    assert bins["confidence"][13] == pytest.approx(0.9)
    assert _metrics(y, probs, ["a", "b"])["ece"] == pytest.approx(0.3625)


def test_ece_puts_confidence_one_in_the_last_bin():
    y = np.array([1, 1])
    probs = np.array([[1.0, 0.0], [0.06, 0.94]])  # wrong at 1.0, right at 0.94 (both in [14/15, 1])
    # One bin: acc 1/2, conf 0.97 -> 0.47. torchmetrics bins 1.0 alone: (|0 - 1| + |1 - 0.94|) / 2 = 0.53.
    assert cm.expected_calibration_error(y, probs) == pytest.approx(0.47)
    torchmetrics_ece = multiclass_calibration_error(torch.tensor(probs), torch.tensor(y), num_classes=2, n_bins=15)
    assert float(torchmetrics_ece) == pytest.approx(0.53)


def test_ece_agrees_with_torchmetrics_away_from_confidence_one():
    rng = np.random.default_rng(3)
    probs = rng.dirichlet([1.0, 1.0, 1.0], size=500)
    y = rng.integers(0, 3, size=500)
    expected = multiclass_calibration_error(torch.tensor(probs), torch.tensor(y), num_classes=3, n_bins=15)
    # torchmetrics works in float32, hence the tolerance.
    assert cm.expected_calibration_error(y, probs) == pytest.approx(float(expected), abs=1e-6)


def test_optional_arrays_are_reported_only_when_given():
    without = _metrics(THREE_Y, THREE_PROBS, ["a", "b", "c"])
    assert "label_space_mass" not in without and "format_compliance" not in without
    with_arrays = _metrics(
        THREE_Y,
        THREE_PROBS,
        ["a", "b", "c"],
        label_space_mass=np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4]),
        top_token_is_label=np.array([True, True, False, True, False, True]),
    )
    assert with_arrays["label_space_mass"] == pytest.approx(3.9 / 6)
    assert with_arrays["format_compliance"] == pytest.approx(4 / 6)


def test_bad_input_is_one_clear_error():
    with pytest.raises(ValueError, match="label_names"):
        _metrics(THREE_Y, THREE_PROBS, ["a", "b"])
    with pytest.raises(ValueError, match="y_true"):
        _metrics(np.array([0, 1, 5, 1, 2, 2]), THREE_PROBS, ["a", "b", "c"])
    with pytest.raises(ValueError, match="label_space_mass"):
        _metrics(THREE_Y, THREE_PROBS, ["a", "b", "c"], label_space_mass=np.ones(5))


def test_confidence_intervals_are_seeded_and_bracket_the_estimate():
    first = _metrics(BINARY_Y, BINARY_PROBS, ["n", "p"], n_resamples=1000, seed=7)
    again = _metrics(BINARY_Y, BINARY_PROBS, ["n", "p"], n_resamples=1000, seed=7)
    other = _metrics(BINARY_Y, BINARY_PROBS, ["n", "p"], n_resamples=1000, seed=8)
    assert first["confidence_intervals"] == again["confidence_intervals"]
    assert first["confidence_intervals"] != other["confidence_intervals"]
    for name in ("accuracy", "macro_f1"):
        ci = first["confidence_intervals"][name]
        assert ci["estimate"] == pytest.approx(first[name])
        assert ci["low"] <= ci["estimate"] <= ci["high"]
        assert ci["low"] < ci["high"]  # 10 examples: the interval cannot be a point
        assert ci["n_resamples"] == 1000


def _comb_p_value(b: int, c: int) -> float:
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


def test_mcnemar_counts_and_small_case():
    a = np.array([True, True, True, False, False, True])
    b = np.array([True, False, False, True, False, True])
    result = cm.mcnemar_exact(a, b)
    # b = 2 (a right, b wrong at 1 and 2), c = 1 (index 3); p = 2 * (C(3,0) + C(3,1)) / 8 = 1
    assert result == {
        "b_only_first_correct": 2,
        "c_only_second_correct": 1,
        "n_discordant": 3,
        "p_value": 1.0,
        "statistic": 1,
    }
    swapped = cm.mcnemar_exact(b, a)
    assert (swapped["b_only_first_correct"], swapped["c_only_second_correct"]) == (1, 2)


@pytest.mark.parametrize("b, c", [(0, 5), (2, 8), (10, 3), (25, 40), (12, 12), (0, 0)])
def test_mcnemar_matches_binomial_coefficient_sum(b, c):
    a = np.array([True] * b + [False] * c + [True] * 4 + [False] * 3)
    second = np.array([False] * b + [True] * c + [True] * 4 + [False] * 3)
    p_value = cm.mcnemar_exact(a, second)["p_value"]
    assert p_value == pytest.approx(_comb_p_value(b, c), rel=1e-12)
    if b + c:
        assert p_value == pytest.approx(binomtest(min(b, c), b + c, 0.5).pvalue, rel=1e-9)


def test_mcnemar_textbook_value():
    # Fagerland, Lydersen & Laake (2013), BMC Med Res Methodol 13:91: b=1, c=7, exact conditional p = 0.070.
    # 2 * (C(8,0) + C(8,1)) / 2^8 = 18/256 = 0.0703125
    a = np.array([True] + [False] * 7)
    result = cm.mcnemar_exact(a, ~a)
    assert result["p_value"] == pytest.approx(18 / 256)
    assert round(result["p_value"], 3) == 0.070


def _noisy_model(y: np.ndarray, accuracy: float, rng: np.random.Generator) -> np.ndarray:
    """One-hot-ish probabilities that are right with probability ``accuracy``."""
    right = rng.random(len(y)) < accuracy
    predicted = np.where(right, y, (y + rng.integers(1, 3, len(y))) % 3)
    probs = np.full((len(y), 3), 0.15)
    probs[np.arange(len(y)), predicted] = 0.7
    return probs


def test_paired_bootstrap_contains_true_difference_and_is_reproducible():
    rng = np.random.default_rng(11)
    y = rng.integers(0, 3, 600)
    probs_a, probs_b = _noisy_model(y, 0.60, rng), _noisy_model(y, 0.75, rng)
    result = cm.compare_predictions(y, probs_a, probs_b, "zero-shot", "lora", n_resamples=1000, seed=0)
    assert result["baseline"] == "zero-shot" and result["model"] == "lora" and result["n_examples"] == 600
    acc = result["differences"]["accuracy"]
    observed = np.mean(probs_b.argmax(1) == y) - np.mean(probs_a.argmax(1) == y)
    assert acc["difference"] == pytest.approx(observed)
    assert acc["ci_low"] <= 0.15 <= acc["ci_high"]  # population difference of the generating process
    assert acc["ci_low"] > 0  # a 15-point gap on 600 examples is clearly resolved
    assert set(result["differences"]) >= {"accuracy", "macro_f1", "f1", "weighted_f1", "mcc", "ece"}
    for name, diff in result["differences"].items():
        assert diff["ci_low"] <= diff["difference"] <= diff["ci_high"], name
        assert diff["difference"] == pytest.approx(diff["model_value"] - diff["baseline_value"]), name
    mcnemar = cm.mcnemar_exact(probs_a.argmax(1) == y, probs_b.argmax(1) == y)
    assert result["mcnemar"] == mcnemar and mcnemar["p_value"] < 1e-3
    small = cm.compare_predictions(y, probs_a, probs_b, "zero-shot", "lora", n_resamples=200, seed=0)
    assert cm.compare_predictions(y, probs_a, probs_b, "zero-shot", "lora", n_resamples=200, seed=0) == small
    assert cm.compare_predictions(y, probs_a, probs_b, "zero-shot", "lora", n_resamples=200, seed=1) != small


def test_bootstrap_resamples_both_models_jointly():
    rng = np.random.default_rng(5)
    y = rng.integers(0, 3, 200)
    probs_a = _noisy_model(y, 0.5, rng)
    same = cm.compare_predictions(y, probs_a, probs_a.copy(), "a", "a again", n_resamples=300)
    for diff in same["differences"].values():
        assert diff["difference"] == diff["ci_low"] == diff["ci_high"] == 0.0
    assert same["mcnemar"]["p_value"] == 1.0
    # b fixes 6 of a's mistakes and changes nothing else: every paired resample has difference >= 0.
    probs_b = probs_a.copy()
    wrong = np.flatnonzero(probs_a.argmax(1) != y)[:6]
    probs_b[wrong] = np.eye(3)[y[wrong]]
    fixed = cm.compare_predictions(y, probs_a, probs_b, "a", "b", n_resamples=300)
    assert fixed["differences"]["accuracy"]["difference"] == pytest.approx(6 / 200)
    assert fixed["differences"]["accuracy"]["ci_low"] >= 0.0


def _assert_valid_png(path) -> None:
    assert path.exists() and path.stat().st_size > 0
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = plt.imread(path)
    assert image.ndim == 3 and image.shape[0] > 0 and image.shape[1] > 0
    assert not [name for name in os.listdir(path.parent) if name.endswith(".tmp")]


def test_plots_write_valid_pngs(tmp_path):
    names = ["negative", "neutral", "positive"]
    rng = np.random.default_rng(2)
    y = rng.integers(0, 3, 120)
    probs = {"zero-shot": _noisy_model(y, 0.5, rng), "lora": _noisy_model(y, 0.8, rng)}
    metrics = {model: _metrics(y, p, names, n_resamples=100) for model, p in probs.items()}
    metrics["no-ci"] = {"accuracy": 0.4, "macro_f1": 0.3}  # missing metrics and CIs are skipped, not fatal

    written = [
        plot_metric_comparison(metrics, tmp_path / "metrics.png"),
        plot_confusion_matrices({m: metrics[m] for m in probs}, names, tmp_path / "nested" / "confusion.png"),
        plot_reliability(y, probs, tmp_path / "reliability.png"),
    ]
    assert written == [
        tmp_path / "metrics.png",
        tmp_path / "nested" / "confusion.png",
        tmp_path / "reliability.png",
    ]
    for path in written:
        _assert_valid_png(path)


def test_save_figure_leaves_nothing_behind_on_failure(tmp_path):
    fig = Figure()

    def broken_savefig(*args, **kwargs):
        raise RuntimeError("disk full")

    fig.savefig = broken_savefig
    with pytest.raises(RuntimeError, match="disk full"):
        save_figure(fig, tmp_path / "figure.png")
    assert os.listdir(tmp_path) == []
