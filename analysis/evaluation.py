"""Baselines vs fine-tuned evaluation: score every model through the module's predict loop, then metrics and files.

The compared models are those of `analysis.baselines`: raw zero-shot, calibrated zero-shot, k-shot and, given an
adapter, the fine-tuned model. Each gets a `<model>_metrics.json`; `comparison.json` compares every baseline with
the fine-tuned model (without an adapter: every other baseline with raw zero-shot).

Everything a user can get wrong (config, adapter, labels, prompt, output folder) is checked before the first
file is written, so a failed run leaves the output folder as it was.
"""

from __future__ import annotations

import datetime as dt
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from analysis.baselines import (
    BASELINES,
    DEFAULT_K,
    FINE_TUNED,
    MODEL_ORDER,
    ModelSpec,
    check_baselines,
    display_name,
    model_specs,
)
from analysis.classification_metrics import classification_metrics, compare_predictions, holm_adjust
from analysis.files import write_json_atomic, write_jsonl_atomic
from analysis.plots import plot_confusion_matrices, plot_metric_comparison, plot_reliability
from lightning_modules.errors import UserInputError

METRICS_FILES = {model: f"{model}_metrics.json" for model in MODEL_ORDER}
PREDICTIONS_FILE = "predictions.jsonl"
COMPARISON_FILE = "comparison.json"
METRICS_PLOT = "metrics_comparison.png"
CONFUSION_PLOT = "confusion_matrices.png"
RELIABILITY_PLOT = "reliability_diagram.png"
TENSORBOARD_DIR = "tensorboard"
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


# ---- checks -----------------------------------------------------------------------------------------------------
def check_output_dir(path: str | Path) -> Path:
    """The absolute output folder, after checking it can be written, without creating anything."""
    folder = Path(path).expanduser().resolve()
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserInputError(
            f"Cannot write to the output folder '{folder}': '{existing}' is a file, not a folder; "
            "choose another --output-dir."
        )
    try:
        with tempfile.TemporaryFile(dir=existing):  # unlinked at once: leaves nothing behind
            pass
    except OSError as error:
        raise UserInputError(
            f"Cannot write to the output folder '{folder}' ({error.strerror}); choose another --output-dir."
        ) from error
    return folder


# ---- scoring ----------------------------------------------------------------------------------------------------
def make_predict_trainer(accelerator: str = "auto", progress_bar: bool = True):
    import lightning as L

    return L.Trainer(
        accelerator=accelerator,
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress_bar,
    )


def score_eval_split(trainer, module, datamodule, use_adapter: bool, encoder=None) -> ModelScores:
    """Label-token scores of every eval example through `module.predict_step` (prefix cache, sorted batches).

    `encoder`: another prompt for the same examples (e.g. k-shot); default the data's own prompt.
    """
    module.use_adapter = use_adapter
    try:
        if encoder is None:
            batches = trainer.predict(module, datamodule=datamodule)
        else:
            batches = trainer.predict(module, dataloaders=datamodule.eval_dataloader_for(encoder))
    finally:
        module.use_adapter = True
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


