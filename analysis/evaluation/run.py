"""Baselines vs fine-tuned evaluation: score every model through the module's predict loop, then metrics and files.

The compared models are those of `analysis.models`: raw zero-shot, calibrated zero-shot, k-shot and, given an
adapter, the fine-tuned model. Each gets a `<model>_metrics.json`; `comparison.json` compares every baseline with
the fine-tuned model (without an adapter: every other baseline with raw zero-shot).

Everything a user can get wrong (config, adapter, labels, prompt, output folder) is checked before the first
file is written, so a failed run leaves the output folder as it was.
"""

from __future__ import annotations

import datetime as dt
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from analysis.models import (
    FINE_TUNED,
    MODEL_ORDER,
    ModelSpec,
    check_baselines,
    display_name,
    model_specs,
)
from analysis.report.plots import plot_confusion_matrices, plot_metric_comparison, plot_reliability
from analysis.report.tensorboard import write_tensorboard
from analysis.statistics.classification import classification_metrics, compare_predictions, holm_adjust
from foundation.atomic_files import write_json_atomic, write_jsonl_atomic
from foundation.output_folder import check_output_dir, require_output_dir
from foundation.output_names import (
    COMPARISON_FILE,
    CONFUSION_PLOT,
    METRICS_PLOT,
    PREDICTIONS_FILE,
    RELIABILITY_PLOT,
    TENSORBOARD_DIR,
    metrics_file,
)

if TYPE_CHECKING:
    from analysis.configuration import LoadedRun

# Logged to TensorBoard as `<model>/<name>`; the JSON files hold everything.
TENSORBOARD_METRICS = (
    "accuracy",
    "precision",
    "recall",
    "f1",
    "macro_f1",
    "macro_recall",
    "mcc",
    "ece",
    "mean_max_probability",
    "label_space_mass",
    "format_compliance",
)


@dataclass
class ModelScores:
    """One model's label-token scores on the eval split, in the order of `datamodule.eval_examples`."""

    probabilities: np.ndarray  # (n, classes)
    label_space_mass: np.ndarray  # (n,)
    top_token_is_label: np.ndarray  # (n,) bool

    @property
    def predictions(self) -> np.ndarray:
        return self.probabilities.argmax(axis=1)  # ties go to the lower index, as in classification_metrics


@dataclass
class EvaluationResult:
    output_dir: Path
    metrics: dict[str, dict]  # by model, in MODEL_ORDER: the baselines, and FINE_TUNED when an adapter was given
    comparison: dict | None
    files: list[Path] = field(default_factory=list)
    figures: list[Path] = field(default_factory=list)
    removed_stale: list[Path] = field(default_factory=list)


# ---- scoring ----------------------------------------------------------------------------------------------------
def make_predict_trainer(accelerator: str = "auto", progress_bar: bool | None = True):
    import lightning as L

    return L.Trainer(
        accelerator=accelerator,
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=True if progress_bar is None else progress_bar,
    )


def score_eval_split(trainer, module, datamodule, use_adapter: bool, encoder=None) -> ModelScores:
    """Label-token scores of every eval example through `module.predict_step` (prefix cache, sorted batches).

    `encoder`: another prompt for the same examples (e.g. k-shot); default the data's own prompt.
    """
    with module.adapter(use_adapter):
        if encoder is None:
            batches = trainer.predict(module, datamodule=datamodule)
        else:
            batches = trainer.predict(module, dataloaders=datamodule.eval_dataloader_for(encoder))
    index = np.concatenate([batch["index"] for batch in batches])
    n = len(datamodule.eval_examples)
    if sorted(index.tolist()) != list(range(n)):
        raise RuntimeError(f"predict returned indices that are not a permutation of the {n} eval examples")
    order = np.argsort(index)
    return ModelScores(
        probabilities=np.concatenate([batch["probabilities"] for batch in batches])[order],
        label_space_mass=np.concatenate([batch["label_space_mass"] for batch in batches])[order],
        top_token_is_label=np.concatenate([batch["top_token_is_label"] for batch in batches])[order].astype(bool),
    )


def score_models(trainer, module, datamodule, specs: dict[str, ModelSpec]) -> dict[str, ModelScores]:
    """Every model's scores; models that differ only by calibration share one scoring pass."""
    raw: dict[tuple[int, bool], ModelScores] = {}
    scores = {}
    for name, spec in specs.items():
        key = (id(spec.encoder), spec.use_adapter)
        if key not in raw:
            encoder = None if spec.encoder is datamodule.encoder else spec.encoder
            raw[key] = score_eval_split(trainer, module, datamodule, spec.use_adapter, encoder)
        # Calibration reweights the label tokens only: the unconstrained next-token distribution, and so the
        # label-space mass and format compliance, are the raw model's.
        scores[name] = ModelScores(
            spec.transform(raw[key].probabilities), raw[key].label_space_mass, raw[key].top_token_is_label
        )
    return scores


