"""The original single-script experiment as one composition of our building blocks.

`run_experiment` writes one training config for the run (`config.yaml`: the original experiment's config with the
flags applied), then calls exactly what the separate commands call: the LightningCLI `fit` of `scripts/train.py`,
`analysis.evaluation.evaluate` and `analysis.analyze.run_analysis`. It adds what only a whole run can know: the
Quantum Pass badge, the `run.json` manifest and `report.html`.

The hub token never reaches a file: it is moved into `HF_TOKEN` in this process's environment before anything
runs, and every recorded configuration is passed through `without_secrets`.
"""

from __future__ import annotations

import datetime as dt
import gc
import json
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import yaml

from analysis.badge import BADGE_FILE, BADGE_ID, BADGE_MANIFEST, PROJECT_ROOT, install_badge
from analysis.baselines import BASELINES, DEFAULT_K, ZERO_SHOT, check_baselines, display_name
from analysis.evaluation import PREDICTIONS_FILE, TENSORBOARD_DIR
from analysis.files import write_json_atomic, write_text_atomic
from analysis.report_html import REPORT_FILE, write_report
from analysis.run_manifest import (
    PhaseTimer,
    device_description,
    examples_fingerprint,
    git_commit,
    model_record,
    package_versions,
    without_secrets,
)
from lightning_modules.backbone import TOKEN_ENV_VARS
from lightning_modules.errors import UserInputError
from lightning_modules.export_adapter import ADAPTER_DIR

# The original experiment (Llama-3.2-1B, 4-bit, 1 epoch, accumulation 4, LoRA r=16): the flags override its
# model and data; everything else (trainer, LoRA, batch sizes) comes from here, as for `scripts/train.py`.
BASE_CONFIG = PROJECT_ROOT / "configs" / "llama-3.2-1b.yaml"
CONFIG_FILE = "config.yaml"
MANIFEST_FILE = "run.json"
SEED = 42
# Written by Lightning during fit, next to the original's files.
TRAINING_OUTPUTS = (ADAPTER_DIR, "checkpoints", "lightning_logs")


@dataclass
class ExperimentOptions:
    """The original script's flags, with its names and defaults (`scripts/run_experiment.py --help`)."""

    model_name: str = "meta-llama/Llama-3.2-1B"
    dataset_name: str = "mteb/tweet_sentiment_extraction"
    dataset_config: str | None = None
    train_split: str = "train"
    eval_split: str = "test"
    text_field: str = "text"
    label_field: str = "label"
    label_space: list[str] | None = None
    train_subset: int | None = 2000
    eval_subset: int | None = 1000
    run_shap: bool = True
    shap_example_count: int = 10
    shap_max_evals: int = 200
    load_in_4bit: bool = True
    finetune: bool = False
    # Ours, beyond the original's flags: the prompt-only baselines evaluated (and explained) beside LoRA.
    baselines: tuple[str, ...] = BASELINES
    k_shot: int = DEFAULT_K
    shap_baselines: tuple[str, ...] = (ZERO_SHOT,)
    output_dir: str = "outputs/tweet_sentiment_extraction"
    project_badge_dir: str | None = None
    project_badge: bool = True
    huggingface_token: str | None = field(default=None, repr=False)


@dataclass
class ExperimentResult:
    output_dir: Path
    manifest: dict
    report: Path
    files: list[str]
    summary: list[str] = field(default_factory=list)


# ---- the training config of the run -------------------------------------------------------------------------------
def lightning_config(options: ExperimentOptions, output_dir: Path) -> dict:
    """The LightningCLI config this run trains, evaluates and explains with (no secrets: the token is not a flag)."""
    import torch

    config = yaml.safe_load(BASE_CONFIG.read_text())
    config["seed_everything"] = SEED
    trainer = config["trainer"]
    trainer["default_root_dir"] = str(output_dir)
    if not (torch.cuda.is_available() and torch.cuda.is_bf16_supported()):
        trainer.pop("precision", None)  # bf16 autocast is for GPUs; a CPU runs (and is compared) in fp32
    config["model"].update(model_name=options.model_name, load_in_4bit=options.load_in_4bit)
    config["data"].update(
        dataset_name=options.dataset_name,
        dataset_config=options.dataset_config,
        train_split=options.train_split,
        eval_split=options.eval_split,
        text_field=options.text_field,
        label_field=options.label_field,
        label_space=list(options.label_space) if options.label_space else None,
        train_subset=options.train_subset,
        eval_subset=options.eval_subset,
        seed=SEED,
    )
    return config


