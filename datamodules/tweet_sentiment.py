"""LightningDataModule: rows -> label-masked prompts -> dynamically padded batches."""

from __future__ import annotations

from dataclasses import dataclass

import lightning as L
import numpy as np
import torch
from lightning.pytorch.trainer.states import TrainerStatus
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from datamodules.embedded_tweets import EMBEDDED_DATASET
from datamodules.prompts import PromptEncoder, sample_demonstrations
from datamodules.samplers import ResumableLoader, ShuffledEpochs
from datamodules.sources import infer_label_names, load_raw_splits, require_columns, require_split
from foundation.embedded_model import EMBEDDED_MODEL
from foundation.errors import UserInputError
from foundation.hub import load_tokenizer, resolve_token

IGNORE_INDEX = -100
# The original experiment's sizes and seed; the one definition of these defaults (configs and commands read them).
DEFAULT_TRAIN_SUBSET = 2000
DEFAULT_EVAL_SUBSET = 1000
DEFAULT_SEED = 42


@dataclass(frozen=True)
class Example:
    text: str
    label: int


def _require_labels(values, split: str, column: str, dataset_name: str) -> None:
    """Every row has a label: a blank or NaN one (a gap in a CSV) is one sentence, not a crash or a class 'nan'."""
    missing = [
        i
        for i, value in enumerate(values)
        if value is None
        or (isinstance(value, float) and value != value)
        or (isinstance(value, str) and not value.strip())
    ]
    if missing:
        raise UserInputError(
            f"{len(missing)} rows of the '{split}' split of '{dataset_name}' have no label in column '{column}' (the "
            f"first is row {missing[0]}); fill them in or remove those rows."
        )


class PromptDataset(Dataset):
    def __init__(self, examples: list[Example], encoder: PromptEncoder):
        self.examples = examples
        self.prefix_length = len(encoder.prefix_ids)
        self.encoded = [encoder.encode(example.text, example.label) for example in examples]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        encoded = self.encoded[index]
        labels = [IGNORE_INDEX] * len(encoded.input_ids)
        labels[encoded.label_position] = encoded.input_ids[encoded.label_position]
        return {
            "input_ids": encoded.input_ids,
            "labels": labels,
            "label_position": encoded.label_position,
            "class_index": self.examples[index].label,
            "index": index,
            "prefix_length": self.prefix_length,
        }


