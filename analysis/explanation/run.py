"""Explain baselines and the fine-tuned model with SHAP on the first N eval tweets; statistics, plots, HTML.

The explained models are `analysis.models` names: by default raw zero-shot and, given an adapter, fine-tuned;
any baseline (calibrated zero-shot, k-shot) can be added. All are explained on the same coalitions, and each
baseline is compared with the fine-tuned model (without an adapter: each other baseline with the first).

Every finished example is written at once to the progress store (`analysis.explanation.progress`); a rerun with
the same settings skips those and recomputes nothing, and shards split the examples across processes. The final
files are written atomically at the end. A run is a short sequence over small objects: the plan checked before any
model loads (`check_explanation`), the tweets as the models see them (`ExplainedTweets`), the store, the explainer
of one example (`ExampleExplainer`), and the notes it logs (`RunNotes`).
"""

from __future__ import annotations

import hashlib
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import shap

from analysis.explanation.checks import ExplanationPlan, check_explanation
from analysis.explanation.faithfulness import (
    FRACTIONS,
    compare_model_faithfulness,
    example_faithfulness,
    summarize_model_faithfulness,
)
from analysis.explanation.methods import IDENTITY_SEED_OFFSET, AttributionMethods
from analysis.explanation.progress import ProgressStore
from analysis.explanation.properties import explainer_agreement, explainer_verdicts, method_values, xai_properties
from analysis.explanation.shap_values import (
    BUDGET_NOTE,
    MASKS_PER_ROUND,
    LabelProbabilities,
    TweetMasker,
    budget_resolution,
    evals_for_exact_owen,
    explain_tweet,
    explanation_file_content,
    fit_to_budget,
    mask_tweet,
    model_value_functions,
    normalize_tweet,
    tweet_masker,
)
from analysis.models import (
    FINE_TUNED,
    K_SHOT,
    MODEL_ORDER,
    display_name,
    model_specs,
    release_memory,
    to_device,
)
from analysis.report.explanations_page import explanations_html
from analysis.report.plots import plot_deletion_curves, plot_explainer_agreement, plot_top_tokens
from analysis.report.tables import analysis_summary
from analysis.report.tensorboard import write_tensorboard
from analysis.settings import (
    EXPLAINERS,
    ExplainSettings,
)
from analysis.statistics.explanations import PAIRED_EXAMPLE_STATISTICS, compare_models, model_statistics
from analysis.statistics.fine_tuning_effect import MIN_STRATUM, STRATA_DEFINITION, fine_tuning_effect, strata_members
from analysis.statistics.shapley import MAX_EXACT_FEATURES, all_coalitions, shapley_values
from analysis.statistics.shapley import distance as shapley_distance
from foundation.atomic_files import write_json_atomic, write_text_atomic
from foundation.errors import UserInputError
from foundation.output_names import (
    AGREEMENT_PLOT,
    DELETION_PLOT,
    EXPLANATIONS_FILE,
    INTERPRETABILITY_FILE,
    PROGRESS_DIR,
    TENSORBOARD_DIR,
    XAI_PROPERTIES_FILE,
    explanation_file,
    shap_file,
    shap_summary_plot,
)

if TYPE_CHECKING:
    from analysis.configuration import LoadedRun

ADDITIVITY_TOLERANCE = 1e-4
BUDGETS = {"kernel_samples": "kernel", "lime_samples": "lime", "ig_steps": "integrated_gradients"}
TOP_TOKENS = 20


@dataclass
class AnalysisResult:
    output_dir: Path
    metrics: dict
    notes: list[str]
    files: list[Path] = field(default_factory=list)
    computed: list[int] = field(default_factory=list)  # example indices explained in this run
    resumed: list[int] = field(default_factory=list)  # example indices read back from .progress
    models: list[str] = field(default_factory=list)
    merged: bool = True  # False for a shard whose final files another shard (or a later run) writes
    removed_stale: list[Path] = field(default_factory=list)