def check_options(options: ExperimentOptions) -> None:
    check_baselines(options.baselines, options.k_shot)
    if options.run_shap:
        check_baselines(options.shap_baselines, options.k_shot)
    for flag, value in (("--train-subset", options.train_subset), ("--eval-subset", options.eval_subset)):
        if value is not None and value < 1:
            raise UserInputError(f"{flag} must be a positive number of examples or None (all), got {value}.")
    if options.run_shap and options.shap_example_count < 1:
        raise UserInputError(f"--shap-example-count must be at least 1, got {options.shap_example_count}.")
    if options.run_shap and options.shap_max_evals < 2:
        raise UserInputError(
            f"--shap-max-evals {options.shap_max_evals} is too small: SHAP needs at least the full and the empty "
            "tweet (2); use about 2 x the tweet length or more (default 200)."
        )


# ---- phases -------------------------------------------------------------------------------------------------------
def fit_adapter(config_path: Path):
    """`scripts/train.py fit --config <config_path>`, in this process; returns the finished LightningCLI."""
    from datamodules import TweetSentimentDataModule
    from lightning_modules import LoRASentimentClassifier
    from scripts.cli import SentimentCLI

    return SentimentCLI(
        LoRASentimentClassifier,
        TweetSentimentDataModule,
        seed_everything_default=SEED,
        save_config_kwargs={"overwrite": True},
        args=["fit", "--config", str(config_path)],
    )


def _release_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _labelled_texts(datamodule, examples) -> list[tuple[str, str]]:
    names = datamodule.label_names
    return [(example.text, names[example.label]) for example in examples]


def _predictions_fingerprint(path: Path) -> dict:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return examples_fingerprint((row["text"], row["label"]) for row in rows)


def _explained_fingerprint(path: Path) -> dict:
    content = json.loads(path.read_text(encoding="utf-8"))
    labels = content["output_names"]
    return examples_fingerprint((text, labels[gold]) for text, gold in zip(content["texts"], content["gold"]))


# ---- the whole run ------------------------------------------------------------------------------------------------
@contextmanager
def _program_name_only() -> Iterator[None]:
    """LightningCLI, given explicit args, warns with a dump of `sys.argv`, which may hold the token: hide it."""
    saved = sys.argv
    sys.argv = saved[:1]
    try:
        yield
    finally:
        sys.argv = saved


