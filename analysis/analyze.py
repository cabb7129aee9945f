"""Explain baselines and the fine-tuned model with SHAP on the first N eval tweets; statistics, plots, HTML.

The explained models are `analysis.baselines` names: by default raw zero-shot and, given an adapter, fine-tuned;
any baseline (calibrated zero-shot, k-shot) can be added. All are explained on the same coalitions, and each
baseline is compared with the fine-tuned model (without an adapter: each other baseline with the first).

Every finished example is written at once to `<output-dir>/.progress/<index>.json`; a rerun with the same settings
skips those and recomputes nothing. The final files are written atomically at the end.

Sharding: with `num_shards` > 1 a process explains only the examples whose index is `shard_index` modulo
`num_shards` into the shared progress folder; the run that finds every example there (or rank 0 under `torchrun`,
after a barrier) merges them into the final files, which are identical to a single-process run's.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import shap
import torch

from analysis.baselines import (
    DEFAULT_K,
    FINE_TUNED,
    K_SHOT,
    MODEL_ORDER,
    ZERO_SHOT,
    check_baselines,
    display_name,
    model_specs,
)
from analysis.evaluation import check_output_dir
from analysis.explanation_stats import compare_models, model_statistics
from analysis.explanations_html import explanations_html
from analysis.faithfulness import (
    FRACTIONS,
    RANDOM_ORDERS,
    compare_model_faithfulness,
    example_faithfulness,
    summarize_model_faithfulness,
)
from analysis.files import to_json_ready, write_json_atomic, write_text_atomic
from analysis.plots import plot_deletion_curves, plot_top_tokens
from analysis.shap_explain import (
    BUDGET_NOTE,
    MASKS_PER_ROUND,
    TARGETS,
    TweetMasker,
    budget_resolution,
    explain_tweet,
    explanation_file_content,
    fit_to_budget,
    model_value_functions,
    normalize_tweet,
    tweet_masker,
)
from lightning_modules.errors import UserInputError

SHAP_FILES = {model: f"{model}_shap.json" for model in MODEL_ORDER}
SUMMARY_PLOTS = {model: f"{model}_shap_summary.png" for model in MODEL_ORDER}
METRICS_FILE = "interpretability_metrics.json"
DELETION_PLOT = "deletion_curves.png"
HTML_FILE = "explanations.html"
PROGRESS_DIR = ".progress"
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


# ---- resumable per-example records ------------------------------------------------------------------------------
class ProgressStore:
    """One JSON per finished example, valid only for the run settings recorded in `run.json`."""

    def __init__(self, folder: Path, fingerprint: dict, notes: list[str]):
        self.folder = folder
        fingerprint = json.loads(json.dumps(to_json_ready(fingerprint)))  # compare as it reads back
        run_file = folder / "run.json"
        if run_file.is_file():
            try:
                previous = json.loads(run_file.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                previous = None
            if previous != fingerprint:
                shutil.rmtree(folder)
                notes.append(f"discarded the partial results in {folder}: they came from a run with other settings")
        write_json_atomic(run_file, fingerprint)

    def load(self, index: int, text: str) -> dict | None:
        path = self.folder / f"{index}.json"
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            return None  # missing, or damaged outside our atomic writes: recompute it
        return record if record.get("text") == text else None

    def save(self, index: int, record: dict) -> None:
        write_json_atomic(self.folder / f"{index}.json", record)


def adapter_digest(module) -> str:
    """Digest of the LoRA weights in the module: a retrained adapter at the same path invalidates old progress."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.trainable_state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


# ---- one example --------------------------------------------------------------------------------------------------
def explain_example(
    index: int,
    text: str,
    gold: int,
    encoder,
    masker: TweetMasker,
    value_functions: Mapping,
    max_evals: int,
    target: str,
    seed: int,
    random_orders: int = RANDOM_ORDERS,
) -> dict:
    """Every model's SHAP values, targets, additivity errors and faithfulness for one (non-empty) tweet."""
    full = {name: fn([text])[0] for name, fn in value_functions.items()}
    predicted = {name: int(np.argmax(p)) for name, p in full.items()}
    targets = predicted if target == "predicted" else {name: gold for name in value_functions}
    start = time.perf_counter()
    explained = explain_tweet(text, value_functions, masker, max_evals, seed=seed + index)
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
            text, values[:, t], t, float(full[name][t]), fn, masker, rng, random_orders=random_orders
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
        f"budget.meaning in {METRICS_FILE})"
    )