def adapter_digest(module) -> str:
    """Digest of the LoRA weights in the module: a retrained adapter at the same path invalidates old progress."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.trainable_state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


# ---- one example --------------------------------------------------------------------------------------------------
class ExampleExplainer:
    """Explains one tweet with every model on the same coalitions: SHAP values, targets, additivity, faithfulness,
    and every other explainer of the run (`AttributionMethods`), with the reruns stability and identity need."""

    def __init__(self, methods: AttributionMethods, settings: ExplainSettings, seed: int):
        self.methods, self.masker, self.value_functions = methods, methods.masker, methods.joint.value_functions
        self.settings, self.seed = settings, seed
        self.explainers = list(dict.fromkeys(settings.explainers))
        self.reference = reference_model(list(self.value_functions))

    def _other_methods(self, text: str, index: int, targets: Mapping) -> tuple[dict, dict]:
        """Per model, each other explainer's values and deletion curves; per explainer its cost."""
        per_model: dict[str, dict] = {name: {} for name in self.value_functions}
        cost = {}
        for method in self.explainers:
            if method == "partition":
                continue
            explained = self.methods.explain(method, text, self.seed + index)
            at_target = {name: row["values"][:, targets[name]] for name, row in explained["models"].items()}
            curves = self.methods.deletion_curves(text, at_target, targets)
            for name, row in explained["models"].items():
                per_model[name][method] = {**row, "deletion": curves[name]}
            cost[method] = {"evaluations": explained["evaluations"], "seconds": explained["seconds"]}
        return per_model, cost

    def _reruns(self, text: str, index: int, values: Mapping[str, Mapping[str, np.ndarray]], targets: Mapping) -> dict:
        """Per explainer: the tweet explained again with another seed (identity) and its edits explained (stability)."""
        out = {}

        def budget(tweet: str) -> int:
            return tweet_budget(self.masker, tweet, self.settings)[0]

        for method in self.explainers:
            again = self.methods.explain(method, text, self.seed + index + IDENTITY_SEED_OFFSET, budget(text))
            magnitude = sum(np.abs(values[name][method][:, targets[name]]) for name in self.value_functions)
            edits = []
            for edit in self.methods.edits(text, magnitude):
                explained = self.methods.explain(method, edit["text"], self.seed + index, budget(edit["text"]))
                edits.append({**edit, "models": {n: r["values"] for n, r in explained["models"].items()}})
            out[method] = {"identity": {n: r["values"] for n, r in again["models"].items()}, "edits": edits}
        return out

    def explain(self, index: int, text: str, gold: int) -> dict:
        """The record of one (non-empty) tweet."""
        value_functions, seed = self.value_functions, self.seed
        max_evals, capped = tweet_budget(self.masker, text, self.settings)
        full = {name: fn([text])[0] for name, fn in value_functions.items()}
        predicted = {name: int(np.argmax(p)) for name, p in full.items()}
        targets = predicted if self.settings.target == "predicted" else {name: gold for name in value_functions}
        # Every comparison of two models reads one class per tweet: the gold label or the reference's prediction.
        common = gold if self.settings.comparison_target == "gold" else predicted[self.reference]
        start = time.perf_counter()
        explained = explain_tweet(text, value_functions, self.masker, max_evals, seed=seed + index)
        seconds = time.perf_counter() - start
        n_tokens = len(explained["data"])
        others, cost = self._other_methods(text, index, targets)
        models = {}
        for k, (name, fn) in enumerate(value_functions.items()):
            values, base = explained["models"][name]["values"], explained["models"][name]["base_values"]
            t = targets[name]
            # f(x) from its own forward pass, not the explainer's: the check covers the whole pipeline.
            errors = np.abs(base + values.sum(axis=0) - full[name])
            faithfulness = {
                c: example_faithfulness(
                    text,
                    values[:, c],
                    c,
                    float(full[name][c]),
                    fn,
                    self.masker,
                    np.random.default_rng([seed, index, k] if c == t else [seed, index, k, 1]),
                    random_orders=self.settings.random_orders,
                )
                for c in dict.fromkeys((t, common))
            }
            models[name] = {
                "values": values,
                "base_values": base,
                "target": t,
                "predicted": predicted[name],
                "probabilities": full[name],
                "additivity_error": float(errors[t]),
                "additivity_error_all_classes": float(errors.max()),
                "shared_credit_fraction": float(explained["models"][name]["shared_credit_fraction"][t]),
                "faithfulness": faithfulness[t],
                "comparison_faithfulness": faithfulness[common],  # at the comparison target
                "explainers": others[name],
            }
        record = {
            "index": index,
            "text": text,
            "gold": gold,
            "comparison_target": common,
            "n_tokens": n_tokens,
            "data": explained["data"],
            "feature_names": explained["feature_names"],
            "max_evals": max_evals,
            "capped": capped,
            "evals_used": explained["evals_used"],
            "evals_for_exact_owen": explained["evals_for_exact_owen"],
            "resolution": budget_resolution(
                n_tokens, max_evals, explained["evals_used"], explained["evals_for_exact_owen"]
            ),
            "seconds": seconds,
            "explainers": {"partition": {"evaluations": explained["evals_used"], "seconds": seconds}, **cost},
            "models": models,
        }
        if self.settings.measure_stability:
            values = {name: {m: method_values(record, name, m) for m in self.explainers} for name in models}
            record["reruns"] = self._reruns(text, index, values, targets)
        return record


