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
import torch

from analysis.explanation.faithfulness import (
    FRACTIONS,
    compare_model_faithfulness,
    example_faithfulness,
    summarize_model_faithfulness,
)
from analysis.explanation.progress import ProgressStore, ShardAssignment
from analysis.explanation.shap_values import (
    BUDGET_NOTE,
    MASKS_PER_ROUND,
    TweetMasker,
    budget_resolution,
    explain_tweet,
    explanation_file_content,
    fit_to_budget,
    model_value_functions,
    normalize_tweet,
    tweet_masker,
)
from analysis.models import FINE_TUNED, K_SHOT, MODEL_ORDER, check_baselines, display_name, model_specs
from analysis.report.explanations_page import explanations_html
from analysis.report.plots import plot_deletion_curves, plot_top_tokens
from analysis.settings import TARGETS, CompareSettings, ExplainSettings
from analysis.statistics.explanations import compare_models, model_statistics
from foundation.atomic_files import write_json_atomic, write_text_atomic
from foundation.errors import UserInputError
from foundation.output_folder import check_output_dir, require_output_dir
from foundation.output_names import (
    DELETION_PLOT,
    EXPLANATIONS_FILE,
    INTERPRETABILITY_FILE,
    PROGRESS_DIR,
    shap_file,
    shap_summary_plot,
)

if TYPE_CHECKING:
    from analysis.configuration import LoadedRun

ADDITIVITY_TOLERANCE = 1e-4
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
    """Explains one tweet with every model on the same coalitions: SHAP values, targets, additivity, faithfulness."""

    def __init__(self, masker: TweetMasker, value_functions: Mapping, settings: ExplainSettings, seed: int):
        self.masker, self.value_functions = masker, value_functions
        self.settings, self.seed = settings, seed

    def explain(self, index: int, text: str, gold: int) -> dict:
        """The record of one (non-empty) tweet."""
        value_functions, max_evals, seed = self.value_functions, self.settings.max_evals, self.seed
        full = {name: fn([text])[0] for name, fn in value_functions.items()}
        predicted = {name: int(np.argmax(p)) for name, p in full.items()}
        targets = predicted if self.settings.target == "predicted" else {name: gold for name in value_functions}
        start = time.perf_counter()
        explained = explain_tweet(text, value_functions, self.masker, max_evals, seed=seed + index)
        seconds = time.perf_counter() - start
        n_tokens = len(explained["data"])
        models = {}
        for k, (name, fn) in enumerate(value_functions.items()):
            values, base = explained["models"][name]["values"], explained["models"][name]["base_values"]
            t = targets[name]
            # f(x) from its own forward pass, not the explainer's: the check covers the whole pipeline.
            errors = np.abs(base + values.sum(axis=0) - full[name])
            rng = np.random.default_rng([seed, index, k])
            faithfulness = example_faithfulness(
                text,
                values[:, t],
                t,
                float(full[name][t]),
                fn,
                self.masker,
                rng,
                random_orders=self.settings.random_orders,
            )
            models[name] = {
                "values": values,
                "base_values": base,
                "target": t,
                "predicted": predicted[name],
                "probabilities": full[name],
                "additivity_error": float(errors[t]),
                "additivity_error_all_classes": float(errors.max()),
                "shared_credit_fraction": float(explained["models"][name]["shared_credit_fraction"][t]),
                "faithfulness": faithfulness,
            }
        return {
            "index": index,
            "text": text,
            "gold": gold,
            "n_tokens": n_tokens,
            "data": explained["data"],
            "feature_names": explained["feature_names"],
            "max_evals": max_evals,
            "evals_used": explained["evals_used"],
            "evals_for_exact_owen": explained["evals_for_exact_owen"],
            "resolution": budget_resolution(
                n_tokens, max_evals, explained["evals_used"], explained["evals_for_exact_owen"]
            ),
            "seconds": seconds,
            "models": models,
        }


# ---- statistics -------------------------------------------------------------------------------------------------
def _target_values(records: list[dict], model: str) -> list[np.ndarray]:
    return [np.asarray(r["models"][model]["values"], dtype=float)[:, r["models"][model]["target"]] for r in records]


def compared_pairs(models: list[str]) -> dict[str, tuple[str, str]]:
    """`{"<reference>_vs_<baseline>": (baseline, reference)}`: each baseline against the fine-tuned model, or
    (without one) against the first baseline; the names match `comparison.json`'s."""
    reference = FINE_TUNED if FINE_TUNED in models else models[0]
    return {f"{reference}_vs_{other}": (other, reference) for other in models if other != reference}


