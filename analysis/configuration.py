"""The one configuration system: LightningCLI (jsonargparse) over the classifier, the data and the analysis settings.

Every command parses the same configuration, so one YAML file serves them all (`--config`, `--print_config`):
Lightning's `seed_everything`, `trainer`, `model` and `data`, and the `compare`, `evaluate` and `explain` sections of
`analysis.settings`. `scripts/train.py` runs Lightning's subcommands on it; `scripts/evaluate.py` and
`scripts/analyze.py` build the model and the data from it without a Trainer (`load_run`). The dashed flags the
README documents (`--output-dir`, `--eval-subset`, `--shap-max-evals`, ...) are aliases of the dotted options,
translated before parsing (`translate_aliases`).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from lightning.pytorch.cli import LightningCLI

from analysis.settings import CompareSettings, EvaluateSettings, ExplainSettings
from datamodules import TweetSentimentDataModule
from datamodules.tweet_sentiment import DEFAULT_SEED
from foundation.errors import UserInputError
from foundation.output_folder import ensure_writable
from foundation.output_names import CHECKPOINT_DIR
from lightning_modules import LoRASentimentClassifier

SECTIONS = {"compare": CompareSettings, "evaluate": EvaluateSettings, "explain": ExplainSettings}


class SentimentCLI(LightningCLI):
    """LightningCLI for the classifier and the data, with the analysis sections, token handling and clear errors."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.model_name", "data.tokenizer_name")
        parser.link_arguments("data.label_names", "model.label_names", apply_on="instantiate")
        parser.link_arguments("data.label_token_ids", "model.label_token_ids", apply_on="instantiate")
        for name, settings in SECTIONS.items():
            parser.add_class_arguments(settings, name, instantiate=False)

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
                callback.init_args.dirpath = str(Path(root) / CHECKPOINT_DIR)


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


@contextmanager
def program_name_only() -> Iterator[None]:
    """LightningCLI, given explicit args, warns with a dump of `sys.argv` (which may hold a token): hide it."""
    saved = sys.argv
    sys.argv = saved[:1]
    try:
        yield
    finally:
        sys.argv = saved


def run_cli(args: list[str] | None = None) -> int:
    """`scripts/train.py`: Lightning's fit / validate / test / predict on the configuration."""

    def run() -> None:
        SentimentCLI(
            LoRASentimentClassifier,
            TweetSentimentDataModule,
            seed_everything_default=DEFAULT_SEED,
            save_config_kwargs={"overwrite": True},
            args=args,
        )

    return run_reporting_user_errors(run)


def fit(config_path: str | Path) -> LightningCLI:
    """`scripts/train.py fit --config <config_path>`, in this process; returns the finished LightningCLI."""
    with program_name_only():
        return SentimentCLI(
            LoRASentimentClassifier,
            TweetSentimentDataModule,
            seed_everything_default=DEFAULT_SEED,
            save_config_kwargs={"overwrite": True},
            args=["fit", "--config", str(config_path)],
        )


# ---- evaluation and analysis: the model and the data, no Trainer -------------------------------------------------
@dataclass
class LoadedRun:
    """What `scripts/evaluate.py` and `scripts/analyze.py` work on: the data, the (untrained) module, the settings."""

    datamodule: TweetSentimentDataModule
    module: LoRASentimentClassifier
    compare: CompareSettings
    evaluate: EvaluateSettings
    explain: ExplainSettings
    trainer: Mapping  # the config's trainer section (accelerator, progress bar)
    config_path: Path | None
    arguments: list[str]  # the command line after `--config FILE`, with aliases translated


class _ModelAndDataCLI(SentimentCLI):
    """Parses the configuration and instantiates only the model and the data (no Trainer, no callbacks).

    `check(settings)` runs after parsing and before the model is loaded, so bad options fail in seconds.
    """

    def __init__(self, *args, check: Callable[[dict], None] | None = None, **kwargs):
        self._check = check
        super().__init__(*args, **kwargs)

    def before_instantiate_classes(self) -> None:
        super().before_instantiate_classes()
        if self._check is not None:
            self._check(settings_of(self.config))

    def instantiate_trainer(self, **kwargs):
        return None


