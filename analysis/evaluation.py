"""Zero-shot vs fine-tuned evaluation: score both through the module's predict loop, then metrics and files.

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

from analysis.classification_metrics import classification_metrics, compare_predictions
from analysis.files import write_json_atomic, write_jsonl_atomic
from analysis.plots import plot_confusion_matrices, plot_metric_comparison, plot_reliability
from lightning_modules.errors import UserInputError

ZERO_SHOT = "zero_shot"
FINE_TUNED = "fine_tuned"
DISPLAY_NAMES = {ZERO_SHOT: "zero-shot", FINE_TUNED: "fine-tuned"}
METRICS_FILES = {ZERO_SHOT: "zero_shot_metrics.json", FINE_TUNED: "fine_tuned_metrics.json"}
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
# The prompt fields an adapter must share with the data it is evaluated on (label names are checked on load).


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
    metrics: dict[str, dict]  # by model: ZERO_SHOT, and FINE_TUNED when an adapter was given
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


def load_fine_tuned(module, adapter: str | Path, prompt: dict) -> dict:
    """Load the adapter into `module`, checked against this base model, label space and prompt."""
    from lightning_modules.adapters import load_adapter

    return load_adapter(module, Path(adapter).expanduser().resolve(), prompt)


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


def score_eval_split(trainer, module, datamodule, use_adapter: bool) -> ModelScores:
    """Label-token scores of every eval example through `module.predict_step` (prefix cache, sorted batches)."""
    module.use_adapter = use_adapter
    try:
        batches = trainer.predict(module, datamodule=datamodule)
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
    model: str,
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
    return {
        "model": model,
        "base_model": module.hparams.model_name,
        "adapter_enabled": model == FINE_TUNED,
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
        "prompt": datamodule.prompt_description(),
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
        if comparison:
            for name, difference in comparison["differences"].items():
                writer.add_scalar(f"comparison/{name}_difference", difference["difference"], 0)
            writer.add_scalar("comparison/mcnemar_p_value", comparison["mcnemar"]["p_value"], 0)
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
) -> EvaluationResult:
    """Score the zero-shot model (adapter disabled) and, given `adapter`, the fine-tuned one; write the reports.

    Without `adapter` only the zero-shot files are written (and stale fine-tuned ones from an earlier run in the
    same folder are removed, so the folder never mixes two runs).
    """
    from scripts.cli import build_from_config

    folder = check_output_dir(output_dir)
    adapter_path = Path(adapter).expanduser().resolve() if adapter else None
    if adapter_path and not adapter_path.exists():  # fail before the (slow) model load
        raise UserInputError(
            f"The adapter '{adapter_path}' does not exist; pass a lora_adapter/ folder or a .ckpt file."
        )
    overrides = list(extra_overrides or [])
    if eval_subset is not None:
        overrides += ["--data.eval_subset", str(eval_subset)]
    if batch_size is not None:
        overrides += ["--data.eval_batch_size", str(batch_size)]
    datamodule, module = build_from_config(str(config), overrides)
    label_names = datamodule.label_names
    prompt = datamodule.prompt_description()
    adapter_meta = load_fine_tuned(module, adapter_path, prompt) if adapter_path else None

    trainer = make_predict_trainer(accelerator, progress_bar)
    scores = {ZERO_SHOT: score_eval_split(trainer, module, datamodule, use_adapter=False)}
    if adapter_path:
        scores[FINE_TUNED] = score_eval_split(trainer, module, datamodule, use_adapter=True)

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
            model, module, datamodule, config, overrides, adapter_path, adapter_meta, n_resamples, seed
        )
        metrics[model] = values
    comparison = None
    if adapter_path:
        comparison = compare_predictions(
            y_true,
            scores[ZERO_SHOT].probabilities,
            scores[FINE_TUNED].probabilities,
            ZERO_SHOT,
            FINE_TUNED,
            n_resamples=n_resamples,
            seed=seed,
        )
        comparison["source"] = {k: v for k, v in metrics[FINE_TUNED]["source"].items() if k != "model"}

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
    """Metrics JSONs, predictions.jsonl, comparison.json (with an adapter), the three figures and TensorBoard."""
    folder.mkdir(parents=True, exist_ok=True)
    result = EvaluationResult(folder, metrics, comparison)
    for model, values in metrics.items():
        result.files.append(write_json_atomic(folder / METRICS_FILES[model], values))
    result.files.append(write_jsonl_atomic(folder / PREDICTIONS_FILE, prediction_rows(examples, label_names, scores)))
    if comparison:
        result.files.append(write_json_atomic(folder / COMPARISON_FILE, comparison))
    else:
        for stale in (folder / METRICS_FILES[FINE_TUNED], folder / COMPARISON_FILE):
            if stale.is_file():
                stale.unlink()
                result.removed_stale.append(stale)
    y_true = np.array([example.label for example in examples], dtype=np.int64)
    by_name = {DISPLAY_NAMES[model]: values for model, values in metrics.items()}
    result.figures = [
        plot_metric_comparison(by_name, folder / METRICS_PLOT),
        plot_confusion_matrices(by_name, label_names, folder / CONFUSION_PLOT),
        plot_reliability(
            y_true, {DISPLAY_NAMES[m]: s.probabilities for m, s in scores.items()}, folder / RELIABILITY_PLOT
        ),
    ]
    result.files.extend(result.figures)
    log_to_tensorboard(folder / TENSORBOARD_DIR, metrics, comparison)
    return result


def summary_lines(result: EvaluationResult) -> list[str]:
    """A short human-readable report of a run: headline metrics with CIs, the comparison, the files."""

    def with_ci(values: dict, name: str) -> str:
        ci = values["confidence_intervals"][name]
        return f"{values[name]:.3f} [{ci['low']:.3f}, {ci['high']:.3f}]"

    lines = []
    for model, values in result.metrics.items():
        lines.append(
            f"{DISPLAY_NAMES[model]:>10}: accuracy {with_ci(values, 'accuracy')}"
            f"  macro-F1 {with_ci(values, 'macro_f1')}  ECE {values['ece']:.3f}"
            f"  format compliance {values['format_compliance']:.3f}"
            f"  (n={values['n_examples']})"
        )
    if result.comparison:
        for name in ("accuracy", "macro_f1"):
            d = result.comparison["differences"][name]
            lines.append(
                f"fine-tuned - zero-shot {name}: {d['difference']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]"
            )
        mcnemar = result.comparison["mcnemar"]
        lines.append(f"exact McNemar: p = {mcnemar['p_value']:.4g} ({mcnemar['n_discordant']} discordant pairs)")
    for stale in result.removed_stale:
        lines.append(f"removed {stale} from an earlier run with an adapter")
    lines.append(f"results in {result.output_dir}")
    lines.append("figures:")
    lines.extend(f"  {path.resolve()}" for path in result.figures)
    return lines