# ---- statistics -------------------------------------------------------------------------------------------------
def reference_model(models: list[str]) -> str:
    """The model every other is compared with: the fine-tuned one, or (without an adapter) the first baseline."""
    return FINE_TUNED if FINE_TUNED in models else models[0]


def compared_pairs(models: list[str]) -> dict[str, tuple[str, str]]:
    """`{"<reference>_vs_<baseline>": (baseline, reference)}`: each baseline against the reference model; the names
    match `comparison.json`'s."""
    reference = reference_model(models)
    return {f"{reference}_vs_{other}": (other, reference) for other in models if other != reference}


def _own_target_values(records: list[dict], model: str) -> list[np.ndarray]:
    """Each tweet's values of `model` for the class its own statistics explain (`target`)."""
    return [np.asarray(r["models"][model]["values"], dtype=float)[:, r["models"][model]["target"]] for r in records]


def _at_comparison_target(records: list[dict], model: str, field: str) -> list:
    """A per-class field of each record (`values`, `base_values`, `probabilities`) at the tweet's common
    `comparison_target`: a vector per tweet for `values`, a number for the others."""
    return [np.asarray(r["models"][model][field], dtype=float)[..., r["comparison_target"]] for r in records]


def comparison_statistics(records: list[dict], a: str, b: str, n_resamples: int, seed: int) -> dict:
    """Two models' explanations on the common target of every tweet, overall and per stratum of correctness."""
    tokens = [r["feature_names"] for r in records]
    first, second = _at_comparison_target(records, a, "values"), _at_comparison_target(records, b, "values")
    result = compare_models(first, second, tokens, n_resamples=n_resamples, seed=seed, top_k=TOP_TOKENS, names=(a, b))
    members = strata_members(
        [r["models"][a]["predicted"] == r["gold"] for r in records],
        [r["models"][b]["predicted"] == r["gold"] for r in records],
    )
    strata = {"definition": STRATA_DEFINITION, "min_examples": MIN_STRATUM}
    for name, rows in members.items():
        if len(rows) < MIN_STRATUM:
            strata[name] = {"n_examples": len(rows), "note": f"fewer than {MIN_STRATUM} tweets: no statistics"}
            continue
        pick = [tokens[k] for k in rows]
        stats_ = compare_models(
            [first[k] for k in rows], [second[k] for k in rows], pick, n_resamples, seed, TOP_TOKENS, (a, b)
        )
        strata[name] = {key: stats_[key] for key in (*PAIRED_EXAMPLE_STATISTICS, "n_examples")}
    result["strata"] = strata
    return result


def effect_statistics(records: list[dict], a: str, b: str, n_resamples: int, seed: int) -> dict:
    """The fine-tuning effect (second minus first) on the common target, per tweet and per word type."""
    effect = fine_tuning_effect(
        _at_comparison_target(records, a, "values"),
        _at_comparison_target(records, b, "values"),
        [float(v) for v in _at_comparison_target(records, a, "base_values")],
        [float(v) for v in _at_comparison_target(records, b, "base_values")],
        [float(v) for v in _at_comparison_target(records, a, "probabilities")],
        [float(v) for v in _at_comparison_target(records, b, "probabilities")],
        [r["feature_names"] for r in records],
        n_resamples=n_resamples,
        seed=seed,
    )
    for row, record in zip(effect["per_example"], records):
        row["index"], row["target"] = record["index"], record["comparison_target"]
    effect["models"] = [a, b]
    return effect


