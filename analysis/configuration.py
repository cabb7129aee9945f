"""The one configuration system: LightningCLI (jsonargparse) over the classifier, the data and the analysis settings.

Every command parses the same configuration, so one YAML file serves them all (`--config`, `--print_config`):
Lightning's `seed_everything`, `trainer`, `model` and `data`, and the `compare`, `evaluate`, `explain` and `roar`
sections of `analysis.settings`. `scripts/train.py` runs Lightning's subcommands on it; `scripts/evaluate.py`,
`scripts/analyze.py` and `scripts/roar.py` build the model and the data from it without a Trainer (`load_run`). The
dashed flags the README documents (`--output-dir`, `--eval-subset`, `--shap-max-evals`, ...) are aliases of the
dotted options, translated before parsing (`translate_aliases`).
"""

from __future__ import annotations

import contextvars
import json
import os
import sys
from argparse import ArgumentError
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml
from lightning.pytorch.cli import LightningCLI

from analysis.settings import CompareSettings, EvaluateSettings, ExplainSettings, RoarSettings
from datamodules import TweetSentimentDataModule
from datamodules.tweet_sentiment import DEFAULT_SEED
from foundation.errors import UserInputError
from foundation.output_folder import check_output_dir
from foundation.output_names import CHECKPOINT_DIR
from lightning_modules import LoRASentimentClassifier
from lightning_modules.precision import DtypeChoice

SECTIONS = {
    "compare": CompareSettings,
    "evaluate": EvaluateSettings,
    "explain": ExplainSettings,
    "roar": RoarSettings,
}


class SentimentCLI(LightningCLI):
    """LightningCLI for the classifier and the data, with the analysis sections, token handling and clear errors.

    `--model.dtype auto` is resolved here, per phase (`lightning_modules.precision`): the module, its checkpoints and
    the saved config see the dtype the phase runs in, and `dtype_choice` keeps the reason.
    """

    phase = "fit"  # what `fit` resolves for; validate / test / predict resolve for evaluation

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
        phase = self.phase if self.subcommand in (None, "fit") else "evaluation"  # no subcommand: load_run's phase
        self.dtype_choice = _resolve_dtype(config, phase, fit=self.subcommand == "fit")
        if not self.subcommand:  # built for evaluation or analysis: no Trainer, nothing written
            return
        root = config.trainer.get("default_root_dir") or os.getcwd()
        check_output_dir(root, "--trainer.default_root_dir")  # checked, not created: a bad input leaves nothing
        # Checkpoints go to a fixed <root>/checkpoints (not a versioned log folder) so `--ckpt_path last` finds them.
        for callback in config.trainer.get("callbacks") or []:
            if str(callback.get("class_path", "")).endswith("ModelCheckpoint") and not callback.init_args.get(
                "dirpath"
            ):
                callback.init_args.dirpath = str(Path(root) / CHECKPOINT_DIR)

    def _parse_ckpt_path(self) -> None:
        # Lightning reads `--ckpt_path` here, right after parsing, and replaces the model's options with those saved
        # in the checkpoint: a corrupt file, or a checkpoint of another base model than the configuration names, is
        # one sentence before that (this is Lightning's own hook for it, private but the one place it happens).
        subcommand = self.config.get("subcommand")
        saved = _read_checkpoint_file(self.config[subcommand].get("ckpt_path")) if subcommand else None
        self._checkpoint = saved  # kept for before_fit: read once, not again
        if saved is not None:
            trained_on = (saved.get("hyper_parameters") or {}).get("model_name")
            named = self.config[subcommand].model.model_name
            if trained_on and trained_on != named:
                raise UserInputError(
                    f"The checkpoint '{self.config[subcommand].ckpt_path}' was trained on '{trained_on}' but the "
                    f"configuration names '{named}'; resume it with the --model.model_name it was trained with."
                )
        super()._parse_ckpt_path()

    def before_fit(self) -> None:
        """A checkpoint to resume from must have been trained on these labels: found before the fit starts."""
        # Read in _parse_ckpt_path; read here only if Lightning no longer calls that hook.
        saved = getattr(self, "_checkpoint", None) or _read_checkpoint_file(self.config.fit.get("ckpt_path"))
        labels = saved.get("label_names") if saved is not None else None
        if labels and list(labels) != list(self.datamodule.label_names):
            raise UserInputError(
                f"The checkpoint '{self.config.fit.ckpt_path}' was trained on labels {labels} but the data has "
                f"{self.datamodule.label_names}; use the same --data.label_space."
            )

    def instantiate_trainer(self, **kwargs):
        from lightning.pytorch.plugins.io import TorchCheckpointIO

        from lightning_modules.checkpointing import AtomicCheckpointIO

        trainer = super().instantiate_trainer(**kwargs)
        # Checkpoints are written atomically whatever the config says, unless it chose its own CheckpointIO.
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer


