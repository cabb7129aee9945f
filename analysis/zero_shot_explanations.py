"""SHAP for the zero-shot model alone (the original's run without `--finetune`), from `analysis.analyze`'s parts.

`analysis.analyze.run_analysis` needs an adapter because it explains both models on the same coalitions. Without
one there is only the base model: the same per-example explainer (`explain_example`), statistics, faithfulness
summary, figures and page are applied to it, and the files keep their names. Nothing is computed differently.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from analysis.analyze import (
    ADDITIVITY_TOLERANCE,
    DELETION_PLOT,
    HTML_FILE,
    METRICS_FILE,
    SHAP_FILES,
    SUMMARY_PLOTS,
    TOP_TOKENS,
    explain_example,
)
from analysis.evaluation import DISPLAY_NAMES, check_output_dir
from analysis.explanation_plots import plot_deletion_curves, plot_top_tokens
from analysis.explanation_stats import model_statistics
from analysis.explanations_html import explanations_html
from analysis.faithfulness import FRACTIONS, RANDOM_ORDERS, summarize_model_faithfulness
from analysis.files import write_json_atomic, write_text_atomic
from analysis.shap_explain import (
    BUDGET_NOTE,
    ZERO_SHOT,
    explanation_file_content,
    fit_to_budget,
    model_value_functions,
    normalize_tweet,
    target_values,
    tweet_masker,
)
from lightning_modules.errors import UserInputError


@dataclass
class ZeroShotExplanations:
    output_dir: Path
    metrics: dict
    files: list[Path] = field(default_factory=list)
    summary: list[str] = field(default_factory=list)


def explain_zero_shot(
    config: str | Path,
    output_dir: str | Path,
    example_count: int = 10,
    max_evals: int = 200,
    batch_size: int = 16,
    target: str = "predicted",
    seed: int = 0,
    n_resamples: int = 1000,
    log: Callable[[str], None] = lambda message: print(message, file=sys.stderr, flush=True),
) -> ZeroShotExplanations:
    """Explain the first `example_count` eval tweets with the base model; write the zero-shot files."""
    from scripts.cli import build_from_config

    folder = check_output_dir(output_dir)
    datamodule, module = build_from_config(str(config), [])
    if torch.cuda.is_available() and not module.quantized:
        module.to("cuda")  # 4-bit weights are placed when loaded; a full-precision backbone is moved here
    encoder, label_names, examples = datamodule.encoder, datamodule.label_names, datamodule.eval_examples
    notes = []
    if example_count > len(examples):
        notes.append(
            f"--shap-example-count {example_count} is larger than the eval set; explaining all {len(examples)} examples"
        )
    masker = tweet_masker(encoder)
    value_functions = {ZERO_SHOT: model_value_functions(module, encoder, batch_size)[ZERO_SHOT]}
    records = []
    for index, example in enumerate(examples[:example_count]):
        text, _ = fit_to_budget(encoder, normalize_tweet(example.text))
        if not text or not encoder.tweet_ids(text):
            notes.append(f"example {index} has an empty tweet; skipped")
            continue
        record = explain_example(index, text, example.label, encoder, masker, value_functions, max_evals, target, seed)
        records.append(record)
        log(f"explained example {index + 1}/{min(example_count, len(examples))} in {record['seconds']:.1f} s")
    if not records:
        raise UserInputError(f"None of the first {example_count} eval examples has tweet text to explain.")
    for note in notes:
        log(f"note: {note}")

    settings = {
        "base_model": module.hparams.model_name,
        "adapter": None,
        "prompt": datamodule.prompt_description(),
        "max_evals": max_evals,
        "target": target,
        "seed": seed,
        "masking": "masked tweet tokens are deleted; the base value is the empty tweet",
    }
    content = explanation_file_content(ZERO_SHOT, records, label_names, settings)
    statistics = model_statistics(target_values(content), content["feature_names"], top_k=TOP_TOKENS)
    faithfulness = summarize_model_faithfulness(
        [r["models"][ZERO_SHOT]["faithfulness"] for r in records], n_resamples, seed
    )
    largest_error = max(r["models"][ZERO_SHOT]["additivity_error"] for r in records)
    metrics = {
        "settings": settings,
        "notes": notes,
        "n_examples": len(records),
        "models": [ZERO_SHOT],
        "additivity": {
            "max_abs_error": largest_error,
            "per_model": {ZERO_SHOT: largest_error},
            "tolerance": ADDITIVITY_TOLERANCE,
            "within_tolerance": largest_error < ADDITIVITY_TOLERANCE,
        },
        "budget": {
            "max_evals": max_evals,
            "meaning": BUDGET_NOTE,
            "counts": {
                name: [r["resolution"] for r in records].count(name) for name in ("exact", "approximate", "coarse")
            },
        },
        ZERO_SHOT: statistics,
        "faithfulness": {
            "fractions": list(FRACTIONS),
            "random_orders_per_example": RANDOM_ORDERS,
            ZERO_SHOT: faithfulness,
        },
    }
    title = f"{DISPLAY_NAMES[ZERO_SHOT]}: top {TOP_TOKENS} tokens ({len(records)} tweets)"
    files = [
        write_json_atomic(folder / SHAP_FILES[ZERO_SHOT], content),
        plot_top_tokens(statistics["top_tokens"], title, folder / SUMMARY_PLOTS[ZERO_SHOT]),
        plot_deletion_curves({DISPLAY_NAMES[ZERO_SHOT]: faithfulness}, folder / DELETION_PLOT),
        write_text_atomic(
            folder / HTML_FILE,
            explanations_html(records, label_names, DISPLAY_NAMES, "Zero-shot: SHAP of the tweet tokens"),
        ),
        write_json_atomic(folder / METRICS_FILE, metrics),
    ]
    top = ", ".join(row["token"] for row in statistics["top_tokens"][:5])
    summary = [
        f"explained {len(records)} tweets with the zero-shot model; largest additivity error {largest_error:.2e}",
        f"zero-shot: mean |SHAP| {statistics['mean_abs_importance']:.4f}, Gini {statistics['mean_gini']:.3f}; "
        f"top tokens: {top}",
    ]
    return ZeroShotExplanations(folder, metrics, files, summary)