def interpretability_metrics(
    records: list[dict], models: list[str], settings: dict, notes: list[str], n_resamples: int, seed: int
) -> dict:
    """Everything measured, as one JSON-ready dict: per-model statistics, comparisons, faithfulness, checks.

    `comparison` (the original's key) holds the first pair of `comparisons`: raw zero-shot vs fine-tuned by default.
    """
    tokens = [r["feature_names"] for r in records]
    values = {model: _own_target_values(records, model) for model in models}
    faithfulness_rows = {model: [r["models"][model]["faithfulness"] for r in records] for model in models}
    common_faithfulness = {m: [r["models"][m]["comparison_faithfulness"] for r in records] for m in models}
    additivity = {model: max(r["models"][model]["additivity_error"] for r in records) for model in models}
    largest = max(additivity.values())
    resolutions = [r["resolution"] for r in records]
    pairs = compared_pairs(models)
    comparisons = {key: comparison_statistics(records, a, b, n_resamples, seed) for key, (a, b) in pairs.items()}
    metrics = {
        "settings": settings,
        "notes": notes,
        "n_examples": len(records),
        "models": list(models),
        "target": {
            "source": settings["target"],
            "meaning": "per-model statistics explain each model's own target class (`source`); every comparison of "
            "two models, the faithfulness comparisons and the fine-tuning effect use one common class per tweet "
            "(`comparison_target`)",
            "comparison_target": settings["comparison_target"],
            # the classes the comparisons actually read for the two models: the same by construction
            "same_target_fraction": {key: 1.0 for key in pairs},
            "own_target_agreement": {
                key: float(np.mean([r["models"][a]["target"] == r["models"][b]["target"] for r in records]))
                for key, (a, b) in pairs.items()
            },
            "per_example": [
                {
                    "index": r["index"],
                    "gold": r["gold"],
                    "comparison_target": r["comparison_target"],
                    **{m: r["models"][m]["target"] for m in models},
                }
                for r in records
            ],
        },
        "additivity": {
            "max_abs_error": largest,
            "per_model": additivity,
            "tolerance": ADDITIVITY_TOLERANCE,
            "within_tolerance": largest < ADDITIVITY_TOLERANCE,
            "definition": "|base value + sum of SHAP values - f(x)| for the target class, f(x) from its own forward",
        },
        "budget": {
            "max_evals": settings["max_evals"],
            "max_evals_cap": settings["max_evals_cap"],
            "capped_examples": [r["index"] for r in records if r.get("capped")],
            "meaning": BUDGET_NOTE,
            "counts": {name: resolutions.count(name) for name in ("exact", "approximate", "coarse")},
            "mean_shared_credit_fraction": {
                model: float(np.mean([r["models"][model]["shared_credit_fraction"] for r in records]))
                for model in models
            },
            "per_example": [
                {
                    **{
                        key: r.get(key)
                        for key in (
                            "index",
                            "n_tokens",
                            "max_evals",
                            "capped",
                            "evals_used",
                            "evals_for_exact_owen",
                            "resolution",
                        )
                    },
                    "shared_credit_fraction": {m: r["models"][m]["shared_credit_fraction"] for m in models},
                }
                for r in records
            ],
        },
        **{model: model_statistics(values[model], tokens, top_k=TOP_TOKENS) for model in models},
        "faithfulness": {
            "fractions": list(FRACTIONS),
            "random_orders_per_example": settings["random_orders"],
            **{m: summarize_model_faithfulness(faithfulness_rows[m], n_resamples, seed) for m in models},
            **{
                key: compare_model_faithfulness(
                    common_faithfulness[a], common_faithfulness[b], n_resamples, seed, (a, b)
                )
                for key, (a, b) in pairs.items()
            },
        },
        "timing": {
            "seconds_per_example": [r["seconds"] for r in records],
            "note": f"SHAP time per example for all {len(models)} models together (faithfulness excluded); resumed "
            "examples keep the time of the run that computed them",
        },
    }
    explainers = settings["explainers"]
    if len(explainers) > 1:
        metrics["explainer_agreement"] = explainer_agreement(records, models, explainers, n_resamples, seed)
        if pairs:
            metrics["explainer_verdicts"] = explainer_verdicts(records, pairs, explainers, n_resamples, seed)
    if comparisons:
        metrics["comparison"] = next(iter(comparisons.values()))
        metrics["comparisons"] = comparisons
        metrics["fine_tuning_effect"] = {
            key: effect_statistics(records, a, b, n_resamples, seed) for key, (a, b) in pairs.items()
        }
    return metrics


