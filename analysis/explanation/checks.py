"""What an explanation run will do, checked from its settings alone, before any model loads or anything is written.

Kept apart from `analysis.explanation.run` so that a one-command run checks its explanation options up front without
importing shap and its dependencies (about 0.1 GiB resident) into the fit and the evaluation that come first.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from analysis.explanation.progress import ShardAssignment
from analysis.models import check_baselines
from analysis.settings import COMPARISON_TARGETS, EXPLAINERS, FEATURES, TARGETS, CompareSettings, ExplainSettings
from foundation.errors import UserInputError
from foundation.output_folder import check_output_dir, require_output_dir


@dataclass
class ExplanationPlan:
    """What a run will do, derived from its settings before any model is loaded."""

    folder: Path
    adapter: Path | None
    baselines: list[str]
    shard: ShardAssignment


def check_explain_options(explain: ExplainSettings, compare: CompareSettings, with_adapter: bool = False) -> list[str]:
    """The explanation options on their own (no file system, no model); returns the baselines in canonical order."""
    if explain.example_count < 1:
        raise UserInputError(f"--shap-example-count must be at least 1, got {explain.example_count}.")
    check_method_options(explain)
    if "partition" not in explain.explainers:
        raise UserInputError(
            "--explainers must include partition: the statistics and the report read its values; add it, e.g. "
            "--explainers partition occlusion."
        )
    return check_baselines(explain.baselines, compare.k_shot, with_adapter)


def check_method_options(explain: ExplainSettings, explainers_flag: str = "--explainers") -> None:
    """How every explainer runs (budgets, batch size, target, features, their names): analyze.py's and roar.py's."""
    budgets = {"--shap-max-evals": explain.max_evals, "--explain.max_evals_cap": explain.max_evals_cap}
    for flag, budget in budgets.items():
        if budget == "auto" and flag == "--shap-max-evals":
            continue
        if isinstance(budget, str) and not budget.isdigit():
            raise UserInputError(f"{flag} must be auto or a number of evaluations, got {budget!r}.")
        if int(budget) < 2:
            raise UserInputError(
                f"{flag} {budget} is too small: SHAP needs at least the full and the empty tweet (2); use auto "
                f"(exact values, the default) or about 2 x the tweet length or more."
            )
    if explain.forward_batch_size < 1:
        raise UserInputError(f"--explain.forward_batch_size must be at least 1, got {explain.forward_batch_size}.")
    for flag, value, choices in (
        ("--target", explain.target, TARGETS),
        ("--comparison-target", explain.comparison_target, COMPARISON_TARGETS),
        ("--features", explain.features, FEATURES),
    ):
        if value not in choices:
            raise UserInputError(f"{flag} must be one of {', '.join(choices)}, got {value!r}.")
    unknown = [name for name in explain.explainers if name not in EXPLAINERS]
    if unknown:
        raise UserInputError(
            f"Unknown explainer {', '.join(map(repr, unknown))} in {explainers_flag}; choose from "
            f"{', '.join(EXPLAINERS)}."
        )
    for flag, value, least in (
        ("--explain.kernel_samples", explain.kernel_samples, 2),
        ("--explain.lime_samples", explain.lime_samples, 2),
        ("--explain.ig_steps", explain.ig_steps, 1),
    ):
        if value < least:
            raise UserInputError(f"{flag} must be at least {least}, got {value}.")


def check_explanation(settings: dict) -> ExplanationPlan:
    """Everything about the explanation options that can be wrong, checked without loading a model."""
    from lightning_modules.adapters import existing_adapter

    compare, explain = settings["compare"], settings["explain"]
    adapter = existing_adapter(compare.adapter)
    baselines = check_explain_options(explain, compare, with_adapter=adapter is not None)
    shard = ShardAssignment.resolve(explain.shard_index, explain.num_shards)
    folder = check_output_dir(require_output_dir(explain.output_dir))
    return ExplanationPlan(folder, adapter, baselines, shard)