# ---- the whole run ------------------------------------------------------------------------------------------------
def _check_arguments(example_count: int, max_evals: int, batch_size: int, target: str) -> None:
    if example_count < 1:
        raise UserInputError(f"--shap-example-count must be at least 1, got {example_count}.")
    if max_evals < 2:
        raise UserInputError(
            f"--shap-max-evals {max_evals} is too small: SHAP needs at least the full and the empty tweet (2); "
            "use about 2 x the tweet length or more (default 200)."
        )
    if batch_size < 1:
        raise UserInputError(f"--batch-size must be at least 1, got {batch_size}.")
    if target not in TARGETS:
        raise UserInputError(f"--target must be one of {', '.join(TARGETS)}, got {target!r}.")


def _to_device(module) -> None:
    # 4-bit weights are placed on their device when loaded; a full-precision backbone is moved here.
    if torch.cuda.is_available() and not module.quantized:
        module.to(f"cuda:{torch.cuda.current_device()}")


def _check_shard(shard_index: int, num_shards: int) -> None:
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise UserInputError(
            f"--shard-index {shard_index} is not in 0..{num_shards - 1} for --num-shards {num_shards}; "
            "give each of N processes a different index from 0 to N - 1."
        )


def distributed_shard() -> tuple[int, int] | None:
    """(rank, world size) when launched by `torchrun` with more than one process; None otherwise."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    return (int(os.environ.get("RANK", "0")), world) if world > 1 else None


def _barrier() -> None:
    """Wait for every rank (torchrun); the process group is created on first use (gloo works on any device)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    dist.barrier()