def _resolve_dtype(config, phase: str, fit: bool = False):
    """Replace `model.dtype: auto` by the dtype `phase` runs in; an unknown name is one sentence. For a fit (`fit`),
    the trainer's precision is checked and kept with the choice: under bf16-mixed the products of fp32 weights run in
    bf16, and the log and run.json say so."""
    from lightning_modules.precision import DTYPE_NAMES, choose_dtype

    requested = config.model.get("dtype") or "auto"
    if requested != "auto" and requested not in DTYPE_NAMES:
        raise UserInputError(f"Unknown --model.dtype '{requested}'; use auto, {', '.join(DTYPE_NAMES)}.")
    from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

    choice = choose_dtype(requested, config.model.model_name, phase)
    config.model.dtype = choice.dtype
    if fit:
        _check_fit_precision(config)
        choice = choice.under_precision(config.trainer.get("precision"))
    (rank_zero_warn if choice.emulated else rank_zero_info)(f"{phase} computes in {choice.describe()}: {choice.reason}")
    return choice


def _check_fit_precision(config) -> None:
    """fp16 weights train only with a loss scaler, which Lightning's `16-mixed` gives on a GPU; set it, or refuse."""
    import torch

    if config.model.dtype != "float16":
        return
    if not torch.cuda.is_available():
        raise UserInputError(
            "--model.dtype float16 trains only on a GPU (with a loss scaler); on a CPU use bfloat16 or float32."
        )
    precision = str(config.trainer.get("precision") or "32-true")
    if precision in ("32-true", "32"):
        config.trainer.precision = "16-mixed"  # autocast + GradScaler over the fp32 LoRA weights
    elif precision != "16-mixed":
        raise UserInputError(
            f"--model.dtype float16 with --trainer.precision {precision}: fp16 weights need --trainer.precision "
            "16-mixed (the loss scaler); use it, or --model.dtype bfloat16."
        )


def _read_checkpoint_file(path: str | None) -> dict | None:
    """The checkpoint `--ckpt_path FILE` names, read as Lightning will (weights only); None for none or for the names
    Lightning resolves itself (last, best, ...). A missing, corrupt or foreign file is one sentence."""
    if not path or path in ("last", "best", "hpc", "registry"):
        return None
    import torch

    file = Path(path).expanduser()
    if not file.is_file():
        raise UserInputError(f"The checkpoint '{path}' does not exist; pass a .ckpt file or --ckpt_path last.")
    try:
        saved = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated, not a torch file, or not loadable with weights_only
        raise UserInputError(
            f"The checkpoint '{path}' is corrupt ({type(error).__name__}); pass another one."
        ) from error
    if not isinstance(saved, dict) or "state_dict" not in saved:
        raise UserInputError(f"'{path}' is not a Lightning checkpoint of this project; pass checkpoints/last.ckpt.")
    return saved


def run_reporting_user_errors(work: Callable[[], list[str] | None]) -> int:
    """An entry point's exit code: print what `work` returns and give 0, or one `error:` line and 2 on bad input
    (ours, or an option the parser rejects: its message on one line, instead of the usage of every option)."""
    try:
        lines = work()
    except UserInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except ArgumentError as error:
        message = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
        print(f"error: {message} (see --help for the options)", file=sys.stderr)
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


# Parse errors raise (and become one `error:` line) instead of printing the usage of every option and exiting.
RAISE_PARSE_ERRORS = {"exit_on_error": False} | {name: {"exit_on_error": False} for name in LightningCLI.subcommands()}


def run_cli(args: list[str] | None = None) -> int:
    """`scripts/train.py`: Lightning's fit / validate / test / predict on the configuration."""

    def run() -> None:
        arguments = sys.argv[1:] if args is None else args
        _config_path(arguments)  # a config that is missing or not a YAML mapping: one sentence
        _build_cli(SentimentCLI, save_config_kwargs={"overwrite": True}, parser_kwargs=RAISE_PARSE_ERRORS, args=args)

    return run_reporting_user_errors(run)


