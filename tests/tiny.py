"""Tiny models, tokenizers and datasets built locally for the tests (nothing is downloaded).

The one importable home of the test builders: fixtures (conftest.py) and tests import them as `tests.tiny`.
"""

from __future__ import annotations

import csv
from pathlib import Path

POSITIVE = ["love", "great", "happy", "awesome", "wonderful"]
NEGATIVE = ["hate", "awful", "sad", "terrible", "horrible"]
NEUTRAL = ["table", "monday", "bus", "paper", "window"]
FILLER = ["the", "a", "my", "this", "is", "day", "so", "really"]
TEMPLATE_WORDS = [
    "You",
    "are",
    "sentiment",
    "classifier",
    ".",
    "Classify",
    "tweet",
    "as",
    "one",
    "of",
    ":",
    ",",
    "Tweet",
    "Label",
    "Answer",
    "with",
    "digit",
    "for",
    "0",
    "1",
    "2",
    "negative",
    "neutral",
    "positive",
]


def build_tiny_tokenizer():
    """A word-level tokenizer: every template word and label word is one token (built locally, no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    words = sorted(set(POSITIVE + NEGATIVE + NEUTRAL + FILLER + TEMPLATE_WORDS))
    vocab = {token: i for i, token in enumerate(specials + words)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def save_tiny_llama(folder: Path, seed: int = 0) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def synthetic_rows(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """Tweets whose sentiment is carried by one keyword, so a tiny model can learn it in a few steps."""
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label, words = [("negative", NEGATIVE), ("neutral", NEUTRAL), ("positive", POSITIVE)][i % 3]
        text = " ".join(rng.sample(FILLER, 3) + [rng.choice(words)] + rng.sample(FILLER, 2))
        rows.append((text, label))
    return rows


def write_csv(path: Path, rows, header=("text", "label")) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_tiny_config(path: Path, model: str, dataset: str | Path, root: Path, **data) -> Path:
    """A training config for the tiny Llama: a few real optimisation steps change its predictions."""
    import json

    lines = [
        "seed_everything: 0",
        "trainer:",
        f"  default_root_dir: {root}",
        "model:",
        f"  model_name: {model}",
        "  load_in_4bit: false",
        "  learning_rate: 0.02",
        "  warmup_ratio: 0.0",
        "  lora_dropout: 0.0",
        "data:",
        f"  dataset_name: {dataset}",
        "  batch_size: 8",
        "  eval_batch_size: 5",  # several batches, so the length-sorted order must be undone
        "  seed: 0",
    ] + [f"  {key}: {json.dumps(value)}" for key, value in data.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def analysis_test_rows() -> list[tuple[str, str]]:
    """24 synthetic eval tweets; the first holds HTML, and an empty one (the loader drops it) sits at index 2."""
    rows = synthetic_rows(24, seed=2)
    rows[0] = ('<b>love</b> & "great" so', "positive")
    rows.insert(2, ("   ", "neutral"))
    return rows


def tensorboard_events(folder: Path):
    """Every scalar, image and text a command wrote into a TensorBoard folder, as TensorBoard reads them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"images": 0, "tensors": 0, "scalars": 0})
    events.Reload()
    return events
