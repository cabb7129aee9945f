"""Where rows come from: the hub, local files, or the embedded corpus, normalised to `text` + integer `label`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from datamodules.embedded_tweets import EMBEDDED_DATASET, TEST_FRACTION, load_embedded_tweets, stratified_split
from foundation.errors import UserInputError

LOCAL_FORMATS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def load_raw_splits(dataset_name: str, dataset_config: str | None, seed: int, token: str | None = None):
    """A `DatasetDict` for a hub name (+ config), a local file or folder of split files, or the embedded alias."""
    import datasets

    if dataset_name == EMBEDDED_DATASET:
        return load_embedded_tweets(seed=seed)
    if dataset_name.startswith("embedded:"):
        raise UserInputError(f"Unknown embedded dataset '{dataset_name}'; the embedded one is '{EMBEDDED_DATASET}'.")
    path = Path(dataset_name).expanduser()
    if path.is_file():
        return _load_local_file(path, seed)
    if path.is_dir():
        return _load_local_folder(path)
    try:
        return datasets.load_dataset(dataset_name, dataset_config, token=token)
    except Exception as error:  # datasets raises many unrelated types for "not found" / "offline" / "gated"
        text = str(error)
        if "gated" in text.lower() or "401" in text or "403" in text:
            raise UserInputError(
                f"The dataset '{dataset_name}' is gated: accept its terms on huggingface.co and set HF_TOKEN."
            ) from error
        raise UserInputError(
            f"Could not load the dataset '{dataset_name}' ({text.splitlines()[0] if text else type(error).__name__}); "
            f"give a hub dataset id, a local CSV/JSON/JSONL/Parquet file or folder, or '{EMBEDDED_DATASET}'."
        ) from error


def _load_local_file(path: Path, seed: int):
    import datasets
    import numpy as np

    fmt = LOCAL_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise UserInputError(f"Unsupported data file '{path}'; use one of {', '.join(LOCAL_FORMATS)}.")
    table = _read_files(fmt, {"train": str(path)}, path)["train"]
    # One file holds every row: split it like the embedded corpus (seeded, stratified when labels allow).
    column = "label" if "label" in table.column_names else None
    labels = np.array([str(v) for v in table[column]]) if column else np.zeros(len(table), dtype=int)
    train_idx, test_idx = stratified_split(labels, TEST_FRACTION, seed)
    return datasets.DatasetDict(train=table.select(train_idx), test=table.select(test_idx))


def _load_local_folder(path: Path):
    files: dict[str, str] = {}
    fmt = None
    for file in sorted(path.iterdir()):
        if file.suffix.lower() in LOCAL_FORMATS:
            if fmt and LOCAL_FORMATS[file.suffix.lower()] != fmt:
                raise UserInputError(f"The folder '{path}' mixes file formats; keep one format per folder.")
            fmt = LOCAL_FORMATS[file.suffix.lower()]
            files[file.stem] = str(file)
    if not files:
        raise UserInputError(f"The folder '{path}' has no split files; add e.g. train.csv and test.csv.")
    return _read_files(fmt, files, path)


def _read_files(fmt: str, files: dict[str, str], where: Path):
    """`datasets.load_dataset` on local files, with a file that cannot be parsed as one sentence."""
    import datasets

    for file in files.values():
        if Path(file).stat().st_size == 0:
            raise UserInputError(f"The data file '{file}' is empty; it needs a header row (text,label) and tweets.")
    no_rows = f"The data in '{where}' has no rows; add tweets below its header (text,label)."
    try:
        splits = datasets.load_dataset(fmt, data_files=files)
    except Exception as error:  # pandas / pyarrow / json errors, wrapped by datasets in DatasetGenerationError
        cause = error
        while cause.__cause__ is not None:
            cause = cause.__cause__
        reason = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        if "corresponds to no data" in reason:  # a CSV header and no rows
            raise UserInputError(no_rows) from error
        if isinstance(cause, UnicodeDecodeError):
            reason = f"not UTF-8: {reason}"
        raise UserInputError(
            f"Could not read the data in '{where}' as {fmt} ({reason}); save it as UTF-8 {fmt} with a header row, "
            "and check its quotes are balanced."
        ) from error
    if any(len(split) == 0 for split in splits.values()):  # e.g. a Parquet or JSON file with no records
        raise UserInputError(no_rows)
    return splits


def require_split(splits, name: str, flag: str, dataset_name: str):
    if name not in splits:
        raise UserInputError(
            f"The dataset '{dataset_name}' has no split '{name}'; available: {', '.join(splits)}; set {flag}."
        )
    return splits[name]


def require_columns(split, columns: Sequence[tuple[str, str]], dataset_name: str) -> None:
    for column, flag in columns:
        if column not in split.column_names:
            raise UserInputError(
                f"The dataset '{dataset_name}' has no column '{column}'; available: "
                f"{', '.join(split.column_names)}; set {flag}."
            )


def infer_label_names(split, label_field: str) -> list[str] | None:
    """Class names from a ClassLabel feature or a `label_text` column; None when the labels are bare integers."""
    feature = split.features[label_field]
    if hasattr(feature, "names"):
        return list(feature.names)
    values = split[label_field]
    if values and isinstance(values[0], str):
        return None  # string labels name themselves
    text_column = next((c for c in (f"{label_field}_text", "label_text") if c in split.column_names), None)
    if text_column is None:
        return None
    names: dict[int, str] = {}
    for value, name in zip(values, split[text_column]):
        names.setdefault(int(value), str(name))
    return [names[i] for i in sorted(names)] if sorted(names) == list(range(len(names))) else None