def compare_models(
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


def source_record(
    spec: ModelSpec,
    module,
    datamodule,
    config: str | Path | None,
    overrides: list[str],
    adapter: Path | None,
    adapter_meta: dict | None,
    n_resamples: int,
    seed: int,
) -> dict:
    """What produced a metrics file. Holds names and paths only: the token stays in the environment."""
    hp = datamodule.hparams
    model = spec.name
    return {
        **spec.describe(),
        "display_name": display_name(model, len(spec.encoder.demonstrations)),
        "base_model": module.hparams.model_name,
        "adapter": str(adapter) if model == FINE_TUNED and adapter else None,
        "adapter_trained_on": (
            {k: adapter_meta.get(k) for k in ("base_model", "label_names")} if model == FINE_TUNED else None
        ),
        "config": str(Path(config).resolve()) if config else None,
        "overrides": list(overrides),
        "dataset": {
            "name": hp.dataset_name,
            "config": hp.dataset_config,
            "eval_split": hp.eval_split,
            "eval_subset": hp.eval_subset,
            "seed": hp.seed,
            "label_space": hp.label_space,
        },
        "prompt": {**spec.encoder.describe(), "dataset_name": hp.dataset_name},
        "bootstrap": {"n_resamples": n_resamples, "seed": seed},
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def log_to_tensorboard(folder: Path, metrics: dict[str, dict], comparison: dict | None) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(folder))
    try:
        for model, values in metrics.items():
            for name in TENSORBOARD_METRICS:
                if values.get(name) is not None:
                    writer.add_scalar(f"{model}/{name}", values[name], 0)
        for pair, values in (comparison or {}).get("comparisons", {}).items():
            for name, difference in values["differences"].items():
                writer.add_scalar(f"{pair}/{name}_difference", difference["difference"], 0)
            writer.add_scalar(f"{pair}/mcnemar_p_value", values["mcnemar"]["p_value"], 0)
    finally:
        writer.close()


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
def evaluate(
    config: str | Path,
    output_dir: str | Path,
    adapter: str | Path | None = None,
    eval_subset: int | None = None,
    batch_size: int | None = None,
    n_resamples: int = 1000,
    seed: int = 0,
    accelerator: str = "auto",
    progress_bar: bool = True,
    extra_overrides: list[str] | None = None,
    baselines: tuple[str, ...] | list[str] = BASELINES,
    k_shot: int = DEFAULT_K,
) -> EvaluationResult:
    """Score the baselines (adapter disabled) and, given `adapter`, the fine-tuned model; write the reports.

    `baselines`: any of `zero_shot`, `zero_shot_calibrated`, `k_shot` (with `k_shot` demonstrations). Metrics
    files of models this run did not evaluate are removed from the folder, so it never mixes two runs.
    """
    from lightning_modules.adapters import existing_adapter, load_adapter
    from scripts.cli import build_from_config

    baselines = check_baselines(baselines, k_shot)
    folder = check_output_dir(output_dir)
    adapter_path = existing_adapter(adapter)
    overrides = list(extra_overrides or [])
    if eval_subset is not None:
        overrides += ["--data.eval_subset", str(eval_subset)]
    if batch_size is not None:
        overrides += ["--data.eval_batch_size", str(batch_size)]
    datamodule, module = build_from_config(str(config), overrides)
    label_names = datamodule.label_names
    adapter_meta = load_adapter(module, adapter_path, datamodule.prompt_description()) if adapter_path else None

    models = baselines + ([FINE_TUNED] if adapter_path else [])
    specs = model_specs(module, datamodule, models, k_shot)
    trainer = make_predict_trainer(accelerator, progress_bar)
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
            n_resamples=n_resamples,
            seed=seed,
        )
        values["source"] = source_record(
            specs[model], module, datamodule, config, overrides, adapter_path, adapter_meta, n_resamples, seed
        )
        metrics[model] = values
    reference = FINE_TUNED if adapter_path else models[0]
    comparison = compare_models(y_true, scores, n_resamples, seed, reference)
    if comparison:
        shared = ("base_model", "adapter", "config", "overrides", "dataset", "bootstrap", "created")
        comparison["source"] = {key: metrics[reference]["source"][key] for key in shared}
        comparison["display_names"] = {model: metrics[model]["source"]["display_name"] for model in metrics}

    # Everything is computed: only now touch the output folder.
    result = write_reports(folder, datamodule.eval_examples, label_names, scores, metrics, comparison)
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
        result.files.append(write_json_atomic(folder / METRICS_FILES[model], values))
    result.files.append(write_jsonl_atomic(folder / PREDICTIONS_FILE, prediction_rows(examples, label_names, scores)))
    if comparison:
        result.files.append(write_json_atomic(folder / COMPARISON_FILE, comparison))
    stale = [folder / METRICS_FILES[model] for model in MODEL_ORDER if model not in metrics]
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
    log_to_tensorboard(folder / TENSORBOARD_DIR, metrics, comparison)
    return result


def metrics_table(metrics: dict[str, dict]) -> list[str]:
    """A Markdown table of every model's headline metrics with 95 % CIs (the README's table comes from here)."""

    def with_ci(values: dict, name: str) -> str:
        ci = values["confidence_intervals"][name]
        return f"{values[name]:.3f} [{ci['low']:.3f}, {ci['high']:.3f}]"

    lines = [
        "| model | accuracy [95% CI] | macro-F1 [95% CI] | MCC | ECE | format compliance | n |",
        "|---|---|---|---|---|---|---|",
    ]
    for values in metrics.values():
        lines.append(
            f"| {values['source']['display_name']} | {with_ci(values, 'accuracy')} | {with_ci(values, 'macro_f1')} "
            f"| {values['mcc']:.3f} | {values['ece']:.3f} | {values['format_compliance']:.3f} "
            f"| {values['n_examples']} |"
        )
    return lines


def comparison_lines(comparison: dict | None) -> list[str]:
    """One line per compared pair: accuracy and macro-F1 differences with CIs, McNemar p (raw and Holm)."""
    if not comparison:
        return []
    names = comparison.get("display_names", {})
    lines = []
    for values in comparison["comparisons"].values():
        model, baseline = names.get(values["model"], values["model"]), names.get(values["baseline"], values["baseline"])
        parts = []
        for metric in ("accuracy", "macro_f1"):
            d = values["differences"][metric]
            parts.append(f"{metric} {d['difference']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]")
        mcnemar = values["mcnemar"]
        lines.append(
            f"{model} - {baseline}: {', '.join(parts)}; McNemar p = {mcnemar['p_value']:.3g} "
            f"(Holm {mcnemar['p_value_holm']:.3g}, {mcnemar['n_discordant']} discordant)"
        )
    return lines


def summary_lines(result: EvaluationResult) -> list[str]:
    """A short human-readable report of a run: headline metrics with CIs, the comparisons, the files."""
    lines = metrics_table(result.metrics) + comparison_lines(result.comparison)
    for stale in result.removed_stale:
        lines.append(f"removed {stale} from an earlier run with other models")
    lines.append(f"results in {result.output_dir}")
    lines.append("figures:")
    lines.extend(f"  {path.resolve()}" for path in result.figures)
    return lines
