"""Shared fixtures: a tiny Llama with a locally built tokenizer, small CSV datasets, the embedded model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.tiny import analysis_test_rows, save_tiny_llama, synthetic_rows, write_csv, write_tiny_config

# Tests never touch the network: hub names must fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# `--model.dtype auto` is fp32 in every test (no recorded bf16 gates), on every kind of CPU: tests compare with fp32
# forwards. The policy itself is tested with records of its own (tests/test_precision.py).
os.environ["LORA_EXPLAIN_DTYPE_GATES"] = ""


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    return str(save_tiny_llama(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(scope="session")
def synthetic_folder(tmp_path_factory) -> str:
    """A folder of split files (train.csv, test.csv) with string labels."""
    folder = tmp_path_factory.mktemp("synthetic")
    write_csv(folder / "train.csv", synthetic_rows(48, seed=1))
    write_csv(folder / "test.csv", synthetic_rows(24, seed=2))
    return str(folder)


@pytest.fixture(scope="session")
def embedded_model_dir() -> Path:
    from foundation.embedded_model import embedded_model_dir

    return embedded_model_dir()


@pytest.fixture(scope="session")
def trained(tmp_path_factory, tiny_model_dir) -> dict:
    """One short real fit of the tiny Llama, shared by every test that needs a fine-tuned adapter: its data folder,
    config, the adapter as a peft folder and as a Lightning checkpoint."""
    import lightning as L

    from analysis.configuration import load_run
    from lightning_modules.export_adapter import write_adapter

    root = tmp_path_factory.mktemp("trained")
    data = root / "data"
    data.mkdir()
    write_csv(data / "train.csv", synthetic_rows(48, seed=1))
    write_csv(data / "test.csv", analysis_test_rows())
    config = write_tiny_config(root / "tiny.yaml", tiny_model_dir, data, root / "train")
    run = load_run(["--config", str(config)])
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=6,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    trainer.fit(run.module, run.datamodule)
    adapter = write_adapter(run.module, root / "lora_adapter", run.datamodule.prompt_description())
    checkpoint = root / "adapter.ckpt"
    trainer.save_checkpoint(checkpoint)
    return {
        "root": root,
        "config": config,
        "adapter": adapter,
        "checkpoint": checkpoint,
        "model": tiny_model_dir,
        "data": data,
    }
