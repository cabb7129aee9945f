"""The perturbation explainers beside the Partition explainer: occlusion, KernelSHAP and LIME.

Each one explains a tweet on the same features (words or tokens) by deleting features exactly as the Partition
explainer does (`mask_tweet`), scored by the same prefix-cached, prefix-tree value functions, so each costs only its
own evaluations. Like the Partition explainer, every model of a run is evaluated on the same masked tweets (one
`JointValueFunction` call scores them all), so two models' explanations never differ by their samples.

- `occlusion`: f(x) - f(x without feature i): n + 1 evaluations, deterministic, exact.
- `kernel`: shap's `KernelExplainer` over the binary feature mask (background: every feature deleted, so the base
  value is the empty tweet), paired sampling of coalitions (shap adds each sampled coalition's complement), seeded
  per tweet; with a budget of at least 2^n - 2 coalitions it enumerates them all and returns the exact Shapley
  values. No L1 feature selection: every feature gets a value, as with the other explainers.
- `lime`: the `lime` package's weighted ridge surrogate (`LimeBase`) on LIME's text neighbourhood (remove a
  uniformly drawn number of features, chosen at random; cosine distance x 100, kernel width 25, as
  `LimeTextExplainer` does), seeded per tweet; the surrogate's weighted R^2 is its fidelity. lime's own text
  explainer is not used because it splits words its own way (`\\W+`) and masks them with its own string edit, which
  would explain other features on other inputs than every other explainer here.

Every function returns, per model, `{"values": (features, classes), "base_values": (classes,), "evaluations":
int, ...}` with a method-specific quality measure.
"""

from __future__ import annotations

import numpy as np

from analysis.explanation.shap_values import JointValueFunction, TweetMasker, mask_tweet, seeded_numpy

LIME_KERNEL_WIDTH = 25.0  # LimeTextExplainer's default


def _masked(masker: TweetMasker, text: str, keep_rows: np.ndarray) -> list[str]:
    return [mask_tweet(masker, text, row) for row in np.asarray(keep_rows) > 0.5]


def _single_feature(joint: JointValueFunction, text: str) -> dict[str, dict]:
    """One feature: every method's value is f(x) - f(empty), exactly (the regressions have nothing to fit)."""
    out = joint.split(joint(["", text]))
    return {
        name: {"values": (p[1] - p[0])[None, :], "base_values": p[0], "full": p[1], "evaluations": 2}
        for name, p in out.items()
    }


def occlusion_values(text: str, n_features: int, joint: JointValueFunction, masker: TweetMasker) -> dict[str, dict]:
    """Leave-one-out attributions: values[i, c] = p_c(x) - p_c(x without feature i); base_values = p(x), the output
    every removal is measured from (occlusion values are not additive)."""
    keep = np.vstack([np.ones(n_features, dtype=bool), ~np.eye(n_features, dtype=bool)])
    with joint.remembering():
        scored = joint.split(joint(_masked(masker, text, keep)))
    return {
        name: {"values": p[0][None, :] - p[1:], "base_values": p[0], "full": p[0], "evaluations": n_features + 1}
        for name, p in scored.items()
    }


def kernel_values(
    text: str, n_features: int, joint: JointValueFunction, masker: TweetMasker, budget: int, seed: int
) -> dict[str, dict]:
    """KernelSHAP values (see the module docstring); `additivity_error` is |base + sum(values) - f(x)| at the
    largest class, f(x) as the explainer scored it (the explainer enforces it; this records that it did)."""
    import shap

    if n_features == 1:
        single = _single_feature(joint, text)
        return {name: {**row, "additivity_error": 0.0, "exact": True} for name, row in single.items()}
    evaluations = 0

    def model(masks: np.ndarray) -> np.ndarray:
        nonlocal evaluations
        evaluations += len(masks)
        return joint(_masked(masker, text, masks))

    with joint.remembering(), seeded_numpy(seed):
        explainer = shap.KernelExplainer(model, np.zeros((1, n_features)))
        values = np.asarray(
            explainer.shap_values(np.ones((1, n_features)), nsamples=budget, l1_reg=False, silent=True), dtype=float
        )
        full = np.asarray(explainer.fx, dtype=float).reshape(-1)  # f(x) as the explainer scored it
    values = values.reshape(n_features, -1)  # (1, features, outputs) -> (features, outputs)
    base = np.asarray(explainer.expected_value, dtype=float).reshape(-1)
    exact = budget >= 2**n_features - 2
    values_by, base_by, full_by = joint.split(values), joint.split(base), joint.split(full)
    return {
        name: {
            "values": values_by[name],
            "base_values": base_by[name],
            "full": full_by[name],
            "evaluations": evaluations,
            "additivity_error": float(np.abs(base_by[name] + values_by[name].sum(axis=0) - full_by[name]).max()),
            "exact": bool(exact),
        }
        for name in joint.names
    }


def lime_neighbourhood(n_features: int, samples: int, rng: np.random.RandomState) -> np.ndarray:
    """LIME's text neighbourhood: the tweet itself, then `samples - 1` masks each deleting a uniformly drawn number
    (1..n) of randomly chosen features (`LimeTextExplainer.__data_labels_distances`)."""
    data = np.ones((samples, n_features))
    for row, size in enumerate(rng.randint(1, n_features + 1, samples - 1), start=1):
        data[row, rng.choice(n_features, size, replace=False)] = 0
    return data


def lime_values(
    text: str, n_features: int, joint: JointValueFunction, masker: TweetMasker, samples: int, seed: int
) -> dict[str, dict]:
    """LIME surrogate weights per class; `base_values` are the surrogate's intercepts (its prediction with every
    feature deleted) and `r2` its weighted R^2 per class (the fidelity of the surrogate)."""
    from lime.lime_base import LimeBase
    from sklearn.metrics.pairwise import pairwise_distances

    if n_features == 1:
        single = _single_feature(joint, text)
        return {name: {**row, "r2": [1.0] * len(row["full"])} for name, row in single.items()}
    rng = np.random.RandomState(seed)
    data = lime_neighbourhood(n_features, samples, rng)
    with joint.remembering():
        labels = joint.split(joint(_masked(masker, text, data)))
    distances = pairwise_distances(data, data[:1], metric="cosine").ravel() * 100

    def kernel(d: np.ndarray) -> np.ndarray:
        return np.sqrt(np.exp(-(d**2) / LIME_KERNEL_WIDTH**2))

    surrogate = LimeBase(kernel, random_state=rng)
    out = {}
    for name, probabilities in labels.items():
        classes = probabilities.shape[1]
        values, base, r2 = np.zeros((n_features, classes)), np.zeros(classes), []
        for c in range(classes):
            intercept, weights, score, _ = surrogate.explain_instance_with_data(
                data, probabilities, distances, c, n_features, feature_selection="none"
            )
            base[c] = intercept
            for feature, weight in weights:
                values[feature, c] = weight
            r2.append(float(score))
        out[name] = {"values": values, "base_values": base, "full": probabilities[0], "evaluations": samples, "r2": r2}
    return out