def compare_with_reference(
    y_true: np.ndarray, scores: dict[str, ModelScores], n_resamples: int, seed: int, reference: str
) -> dict | None:
    """`reference` minus each other model: paired bootstrap CIs and exact McNemar, Holm-adjusted across pairs."""
    others = [name for name in scores if name != reference]
    if not others:
        return None
    comparisons = {
        f"{reference}_vs_{other}": compare_predictions(
            y_true,
            scores[other].probabilities,
            scores[reference].probabilities,
            other,
            reference,
            n_resamples=n_resamples,
            seed=seed,
        )
        for other in others
    }
    adjusted = holm_adjust([c["mcnemar"]["p_value"] for c in comparisons.values()])
    for comparison, p_value in zip(comparisons.values(), adjusted):
        comparison["mcnemar"]["p_value_holm"] = p_value
    return {
        "reference": reference,
        "comparisons": comparisons,
        "multiple_testing": (
            f"McNemar p_value_holm: Holm-Bonferroni over the {len(comparisons)} comparisons of this file; the "
            "bootstrap CIs are per comparison (unadjusted)"
        ),
        "n_examples": len(y_true),
        "n_resamples": int(n_resamples),
    }


# ---- records ----------------------------------------------------------------------------------------------------
def prediction_rows(examples, label_names: list[str], scores: dict[str, ModelScores]) -> list[dict]:
    """One JSON-ready row per example: text, gold label, and each model's probabilities and prediction."""
    rows = []
    for i, example in enumerate(examples):
        row = {"index": i, "text": example.text, "label": label_names[example.label], "label_index": example.label}
        for model, score in scores.items():
            predicted = int(score.predictions[i])
            row[model] = {
                "prediction": label_names[predicted],
                "prediction_index": predicted,
                "correct": predicted == example.label,
                "probabilities": {name: float(p) for name, p in zip(label_names, score.probabilities[i])},
                "label_space_mass": float(score.label_space_mass[i]),
                "top_token_is_label": bool(score.top_token_is_label[i]),
            }
        rows.append(row)
    return rows