def run_analysis(
    config: str | Path,
    adapter: str | Path | None,
    output_dir: str | Path,
    example_count: int = 10,
    max_evals: int = 200,
    batch_size: int = 16,
    target: str = "predicted",
    seed: int = 0,
    n_resamples: int = 1000,
    random_orders: int = RANDOM_ORDERS,
    overrides: list[str] | None = None,
    log: Callable[[str], None] = lambda message: print(message, file=sys.stderr, flush=True),
    after_example: Callable[[int], None] | None = None,
    baselines: tuple[str, ...] | list[str] = (ZERO_SHOT,),
    k_shot: int = DEFAULT_K,
    shard_index: int | None = None,
    num_shards: int | None = None,
) -> AnalysisResult:
    """Explain the first `example_count` eval tweets with the baselines (and the fine-tuned model, given `adapter`).

    `random_orders`: random token rankings per example for the faithfulness baseline. `after_example(index)` is
    called after each newly computed example is saved (tests use it to interrupt a run). `shard_index` /
    `num_shards` (default: torchrun's RANK / WORLD_SIZE, else one shard) split the examples across processes.
    """
    from lightning_modules.adapters import existing_adapter, load_adapter
    from scripts.cli import build_from_config

    _check_arguments(example_count, max_evals, batch_size, target)
    baselines = check_baselines(baselines, k_shot)
    distributed = distributed_shard() if shard_index is None and num_shards is None else None
    if distributed:
        shard_index, num_shards = distributed
    shard_index, num_shards = shard_index or 0, num_shards or 1
    _check_shard(shard_index, num_shards)
    folder = check_output_dir(output_dir)
    adapter_path = existing_adapter(adapter)
    datamodule, module = build_from_config(str(config), list(overrides or []))
    prompt = datamodule.prompt_description()
    if adapter_path:
        load_adapter(module, adapter_path, prompt)
    _to_device(module)
    label_names = datamodule.label_names
    examples = datamodule.eval_examples
    models = baselines + ([FINE_TUNED] if adapter_path else [])
    specs = model_specs(module, datamodule, models, k_shot)
    encoder = datamodule.encoder
    # Every model explains the same tweet tokens: cut long tweets to the tightest prompt's budget.
    tweet_budget = min(spec.encoder.tweet_budget for spec in specs.values())

    notes: list[str] = []
    if datamodule.skipped_empty:
        notes.append(f"skipped {datamodule.skipped_empty} rows with an empty tweet (the data loader drops them)")
    if example_count > len(examples):
        notes.append(
            f"--shap-example-count {example_count} is larger than the eval set; explaining all {len(examples)} examples"
        )
        example_count = len(examples)
    for note in notes:
        log(f"note: {note}")
    logged = len(notes)

    settings = {
        "base_model": module.hparams.model_name,
        "adapter": str(adapter_path) if adapter_path else None,
        "adapter_digest": adapter_digest(module) if adapter_path else None,
        "models": {name: spec.describe() for name, spec in specs.items()},
        "prompt": prompt,
        "dataset": {key: datamodule.hparams[key] for key in ("dataset_name", "eval_split", "eval_subset", "seed")},
        "max_evals": max_evals,
        "target": target,
        "seed": seed,
        "random_orders": random_orders,
        "masking": "masked tweet tokens are deleted; the base value is the empty tweet",
        "masks_per_round": MASKS_PER_ROUND,
        "explainer": f"shap {shap.__version__} Partition explainer, Text masker over the tweet tokens",
    }
    if K_SHOT in specs:
        settings["k_shot"] = k_shot
    folder.mkdir(parents=True, exist_ok=True)
    if distributed and shard_index != 0:
        _barrier()  # rank 0 validates (or discards) the progress folder first
    # Progress is valid for the same settings. A calibration prior is computed from them (model, prompt), so its
    # digits, which can differ in the last bits between machines, do not invalidate another shard's work.
    fingerprint = {
        **settings,
        "models": {
            name: {k: v for k, v in record.items() if k != "calibration"} for name, record in settings["models"].items()
        },
    }
    store = ProgressStore(folder / PROGRESS_DIR, fingerprint, notes)
    if distributed and shard_index == 0:
        _barrier()
    for note in notes[logged:]:
        log(f"note: {note}")
    masker = tweet_masker(encoder)
    value_functions = model_value_functions(module, specs, batch_size)
    result = AnalysisResult(folder, {}, notes, models=models)

    waiting: list[int] = []  # examples of other shards not in the store yet

    def explained(index: int, compute: bool) -> dict | None:
        """Example `index`'s record: read back from the store, else computed now (when `compute`), else None."""
        text, truncated = fit_to_budget(encoder, normalize_tweet(examples[index].text), tweet_budget)
        if not text or not encoder.tweet_ids(text):
            notes.append(f"example {index} has an empty tweet; skipped")
            log(f"note: {notes[-1]}")
            return None
        if truncated:
            notes.append(f"example {index} is longer than the prompt allows; explained the tokens the model sees")
        record = store.load(index, text)
        if record is not None:
            if index not in result.computed:  # the merge pass reads back this process's own shard too
                result.resumed.append(index)
            return record
        if not compute:
            waiting.append(index)
            return None
        record = explain_example(
            index, text, examples[index].label, encoder, masker, value_functions, max_evals, target, seed, random_orders
        )
        store.save(index, record)
        result.computed.append(index)
        log(
            f"explained example {index + 1}/{example_count} ({record['n_tokens']} tokens, "
            f"{record['evals_used']} evaluations per model) in {record['seconds']:.1f} s"
        )
        if after_example is not None:
            after_example(index)
        return json.loads((store.folder / f"{index}.json").read_text())  # identical to a resumed one

    shard_notes = len(notes)
    if num_shards > 1:
        for index in range(shard_index, example_count, num_shards):
            explained(index, compute=True)
        if distributed:
            _barrier()
            if shard_index != 0:
                result.merged = False  # rank 0 merges
                return result
        del notes[shard_notes:]  # the merge pass below notes every example again
    # The merging pass: read every example back (computing any a shard left out); a shard that finds others
    # missing leaves the merge to the last shard or a later run without sharding.
    merge_computes = num_shards == 1 or distributed is not None
    records = [r for r in (explained(i, compute=merge_computes) for i in range(example_count)) if r is not None]
    if waiting:
        result.merged = False
        return result
    if not records:
        raise UserInputError(f"None of the first {example_count} eval examples has tweet text to explain.")

    warning = budget_warning(records, models, max_evals)
    if warning:
        notes.append(warning)
        log(f"warning: {warning}")

    result.metrics = interpretability_metrics(records, models, settings, notes, n_resamples, seed)
    result.files, result.removed_stale = write_outputs(folder, records, models, result.metrics, label_names, settings)
    return result


