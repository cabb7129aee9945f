"""From per-tweet records to the cross-explainer results: XAI properties, explainer agreement, per-explainer verdicts.

The glue only: it reads each explainer's values out of the records (`method_values`) and hands vectors to the pure
functions of `analysis.statistics` (`xai_properties`, `explanations`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from analysis.explanation.methods import DETERMINISTIC, EDIT_MEANING
from analysis.statistics import xai_properties as props
from analysis.statistics.explanations import compare_models

FIDELITY = {
    "partition": ("additivity_error", "|base value + sum of values - f(x)| at the target, f(x) from its own forward"),
    "kernel": ("additivity_error", "|base value + sum of values - f(x)|, largest over classes"),
    "lime": ("r2", "weighted R^2 of the LIME surrogate at the target class"),
    "occlusion": (None, "leave-one-out values are not additive: its fidelity is the deletion AOPC"),
    "integrated_gradients": (
        "completeness_error",
        "|sum of attributions - (f(x) - f(baseline))|, largest over classes",
    ),
}
PROPERTY_DEFINITIONS = {
    "selectivity": "Gini of |attribution| (0 even, (n-1)/n on one feature)",
    "compactness": "share of the features needed to hold 80 % of the total |attribution| (lower: more compact)",
    "contrastivity": "(1 - cosine(target-class, runner-up-class attributions)) / 2",
    "target_sensitivity": "mean Jensen-Shannon divergence (base 2) between the |attribution| distributions of every "
    "two classes",
    "fidelity": "the explainer's own exactness (see `measure`)",
    "deletion_aopc": "comprehensiveness AOPC: mean drop of the target probability with the top 10-50 % features "
    "deleted (higher: more faithful)",
    "sufficiency_aopc": "mean drop with only the top 10-50 % kept (lower: more faithful)",
    "monotonicity": "share of the deletion curve's steps on which the drop does not shrink",
    "stability": "Spearman of the attributions before and after a meaning-preserving edit, on the kept features",
    "identity": "Spearman of two explanations of the same tweet with different explainer seeds",
    "seconds_per_explanation": "wall seconds per tweet and model (jointly scored models share the time)",
    "evaluations_per_explanation": "model evaluations (forward passes; gradient steps for integrated gradients) "
    "per tweet and model",
}


def method_values(record: dict, model: str, method: str) -> np.ndarray:
    """One explainer's values of one model for one tweet, (features, classes)."""
    row = record["models"][model]
    chosen = row["values"] if method == "partition" else row["explainers"][method]["values"]
    return np.asarray(chosen, dtype=float)


def _deletion(record: dict, model: str, method: str) -> dict:
    row = record["models"][model]
    return row["faithfulness"] if method == "partition" else row["explainers"][method]["deletion"]


def _fidelity(record: dict, model: str, method: str) -> float | None:
    key = FIDELITY[method][0]
    if key is None:
        return None
    row = record["models"][model]
    value = row[key] if method == "partition" else row["explainers"][method][key]
    return float(value[row["target"]]) if isinstance(value, list) else float(value)


def _runner_up(probabilities: Sequence[float], target: int) -> int:
    order = [int(c) for c in np.argsort(-np.asarray(probabilities, dtype=float), kind="stable")]
    return next(c for c in order if c != target)


def _per_tweet(record: dict, model: str, method: str) -> dict:
    row = record["models"][model]
    t = row["target"]
    values = method_values(record, model, method)
    deletion = _deletion(record, model, method)
    n_models = len(record["models"])
    cost = record["explainers"][method]
    out = {
        "selectivity": props.selectivity(values[:, t]),
        "compactness": props.compactness(values[:, t]),
        "contrastivity": props.contrastivity(values[:, t], values[:, _runner_up(row["probabilities"], t)]),
        "target_sensitivity": props.target_sensitivity(values),
        "fidelity": _fidelity(record, model, method),
        "deletion_aopc": deletion["comprehensiveness"]["aopc"],
        "sufficiency_aopc": deletion["sufficiency"]["aopc"],
        "monotonicity": props.monotonicity(deletion["comprehensiveness"]["curve"], deletion["comprehensiveness"]["k"]),
        # explainers that score every model in one call share their time; gradients run per model
        "seconds_per_explanation": cost["seconds"] / (1 if method == "integrated_gradients" else n_models),
        "evaluations_per_explanation": float(cost["evaluations"]),
    }
    reruns = (record.get("reruns") or {}).get(method)
    if reruns:
        out["identity"] = props.rank_agreement(values[:, t], np.asarray(reruns["identity"][model])[:, t])
        stability = [
            props.rank_agreement(values[edit["kept"], t], np.asarray(edit["models"][model], dtype=float)[:, t])
            for edit in reruns["edits"]
        ]
        stability = [s for s in stability if s is not None]
        out["stability"] = float(np.mean(stability)) if stability else None
    return out