def fit(config_path: str | Path, ckpt_path: str | None = None) -> LightningCLI:
    """`scripts/train.py fit --config <config_path> [--ckpt_path <ckpt_path>]`, in this process; returns the finished
    LightningCLI."""
    args = ["fit", "--config", str(config_path)] + (["--ckpt_path", ckpt_path] if ckpt_path else [])
    with program_name_only():
        return _build_cli(SentimentCLI, save_config_kwargs={"overwrite": True}, args=args)


def _build_cli(cli_class: type[SentimentCLI], **kwargs) -> SentimentCLI:
    """Build (and run) a CLI for the classifier and the data in a copy of the current context.

    jsonargparse leaves the last subcommand's parser in a ContextVar (`subclass_arg_parser`) and never resets it; that
    parser reaches the CLI through its instantiators, and the CLI reaches the model. Run in the caller's context, a
    finished fit or evaluation would keep its model's weights resident until the next CLI replaced the parser
    (0.26 GiB after a bf16 fit of SmolLM2, 0.5 GiB after an fp32 evaluation). In a copy, what jsonargparse sets there
    goes when the copy does.
    """
    return contextvars.copy_context().run(
        cli_class, LoRASentimentClassifier, TweetSentimentDataModule, seed_everything_default=DEFAULT_SEED, **kwargs
    )


# ---- evaluation and analysis: the model and the data, no Trainer -------------------------------------------------
@dataclass
class LoadedRun:
    """What `scripts/evaluate.py`, `scripts/analyze.py` and `scripts/roar.py` work on: the data, the (untrained)
    module, the settings."""

    datamodule: TweetSentimentDataModule
    module: LoRASentimentClassifier
    compare: CompareSettings
    evaluate: EvaluateSettings
    explain: ExplainSettings
    roar: RoarSettings
    trainer: Mapping  # the config's trainer section (accelerator, progress bar)
    config_path: Path | None
    arguments: list[str]  # the command line after `--config FILE`, with aliases translated
    resolved: dict  # the whole configuration with every option resolved, as `--print_config` shows it (no token)
    dtype: DtypeChoice  # the dtype the model was loaded in, and why (`--model.dtype auto` is resolved per phase)


class _ModelAndDataCLI(SentimentCLI):
    """Parses the configuration and instantiates only the model and the data (no Trainer, no callbacks).

    `check(settings)` runs after parsing and before the model is loaded, so bad options fail in seconds.
    """

    def __init__(self, *args, check: Callable[[dict], None] | None = None, phase: str = "evaluation", **kwargs):
        self._check = check
        self.phase = phase
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
    phase: str = "evaluation",
) -> LoadedRun:
    """Parse a command line (`--config FILE`, dotted options) and build the data and the module it describes, the
    model in the dtype `phase` (`evaluation` or `explain`) runs in.

    `--print_config` prints the resolved configuration as YAML and exits, as for `scripts/train.py`; `--help` lists
    every option and, after them, the dashed `aliases` the command accepts.
    """
    arguments = list(arguments)
    config_path = _config_path(arguments)
    with program_name_only():
        cli = _build_cli(
            _ModelAndDataCLI,
            run=False,
            args=arguments,
            save_config_callback=None,
            check=check,
            phase=phase,
            parser_kwargs={"exit_on_error": False, **({"epilog": alias_help(aliases)} if aliases else {})},
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
        resolved=yaml.safe_load(cli.parser.dump(cli.config)),
        dtype=cli.dtype_choice,
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
        check_config_file(path)
        return path.resolve()
    return None


def check_config_file(path: Path) -> None:
    """A config must be a YAML mapping of sections (trainer, model, data, ...): anything else is one sentence."""
    import yaml

    try:
        content = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        where = getattr(error, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise UserInputError(
            f"The config '{path}' is not valid YAML{at}; fix it, or start from configs/embedded.yaml."
        ) from error
    if not isinstance(content, dict):
        raise UserInputError(
            f"The config '{path}' holds a {type(content).__name__}, not a mapping of sections (trainer:, model:, "
            "data:, ...); start from configs/embedded.yaml."
        )


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