def tweet_budget(masker: TweetMasker, text: str, settings: ExplainSettings) -> tuple[int, bool]:
    """The evaluations one tweet gets, and whether `auto` had to cap them below what exact values need."""
    if settings.max_evals != "auto":
        return int(settings.max_evals), False
    exact = evals_for_exact_owen(masker.clustering(text)) if len(masker.data_transform(text)[0]) > 1 else 2
    return min(exact, settings.max_evals_cap), exact > settings.max_evals_cap


def budget_warning(records: list[dict], models: list[str], max_evals: int | str) -> str | None:
    """What a too-small --shap-max-evals did to these explanations, in one sentence (None when nothing)."""
    shared = [r["models"][m]["shared_credit_fraction"] for r in records for m in models]
    coarse = [r for r in records if r["resolution"] == "coarse"]
    if not coarse and max(shared) == 0:
        return None
    needed = sorted(r["evals_for_exact_owen"] for r in records)
    capped = [r["index"] for r in records if r.get("capped")]
    sentence = f"with --shap-max-evals {max_evals}, "
    if capped:
        sentence += (
            f"{len(capped)} of {len(records)} tweets needed more evaluations for exact values than "
            f"--explain.max_evals_cap allows (examples {', '.join(map(str, capped))}), and "
        )
    if coarse:
        longest = max(r["n_tokens"] for r in coarse)
        sentence += (
            f"{len(coarse)} of {len(records)} tweets have too many features for even one split of every group "
            f"(the longest, {longest} features, needs {2 * longest - 1}), and "
        )
    return sentence + (
        f"on average {100 * np.mean(shared):.0f}% of the target-class credit sits on groups of features shap had no "
        f"budget to split, shared equally by their features (the values still add up; exact values need "
        f"{needed[len(needed) // 2]} evaluations for the median tweet, {needed[-1]} for the longest; see "
        f"budget.meaning in {INTERPRETABILITY_FILE})"
    )


# ---- the whole run ------------------------------------------------------------------------------------------------
class RunNotes(list):
    """The notes a run records in its metrics, each logged once when it is added."""

    def __init__(self, log: Callable[[str], None]):
        super().__init__()
        self.log = log

    def add(self, note: str, level: str = "note") -> None:
        self.append(note)
        self.log(f"{level}: {note}")


class ExplainedTweets:
    """The eval tweets as every explained model sees them: normalised, cut to the tightest prompt's token budget."""

    def __init__(self, examples, encoder, budget: int):
        self.examples, self.encoder, self.budget = examples, encoder, budget

    def text(self, index: int) -> tuple[str | None, str | None]:
        """The tweet to explain (None when it has no text) and the note it needs, if any."""
        text, truncated = fit_to_budget(self.encoder, normalize_tweet(self.examples[index].text), self.budget)
        if not text or not self.encoder.tweet_ids(text):
            return None, f"example {index} has an empty tweet; skipped"
        if truncated:
            return text, f"example {index} is longer than the prompt allows; explained the tokens the model sees"
        return text, None


class ExampleRecords:
    """Each example's record: read back from the progress store, else explained and saved at once. `computed` and
    `resumed` list the examples this process explained and those it read back."""

    def __init__(self, store: ProgressStore, explainer: ExampleExplainer, examples, total: int, log, after_example):
        self.store, self.explainer, self.examples, self.total = store, explainer, examples, total
        self.log, self.after_example = log, after_example
        self.computed: list[int] = []
        self.resumed: list[int] = []

    def get(self, index: int, text: str, compute: bool) -> dict | None:
        """The record of example `index`; None when it is not in the store and `compute` is False."""
        found = self.store.load(index, text)
        if found is not None:
            if index not in self.computed:  # the merge pass reads back this process's own shard too
                self.resumed.append(index)
            return found
        if not compute:
            return None
        record = self.store.save(index, self.explainer.explain(index, text, self.examples[index].label))
        self.computed.append(index)
        self.log(
            f"explained example {index + 1}/{self.total} ({record['n_tokens']} {self.explainer.settings.features}, "
            f"{record['evals_used']} evaluations per model) in {record['seconds']:.1f} s"
        )
        if self.after_example is not None:
            self.after_example(index)
        return record