def source_record(spec: ModelSpec, run: LoadedRun, adapter: Path | None, adapter_meta: dict | None) -> dict:
    """What produced a metrics file. Holds names and paths only: the token stays in the environment."""
    hp = run.datamodule.hparams
    model = spec.name
    return {
        **spec.describe(),
        "display_name": display_name(model, len(spec.encoder.demonstrations)),
        "base_model": run.module.hparams.model_name,
        "dtype": run.dtype.as_dict(),  # what the base computed in, and why
        "adapter": str(adapter) if model == FINE_TUNED and adapter else None,
        "adapter_trained_on": (
            {k: adapter_meta.get(k) for k in ("base_model", "label_names")} if model == FINE_TUNED else None
        ),
        "config": str(run.config_path) if run.config_path else None,
        "overrides": list(run.arguments),
        "dataset": {
            "name": hp.dataset_name,
            "config": hp.dataset_config,
            "eval_split": hp.eval_split,
            "eval_subset": hp.eval_subset,
            "seed": hp.seed,
            "label_space": hp.label_space,
        },
        "prompt": {**spec.encoder.describe(), "dataset_name": hp.dataset_name},
        "bootstrap": {"n_resamples": run.compare.n_resamples, "seed": run.compare.seed},
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def log_to_tensorboard(folder: Path, metrics: dict[str, dict], comparison: dict | None, figures: list[Path]) -> None:
    """Every model's headline metrics, each comparison's differences, the figures and the metrics table."""
    from analysis.report.tables import comparison_lines, metrics_table

    scalars = {
        f"{model}/{name}": values[name]
        for model, values in metrics.items()
        for name in TENSORBOARD_METRICS
        if values.get(name) is not None
    }
    for pair, values in (comparison or {}).get("comparisons", {}).items():
        for name, difference in values["differences"].items():
            scalars[f"{pair}/{name}_difference"] = difference["difference"]
        scalars[f"{pair}/mcnemar_p_value"] = values["mcnemar"]["p_value"]
    write_tensorboard(
        folder,
        scalars,
        {f"evaluation/{path.stem}": path for path in figures},
        {"evaluation/metrics": metrics_table(metrics) + [""] + comparison_lines(comparison)},
    )


def show_in_notebook(paths: list[Path]) -> bool:
    """Display the figures inline when running inside a Jupyter kernel; a no-op elsewhere."""
    if "IPython" not in sys.modules:
        return False
    from IPython import get_ipython

    shell = get_ipython()
    if shell is None or "IPKernelApp" not in getattr(shell, "config", {}):
        return False
    from IPython.display import Image, display

    for path in paths:
        display(Image(filename=str(path)))
    return True


# ---- the whole run ----------------------------------------------------------------------------------------------
@dataclass
class EvaluationPlan:
    """What a run will do, derived from its settings before any model is loaded."""

    folder: Path
    adapter: Path | None
    baselines: list[str]


def check_evaluation(settings: dict) -> EvaluationPlan:
    """Everything about the evaluation options that can be wrong, checked without loading a model."""
    from lightning_modules.adapters import existing_adapter

    compare, evaluate_settings = settings["compare"], settings["evaluate"]
    adapter = existing_adapter(compare.adapter)
    baselines = check_baselines(evaluate_settings.baselines, compare.k_shot, with_adapter=adapter is not None)
    folder = check_output_dir(require_output_dir(evaluate_settings.output_dir))
    return EvaluationPlan(folder, adapter, baselines)


def evaluate(run: LoadedRun) -> EvaluationResult:
    """Score the baselines (adapter disabled) and, given an adapter, the fine-tuned model; write the reports.

    Metrics files of models this run did not evaluate are removed from the folder, so it never mixes two runs.
    """
    from lightning_modules.adapters import load_adapter

    plan = check_evaluation({"compare": run.compare, "evaluate": run.evaluate})
    datamodule, module, compare = run.datamodule, run.module, run.compare
    label_names = datamodule.label_names
    adapter_meta = load_adapter(module, plan.adapter, datamodule.prompt_description()) if plan.adapter else None

    models = plan.baselines + ([FINE_TUNED] if plan.adapter else [])
    specs = model_specs(module, datamodule, models, compare.k_shot)
    trainer = make_predict_trainer(run.trainer.get("accelerator") or "auto", run.trainer.get("enable_progress_bar"))
    scores = score_models(trainer, module, datamodule, specs)

    examples = datamodule.eval_examples
    y_true = np.array([example.label for example in examples], dtype=np.int64)
    metrics = {}
    for model, score in scores.items():
        values = classification_metrics(
            y_true,
            score.probabilities,
            label_names,
            label_space_mass=score.label_space_mass,
            top_token_is_label=score.top_token_is_label,
            n_resamples=compare.n_resamples,
            seed=compare.seed,
        )
        values["source"] = source_record(specs[model], run, plan.adapter, adapter_meta)
        metrics[model] = values
    reference = FINE_TUNED if plan.adapter else models[0]
    comparison = compare_with_reference(y_true, scores, compare.n_resamples, compare.seed, reference)
    if comparison:
        shared = ("base_model", "dtype", "adapter", "config", "overrides", "dataset", "bootstrap", "created")
        comparison["source"] = {key: metrics[reference]["source"][key] for key in shared}
        comparison["display_names"] = {model: metrics[model]["source"]["display_name"] for model in metrics}

    # Everything is computed: only now touch the output folder.
    result = write_reports(plan.folder, datamodule.eval_examples, label_names, scores, metrics, comparison)
    show_in_notebook(result.figures)
    return result


def write_reports(
    folder: Path,
    examples,
    label_names: list[str],
    scores: dict[str, ModelScores],
    metrics: dict[str, dict],
    comparison: dict | None,
) -> EvaluationResult:
    """Metrics JSONs, predictions.jsonl, comparison.json (two or more models), the three figures and TensorBoard."""
    folder.mkdir(parents=True, exist_ok=True)
    result = EvaluationResult(folder, metrics, comparison)
    for model, values in metrics.items():
        result.files.append(write_json_atomic(folder / metrics_file(model), values))
    result.files.append(write_jsonl_atomic(folder / PREDICTIONS_FILE, prediction_rows(examples, label_names, scores)))
    if comparison:
        result.files.append(write_json_atomic(folder / COMPARISON_FILE, comparison))
    stale = [folder / metrics_file(model) for model in MODEL_ORDER if model not in metrics]
    stale += [] if comparison else [folder / COMPARISON_FILE]
    for path in stale:
        if path.is_file():
            path.unlink()
            result.removed_stale.append(path)
    y_true = np.array([example.label for example in examples], dtype=np.int64)
    names = {model: values["source"]["display_name"] for model, values in metrics.items()}
    by_name = {names[model]: values for model, values in metrics.items()}
    result.figures = [
        plot_metric_comparison(by_name, folder / METRICS_PLOT),
        plot_confusion_matrices(by_name, label_names, folder / CONFUSION_PLOT),
        plot_reliability(y_true, {names[m]: s.probabilities for m, s in scores.items()}, folder / RELIABILITY_PLOT),
    ]
    result.files.extend(result.figures)
    log_to_tensorboard(folder / TENSORBOARD_DIR, metrics, comparison, result.figures)
    return result