def interpretability_metrics(
    records: list[dict], models: list[str], settings: dict, notes: list[str], n_resamples: int, seed: int
) -> dict:
    """Everything measured, as one JSON-ready dict: per-model statistics, comparisons, faithfulness, checks.

    `comparison` (the original's key) holds the first pair of `comparisons`: raw zero-shot vs fine-tuned by default.
    """
    tokens = [r["feature_names"] for r in records]
    values = {model: _target_values(records, model) for model in models}
    faithfulness_rows = {model: [r["models"][model]["faithfulness"] for r in records] for model in models}
    additivity = {model: max(r["models"][model]["additivity_error"] for r in records) for model in models}
    largest = max(additivity.values())
    resolutions = [r["resolution"] for r in records]
    pairs = compared_pairs(models)
    comparisons = {
        key: compare_models(
            values[a], values[b], tokens, n_resamples=n_resamples, seed=seed, top_k=TOP_TOKENS, names=(a, b)
        )
        for key, (a, b) in pairs.items()
    }
    metrics = {
        "settings": settings,
        "notes": notes,
        "n_examples": len(records),
        "models": list(models),
        "target": {
            "source": settings["target"],
            "same_target_fraction": {
                key: float(np.mean([r["models"][a]["target"] == r["models"][b]["target"] for r in records]))
                for key, (a, b) in pairs.items()
            },
            "per_example": [
                {"index": r["index"], "gold": r["gold"], **{m: r["models"][m]["target"] for m in models}}
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
            "meaning": BUDGET_NOTE,
            "counts": {name: resolutions.count(name) for name in ("exact", "approximate", "coarse")},
            "mean_shared_credit_fraction": {
                model: float(np.mean([r["models"][model]["shared_credit_fraction"] for r in records]))
                for model in models
            },
            "per_example": [
                {
                    **{
                        key: r[key] for key in ("index", "n_tokens", "evals_used", "evals_for_exact_owen", "resolution")
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
                key: compare_model_faithfulness(faithfulness_rows[a], faithfulness_rows[b], n_resamples, seed, (a, b))
                for key, (a, b) in pairs.items()
            },
        },
        "timing": {
            "seconds_per_example": [r["seconds"] for r in records],
            "note": f"SHAP time per example for all {len(models)} models together (faithfulness excluded); resumed "
            "examples keep the time of the run that computed them",
        },
    }
    if comparisons:
        metrics["comparison"] = next(iter(comparisons.values()))
        metrics["comparisons"] = comparisons
    return metrics


def budget_warning(records: list[dict], models: list[str], max_evals: int) -> str | None:
    """What a too-small --shap-max-evals did to these explanations, in one sentence (None when nothing)."""
    shared = [r["models"][m]["shared_credit_fraction"] for r in records for m in models]
    coarse = [r for r in records if r["resolution"] == "coarse"]
    if not coarse and max(shared) == 0:
        return None
    needed = sorted(r["evals_for_exact_owen"] for r in records)
    sentence = f"with --shap-max-evals {max_evals}, "
    if coarse:
        longest = max(r["n_tokens"] for r in coarse)
        sentence += (
            f"{len(coarse)} of {len(records)} tweets have too many tokens for even one split of every token group "
            f"(the longest, {longest} tokens, needs {2 * longest - 1}), and "
        )
    return sentence + (
        f"on average {100 * np.mean(shared):.0f}% of the target-class credit sits on token groups shap had no budget "
        f"to split, shared equally by their tokens (the values still add up; exact values need "
        f"{needed[len(needed) // 2]} evaluations for the median tweet, {needed[-1]} for the longest; see "
        f"budget.meaning in {INTERPRETABILITY_FILE})"
    )


# ---- the whole run ------------------------------------------------------------------------------------------------
@dataclass
class ExplanationPlan:
    """What a run will do, derived from its settings before any model is loaded."""

    folder: Path
    adapter: Path | None
    baselines: list[str]
    shard: ShardAssignment


def check_explain_options(explain: ExplainSettings, compare: CompareSettings) -> list[str]:
    """The explanation options on their own (no file system, no model); returns the baselines in canonical order."""
    if explain.example_count < 1:
        raise UserInputError(f"--shap-example-count must be at least 1, got {explain.example_count}.")
    if explain.max_evals < 2:
        raise UserInputError(
            f"--shap-max-evals {explain.max_evals} is too small: SHAP needs at least the full and the empty tweet "
            f"(2); use about 2 x the tweet length or more (default {ExplainSettings.max_evals})."
        )
    if explain.forward_batch_size < 1:
        raise UserInputError(f"--explain.forward_batch_size must be at least 1, got {explain.forward_batch_size}.")
    if explain.target not in TARGETS:
        raise UserInputError(f"--target must be one of {', '.join(TARGETS)}, got {explain.target!r}.")
    return check_baselines(explain.baselines, compare.k_shot)


def check_explanation(settings: dict) -> ExplanationPlan:
    """Everything about the explanation options that can be wrong, checked without loading a model."""
    from lightning_modules.adapters import existing_adapter

    compare, explain = settings["compare"], settings["explain"]
    baselines = check_explain_options(explain, compare)
    shard = ShardAssignment.resolve(explain.shard_index, explain.num_shards)
    folder = check_output_dir(require_output_dir(explain.output_dir))
    return ExplanationPlan(folder, existing_adapter(compare.adapter), baselines, shard)


def _to_device(module) -> None:
    # 4-bit weights are placed on their device when loaded; a full-precision backbone is moved here.
    if torch.cuda.is_available() and not module.quantized:
        module.to(f"cuda:{torch.cuda.current_device()}")


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
            f"explained example {index + 1}/{self.total} ({record['n_tokens']} tokens, "
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
    _to_device(module)
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
    explainer = ExampleExplainer(
        tweet_masker(datamodule.encoder),
        model_value_functions(module, specs, settings.forward_batch_size),
        settings,
        run.compare.seed,
    )
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
    if not explained:
        raise UserInputError(f"None of the first {example_count} eval examples has tweet text to explain.")

    warning = budget_warning(explained, models, settings.max_evals)
    if warning:
        notes.add(warning, level="warning")

    result.metrics = interpretability_metrics(
        explained, models, recorded, list(notes), run.compare.n_resamples, run.compare.seed
    )
    result.files, result.removed_stale = write_outputs(
        plan.folder, explained, models, result.metrics, datamodule.label_names, recorded
    )
    return result


def run_settings(run: LoadedRun, plan: ExplanationPlan, specs: Mapping, prompt: dict) -> dict:
    """What the explanations depend on, recorded in every file (and, but for computed digits, the progress key)."""
    datamodule, module, settings = run.datamodule, run.module, run.explain
    recorded = {
        "base_model": module.hparams.model_name,
        "adapter": str(plan.adapter) if plan.adapter else None,
        "adapter_digest": adapter_digest(module) if plan.adapter else None,
        "models": {name: spec.describe() for name, spec in specs.items()},
        "prompt": prompt,
        "dataset": {key: datamodule.hparams[key] for key in ("dataset_name", "eval_split", "eval_subset", "seed")},
        "max_evals": settings.max_evals,
        "target": settings.target,
        "seed": run.compare.seed,
        "random_orders": settings.random_orders,
        "masking": "masked tweet tokens are deleted; the base value is the empty tweet",
        "masks_per_round": MASKS_PER_ROUND,
        "explainer": f"shap {shap.__version__} Partition explainer, Text masker over the tweet tokens",
    }
    if K_SHOT in specs:
        recorded["k_shot"] = run.compare.k_shot
    return recorded


def progress_fingerprint(recorded: dict) -> dict:
    """Progress is valid for the same settings. A calibration prior is computed from them (model, prompt), so its
    digits, which can differ in the last bits between machines, do not invalidate another shard's work."""
    return {
        **recorded,
        "models": {
            name: {k: v for k, v in record.items() if k != "calibration"} for name, record in recorded["models"].items()
        },
    }


def write_outputs(
    folder: Path, records: list[dict], models: list[str], metrics: dict, label_names: list[str], settings: dict
) -> tuple[list[Path], list[Path]]:
    """The per-model SHAP files and plots, deletion curves, HTML page and metrics; removes other models' files."""
    names = {model: display_name(model, settings.get("k_shot")) for model in models}
    files = []
    for model in models:
        content = explanation_file_content(model, records, label_names, settings)
        files.append(write_json_atomic(folder / shap_file(model), content))
        files.append(
            plot_top_tokens(
                metrics[model]["top_tokens"],
                f"{names[model]}: tokens by total |SHAP| (top {TOP_TOKENS}, {len(records)} tweets)",
                folder / shap_summary_plot(model),
            )
        )
    faithfulness = {names[m]: metrics["faithfulness"][m] for m in models}
    files.append(plot_deletion_curves(faithfulness, folder / DELETION_PLOT))
    title = " vs ".join(names.values()).capitalize() + ": SHAP of the tweet tokens"
    files.append(write_text_atomic(folder / EXPLANATIONS_FILE, explanations_html(records, label_names, names, title)))
    files.append(write_json_atomic(folder / INTERPRETABILITY_FILE, metrics))
    removed = []
    for model in (m for m in MODEL_ORDER if m not in models):  # never mix two runs' models in one folder
        for path in (folder / shap_file(model), folder / shap_summary_plot(model)):
            if path.is_file():
                path.unlink()
                removed.append(path)
    return files, removed