def xai_properties(records: list[dict], models: list[str], explainers: list[str], n_resamples: int, seed: int) -> dict:
    """`xai_properties.json`: per model and explainer, each property's mean over tweets with a bootstrap CI."""
    measured_reruns = all("reruns" in r for r in records)
    result: dict = {
        "definitions": PROPERTY_DEFINITIONS,
        "fidelity_measures": {method: FIDELITY[method][1] for method in explainers},
        "stability_edits": EDIT_MEANING,
        "deterministic_explainers": [m for m in explainers if m in DETERMINISTIC],
        "n_examples": len(records),
        "models": {},
    }
    if not measured_reruns:
        result["not_measured"] = {
            "stability": "pass --explain.measure_stability true (explains every tweet again, and its edits)",
            "identity": "pass --explain.measure_stability true",
        }
    for model in models:
        result["models"][model] = {}
        for method in explainers:
            rows = [_per_tweet(record, model, method) for record in records]
            result["models"][model][method] = {
                name: props.summarize([row.get(name) for row in rows], n_resamples, seed)
                for name in PROPERTY_DEFINITIONS
                if name in rows[0]
            }
    return result


def explainer_agreement(records: list[dict], models: list[str], explainers: list[str], n_resamples: int, seed: int):
    """Per model: Spearman and top-5 overlap between every two explainers at the model's own target."""
    return {
        model: props.explainer_agreement(
            {
                method: [method_values(r, model, method)[:, r["models"][model]["target"]] for r in records]
                for method in explainers
            },
            n_resamples,
            seed,
        )
        for model in models
    }


def explainer_verdicts(
    records: list[dict], pairs: dict[str, tuple[str, str]], explainers: list[str], n_resamples: int, seed: int
) -> dict:
    """Each model comparison recomputed under every explainer, at the common target, with one sentence each, and
    whether the direction of the change in mean |attribution| depends on the method."""
    out = {}
    tokens = [r["feature_names"] for r in records]
    for key, (a, b) in pairs.items():
        rows, directions = {}, {}
        for method in explainers:
            first = [method_values(r, a, method)[:, r["comparison_target"]] for r in records]
            second = [method_values(r, b, method)[:, r["comparison_target"]] for r in records]
            result = compare_models(first, second, tokens, n_resamples, seed, names=(a, b))
            test = result["paired_tests"]["mean_abs"]
            direction = change_direction(test)
            directions[method] = direction
            rows[method] = {
                "spearman": result["spearman"],
                "top5_overlap": result["top5_overlap"],
                "mean_abs": test,
                "direction": direction,
                "verdict": _verdict(method, b, a, direction, test, result["spearman"]),
            }
        same = len(set(directions.values())) == 1
        out[key] = {
            "models": [a, b],
            "explainers": rows,
            "consistent": same,
            "conclusion": (
                f"every explainer gives the same direction: {next(iter(directions.values()))}"
                if same
                else "the conclusion depends on the method: " + "; ".join(f"{m}: {d}" for m, d in directions.items())
            ),
        }
    return out


UNDECIDED = "the two tests disagree"


def change_direction(test: dict) -> str:
    """The direction of a paired change in mean |attribution| (`paired_tests["mean_abs"]`): larger or smaller when the
    bootstrap CI of the difference excludes 0 and the Wilcoxon test rejects at 0.05; "the two tests disagree" when
    only one of them does; no detectable change when neither does."""
    p = test.get("wilcoxon_p")
    ci_excludes_zero = test["ci_low"] > 0 or test["ci_high"] < 0
    rejects = p is not None and p < 0.05
    if ci_excludes_zero and rejects:
        return "larger" if test["mean_difference"] > 0 else "smaller"
    if p is not None and ci_excludes_zero != rejects:
        return UNDECIDED
    return "no detectable change"


def _verdict(method: str, second: str, first: str, direction: str, test: dict, spearman: dict) -> str:
    p = test.get("wilcoxon_p")
    if direction == UNDECIDED:
        which = "the CI excludes 0, Wilcoxon does not reject" if p >= 0.05 else "Wilcoxon rejects, the CI includes 0"
        change = f"undecided whether mean |attribution| changes from {first} to {second} ({which})"
    elif direction == "no detectable change":
        change = f"no detectable change in mean |attribution| from {first} to {second}"
    else:
        change = f"{second}'s mean |attribution| is {direction} than {first}'s"
    rho = spearman.get("mean")
    rho_text = (
        f"; rank agreement Spearman {rho:.2f} [{spearman['ci_low']:.2f}, {spearman['ci_high']:.2f}]"
        if rho is not None
        else ""
    )
    return (
        f"{method}: {change} (difference {test['mean_difference']:+.3g} [{test['ci_low']:+.3g}, "
        f"{test['ci_high']:+.3g}], Wilcoxon p = {p:.2g})" + rho_text
        if p is not None
        else f"{method}: {change} ({test.get('wilcoxon_note') or 'no test'})" + rho_text
    )
