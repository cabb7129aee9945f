"""The LightningCLI shared by the entry points, with token handling and clear errors."""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from lightning.pytorch.cli import LightningCLI

from datamodules import TweetSentimentDataModule
from lightning_modules import LoRASentimentClassifier, UserInputError


class SentimentCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.model_name", "data.tokenizer_name")
        parser.link_arguments("data.label_names", "model.label_names", apply_on="instantiate")
        parser.link_arguments("data.label_token_ids", "model.label_token_ids", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        # The token lives only in this process's environment: blank it in the config that Lightning saves.
        token = config.model.get("huggingface_token")
        if token:
            os.environ["HF_TOKEN"] = token
            config.model.huggingface_token = None
        if not self.subcommand:  # built for evaluation or analysis: no Trainer, nothing written
            return
        root = config.trainer.get("default_root_dir") or os.getcwd()
        ensure_writable(Path(root), "--trainer.default_root_dir")
        # Checkpoints go to a fixed <root>/checkpoints (not a versioned log folder) so `--ckpt_path last` finds them.
        for callback in config.trainer.get("callbacks") or []:
            if str(callback.get("class_path", "")).endswith("ModelCheckpoint") and not callback.init_args.get(
                "dirpath"
            ):
                callback.init_args.dirpath = str(Path(root) / "checkpoints")


def ensure_writable(folder: Path, flag: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise UserInputError(f"Cannot write to the output folder '{folder}' ({error.strerror}); set {flag}.") from error


def run_reporting_user_errors(work: Callable[[], list[str] | None]) -> int:
    """An entry point's exit code: print what `work` returns and give 0, or one `error:` line and 2 on bad input."""
    try:
        lines = work()
    except UserInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if lines:
        print("\n".join(lines))
    return 0


def run_cli(args: list[str] | None = None) -> int:
    def run() -> None:
        SentimentCLI(
            LoRASentimentClassifier,
            TweetSentimentDataModule,
            seed_everything_default=42,
            save_config_kwargs={"overwrite": True},
            args=args,
        )

    return run_reporting_user_errors(run)


def build_from_config(config: str | None, overrides: list[str] | None = None):
    """The DataModule and (untrained) module a training config describes, for evaluation and analysis.

    `overrides` are extra CLI arguments such as `["--data.eval_subset", "100"]`.
    """
    args = (["--config", config] if config else []) + list(overrides or [])
    if config and not Path(config).is_file():
        raise UserInputError(f"The config '{config}' does not exist; pass e.g. --config configs/embedded.yaml.")
    # LightningCLI warns when both `args` and a longer sys.argv exist; the caller's own flags are not for it.
    saved_argv, sys.argv = sys.argv, sys.argv[:1]
    try:
        cli = _ModelAndDataCLI(
            LoRASentimentClassifier,
            TweetSentimentDataModule,
            seed_everything_default=42,
            run=False,
            args=args,
            save_config_callback=None,
        )
    finally:
        sys.argv = saved_argv
    return cli.datamodule, cli.model


class _ModelAndDataCLI(SentimentCLI):
    """Parses a training config but instantiates only the model and the data (no Trainer, no callbacks)."""

    def instantiate_trainer(self, **kwargs):
        return None