def collate_prompts(items: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest prompt in the batch (never to max_seq_length)."""
    width = max(len(item["input_ids"]) for item in items)
    input_ids = torch.full((len(items), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, item in enumerate(items):
        n = len(item["input_ids"])
        input_ids[row, :n] = torch.tensor(item["input_ids"])
        labels[row, :n] = torch.tensor(item["labels"])
        attention_mask[row, :n] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "label_position": torch.tensor([item["label_position"] for item in items]),
        "class_index": torch.tensor([item["class_index"] for item in items]),
        "index": torch.tensor([item["index"] for item in items]),
        # Every prompt starts with the same instruction tokens: scoring can cache them once.
        "prefix_length": torch.tensor([item["prefix_length"] for item in items]),
    }


class _LengthSorted(DistributedSampler):
    """Deterministic shortest-first order for evaluation: less padding, same metrics.

    With several processes (DDP), process `rank` takes every `num_replicas`-th example of that order and nothing
    else: unlike Lightning's DistributedSampler wrapper it adds no padding duplicates, so the synced metrics count
    every example exactly once (ranks may run one batch more or fewer; validation has no per-batch collective).
    Being a DistributedSampler, Lightning leaves it unwrapped.
    """

    def __init__(self, dataset: PromptDataset, num_replicas: int = 1, rank: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        order = sorted(range(len(dataset)), key=lambda i: len(dataset.encoded[i].input_ids))
        # Fewer examples than processes: an idle rank would skip the collectives of DDP's first forward and
        # hang the others, so it scores one duplicate instead.
        self.indices = order[rank::num_replicas] or order[rank % len(order) :][:1]

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class TweetSentimentDataModule(L.LightningDataModule):
    """Tweets with sentiment labels as prompts whose only supervised token is the label word.

    Args:
        dataset_name: hub dataset id, a local CSV/JSON/JSONL/Parquet file or folder of split files, or
            `embedded:crowdflower-tweets`.
        tokenizer_name: model whose tokenizer encodes the prompts (linked to `--model.model_name` by the CLI).
        label_space: keep only these classes (names, or integer labels), in this order; None infers all.
        class_names: names for bare integer labels that carry none.
        train_subset / eval_subset: seeded sample sizes (None = all rows).
        prompt_style: `words` (label names as words) or `seed-digits` (the original digit template).
        label_words: verbalizer, one single-token word per class (default from the style and label names).
        num_demonstrations: k-shot prompts: k seeded, class-balanced training tweets placed in the fixed prefix.
        shuffle_seed: the seed of the training order only (default: `seed`); the rows, subsets, splits and
            demonstrations stay those of `seed`, so adapters fitted with different shuffle seeds see the same data.
    """

    def __init__(
        self,
        dataset_name: str = EMBEDDED_DATASET,
        dataset_config: str | None = None,
        tokenizer_name: str = EMBEDDED_MODEL,
        train_split: str = "train",
        eval_split: str = "test",
        text_field: str = "text",
        label_field: str = "label",
        label_space: list[str] | None = None,
        class_names: list[str] | None = None,
        train_subset: int | None = DEFAULT_TRAIN_SUBSET,
        eval_subset: int | None = DEFAULT_EVAL_SUBSET,
        seed: int = DEFAULT_SEED,
        batch_size: int = 4,
        eval_batch_size: int | None = None,
        max_seq_length: int = 512,
        prompt_style: str = "words",
        label_words: list[str] | None = None,
        num_demonstrations: int = 0,
        num_workers: int = 0,
        shuffle_seed: int | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        self._train: list[Example] | None = None
        self._eval: list[Example] | None = None
        self._label_names: list[str] | None = None
        self._tokenizer = None
        self._encoder: PromptEncoder | None = None
        self.skipped_empty = 0
        self._train_loader: ResumableLoader | None = None
        self._train_order: dict | None = None  # a checkpoint's place in the training order, for the next loader

    # ---- rows -------------------------------------------------------------------------------------------------
    def _load_rows(self) -> None:
        if self._train is not None:
            return
        hp = self.hparams
        splits = load_raw_splits(hp.dataset_name, hp.dataset_config, hp.seed, token=resolve_token())
        train = require_split(splits, hp.train_split, "--data.train_split", hp.dataset_name)
        evaluation = require_split(splits, hp.eval_split, "--data.eval_split", hp.dataset_name)
        for split in (train, evaluation):
            require_columns(
                split, [(hp.text_field, "--data.text_field"), (hp.label_field, "--data.label_field")], hp.dataset_name
            )
        for split, name in ((train, hp.train_split), (evaluation, hp.eval_split)):
            _require_labels(split[hp.label_field], name, hp.label_field, hp.dataset_name)
        names, to_index = self._label_mapping(train, evaluation)
        if len(names) < 2:
            raise UserInputError(
                f"The dataset '{hp.dataset_name}' has one class only ({', '.join(names)}); a classifier needs at least "
                "two: check --data.label_field and --data.label_space."
            )
        self._label_names = names
        self._train = self._subset(self._examples(train, to_index), hp.train_subset, hp.seed)
        self._eval = self._subset(self._examples(evaluation, to_index), hp.eval_subset, hp.seed)
        if self.skipped_empty:
            rank_zero_warn(f"Skipped {self.skipped_empty} rows with an empty '{hp.text_field}'.")
        if not self._eval:
            raise UserInputError(
                f"The eval split '{hp.eval_split}' has no rows left after label filtering "
                f"(label_space={hp.label_space}); check --data.label_space against the data's labels."
            )
        if not self._train:
            raise UserInputError(
                f"The train split '{hp.train_split}' has no rows left after label filtering; check --data.label_space."
            )

    def _label_mapping(self, train, evaluation) -> tuple[list[str], dict]:
        hp = self.hparams
        for flag, names in (("--data.class_names", hp.class_names), ("--data.label_space", hp.label_space)):
            stripped = [str(name).strip() for name in names or []]
            twice = sorted({name for name in stripped if stripped.count(name) > 1})
            if twice:
                raise UserInputError(f"{flag} names {', '.join(map(repr, twice))} twice; give each class once.")
        values = list(train[hp.label_field]) + list(evaluation[hp.label_field])
        string_labels = bool(values) and isinstance(values[0], str)
        if string_labels:
            all_names = sorted({str(v).strip() for v in values})
            raw_for_name = {name: name for name in all_names}
        else:
            all_names = hp.class_names or infer_label_names(train, hp.label_field)
            if all_names is None:
                raise UserInputError(
                    f"The integer labels in column '{hp.label_field}' have no names; add a 'label_text' column or "
                    "name them in order with --data.class_names."
                )
            all_names = list(all_names)
            raw_for_name = {name: index for index, name in enumerate(all_names)}
        if hp.label_space:
            wanted = [str(v).strip() for v in hp.label_space]
            # Integer label spaces ("0", "2") refer to class indices of integer-labelled data.
            if not string_labels and all(w.isdigit() for w in wanted):
                wanted = [all_names[int(w)] if int(w) < len(all_names) else w for w in wanted]
            unknown = [w for w in wanted if w not in raw_for_name]
            if unknown:
                raise UserInputError(
                    f"--data.label_space values {unknown} are not labels of '{hp.dataset_name}'; "
                    f"available: {', '.join(all_names)}."
                )
            names = wanted
        else:
            names = all_names
        to_index = {raw_for_name[name]: index for index, name in enumerate(names)}
        return names, to_index

    def _examples(self, split, to_index: dict) -> list[Example]:
        hp = self.hparams
        examples = []
        for text, raw in zip(split[hp.text_field], split[hp.label_field]):
            text = "" if text is None else " ".join(str(text).split())
            if not text:
                self.skipped_empty += 1
                continue
            key = str(raw).strip() if isinstance(raw, str) else int(raw)
            if key in to_index:
                examples.append(Example(text, to_index[key]))
        return examples

    @staticmethod
    def _subset(examples: list[Example], size: int | None, seed: int) -> list[Example]:
        if size is None or size >= len(examples):
            return examples
        chosen = np.sort(np.random.default_rng(seed).choice(len(examples), size=size, replace=False))
        return [examples[i] for i in chosen]

    # ---- public views -----------------------------------------------------------------------------------------
    @property
    def label_names(self) -> list[str]:
        self._load_rows()
        return list(self._label_names)

    @property
    def train_examples(self) -> list[Example]:
        self._load_rows()
        return self._train

    @property
    def eval_examples(self) -> list[Example]:
        self._load_rows()
        return self._eval

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.hparams.tokenizer_name)
        return self._tokenizer

    @property
    def encoder(self) -> PromptEncoder:
        if self._encoder is None:
            self._encoder = self.make_encoder(self.hparams.num_demonstrations)
        return self._encoder

    def make_encoder(self, num_demonstrations: int = 0) -> PromptEncoder:
        """The prompt encoder of this data, optionally with k demonstrations drawn from the training rows only."""
        hp = self.hparams
        demonstrations = sample_demonstrations(
            [e.text for e in self.train_examples],
            [e.label for e in self.train_examples],
            num_demonstrations,
            len(self.label_names),
            seed=hp.seed,
            exclude_texts=[e.text for e in self.eval_examples],
        )
        return PromptEncoder(
            self.tokenizer, self.label_names, hp.label_words, hp.prompt_style, hp.max_seq_length, demonstrations
        )

    @property
    def label_token_ids(self) -> list[int]:
        return list(self.encoder.label_token_ids)

    def prompt_description(self) -> dict:
        return {**self.encoder.describe(), "dataset_name": self.hparams.dataset_name}

    # ---- Lightning hooks --------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        encoder = self.encoder
        if stage in (None, "fit") and not hasattr(self, "train_dataset"):
            self.train_dataset = PromptDataset(self.train_examples, encoder)
        if not hasattr(self, "eval_dataset"):
            self.eval_dataset = PromptDataset(self.eval_examples, encoder)
            truncated = sum(e.truncated for e in self.eval_dataset.encoded)
            if truncated:
                rank_zero_info(
                    f"Truncated {truncated} eval tweets to fit max_seq_length={self.hparams.max_seq_length}."
                )

    def _processes(self) -> tuple[int, int]:
        """(number of processes, this one's rank) while a distributed Trainer runs this DataModule, else (1, 0)."""
        trainer = self.trainer
        # A finished DDP fit leaves `self.trainer` set: loaders built afterwards (evaluation) must see every row.
        if trainer is None or trainer.state.status != TrainerStatus.RUNNING:
            return 1, 0
        kwargs = trainer.distributed_sampler_kwargs
        return (kwargs["num_replicas"], kwargs["rank"]) if kwargs else (1, 0)

    def _loader(self, dataset: PromptDataset, shuffle: bool) -> DataLoader:
        hp = self.hparams
        pad = self.tokenizer.pad_token_id
        processes, rank = self._processes()
        order_seed = hp.seed if hp.shuffle_seed is None else hp.shuffle_seed
        options = dict(num_workers=hp.num_workers, collate_fn=lambda items: collate_prompts(items, pad))
        if shuffle:
            # One permutation per (seed, epoch), whatever the number of processes: rank r takes every
            # processes-th index, so with per-device batch b the ranks' batches together are exactly the
            # single-process batch of size b * processes (Lightning calls set_epoch each epoch).
            sampler = ShuffledEpochs(dataset, num_replicas=processes, rank=rank, seed=order_seed)
            generator = torch.Generator().manual_seed(order_seed)
            return ResumableLoader(dataset, sampler, batch_size=hp.batch_size, generator=generator, **options)
        sampler = _LengthSorted(dataset, num_replicas=processes, rank=rank)
        return DataLoader(dataset, batch_size=hp.eval_batch_size or hp.batch_size, sampler=sampler, **options)

    def train_dataloader(self) -> DataLoader:
        self._train_loader = self._loader(self.train_dataset, shuffle=True)
        if self._train_order is not None:
            self._train_loader.load_state_dict(self._train_order)
        return self._train_loader

    def teardown(self, stage: str) -> None:
        if stage == "fit":
            self._train_order = None  # a later fit of this DataModule starts its own order

    # ---- checkpoints: the place in the training order ---------------------------------------------------------
    # Lightning also offers the loader's own state_dict to the checkpoint, but restores it only when the loader is
    # built after the checkpoint is read; `configure_optimizers` reads `estimated_stepping_batches`, which builds
    # it first (Lightning-AI/pytorch-lightning#20550). The DataModule's state is restored in either order, and the
    # loader applies it lazily, at its first batch.
    def state_dict(self) -> dict:
        return {"train_order": self._train_loader.state_dict()} if self._train_loader is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        if "train_order" in state_dict:
            self._train_order = dict(state_dict["train_order"])
            if self._train_loader is not None:
                self._train_loader.load_state_dict(self._train_order)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.eval_dataset, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.eval_dataset, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.eval_dataset, shuffle=False)

    def eval_dataloader_for(self, encoder: PromptEncoder) -> DataLoader:
        """The eval split encoded with another prompt (e.g. k-shot), batched and sorted like `predict_dataloader`."""
        return self._loader(PromptDataset(self.eval_examples, encoder), shuffle=False)
