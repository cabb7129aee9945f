"""The options of evaluation and explanation: each defined once, here, with its default and its help text.

These are sections of the one configuration every command reads (`analysis.configuration`): beside Lightning's
`trainer`, `model` and `data`, a YAML config may hold `compare:`, `evaluate:`, `explain:` and `roar:`.
`scripts/train.py` accepts and ignores them, `scripts/evaluate.py` reads `compare` and `evaluate`,
`scripts/analyze.py` reads `compare` and `explain`, `scripts/roar.py` reads `compare`, `explain` and `roar`, and
`scripts/run_experiment.py` writes all of them into the config it saves. The field docstrings are the `--help`
texts (jsonargparse reads them).

Nothing here imports torch: the settings are checked before any model is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from analysis.models import BASELINES, DEFAULT_K, ZERO_SHOT

TARGETS = ("predicted", "gold")
COMPARISON_TARGETS = ("gold", "reference")
FEATURES = ("words", "tokens")  # analysis.explanation.shap_values.TweetMasker's features
# Attribution methods on the same features: `partition` (shap's Owen values: every statistic and the report read them),
# the perturbation explainers on the same value function, and integrated gradients through the embeddings.
EXPLAINERS = ("partition", "kernel", "lime", "occlusion", "integrated_gradients")
ROAR_CONTROL = "random"  # ROAR's control: the same number of words removed from each tweet, chosen at random


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
    max_evals: int | str = "auto"
    """Model evaluations per tweet and model: `auto` gives each tweet exactly the evaluations that resolve every
    split of its partition tree (exact Owen values, no shared credit), up to `max_evals_cap`; a number is a fixed
    budget for every tweet (below what exact values need, credit stays shared inside unsplit groups)."""
    max_evals_cap: int = 512
    """With `max_evals: auto`, the most evaluations a tweet gets; a capped tweet is flagged in the files and the
    report. 512 keeps 95 % of the 7,437 embedded eval tweets exact with word features (their median needs 172)."""
    exact_shapley_check: int = 0
    """Also compute exact Shapley values by enumerating every coalition (plain padded forwards) for the N shortest
    explained tweets of at most 10 features, and report how far the Owen values are from them."""
    forward_batch_size: int = 16
    """Masked tweets per forward pass (memory only: it never changes which coalitions are evaluated)."""
    features: str = "words"
    """What a feature is: `words` (whitespace-delimited units: an @mention, a #hashtag, an emoji run, a word with its
    punctuation; all its tokens masked together) or `tokens` (the tokenizer's tokens)."""
    target: str = "predicted"
    """The class each model's own statistics explain per tweet: its `predicted` class or the `gold` label."""
    comparison_target: str = "gold"
    """The one class per tweet every comparison of two models reads: the `gold` label or the `reference` model's
    (fine-tuned, else the first baseline's) prediction."""
    explainers: list[str] = field(default_factory=lambda: ["partition"])
    """Attribution methods, on the same features and target: `partition` (Owen values, `<model>_shap.json`; always
    included: the statistics and the report read it); `kernel` (KernelSHAP, `kernel_samples` coalitions, seeded);
    `lime` (LIME's weighted ridge surrogate on `lime_samples` masked tweets, seeded); `occlusion` (leave-one-out,
    n + 1 evaluations, exact); `integrated_gradients` (through the tweet's token embeddings from a zero baseline,
    summed per feature, `ig_steps` steps). Each writes `<model>_<explainer>.json`; with more than one, the
    agreement between them, the comparison under each and xai_properties.json."""
    kernel_samples: int = 512
    """Coalitions KernelSHAP evaluates per tweet (all models on the same ones); at 2^n - 2 or more for n features
    it enumerates them all: exact Shapley values."""
    lime_samples: int = 512
    """Masked tweets in LIME's neighbourhood per tweet (the lime package's text default is 5,000)."""
    ig_steps: int = 32
    """Gauss-Legendre steps of integrated gradients per class; the completeness error is reported per tweet."""
    measure_stability: bool = False
    """Measure the stability and identity properties (xai_properties.json): explain every tweet again with another
    explainer seed and after two meaning-preserving edits (case change, the least important word deleted), with
    every explainer: about 3x the explanation time."""
    random_orders: int = 3
    """Random token rankings per example for the faithfulness baseline (one alone is a noisy baseline)."""
    num_shards: int | None = None
    """Split the examples across this many processes (default: torchrun's WORLD_SIZE, else 1)."""
    shard_index: int | None = None
    """This process's shard, 0..num_shards-1 (default: torchrun's RANK)."""


@dataclass
class RoarSettings:
    """What `scripts/roar.py` removes before retraining; the recipe, the rows and their sizes come from the config."""

    output_dir: str | None = None
    """Folder for the ablated data, the retrained adapters and the ROAR results (required)."""
    explainers: list[str] = field(default_factory=lambda: ["occlusion"])
    """Explainers whose rankings remove words (any of the analysis explainers; the `random` control always runs).
    Each explains every training and evaluation tweet with the model under study, at its `explain.target` class."""
    fractions: list[float] = field(default_factory=lambda: [0.1, 0.3, 0.5])
    """Shares of each tweet's words removed, each strictly between 0 and 1: round(share x words), at least one
    word removed and one kept."""