def settings_of(config) -> dict:
    """The analysis sections of a parsed configuration, as settings objects."""
    return {name: cls(**dict(config[name])) for name, cls in SECTIONS.items()}


def load_run(
    arguments: Sequence[str],
    check: Callable[[dict], None] | None = None,
    aliases: Mapping[str, Alias] | None = None,
) -> LoadedRun:
    """Parse a command line (`--config FILE`, dotted options) and build the data and the module it describes.

    `--print_config` prints the resolved configuration as YAML and exits, as for `scripts/train.py`; `--help` lists
    every option and, after them, the dashed `aliases` the command accepts.
    """
    arguments = list(arguments)
    config_path = _config_path(arguments)
    with program_name_only():
        cli = _ModelAndDataCLI(
            LoRASentimentClassifier,
            TweetSentimentDataModule,
            seed_everything_default=DEFAULT_SEED,
            run=False,
            args=arguments,
            save_config_callback=None,
            check=check,
            parser_kwargs={"epilog": alias_help(aliases)} if aliases else None,
        )
    settings = settings_of(cli.config)
    rest = list(arguments)
    if config_path is not None:
        at = next(i for i, a in enumerate(rest) if a in ("--config", "-c") or a.startswith("--config="))
        del rest[at : at + (1 if "=" in rest[at] else 2)]
    return LoadedRun(
        datamodule=cli.datamodule,
        module=cli.model,
        trainer=dict(cli.config.trainer),
        config_path=config_path,
        arguments=rest,
        **settings,
    )


def _config_path(arguments: Sequence[str]) -> Path | None:
    for i, argument in enumerate(arguments):
        if argument.startswith("--config="):
            value = argument.split("=", 1)[1]
        elif argument in ("--config", "-c") and i + 1 < len(arguments):
            value = arguments[i + 1]
        else:
            continue
        path = Path(value).expanduser()
        if not path.is_file():
            raise UserInputError(f"The config '{value}' does not exist; pass e.g. --config configs/embedded.yaml.")
        return path.resolve()
    return None


# ---- the dashed flags of the README ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Alias:
    """A dashed flag and the dotted option it sets. `kind`: `value` (one value), `list` (the values up to the next
    flag, as one YAML list), `true` / `false` (a switch that takes no value), `subset` (a number or None)."""

    option: str
    kind: str = "value"


def alias_help(aliases: Mapping[str, Alias]) -> str:
    return "Dashed flags, aliases of the options above: " + ", ".join(
        f"{flag} = {alias.option}" + (f" {alias.kind}" if alias.kind in ("true", "false") else "")
        for flag, alias in aliases.items()
    )


def translate_aliases(arguments: Sequence[str], aliases: Mapping[str, Alias]) -> list[str]:
    """The command line with every alias (`--eval-subset 9`) replaced by its option (`--data.eval_subset 9`)."""
    out: list[str] = []
    items = list(arguments)
    i = 0
    while i < len(items):
        flag, _, inline = items[i].partition("=")
        alias = aliases.get(flag)
        i += 1
        if alias is None:
            out.append(items[i - 1])
            continue
        if alias.kind in ("true", "false"):
            out += [alias.option, alias.kind]
            continue
        if inline or "=" in items[i - 1]:
            values = [inline]
        elif alias.kind == "list":
            values = []
            while i < len(items) and not items[i].startswith("--"):
                values.append(items[i])
                i += 1
        else:
            values = items[i : i + 1]
            i += 1
        if alias.kind == "list":
            out += [alias.option, json.dumps(values)]  # strings stay strings ("0" is a label, not a number)
        elif alias.kind == "subset" and values and values[0].strip().lower() == "none":
            out += [alias.option, "null"]
        else:
            out += [alias.option, *values]
    return out