def write_outputs(
    folder: Path, records: list[dict], models: list[str], metrics: dict, label_names: list[str], settings: dict
) -> tuple[list[Path], list[Path]]:
    """The per-model SHAP files and plots, deletion curves, HTML page and metrics; removes other models' files."""
    names = {model: display_name(model, settings.get("k_shot")) for model in models}
    files = []
    for model in models:
        content = explanation_file_content(model, records, label_names, settings)
        files.append(write_json_atomic(folder / SHAP_FILES[model], content))
        files.append(
            plot_top_tokens(
                metrics[model]["top_tokens"],
                f"{names[model]}: tokens by total |SHAP| (top {TOP_TOKENS}, {len(records)} tweets)",
                folder / SUMMARY_PLOTS[model],
            )
        )
    faithfulness = {names[m]: metrics["faithfulness"][m] for m in models}
    files.append(plot_deletion_curves(faithfulness, folder / DELETION_PLOT))
    title = " vs ".join(names.values()).capitalize() + ": SHAP of the tweet tokens"
    files.append(write_text_atomic(folder / HTML_FILE, explanations_html(records, label_names, names, title)))
    files.append(write_json_atomic(folder / METRICS_FILE, metrics))
    removed = []
    for model in (m for m in MODEL_ORDER if m not in models):  # never mix two runs' models in one folder
        for path in (folder / SHAP_FILES[model], folder / SUMMARY_PLOTS[model]):
            if path.is_file():
                path.unlink()
                removed.append(path)
    return files, removed


def summary_lines(result: AnalysisResult) -> list[str]:
    """A short report of a run: what was explained, the headline comparisons, the checks, the files."""
    if not result.merged:
        return [
            f"explained {len(result.computed)} examples of this shard ({len(result.resumed)} were already done); "
            f"the final files are written by the run that finds every example in {result.output_dir / PROGRESS_DIR}"
        ]
    m = result.metrics
    faithfulness = m["faithfulness"]
    k = m["settings"].get("k_shot")
    lines = [
        f"explained {m['n_examples']} tweets ({len(result.computed)} computed now, {len(result.resumed)} resumed)",
        f"additivity: largest |base + sum(SHAP) - f(x)| = {m['additivity']['max_abs_error']:.2e}",
    ]
    for model in result.models:
        stats = m[model]
        top = ", ".join(row["token"] for row in stats["top_tokens"][:5])
        comp = faithfulness[model]["comprehensiveness"]["mean_aopc"]
        comp_random = faithfulness[model]["comprehensiveness_random"]["mean_aopc"]
        lines.append(
            f"{display_name(model, k):>20}: mean |SHAP| {stats['mean_abs_importance']:.4f}, "
            f"Gini {stats['mean_gini']:.3f}, comprehensiveness AOPC {comp:.3f} (random {comp_random:.3f}); "
            f"top tokens: {top}"
        )
    for comparison in (m.get("comparisons") or {}).values():
        a, b = comparison["models"]
        cosine = comparison["cosine_similarity"]
        if cosine["mean"] is not None:
            lines.append(
                f"{display_name(a, k)} vs {display_name(b, k)}: cosine {cosine['mean']:.3f} "
                f"[{cosine['ci_low']:.3f}, {cosine['ci_high']:.3f}]"
            )
    lines.extend(f"note: {note}" for note in result.notes)
    lines.extend(f"removed {path} from an earlier run with other models" for path in result.removed_stale)
    lines.append(f"results in {result.output_dir}")
    lines.extend(f"  {path.name}" for path in result.files)
    return lines
