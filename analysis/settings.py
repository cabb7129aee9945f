"""The options of evaluation and explanation: each defined once, here, with its default and its help text.

These are sections of the one configuration every command reads (`analysis.configuration`): beside Lightning's
`trainer`, `model` and `data`, a YAML config may hold `compare:`, `evaluate:` and `explain:`. `scripts/train.py`
accepts and ignores them, `scripts/evaluate.py` reads `compare` and `evaluate`, `scripts/analyze.py` reads
`compare` and `explain`, and `scripts/run_experiment.py` writes all of them into the config it saves. The field
docstrings are the `--help` texts (jsonargparse reads them).

Nothing here imports torch: the settings are checked before any model is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from analysis.models import BASELINES, DEFAULT_K, ZERO_SHOT

TARGETS = ("predicted", "gold")


@dataclass
class CompareSettings:
    """The models compared and the resampling of their statistics (evaluation and explanation alike)."""

    adapter: str | None = None
    """An exported lora_adapter/ folder or a Lightning .ckpt: the fine-tuned model. Omit for the baselines only."""
    k_shot: int = DEFAULT_K
    """Demonstrations in the k_shot baseline's prompt (seeded, class-balanced, from the train split)."""
    n_resamples: int = 1000
    """Bootstrap resamples for every confidence interval."""
    seed: int = 0
    """Seed of the bootstrap resamples (and of shap's tie-breaking and the random faithfulness rankings)."""


@dataclass
class EvaluateSettings:
    """What `scripts/evaluate.py` scores; the eval rows, their number and batch size come from `data`."""

    output_dir: str | None = None
    """Folder for the metrics, predictions and plots (required)."""
    baselines: list[str] = field(default_factory=lambda: list(BASELINES))
    """Prompt-only models evaluated beside the fine-tuned one: any of zero_shot, zero_shot_calibrated, k_shot."""


@dataclass
class ExplainSettings:
    """What `scripts/analyze.py` explains with SHAP, and how."""

    output_dir: str | None = None
    """Folder for the explanations, statistics and plots (required)."""
    baselines: list[str] = field(default_factory=lambda: [ZERO_SHOT])
    """Prompt-only models explained beside the fine-tuned one: any of zero_shot, zero_shot_calibrated, k_shot."""
    example_count: int = 10
    """Explain the first N eval tweets."""
    max_evals: int = 200
    """Model evaluations per tweet and model; exact Owen values need about 2 x n_tokens per split level."""
    forward_batch_size: int = 16
    """Masked tweets per forward pass (memory only: it never changes which coalitions are evaluated)."""
    target: str = "predicted"
    """The class explained per tweet: each model's `predicted` class or the `gold` label."""
    random_orders: int = 3
    """Random token rankings per example for the faithfulness baseline (one alone is a noisy baseline)."""
    num_shards: int | None = None
    """Split the examples across this many processes (default: torchrun's WORLD_SIZE, else 1)."""
    shard_index: int | None = None
    """This process's shard, 0..num_shards-1 (default: torchrun's RANK)."""
