"""Prompt building, label masking, truncation, padding, and the data sources."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from datamodules import TweetSentimentDataModule
from datamodules.embedded_tweets import load_embedded_tweets, read_embedded_rows
from datamodules.prompts import PromptEncoder
from datamodules.tweet_sentiment import IGNORE_INDEX, collate_prompts
from foundation.errors import UserInputError
from tests.tiny import build_tiny_tokenizer, synthetic_rows, write_csv

LABELS = ["negative", "neutral", "positive"]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def test_label_is_appended_by_id_and_is_the_only_supervised_token(tokenizer):
    encoder = PromptEncoder(tokenizer, LABELS)
    encoded = encoder.encode("I love this day", label=2)
    ids = encoded.input_ids
    assert ids[encoded.label_position] == tokenizer.convert_tokens_to_ids("positive")
    assert encoded.label_position == len(ids) - 1
    # The prompt ends with "Label :" right before the label token.
    assert tokenizer.convert_ids_to_tokens(ids[encoded.label_position - 2 : encoded.label_position]) == ["Label", ":"]
    start, end = encoded.tweet_span
    assert tokenizer.decode(ids[start:end]) == "<unk> love this day"  # "I" is not in the tiny vocabulary


def test_seed_digits_reproduces_the_original_template_shape(tokenizer):
    encoder = PromptEncoder(tokenizer, LABELS, style="seed-digits")
    assert encoder.instruction.startswith("You are a sentiment classifier.\n")
    assert encoder.instruction.endswith("\nTweet:")
    assert "0 for negative, 1 for neutral, 2 for positive" in encoder.instruction
    assert encoder.label_words == [" 0", " 1", " 2"]


def test_multi_token_label_word_is_rejected_with_its_tokens(embedded_model_dir):
    from transformers import AutoTokenizer

    smol = AutoTokenizer.from_pretrained(embedded_model_dir)
    with pytest.raises(UserInputError, match=r"label word ' 0' is 2 tokens"):
        PromptEncoder(smol, LABELS, style="seed-digits")
    # The default verbalizer is single-token for SmolLM2.
    assert len(PromptEncoder(smol, LABELS).label_token_ids) == 3


def test_long_tweet_is_truncated_inside_the_tweet_and_keeps_tail_and_label(tokenizer):
    encoder = PromptEncoder(tokenizer, LABELS, max_seq_length=40)
    text = " ".join(["love"] * 100)
    encoded = encoder.encode(text, label=2)
    assert encoded.truncated
    assert len(encoded.input_ids) == 40
    assert encoded.input_ids[-1] == encoder.label_token_ids[2]
    assert encoded.input_ids[-1 - len(encoder.tail_ids) : -1] == encoder.tail_ids
    assert encoded.input_ids[: len(encoder.prefix_ids)] == encoder.prefix_ids


def test_max_seq_length_too_small_for_the_template_is_a_clear_error(tokenizer):
    with pytest.raises(UserInputError, match="leaves no room for the tweet"):
        PromptEncoder(tokenizer, LABELS, max_seq_length=8)


def test_collation_pads_dynamically_and_masks_everything_but_the_label(synthetic_folder, tiny_model_dir):
    dm = TweetSentimentDataModule(
        dataset_name=synthetic_folder, tokenizer_name=tiny_model_dir, batch_size=4, max_seq_length=512
    )
    dm.setup("fit")
    items = [dm.train_dataset[i] for i in range(4)]
    items[0] = {**items[0], "input_ids": items[0]["input_ids"][:-3] + items[0]["input_ids"][-1:]}
    items[0]["labels"] = [IGNORE_INDEX] * (len(items[0]["input_ids"]) - 1) + [items[0]["input_ids"][-1]]
    items[0]["label_position"] = len(items[0]["input_ids"]) - 1
    batch = collate_prompts(items, pad_token_id=dm.tokenizer.pad_token_id)
    longest = max(len(item["input_ids"]) for item in items)
    assert batch["input_ids"].shape == (4, longest) and longest < 512
    for row, item in enumerate(items):
        supervised = (batch["labels"][row] != IGNORE_INDEX).nonzero().flatten().tolist()
        assert supervised == [item["label_position"]]
        assert batch["labels"][row, item["label_position"]] == dm.label_token_ids[item["class_index"]]
        assert batch["attention_mask"][row].sum() == len(item["input_ids"])
    assert (batch["input_ids"][0, len(items[0]["input_ids"]) :] == dm.tokenizer.pad_token_id).all()


def test_local_csv_with_string_labels_maps_through_label_names(tmp_path, tiny_model_dir):
    path = write_csv(tmp_path / "tweets.csv", synthetic_rows(30) + [("", "positive"), ("   ", "neutral")])
    dm = TweetSentimentDataModule(dataset_name=str(path), tokenizer_name=tiny_model_dir)
    assert dm.label_names == LABELS  # sorted label strings
    assert dm.skipped_empty == 2
    assert len(dm.train_examples) + len(dm.eval_examples) == 30
    for example in dm.train_examples:
        word = {0: "hate awful sad terrible horrible", 1: "table monday bus paper window"}.get(example.label)
        if word:
            assert any(w in example.text.split() for w in word.split())


def test_label_space_keeps_only_those_classes_in_that_order(synthetic_folder, tiny_model_dir):
    dm = TweetSentimentDataModule(
        dataset_name=synthetic_folder, tokenizer_name=tiny_model_dir, label_space=["positive", "negative"]
    )
    assert dm.label_names == ["positive", "negative"]
    assert collections.Counter(e.label for e in dm.eval_examples) == {0: 8, 1: 8}
    assert all(
        ("love" in e.text or "great" in e.text or "happy" in e.text or "awesome" in e.text or "wonderful" in e.text)
        == (e.label == 0)
        for e in dm.eval_examples
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"label_space": ["joy"]}, r"label_space values \['joy'\] are not labels"),
        ({"text_field": "tweet"}, r"no column 'tweet'; available: text, label"),
        ({"eval_split": "validation"}, r"no split 'validation'; available: .*test.*train"),
        ({"dataset_name": "embedded:nope"}, r"Unknown embedded dataset"),
    ],
)
def test_bad_data_input_is_one_clear_sentence(synthetic_folder, tiny_model_dir, kwargs, message):
    dm = TweetSentimentDataModule(**{"dataset_name": synthetic_folder, "tokenizer_name": tiny_model_dir, **kwargs})
    with pytest.raises(UserInputError, match=message):
        _ = dm.label_names


def test_integer_labels_without_names_ask_for_class_names(tmp_path, tiny_model_dir):
    rows = [(text, ["negative", "neutral", "positive"].index(label)) for text, label in synthetic_rows(12)]
    folder = tmp_path / "ints"
    folder.mkdir()
    write_csv(folder / "train.csv", rows)
    write_csv(folder / "test.csv", rows)
    dm = TweetSentimentDataModule(dataset_name=str(folder), tokenizer_name=tiny_model_dir)
    with pytest.raises(UserInputError, match="--data.class_names"):
        _ = dm.label_names
    named = TweetSentimentDataModule(dataset_name=str(folder), tokenizer_name=tiny_model_dir, class_names=LABELS)
    assert named.label_names == LABELS
    assert [e.label for e in named.eval_examples] == [label for _, label in rows]


def test_embedded_split_is_deterministic_stratified_and_deduplicated():
    texts, labels, dropped = read_embedded_rows()
    assert len(texts) == len(set(texts)) > 30_000
    assert dropped["conflicting"] > 0
    first, second = load_embedded_tweets(seed=42), load_embedded_tweets(seed=42)
    assert first["test"]["text"] == second["test"]["text"]
    assert load_embedded_tweets(seed=7)["test"]["text"] != first["test"]["text"]
    assert set(first["train"]["text"]).isdisjoint(first["test"]["text"])
    assert first["train"].column_names == ["id", "text", "label", "label_text"]
    overall = np.bincount(labels, minlength=3) / len(labels)
    test_share = np.bincount(first["test"]["label"], minlength=3) / len(first["test"])
    np.testing.assert_allclose(test_share, overall, atol=2e-3)
    assert len(first["test"]) / len(texts) == pytest.approx(0.2, abs=1e-3)
    for row in first["test"].select(range(50)):
        assert row["label_text"] == LABELS[row["label"]]
