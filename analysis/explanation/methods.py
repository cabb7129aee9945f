"""Every attribution method of a run behind one call, and what the XAI properties need beyond the values.

`AttributionMethods.explain(method, text, seed)` returns, per model, the method's values (features, classes), base
values, evaluations and its own quality figure (Partition additivity, KernelSHAP additivity, LIME R^2,
integrated-gradient completeness). The same object re-explains a tweet with another seed (identity) and explains
meaning-preserving edits of it (stability), and draws each method's deletion curves (fidelity, monotonicity).
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import numpy as np

from analysis.explanation.gradients import integrated_gradients
from analysis.explanation.perturbation import kernel_values, lime_values, occlusion_values
from analysis.explanation.shap_values import JointValueFunction, TweetMasker, explain_tweet, mask_tweet
from analysis.settings import ExplainSettings
from analysis.statistics.explanations import FAITHFULNESS_MODES, aopc

DETERMINISTIC = ("occlusion", "integrated_gradients")  # their seed changes nothing (the identity check shows it)
IDENTITY_SEED_OFFSET = 7919  # the second explanation's seed, far from any tweet's own (seed + index)
EDITS = ("case", "drop_least")
EDIT_MEANING = {
    "case": "the tweet lower-cased (or, if it has no upper case, its first letter capitalised)",
    "drop_least": "the feature with the smallest |attribution| (each model's own class, summed over the models) "
    "deleted",
}


class AttributionMethods:
    """The run's explainers on one masker, one joint value function and (for gradients) the module and specs."""

    def __init__(
        self, masker: TweetMasker, value_functions: Mapping, settings: ExplainSettings, module=None, specs=None
    ):
        self.masker, self.joint, self.settings = masker, JointValueFunction(value_functions), settings
        self.module, self.specs = module, specs or {}

    def n_features(self, text: str) -> int:
        return len(self.masker.feature_names(text)[0])

    def explain(self, method: str, text: str, seed: int, max_evals: int | None = None) -> dict:
        """`{"models": {name: {values, base_values, ...}}, "evaluations", "seconds"}` (all models together)."""
        settings, n = self.settings, self.n_features(text)
        start = time.perf_counter()
        if method == "partition":
            explained = explain_tweet(text, self.joint.value_functions, self.masker, max_evals or 2, seed=seed)
            models = {
                name: {"values": row["values"], "base_values": row["base_values"]}
                for name, row in explained["models"].items()
            }
            evaluations = explained["evals_used"]
        elif method == "integrated_gradients":
            models = {
                name: integrated_gradients(
                    self.module, spec, text, self.masker, settings.ig_steps, settings.forward_batch_size
                )
                for name, spec in self.specs.items()
            }
            evaluations = next(iter(models.values()))["evaluations"]
        else:
            if method == "occlusion":
                models = occlusion_values(text, n, self.joint, self.masker)
            elif method == "kernel":
                models = kernel_values(text, n, self.joint, self.masker, settings.kernel_samples, seed)
            elif method == "lime":
                models = lime_values(text, n, self.joint, self.masker, settings.lime_samples, seed)
            else:
                raise ValueError(f"unknown explainer {method!r}")
            evaluations = next(iter(models.values()))["evaluations"]
        for row in models.values():
            row.pop("full", None)
            row.pop("evaluations", None)
        return {"models": models, "evaluations": int(evaluations), "seconds": time.perf_counter() - start}

    def deletion_curves(self, text: str, attributions: Mapping[str, np.ndarray], targets: Mapping[str, int]) -> dict:
        """Per model, comprehensiveness and sufficiency AOPC of its attributions at its target (no random baseline:
        the partition faithfulness has it), every model's masks scored in one joint call."""
        out = {}
        for name, values in attributions.items():
            function = self.joint.value_functions[name]
            full = float(function([text])[0][targets[name]])

            def score(keep_masks, function=function, target=targets[name]):
                return function([mask_tweet(self.masker, text, keep) for keep in keep_masks])[:, target]

            out[name] = {mode: aopc(score, values, full, mode=mode) for mode in FAITHFULNESS_MODES}
        return out

    def edits(self, text: str, magnitude: np.ndarray) -> list[dict]:
        """Meaning-preserving edits of the tweet (word features only), each with the original features it keeps;
        `magnitude`: per feature, the |attribution| summed over the explained models (one edit serves them all)."""
        n = len(magnitude)
        if self.masker.features != "words":
            return []
        lowered = text.lower()
        cased = lowered if lowered != text else text[:1].upper() + text[1:]
        out = []
        if cased != text and len(cased.split()) == n:
            out.append({"edit": "case", "text": cased, "kept": list(range(n))})
        if n >= 3:
            keep = np.ones(n, dtype=bool)
            keep[int(np.argmin(magnitude))] = False  # the first of equal smallest
            out.append(
                {
                    "edit": "drop_least",
                    "text": mask_tweet(self.masker, text, keep),
                    "kept": np.flatnonzero(keep).tolist(),
                }
            )
        return out
