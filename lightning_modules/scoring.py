"""The one place that turns prompts into label-token probabilities.

Training, evaluation, SHAP and faithfulness all go through `logits_at_positions` / `score_prompts`, so every number
the toolkit reports reads the same position of the same model.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


def _causal_lm(model):
    """The `*ForCausalLM` inside a peft wrapper (LoRA layers are injected in place, so they stay active)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _cache_kwargs(decoder, cache) -> dict:
    """transformers 5.x renamed the decoder's `past_key_values` argument to `cache`; pass whichever it takes."""
    if cache is None:
        return {"use_cache": False}
    name = "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"
    return {name: cache, "use_cache": True}


def logits_at_positions(
    model,
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    past_key_values=None,
) -> torch.Tensor:
    """Full-vocabulary logits at one position per row, shape (batch, vocab).

    Runs the decoder, gathers one hidden state per row and applies the lm_head there only: with a 128k vocabulary,
    logits at every position would cost gigabytes for nothing.
    """
    causal_lm = _causal_lm(model)
    decoder = causal_lm.get_decoder()
    outputs = decoder(input_ids=input_ids, attention_mask=attention_mask, **_cache_kwargs(decoder, past_key_values))
    hidden = outputs.last_hidden_state[torch.arange(input_ids.shape[0], device=input_ids.device), positions]
    return causal_lm.get_output_embeddings()(hidden)


@dataclass
class LabelScores:
    """Per-example scores at the label position; arrays in the order the prompts were given."""

    probabilities: np.ndarray  # (n, classes): softmax over the label tokens only
    label_space_mass: np.ndarray  # (n,): probability the unconstrained next token is a label token
    top_token_is_label: np.ndarray  # (n,) bool: the unconstrained arg-max is a label token


class PrefixCache:
    """Key/value states of the instruction prefix shared by every prompt, computed once per model state."""

    def __init__(self, model, prefix_ids: Sequence[int], device: torch.device):
        from transformers import DynamicCache

        ids = torch.tensor([list(prefix_ids)], dtype=torch.long, device=device)
        cache = DynamicCache()
        decoder = _causal_lm(model).get_decoder()
        decoder(input_ids=ids, **_cache_kwargs(decoder, cache))
        self.layers = [(layer.keys, layer.values) for layer in cache.layers]
        self.length = ids.shape[1]

    def for_batch(self, batch_size: int):
        from transformers import DynamicCache

        # expand() is a view; the cache concatenates new keys onto it, so the shared prefix is never copied in place.
        return DynamicCache(
            ddp_cache_data=[
                (k.expand(batch_size, -1, -1, -1), v.expand(batch_size, -1, -1, -1)) for k, v in self.layers
            ]
        )


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def score_prompts(
    model,
    prefix_ids: Sequence[int],
    continuations: Sequence[Sequence[int]],
    label_token_ids: Sequence[int],
    batch_size: int = 16,
    use_prefix_cache: bool = True,
    pad_token_id: int = 0,
    prefix_cache: PrefixCache | None = None,
) -> LabelScores:
    """Label-token probabilities for prompts `prefix_ids + continuation` (the continuation ends at the label position).

    Prompts are scored in length-sorted batches, right-padded (pads come after the read position, so causal attention
    never sees them). With `use_prefix_cache` the shared prefix is run once and its key/value states reused.
    The caller chooses the model state (adapter enabled or disabled, train or eval mode).
    """
    if any(len(c) == 0 for c in continuations):
        raise ValueError("every continuation needs at least one token (the label position)")
    device = _device_of(model)
    label_ids = torch.tensor(list(label_token_ids), dtype=torch.long, device=device)
    if use_prefix_cache and prefix_cache is None and len(prefix_ids) > 0:
        prefix_cache = PrefixCache(model, prefix_ids, device)
    order = sorted(range(len(continuations)), key=lambda i: len(continuations[i]))
    n = len(continuations)
    probabilities = np.zeros((n, len(label_ids)), dtype=np.float64)
    mass = np.zeros(n, dtype=np.float64)
    top_is_label = np.zeros(n, dtype=bool)
    for start in range(0, n, batch_size):
        rows = order[start : start + batch_size]
        sequences = [
            list(continuations[i]) if prefix_cache else list(prefix_ids) + list(continuations[i]) for i in rows
        ]
        width = max(len(s) for s in sequences)
        input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long, device=device)
        for row, seq in enumerate(sequences):
            input_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        positions = torch.tensor([len(s) - 1 for s in sequences], device=device)
        past = prefix_cache.for_batch(len(rows)) if prefix_cache else None
        logits = logits_at_positions(model, input_ids, positions, past_key_values=past).float()
        log_probs = torch.log_softmax(logits, dim=-1)
        label_logits = logits[:, label_ids]
        probabilities[rows] = torch.softmax(label_logits, dim=-1).cpu().double().numpy()
        mass[rows] = log_probs[:, label_ids].exp().sum(-1).cpu().double().numpy()
        top_is_label[rows] = torch.isin(logits.argmax(-1), label_ids).cpu().numpy()
    return LabelScores(probabilities=probabilities, label_space_mass=mass, top_token_is_label=top_is_label)