def run_analysis(
    run: LoadedRun,
    log: Callable[[str], None] = lambda message: print(message, file=sys.stderr, flush=True),
    after_example: Callable[[int], None] | None = None,
) -> AnalysisResult:
    """Explain the first `explain.example_count` eval tweets with the baselines (and the fine-tuned model, given an
    adapter); this process explains its shard (`ShardAssignment`), and the merging process writes the files.

    `after_example(index)` is called after each newly computed example is saved (tests use it to interrupt a run).
    """
    from lightning_modules.adapters import load_adapter

    plan = check_explanation({"compare": run.compare, "explain": run.explain})
    datamodule, module, settings = run.datamodule, run.module, run.explain
    prompt = datamodule.prompt_description()
    if plan.adapter:
        load_adapter(module, plan.adapter, prompt)
    to_device(module)
    models = plan.baselines + ([FINE_TUNED] if plan.adapter else [])
    specs = model_specs(module, datamodule, models, run.compare.k_shot)
    examples = datamodule.eval_examples
    # Every model explains the same tweet tokens: cut long tweets to the tightest prompt's budget.
    tweets = ExplainedTweets(examples, datamodule.encoder, min(spec.encoder.tweet_budget for spec in specs.values()))

    notes = RunNotes(log)
    if datamodule.skipped_empty:
        notes.add(f"skipped {datamodule.skipped_empty} rows with an empty tweet (the data loader drops them)")
    example_count = settings.example_count
    if example_count > len(examples):
        notes.add(
            f"--shap-example-count {example_count} is larger than the eval set; explaining all {len(examples)} examples"
        )
        example_count = len(examples)
    recorded = run_settings(run, plan, specs, prompt)
    plan.folder.mkdir(parents=True, exist_ok=True)
    store = ProgressStore.open(plan.folder / PROGRESS_DIR, progress_fingerprint(recorded), plan.shard, notes.add)
    methods = AttributionMethods(
        tweet_masker(datamodule.encoder, settings.features),
        model_value_functions(module, specs, settings.forward_batch_size),
        settings,
        module,
        specs,
    )
    explainer = ExampleExplainer(methods, settings, run.compare.seed)
    records = ExampleRecords(store, explainer, examples, example_count, log, after_example)
    result = AnalysisResult(plan.folder, {}, notes, computed=records.computed, resumed=records.resumed, models=models)

    if plan.shard.count > 1:  # this process's share first
        for index in plan.shard.indices(example_count):
            text, _ = tweets.text(index)
            if text is not None:
                records.get(index, text, compute=True)
        plan.shard.barrier()
        if plan.shard.distributed and plan.shard.index != 0:
            result.merged = False  # rank 0 merges
            return result
    # The merging pass reads every example back; a shard that is no merger leaves missing ones to another process.
    explained, waiting = [], []
    for index in range(example_count):
        text, note = tweets.text(index)
        if text is None:
            notes.add(note)
            continue
        if note:
            notes.append(note)  # recorded, not logged: every truncated tweet would repeat it
        found = records.get(index, text, compute=plan.shard.merger)
        if found is None:
            waiting.append(index)
        else:
            explained.append(found)
    if waiting:
        result.merged = False
        return result
    # What follows (statistics, files, the optional exact check) needs no value function: the tweet prefixes they
    # remember (0.19 GiB for two models) are freed before it allocates.
    masker = explainer.masker
    records.explainer = explainer = methods = None
    release_memory()
    if not explained:
        raise UserInputError(f"None of the first {example_count} eval examples has tweet text to explain.")

    warning = budget_warning(explained, models, settings.max_evals)
    if warning:
        notes.add(warning, level="warning")

    result.metrics = interpretability_metrics(
        explained, models, recorded, list(notes), run.compare.n_resamples, run.compare.seed
    )
    if settings.exact_shapley_check:
        padded = {
            name: LabelProbabilities(
                spec.scorer(module, "padded", "labels", settings.forward_batch_size), spec.encoder, spec.transform
            )
            for name, spec in specs.items()
        }
        result.metrics["exact_shapley_check"] = exact_shapley_check(
            explained, settings.exact_shapley_check, masker, padded
        )
    properties = xai_properties(explained, models, recorded["explainers"], run.compare.n_resamples, run.compare.seed)
    result.files, result.removed_stale = write_outputs(
        plan.folder, explained, models, result.metrics, datamodule.label_names, recorded, properties
    )
    figures = {f"analysis/{path.stem}": path for path in result.files if path.suffix == ".png"}
    write_tensorboard(
        plan.folder / TENSORBOARD_DIR, figures=figures, tables={"analysis/summary": analysis_summary(result)}
    )
    return result


