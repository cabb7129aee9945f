"""Every file and folder name the commands write, in one place (the README's output tables list them)."""

from __future__ import annotations

# fit (scripts/train.py)
ADAPTER_DIR = "lora_adapter"
CLASSIFICATION_FILE = "classification.json"  # inside ADAPTER_DIR: base model, labels and prompt it was trained with
CHECKPOINT_DIR = "checkpoints"
LIGHTNING_LOGS_DIR = "lightning_logs"

# evaluation (scripts/evaluate.py)
PREDICTIONS_FILE = "predictions.jsonl"
COMPARISON_FILE = "comparison.json"
METRICS_PLOT = "metrics_comparison.png"
CONFUSION_PLOT = "confusion_matrices.png"
RELIABILITY_PLOT = "reliability_diagram.png"
TENSORBOARD_DIR = "tensorboard"

# explanation (scripts/analyze.py)
INTERPRETABILITY_FILE = "interpretability_metrics.json"
DELETION_PLOT = "deletion_curves.png"
EXPLANATIONS_FILE = "explanations.html"
AGREEMENT_PLOT = "explainer_agreement.png"  # per model: mean Spearman between every two explainers
XAI_PROPERTIES_FILE = "xai_properties.json"  # per model and explainer: selectivity, fidelity, stability, ...
PROGRESS_DIR = ".progress"  # one JSON per finished example, for resuming

# remove and retrain (scripts/roar.py)
ROAR_METRICS_FILE = "roar_metrics.json"  # accuracy and macro-F1 of every condition (the original project's names)
ROAR_RESULTS_FILE = "roar_analysis_results.json"  # per explainer and share: vs random removal, vs none; per tweet
ROAR_COMPARISON_PLOT = "roar_comparison.png"
ROAR_DATA_DIR = "roar_data"  # roar_data/<condition>/{train,test}.jsonl: the rows each condition retrains on
ROAR_RUNS_DIR = "roar_runs"  # roar_runs/<condition>/: its config, fit (adapter, TensorBoard log) and result.json

# the one-command run (scripts/run_experiment.py)
CONFIG_FILE = "config.yaml"
MANIFEST_FILE = "run.json"
REPORT_FILE = "report.html"
BADGE_FILE = "quantum_identity_badge.svg"
BADGE_MANIFEST = "project_badge.json"
SEEDS_DIR = "seeds"  # seeds/seed_<k>/: the run of each further training seed (--seeds K), with its own config.yaml
SEED_METRICS_FILE = "seed_metrics.json"  # the fine-tuned metrics of every seed, their mean, sd and range


def metrics_file(model: str) -> str:
    """`<model>_metrics.json`: one compared model's evaluation metrics."""
    return f"{model}_metrics.json"


def shap_file(model: str) -> str:
    """`<model>_shap.json`: one model's SHAP values (`analysis.explanation.shap_values.load_explanation`)."""
    return f"{model}_shap.json"


def explanation_file(model: str, explainer: str) -> str:
    """One model's attributions by one explainer: `<model>_shap.json` for partition, `<model>_<explainer>.json`."""
    return shap_file(model) if explainer == "partition" else f"{model}_{explainer}.json"


def shap_summary_plot(model: str) -> str:
    return f"{model}_shap_summary.png"