def run_experiment(
    options: ExperimentOptions,
    log: Callable[[str], None] = lambda message: print(message, flush=True),
) -> ExperimentResult:
    """Train (with `finetune`), evaluate, explain (with `run_shap`), then badge, manifest and report."""
    with _program_name_only(), _sigterm_raises():
        return _run(options, log)


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    """SIGTERM (a cluster's time limit, `kill`) ends the run through Python, so `run.json` records the interruption.

    Without this, SIGTERM outside Lightning's fit kills the process where it stands, and `run.json` says `running`
    forever. Lightning chains this handler after its own during fit.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return

    def interrupt(signum, frame) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(options: ExperimentOptions, log: Callable[[str], None]) -> ExperimentResult:
    from analysis.evaluation import check_output_dir

    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    if options.huggingface_token:
        os.environ["HF_TOKEN"] = options.huggingface_token  # read by every loader; never written
    secrets = [options.huggingface_token] + [os.environ.get(name) for name in TOKEN_ENV_VARS]
    options = replace(options, huggingface_token=None)
    check_options(options)
    folder = check_output_dir(options.output_dir)
    badge_folder = None
    if options.project_badge:
        badge_folder = check_output_dir(options.project_badge_dir) if options.project_badge_dir else folder
        log(f"Quantum Pass badge: {BADGE_ID}")

    run = ExperimentRun(options, folder, secrets, started)
    try:
        adapter = None
        if options.finetune:
            log("== fine-tuning a LoRA adapter (scripts/train.py fit) ==")
            adapter = run.train()
        evaluated = [display_name(m, options.k_shot) for m in options.baselines] + (["fine-tuned"] if adapter else [])
        log(f"== evaluating: {', '.join(evaluated)} ==")
        run.evaluate(adapter)
        if options.run_shap:
            log("== explaining with SHAP ==")
            run.explain(adapter)
        return run.finish(badge_folder)
    except BaseException as error:
        run.save_manifest("interrupted" if isinstance(error, (KeyboardInterrupt, SystemExit)) else "failed")
        raise


class ExperimentRun:
    """One run's output folder, manifest and list of files it produced, filled in phase by phase.

    `run.json` is rewritten after every phase, so an interrupted run still says what it did and how long it took.
    """

    def __init__(self, options: ExperimentOptions, folder: Path, secrets: list[str | None], started: str):
        self.options, self.folder, self.secrets = options, folder, secrets
        self.timer = PhaseTimer()
        folder.mkdir(parents=True, exist_ok=True)
        config = lightning_config(options, folder)
        self.config_path = write_text_atomic(folder / CONFIG_FILE, yaml.safe_dump(config, sort_keys=False))
        recorded_options = {k: v for k, v in asdict(options).items() if k != "huggingface_token"}
        recorded_options["huggingface_token_given"] = any(secrets)
        self.manifest: dict = {
            "command": "scripts/run_experiment.py",
            "status": "running",
            "started_at_utc": started,
            "options": recorded_options,
            "config": config,  # what every phase read: config.yaml, the flags applied to the base config
            "lightning_config": None,  # LightningCLI's full dump of it, with every default, once training ran
            "seed": SEED,
            "seeds": {"seed_everything": SEED, "data_subsets": SEED, "bootstrap": 0, "shap": 0},
            "model": model_record(options.model_name),
            "data": {"train": None, "eval": None, "explained": None},
            "device": device_description(),
            "packages": package_versions(),
            "git": git_commit(PROJECT_ROOT),
            "phase_seconds": {},
            "badge": None,
            "outputs": [],
        }
        self.produced = [CONFIG_FILE, MANIFEST_FILE]
        self.summary: list[str] = []
        self.save_manifest()

    def save_manifest(self, status: str = "running") -> None:
        self.manifest["status"] = status
        self.manifest["phase_seconds"] = self.timer.summary()
        self.manifest["outputs"] = sorted(set(self.produced))
        write_json_atomic(self.folder / MANIFEST_FILE, without_secrets(self.manifest, self.secrets))

    def train(self) -> Path:
        with self.timer.phase("train"):
            cli = fit_adapter(self.config_path)
        datamodule = cli.datamodule
        self.manifest["data"]["train"] = examples_fingerprint(_labelled_texts(datamodule, datamodule.train_examples))
        saved_config = Path(cli.trainer.log_dir or self.folder) / "config.yaml"
        if saved_config.is_file():
            self.manifest["lightning_config"] = yaml.safe_load(saved_config.read_text())
        del cli, datamodule
        _release_memory()
        self.produced += [name for name in TRAINING_OUTPUTS if (self.folder / name).exists()]
        self.save_manifest()
        return self.folder / ADAPTER_DIR

    def evaluate(self, adapter: Path | None) -> None:
        from analysis.evaluation import evaluate, summary_lines

        with self.timer.phase("evaluate"):
            evaluation = evaluate(
                config=self.config_path,
                output_dir=self.folder,
                adapter=adapter,
                baselines=self.options.baselines,
                k_shot=self.options.k_shot,
            )
        _release_memory()
        self.produced += [path.name for path in evaluation.files] + [TENSORBOARD_DIR]
        self.manifest["data"]["eval"] = _predictions_fingerprint(self.folder / PREDICTIONS_FILE)
        self.summary += summary_lines(evaluation)
        self.save_manifest()

    def explain(self, adapter: Path | None) -> None:
        from analysis.analyze import SHAP_FILES, SUMMARY_PLOTS, run_analysis, summary_lines
        from analysis.evaluation import show_in_notebook

        with self.timer.phase("explain"):
            result = run_analysis(
                config=self.config_path,
                adapter=adapter,
                output_dir=self.folder,
                example_count=self.options.shap_example_count,
                max_evals=self.options.shap_max_evals,
                baselines=self.options.shap_baselines,
                k_shot=self.options.k_shot,
                log=_to_stderr,
            )
        _release_memory()
        self.produced += [path.name for path in result.files]
        first = self.folder / SHAP_FILES[result.models[0]]
        self.manifest["data"]["explained"] = _explained_fingerprint(first)
        self.summary += summary_lines(result)
        show_in_notebook([self.folder / SUMMARY_PLOTS[model] for model in result.models])
        self.save_manifest()

    def finish(self, badge_folder: Path | None) -> ExperimentResult:
        if badge_folder is not None:
            self.manifest["badge"] = install_badge(badge_folder)
            if badge_folder == self.folder:
                self.produced += [BADGE_FILE, BADGE_MANIFEST]
        self.save_manifest()
        with self.timer.phase("report"):
            badge_svg = Path(self.manifest["badge"]["asset"]) if self.manifest["badge"] else None
            report = write_report(self.folder, self.produced, badge_svg)
        self.produced.append(REPORT_FILE)
        self.save_manifest("complete")
        self.summary.append(f"report: {report}")
        return ExperimentResult(self.folder, self.manifest, report, sorted(set(self.produced)), self.summary)


def _to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
