"""The models a run compares: raw zero-shot, calibrated zero-shot, k-shot, and the LoRA fine-tuned model.

Each is one way of reading the same base model's label-token probabilities:

- `zero_shot`: the base model (adapter disabled) on the run's prompt.
- `zero_shot_calibrated`: the same probabilities divided by the model's label prior on content-free tweets ("",
  "N/A", "[MASK]") and renormalised (contextual calibration, Zhao et al. 2021). Nothing is re-scored.
- `k_shot`: the base model on a prompt whose fixed prefix also holds k seeded, class-balanced training tweets
  with their labels (never eval tweets); the prefix KV cache serves them.
- `fine_tuned`: the run's prompt with the LoRA adapter enabled.

Evaluation and SHAP both build their scorers from `ModelSpec`, so the two always read the same model.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np

from analysis.statistics.calibration import CONTENT_FREE_INPUTS, calibrate, content_free_prior
from foundation.errors import UserInputError
from foundation.memory import release_free_heap

ZERO_SHOT = "zero_shot"
CALIBRATED = "zero_shot_calibrated"
K_SHOT = "k_shot"
FINE_TUNED = "fine_tuned"
BASELINES = (ZERO_SHOT, CALIBRATED, K_SHOT)
MODEL_ORDER = (*BASELINES, FINE_TUNED)
DEFAULT_K = 4
DISPLAY_NAMES = {
    ZERO_SHOT: "zero-shot",
    CALIBRATED: "calibrated zero-shot",
    K_SHOT: "k-shot",
    FINE_TUNED: "fine-tuned",
}


def display_name(model: str, k: int | None = None) -> str:
    """`4-shot` for the k-shot baseline when k is known; the fixed name otherwise."""
    if model == K_SHOT and k:
        return f"{k}-shot"
    return DISPLAY_NAMES.get(model, model.replace("_", " "))


def check_baselines(baselines, k: int, with_adapter: bool = False) -> list[str]:
    """The requested baselines in canonical order, or one sentence on what is wrong. None at all is allowed beside
    an adapter (the fine-tuned model alone, e.g. another training seed's)."""
    baselines = list(dict.fromkeys(baselines))
    unknown = [name for name in baselines if name not in BASELINES]
    if unknown:
        raise UserInputError(f"Unknown baseline {', '.join(map(repr, unknown))}; choose from {', '.join(BASELINES)}.")
    if not baselines and not with_adapter:
        raise UserInputError(f"Name at least one baseline ({', '.join(BASELINES)}), or give an adapter.")
    if K_SHOT in baselines and k < 1:
        raise UserInputError(f"The k-shot baseline needs at least one demonstration, got k={k}; pass --k-shot 4.")
    return [name for name in BASELINES if name in baselines]


@dataclass
class ModelSpec:
    """How one compared model scores a tweet: which prompt, adapter on or off, and an optional calibration prior."""

    name: str
    encoder: object  # datamodules.prompts.PromptEncoder
    use_adapter: bool
    prior: np.ndarray | None = None
    content_free_probabilities: np.ndarray | None = None

    def state(self, module) -> contextlib.AbstractContextManager:
        """The module state this model is read in: `module.adapter(enabled)`."""
        return module.adapter(self.use_adapter)

    def scorer(self, module, mode: str = "prefix_cache", head: str = "full", batch_size: int = 16):
        """This model's `LabelScorer` (raw label probabilities: `transform` applies the calibration)."""
        from lightning_modules.scoring import LabelScorer  # torch: only where a model is scored

        return LabelScorer(
            module.backbone,
            self.encoder.prefix_ids,
            self.encoder.label_token_ids,
            mode=mode,
            head=head,
            batch_size=batch_size,
            pad_token_id=self.encoder.tokenizer.pad_token_id or 0,
            state=lambda: self.state(module),
        )

    def transform(self, probabilities: np.ndarray) -> np.ndarray:
        """Raw label probabilities -> this model's probabilities (calibration, where it has a prior)."""
        return probabilities if self.prior is None else calibrate(probabilities, self.prior)

    def describe(self) -> dict:
        record = {
            "model": self.name,
            "adapter_enabled": self.use_adapter,
            "num_demonstrations": len(self.encoder.demonstrations),
            "demonstrations": [{"text": text, "label": label} for text, label in self.encoder.demonstrations],
        }
        if self.prior is not None:
            record["calibration"] = {
                "method": "contextual calibration (Zhao et al., 2021): p / prior, renormalised",
                "content_free_inputs": list(CONTENT_FREE_INPUTS),
                "content_free_probabilities": self.content_free_probabilities.tolist(),
                "prior": self.prior.tolist(),
            }
        return record


def content_free_probabilities(module, encoder, inputs=CONTENT_FREE_INPUTS) -> np.ndarray:
    """Label probabilities of the base model (adapter disabled, eval mode) with each content-free input as the tweet."""
    scorer = ModelSpec(ZERO_SHOT, encoder, use_adapter=False).scorer(module, batch_size=len(inputs))
    was_training = module.training
    module.eval()
    try:
        scores = scorer([encoder.continuation(text) for text in inputs])
    finally:
        module.train(was_training)
    return scores.probabilities


def model_specs(module, datamodule, models, k: int = DEFAULT_K) -> dict[str, ModelSpec]:
    """The scorers of `models` (names from MODEL_ORDER) for this module and data, in canonical order."""
    specs = {}
    for name in (m for m in MODEL_ORDER if m in models):
        if name == ZERO_SHOT:
            specs[name] = ModelSpec(name, datamodule.encoder, use_adapter=False)
        elif name == CALIBRATED:
            probabilities = content_free_probabilities(module, datamodule.encoder)
            specs[name] = ModelSpec(
                name,
                datamodule.encoder,
                use_adapter=False,
                prior=content_free_prior(probabilities),
                content_free_probabilities=probabilities,
            )
        elif name == K_SHOT:
            specs[name] = ModelSpec(name, datamodule.make_encoder(k), use_adapter=False)
        else:
            specs[name] = ModelSpec(name, datamodule.encoder, use_adapter=True)
    return specs


def to_device(module) -> None:
    """On a GPU, move a full-precision backbone there (4-bit weights are placed on their device when loaded)."""
    import torch

    if torch.cuda.is_available() and not module.quantized:
        module.to(f"cuda:{torch.cuda.current_device()}")


def release_memory() -> None:
    """Free what a finished fit or model left behind before the next one loads."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    release_free_heap()
