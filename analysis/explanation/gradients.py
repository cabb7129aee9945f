"""Integrated gradients through the embeddings of the tweet's tokens, summed per feature (word or token).

captum's `IntegratedGradients` (Gauss-Legendre quadrature) integrates the gradient of one model's label probability
(the explained probability: calibrated for the calibrated baseline) along the straight path from a baseline to the
tweet's token embeddings; the instruction and the `Label:` tail are fixed context (their key/value states come
from the prefix cache, the tail's embeddings are the real ones). The gradient flows through the LoRA adapter when
the model has it enabled and through the 4-bit (or full-precision) base weights, which stay frozen.

The baseline: every tweet token's embedding replaced by the zero vector, at the same positions (a gradient path
needs inputs of one shape, so the deletion the perturbation explainers use is not available). `base_values` are
the model's probabilities at that baseline, so base + sum(values) = f(x) up to the quadrature error, which is
reported per tweet as `completeness_error` = max over classes |sum(attributions) - (f(x) - f(baseline))|.
"""

from __future__ import annotations

import numpy as np

from analysis.explanation.shap_values import TweetMasker, TweetTokenizer


def token_features(masker: TweetMasker, encoder, text: str) -> np.ndarray:
    """For each tweet token of the prompt, the index of the feature (word or token) it belongs to."""
    offsets = TweetTokenizer(encoder)(text)["offset_mapping"]
    if masker.features == "tokens":
        return np.arange(len(offsets))
    spans = masker.tokenizer(text)["offset_mapping"]  # the words' character spans
    owner = np.zeros(len(offsets), dtype=int)
    for k, (start, end) in enumerate(offsets):
        # a byte token after the first of one character has an empty segment: it belongs to that character's word
        char = start if end > start else max(start - 1, 0)
        owner[k] = next((w for w, (a, b) in enumerate(spans) if a <= char < b), len(spans) - 1)
    return owner


def integrated_gradients(module, spec, text: str, masker: TweetMasker, steps: int, batch_size: int) -> dict:
    """One model's integrated gradients for one tweet: values (features, classes), base_values (classes,),
    f(x), completeness error, and the forward/backward passes spent (`evaluations`: steps x classes + 2)."""
    import torch
    from captum.attr import IntegratedGradients

    from lightning_modules.scoring import PrefixCache, input_embeddings, label_logits_from_embeddings

    encoder = spec.encoder
    prompt = encoder.encode(text)
    start, end = prompt.tweet_span
    owner = token_features(masker, encoder, text)
    if len(owner) != end - start:
        raise ValueError(f"{len(owner)} tweet tokens mapped to features, but the prompt holds {end - start}")
    backbone = module.backbone
    prior = None if spec.prior is None else torch.as_tensor(spec.prior, dtype=torch.float64)
    with spec.state(module):
        with torch.no_grad():
            cache = PrefixCache(backbone, encoder.prefix_ids, next(backbone.parameters()).device) if start else None
            embeddings = input_embeddings(backbone, prompt.input_ids[start:]).detach()
        tweet, tail = embeddings[:, : end - start], embeddings[:, end - start :]

        def probabilities(tweet_embeddings: torch.Tensor) -> torch.Tensor:
            rows = tweet_embeddings.shape[0]
            continuation = torch.cat([tweet_embeddings, tail.expand(rows, -1, -1)], dim=1)
            logits = label_logits_from_embeddings(backbone, continuation, encoder.label_token_ids, cache)
            p = torch.softmax(logits.double(), dim=-1)
            if prior is not None:  # contextual calibration, as `ModelSpec.transform` applies it
                p = p / prior.to(p.device)
                p = p / p.sum(dim=-1, keepdim=True)
            return p

        baseline = torch.zeros_like(tweet)
        explainer = IntegratedGradients(probabilities)
        with torch.no_grad():
            ends = probabilities(torch.cat([baseline, tweet])).cpu().numpy()
        classes = ends.shape[1]
        values = np.zeros((len(masker.feature_names(text)[0]), classes))
        for c in range(classes):
            attributions = explainer.attribute(
                tweet,
                baselines=baseline,
                target=c,
                n_steps=steps,
                method="gausslegendre",
                internal_batch_size=batch_size,
            )
            per_token = attributions.sum(dim=-1)[0].detach().double().cpu().numpy()
            np.add.at(values[:, c], owner, per_token)
    base, full = ends[0], ends[1]
    return {
        "values": values,
        "base_values": base,
        "full": full,
        "evaluations": steps * classes + 2,
        "completeness_error": float(np.abs(values.sum(axis=0) - (full - base)).max()),
        "baseline": "zero embedding at every tweet token",
    }