def exact_shapley_check(records: list[dict], count: int, masker: TweetMasker, value_functions: Mapping) -> dict:
    """Exact Shapley values of the `count` shortest explained tweets (at most `MAX_EXACT_FEATURES` features), every
    coalition scored by a plain padded forward, against the explainer's Owen values at each model's own target."""
    short = sorted(
        (r for r in records if r["n_tokens"] <= MAX_EXACT_FEATURES), key=lambda r: (r["n_tokens"], r["index"])
    )
    rows = []
    for record in short[:count]:
        coalitions = all_coalitions(record["n_tokens"])
        texts = [mask_tweet(masker, record["text"], keep) for keep in coalitions]
        row = {"index": record["index"], "n_features": record["n_tokens"], "coalitions": len(texts), "models": {}}
        for name, function in value_functions.items():
            values = function(texts)
            exact = shapley_values(values)  # (features, classes)
            model = record["models"][name]
            t = model["target"]
            owen = np.asarray(model["values"], dtype=float)[:, t]
            row["models"][name] = {
                "target": t,
                "shapley": exact[:, t].tolist(),
                "owen": owen.tolist(),
                **shapley_distance(owen, exact[:, t]),
                "shapley_additivity_error": float(abs(exact[:, t].sum() - (values[-1, t] - values[0, t]))),
            }
        rows.append(row)
    errors = [m["relative_l2"] for row in rows for m in row["models"].values() if m["relative_l2"] is not None]
    return {
        "definition": "exact Shapley values by enumeration of all 2^n coalitions (padded forwards, no prefix tree) "
        "vs the Partition explainer's Owen values, for each model's own target class; Owen values respect the "
        "partition tree, so they differ from Shapley values where features interact across its groups",
        "examples": rows,
        "max_relative_l2": max(errors) if errors else None,
        "mean_relative_l2": float(np.mean(errors)) if errors else None,
        "requested": count,
        "eligible": len(short),
    }


def run_settings(run: LoadedRun, plan: ExplanationPlan, specs: Mapping, prompt: dict) -> dict:
    """What the explanations depend on, recorded in every file (and, but for computed digits, the progress key)."""
    datamodule, module, settings = run.datamodule, run.module, run.explain
    recorded = {
        "base_model": module.hparams.model_name,
        "dtype": run.dtype.as_dict(),  # what the base computed in, and why
        "adapter": str(plan.adapter) if plan.adapter else None,
        "adapter_digest": adapter_digest(module) if plan.adapter else None,
        "models": {name: spec.describe() for name, spec in specs.items()},
        "prompt": prompt,
        "dataset": {key: datamodule.hparams[key] for key in ("dataset_name", "eval_split", "eval_subset", "seed")},
        "max_evals": settings.max_evals,
        "max_evals_cap": settings.max_evals_cap if settings.max_evals == "auto" else None,
        "features": settings.features,
        "target": settings.target,
        "comparison_target": settings.comparison_target,
        "seed": run.compare.seed,
        "random_orders": settings.random_orders,
        "masking": f"masked tweet {settings.features} are deleted; the base value is the empty tweet",
        "masks_per_round": MASKS_PER_ROUND,
        "explainer": f"shap {shap.__version__} Partition explainer, Text masker over the tweet {settings.features}",
        "explainers": list(dict.fromkeys(settings.explainers)),
        **{
            key: getattr(settings, key)
            for key, used in (
                ("kernel_samples", "kernel"),
                ("lime_samples", "lime"),
                ("ig_steps", "integrated_gradients"),
            )
            if used in settings.explainers
        },
        "measure_stability": settings.measure_stability,
    }
    if K_SHOT in specs:
        recorded["k_shot"] = run.compare.k_shot
    return recorded


def progress_fingerprint(recorded: dict) -> dict:
    """Progress is valid for the same settings. A calibration prior is computed from them (model, prompt), so its
    digits, which can differ in the last bits between machines, do not invalidate another shard's work; nor does the
    wording of why `auto` chose the dtype (the dtype itself counts)."""
    return {
        **recorded,
        "dtype": recorded["dtype"]["dtype"],
        "models": {
            name: {k: v for k, v in record.items() if k != "calibration"} for name, record in recorded["models"].items()
        },
    }


