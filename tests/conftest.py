"""Shared fixtures: a tiny Llama with a locally built tokenizer, small CSV datasets, the embedded model."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest

# Tests never touch the network: hub names must fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

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


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    return str(save_tiny_llama(tmp_path_factory.mktemp("tiny-llama")))


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


@pytest.fixture(scope="session")
def synthetic_folder(tmp_path_factory) -> str:
    """A folder of split files (train.csv, test.csv) with string labels."""
    folder = tmp_path_factory.mktemp("synthetic")
    write_csv(folder / "train.csv", synthetic_rows(48, seed=1))
    write_csv(folder / "test.csv", synthetic_rows(24, seed=2))
    return str(folder)


@pytest.fixture(scope="session")
def embedded_model_dir() -> Path:
    from lightning_modules.embedded_model import embedded_model_dir

    return embedded_model_dir()