def write_outputs(
    folder: Path,
    records: list[dict],
    models: list[str],
    metrics: dict,
    label_names: list[str],
    settings: dict,
    properties: dict,
) -> tuple[list[Path], list[Path]]:
    """The per-model explanation files and plots, deletion curves, HTML page, metrics and XAI properties; removes
    other models' and explainers' files."""
    names = {model: display_name(model, settings.get("k_shot")) for model in models}
    files = []
    for model in models:
        content = explanation_file_content(model, records, label_names, settings)
        files.append(write_json_atomic(folder / shap_file(model), content))
        files.append(
            plot_top_tokens(
                metrics[model]["top_tokens"],
                f"{names[model]}: {settings['features']} by total |SHAP| (top {TOP_TOKENS}, {len(records)} tweets)",
                folder / shap_summary_plot(model),
            )
        )
        for explainer in settings["explainers"]:
            if explainer != "partition":
                content = other_explainer_content(explainer, model, records, label_names, settings)
                files.append(write_json_atomic(folder / explanation_file(model, explainer), content))
    faithfulness = {names[m]: metrics["faithfulness"][m] for m in models}
    files.append(plot_deletion_curves(faithfulness, folder / DELETION_PLOT))
    if "explainer_agreement" in metrics:
        files.append(plot_explainer_agreement(metrics["explainer_agreement"], names, folder / AGREEMENT_PLOT))
    title = " vs ".join(names.values()).capitalize() + f": SHAP of the tweet {settings['features']}"
    page = explanations_html(records, label_names, names, title, list(compared_pairs(models).values()))
    files.append(write_text_atomic(folder / EXPLANATIONS_FILE, page))
    files.append(write_json_atomic(folder / INTERPRETABILITY_FILE, metrics))
    files.append(write_json_atomic(folder / XAI_PROPERTIES_FILE, properties))
    removed = []
    if "explainer_agreement" not in metrics and (folder / AGREEMENT_PLOT).is_file():
        (folder / AGREEMENT_PLOT).unlink()
        removed.append(folder / AGREEMENT_PLOT)
    for model in MODEL_ORDER:  # never mix two runs' models (or explainers) in one folder
        stale = [] if model in models else [shap_file(model), shap_summary_plot(model)]
        stale += [
            explanation_file(model, e) for e in EXPLAINERS if e not in settings["explainers"] or model not in models
        ]
        for path in (folder / name for name in stale):
            if path.is_file():
                path.unlink()
                removed.append(path)
    return files, removed


EXPLAINER_MEANING = {
    "kernel": "KernelSHAP: base_values = p(empty tweet); base_values + sum_j values[i][j] = p(tweet i)",
    "lime": "LIME surrogate weights: base_values = the surrogate's intercepts (its prediction with every feature "
    "deleted); r2 = its weighted R^2 per class",
    "occlusion": "values[i][j][c] = p_c(tweet i) - p_c(tweet i without feature j); base_values = p(tweet i)",
    "integrated_gradients": "integrated gradients from the zero embedding of every tweet token, summed per feature: "
    "base_values = p(baseline); base_values + sum_j values[i][j] = p(tweet i) up to completeness_error",
}
QUALITY = {"kernel": "additivity_error", "lime": "r2", "integrated_gradients": "completeness_error"}


def other_explainer_content(explainer: str, model: str, records: list[dict], label_names: list[str], settings: dict):
    """`<model>_<explainer>.json`: the layout of `<model>_shap.json` (it loads with `load_explanation`), with that
    explainer's values, base values (see `meaning`), cost and quality figure."""
    content = explanation_file_content(model, records, label_names, settings)
    rows = [record["models"][model]["explainers"][explainer] for record in records]
    content["explainer"] = explainer
    content["values"] = [row["values"] for row in rows]
    content["base_values"] = [row["base_values"] for row in rows]
    content["meaning"] = EXPLAINER_MEANING[explainer]
    content["evaluations"] = [record["explainers"][explainer]["evaluations"] for record in records]
    content["seconds"] = [record["explainers"][explainer]["seconds"] for record in records]
    content.pop("additivity_error")
    if explainer in QUALITY:
        content[QUALITY[explainer]] = [row[QUALITY[explainer]] for row in rows]
    if explainer == "kernel":
        content["exact"] = [row["exact"] for row in rows]
    return content
