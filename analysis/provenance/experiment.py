"""The original single-script experiment as one composition of our building blocks.

`run_experiment` writes the one configuration of the run (`config.yaml`: the original experiment's config with the
flags applied, and the `compare`, `evaluate` and `explain` sections), then calls exactly what the separate commands
call on it: the LightningCLI `fit` of `scripts/train.py`, `analysis.evaluation.run.evaluate` and
`analysis.explanation.run.run_analysis`. The three commands accept the saved `config.yaml` as it is. It adds what
only a whole run can know: the Quantum Pass badge, the `run.json` manifest and `report.html`.

The hub token never reaches a file: it is moved into `HF_TOKEN` in this process's environment before anything
runs, and every recorded configuration is passed through `without_secrets`.
"""

from __future__ import annotations

import copy
import datetime as dt
import inspect
import json
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import yaml

from analysis.models import FINE_TUNED, ZERO_SHOT, check_baselines, display_name, release_memory
from analysis.provenance.badge import BADGE_ID, PROJECT_ROOT, install_badge
from analysis.provenance.manifest import (
    PhaseTimer,
    device_description,
    examples_fingerprint,
    git_commit,
    model_record,
    package_versions,
    without_secrets,
)
from analysis.report.page import write_report
from analysis.settings import CompareSettings, EvaluateSettings, ExplainSettings
from datamodules.tweet_sentiment import DEFAULT_SEED, TweetSentimentDataModule
from foundation.atomic_files import write_json_atomic, write_text_atomic
from foundation.errors import UserInputError
from foundation.hub import TOKEN_ENV_VARS
from foundation.output_folder import check_output_dir
from foundation.output_names import (
    ADAPTER_DIR,
    BADGE_FILE,
    BADGE_MANIFEST,
    CHECKPOINT_DIR,
    CONFIG_FILE,
    INTERPRETABILITY_FILE,
    LIGHTNING_LOGS_DIR,
    MANIFEST_FILE,
    PREDICTIONS_FILE,
    PROGRESS_DIR,
    REPORT_FILE,
    SEED_METRICS_FILE,
    SEEDS_DIR,
    TENSORBOARD_DIR,
    metrics_file,
    shap_file,
    shap_summary_plot,
)

# The original experiment (Llama-3.2-1B, 4-bit, 1 epoch, accumulation 4, LoRA r=16): the flags override its
# model and data; everything else (trainer, LoRA, batch sizes) comes from here, as for `scripts/train.py`.
BASE_CONFIG = PROJECT_ROOT / "configs" / "llama-3.2-1b.yaml"
_BASE = yaml.safe_load(BASE_CONFIG.read_text())
# Written by Lightning during fit, next to the original's files.
TRAINING_OUTPUTS = (ADAPTER_DIR, CHECKPOINT_DIR, LIGHTNING_LOGS_DIR)


def _data_default(name: str):
    """The DataModule's default for one option: the single definition the original flags share."""
    return inspect.signature(TweetSentimentDataModule.__init__).parameters[name].default


@dataclass
class ExperimentOptions:
    """The original script's flags, with its names and defaults (`scripts/run_experiment.py --help`). Each default
    is read from where the option is defined: the original experiment's config, the DataModule, the settings."""

    model_name: str = _BASE["model"]["model_name"]
    """Hub id, local folder or embedded:smollm2-135m-instruct."""
    dataset_name: str = _BASE["data"]["dataset_name"]
    """Hub id, local file or folder, or embedded:crowdflower-tweets."""
    dataset_config: str | None = _data_default("dataset_config")
    """The hub dataset's configuration, if it has several."""
    train_split: str = _data_default("train_split")
    """Split to fine-tune on."""
    eval_split: str = _data_default("eval_split")
    """Split to evaluate and explain."""
    text_field: str = _data_default("text_field")
    """Column holding the tweet."""
    label_field: str = _data_default("label_field")
    """Column holding the label."""
    label_space: list[str] | None = None
    """Labels to keep, in order (ids or names; default: all in the data)."""
    train_subset: int | None = _data_default("train_subset")
    """Training examples (None = all)."""
    eval_subset: int | None = _data_default("eval_subset")
    """Evaluation examples (None = all)."""
    run_shap: bool = True
    """Explain the first eval tweets with SHAP (--run-shap / --no-run-shap)."""
    shap_example_count: int = ExplainSettings.example_count
    """Eval tweets explained with SHAP."""
    shap_max_evals: int | str = ExplainSettings.max_evals
    """Model evaluations per tweet and model: auto (exact values, up to --explain.max_evals_cap) or a number."""
    features: str = ExplainSettings.features
    """SHAP features: words (default) or tokens."""
    explainers: list[str] = field(default_factory=lambda: ExplainSettings().explainers)
    """Attribution methods, as for analyze.py: partition (always), kernel, lime, occlusion, integrated_gradients."""
    comparison_target: str = ExplainSettings.comparison_target
    """The one class per tweet every comparison of two models reads: gold or reference (the fine-tuned prediction)."""
    load_in_4bit: bool = _BASE["model"]["load_in_4bit"]
    """NF4 quantisation on a CUDA GPU (--load-in-4bit / --no-load-in-4bit)."""
    finetune: bool = False
    """Train a LoRA adapter and compare it with the zero-shot model."""
    seeds: int = 1
    """Fine-tune this many adapters that differ only in their training seed (data order, LoRA init, dropout); the
    agreement of their explanations is the seed-noise null of the zero-shot-vs-fine-tuned comparison."""
    # Ours, beyond the original's flags: the prompt-only baselines evaluated (and explained) beside LoRA.
    baselines: list[str] = field(default_factory=lambda: EvaluateSettings().baselines)
    """Prompt-only models evaluated beside the fine-tuned one."""
    k_shot: int = CompareSettings.k_shot
    """Demonstrations in the k_shot baseline."""
    shap_baselines: list[str] = field(default_factory=lambda: ExplainSettings().baselines)
    """Baselines explained with SHAP beside the fine-tuned model."""
    output_dir: str = _BASE["trainer"]["default_root_dir"]
    """Folder for every file of the run."""
    project_badge_dir: str | None = None
    """Where to copy the badge (default: the output folder)."""
    project_badge: bool = True
    """Copy the Quantum Pass badge (--no-project-badge skips it)."""
    huggingface_token: str | None = field(default=None, repr=False)
    """Token for gated hub repos; kept in this process's environment only (default: HF_TOKEN / HUGGINGFACE_TOKEN)."""
    overwrite: bool = False
    """Start over in an output folder that holds an earlier run (without it, the same options resume that run and
    other options are refused)."""


@dataclass
class ExperimentResult:
    output_dir: Path
    manifest: dict
    report: Path
    files: list[str]
    summary: list[str] = field(default_factory=list)


# ---- the configuration of the run ---------------------------------------------------------------------------------
def run_config(options: ExperimentOptions, output_dir: Path) -> dict:
    """The one configuration this run trains, evaluates and explains with; the three separate commands accept it as
    it is saved (no secrets: the token is not an option)."""
    import torch

    config = yaml.safe_load(BASE_CONFIG.read_text())
    config["seed_everything"] = DEFAULT_SEED
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
        seed=DEFAULT_SEED,
    )
    adapter = str(output_dir / ADAPTER_DIR) if options.finetune else None
    config["compare"] = asdict(CompareSettings(adapter=adapter, k_shot=options.k_shot))
    config["evaluate"] = asdict(EvaluateSettings(output_dir=str(output_dir), baselines=list(options.baselines)))
    config["explain"] = asdict(
        ExplainSettings(
            output_dir=str(output_dir),
            baselines=list(options.shap_baselines),
            example_count=options.shap_example_count,
            max_evals=options.shap_max_evals,
            features=options.features,
            comparison_target=options.comparison_target,
            explainers=list(options.explainers),
        )
    )
    return config


def seed_config(config: dict, seed_index: int, folder: Path) -> dict:
    """The configuration of training seed `seed_index` (> 0): the run's, but for the seed of everything random in
    training (LoRA init, dropout, data order; not the rows), its own folder, and the fine-tuned model alone."""
    config = copy.deepcopy(config)
    config["seed_everything"] = DEFAULT_SEED + seed_index
    config["trainer"]["default_root_dir"] = str(folder)
    config["data"]["shuffle_seed"] = DEFAULT_SEED + seed_index
    config["compare"]["adapter"] = str(folder / ADAPTER_DIR)
    config["evaluate"].update(output_dir=str(folder), baselines=[])
    config["explain"].update(output_dir=str(folder), baselines=[])
    return config


def check_options(options: ExperimentOptions, config: dict) -> None:
    """The options that can be wrong, checked before anything is written: the same checks as the separate commands."""
    from analysis.explanation.checks import check_explain_options

    if options.seeds < 1:
        raise UserInputError(f"--seeds must be at least 1 (the number of fine-tuned adapters), got {options.seeds}.")
    if options.seeds > 1 and not options.finetune:
        raise UserInputError(f"--seeds {options.seeds} fine-tunes several adapters; add --finetune.")
    compare = CompareSettings(**config["compare"])
    check_baselines(options.baselines, compare.k_shot)
    if options.run_shap:
        check_explain_options(ExplainSettings(**config["explain"]), compare)
    for flag, value in (("--train-subset", options.train_subset), ("--eval-subset", options.eval_subset)):
        if value is not None and value < 1:
            raise UserInputError(f"{flag} must be a positive number of examples or None (all), got {value}.")


# ---- phases -------------------------------------------------------------------------------------------------------
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


# ---- several training seeds ------------------------------------------------------------------------------------
SEED_METRICS = ("accuracy", "macro_f1", "mcc", "ece")


def seed_metric_summary(per_seed: list[dict], seeds: list[int]) -> dict:
    """The fine-tuned metrics of every seed, with their mean, sample sd and range."""
    summary = {"seeds": seeds, "per_seed": [{key: m[key] for key in SEED_METRICS} for m in per_seed], "metrics": {}}
    for key in SEED_METRICS:
        values = np.array([m[key] for m in per_seed], dtype=float)
        summary["metrics"][key] = {
            "mean": float(values.mean()),
            "sd": float(values.std(ddof=1)) if len(values) > 1 else None,
            "min": float(values.min()),
            "max": float(values.max()),
        }
    return summary


def seed_metric_lines(summary: dict) -> list[str]:
    parts = [
        f"{key} {row['mean']:.3f} ± {row['sd']:.3f} [{row['min']:.3f}, {row['max']:.3f}]"
        for key, row in summary["metrics"].items()
    ]
    return [f"fine-tuned over {len(summary['seeds'])} seeds (mean ± sd [range]): " + ", ".join(parts)]


def seed_null_of_run(folder: Path, seed_folders: list[Path], baseline: str = ZERO_SHOT, seed: int = 0) -> dict:
    """The seed-noise null from the explanation files of the run (seed 0) and of every further seed, against the
    run's first explained baseline (raw zero-shot by default), on the gold class of each tweet (the reference
    prediction differs between seeds; gold does not)."""
    from analysis.statistics.seed_null import seed_null

    def at_gold(path: Path) -> tuple[list, list[np.ndarray]]:
        content = json.loads(path.read_text(encoding="utf-8"))
        keys = list(zip(content["example_indices"], content["texts"]))
        values = [np.asarray(v, dtype=float)[:, g] for v, g in zip(content["values"], content["gold"])]
        return keys, values

    keys, zero_shot = at_gold(folder / shap_file(baseline))
    fine_tuned = []
    for seed_folder in [folder, *seed_folders]:
        seed_keys, values = at_gold(seed_folder / shap_file(FINE_TUNED))
        if seed_keys != keys:
            raise RuntimeError(f"{seed_folder} explains other tweets than {folder}")
        fine_tuned.append(values)
    result = seed_null(zero_shot, fine_tuned, seed=seed)
    result["target"] = "gold"
    result["baseline"] = baseline
    result["folders"] = [str(folder), *map(str, seed_folders)]
    return result


# ---- the whole run ------------------------------------------------------------------------------------------------
# Set by `continue_in_fresh_process` to the output folder whose run the fresh process image continues.
CONTINUED_RUN_ENV = "LORA_EXPLAIN_CONTINUED_RUN"


def run_experiment(
    options: ExperimentOptions,
    log: Callable[[str], None] = lambda message: print(message, flush=True),
    after_fit: Callable[[Path], None] | None = None,
) -> ExperimentResult:
    """Train (with `finetune`), evaluate, explain (with `run_shap`), then badge, manifest and report.

    `after_fit(folder)` is called once a fit this process ran is recorded in `run.json`, before the evaluation: the
    command line passes `continue_in_fresh_process`, which does not return.
    """
    from analysis.configuration import program_name_only

    with program_name_only(), _sigterm_raises():
        return _run(options, log, after_fit)


def continue_in_fresh_process(folder: Path) -> None:
    """Replace this process image by a fresh one running the same command, which continues the run in `folder` from
    its `run.json` (the fit is done) with what a fresh process holds: the operating system takes back everything the
    fit left in this one (heap the allocator keeps, oneDNN's compiled kernels, the fit's modules and objects; about
    0.3 GB after the embedded fit, docs/benchmarks.md). The same process id, so a caller waiting on it, a time limit and
    `/usr/bin/time` (the peak of both images) see one process. Where `exec` does not replace a process (not POSIX),
    or under a multi-process launcher, the run continues in this process."""
    if os.name != "posix" or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.environ[CONTINUED_RUN_ENV] = str(folder)
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


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


def _run(
    options: ExperimentOptions, log: Callable[[str], None], after_fit: Callable[[Path], None] | None
) -> ExperimentResult:
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    if options.huggingface_token:
        os.environ["HF_TOKEN"] = options.huggingface_token  # read by every loader; never written
    secrets = [options.huggingface_token] + [os.environ.get(name) for name in TOKEN_ENV_VARS]
    options = replace(options, huggingface_token=None)
    # Everything that can be wrong is found here, before anything is written.
    folder = check_output_dir(options.output_dir)
    # The fresh process image of this same command after its fit (`continue_in_fresh_process`): it continues that run
    # (never starts it over, whatever --overwrite said) and says so once.
    continued = os.environ.pop(CONTINUED_RUN_ENV, None) == str(folder)
    if continued:
        options = replace(options, overwrite=False)
    config = run_config(options, folder)
    check_options(options, config)
    badge_folder = None
    if options.project_badge:
        badge_folder = check_output_dir(options.project_badge_dir) if options.project_badge_dir else folder
    check_inputs(options, config)
    previous = None if options.overwrite else previous_run(folder, recorded_options(options, secrets), config)
    if options.overwrite:
        remove_previous_run(folder)
    if options.project_badge and not continued:
        log(f"Quantum Pass badge: {BADGE_ID}")
    if continued:
        log("== continuing in a fresh process: the memory the fit held is back with the operating system ==")
    elif previous is not None:
        done = previous["phases_done"]
        log(f"== resuming the run in {folder}: {', '.join(done) if done else 'no phase'} finished before ==")

    run = ExperimentRun(options, folder, config, secrets, started, previous)

    def announce(title: str, phase: str) -> None:
        log(f"== {title}{' (finished before: kept)' if run.done(phase) else ''} ==")

    try:
        if options.finetune:
            if not continued:
                announce("fine-tuning a LoRA adapter (scripts/train.py fit)", "train")
            fits = not run.done("train")
            run.train()
            if fits and after_fit is not None and not continued:  # one fresh image per run, never a loop
                run.save_manifest("continued in a fresh process")
                after_fit(folder)
        evaluated = [display_name(m, options.k_shot) for m in options.baselines]
        evaluated += ["fine-tuned"] if options.finetune else []
        announce(f"evaluating: {', '.join(evaluated)}", "evaluate")
        run.evaluate()
        if options.run_shap:
            announce("explaining with SHAP", "explain")
            run.explain()
        return run.finish(badge_folder)
    except BaseException as error:
        run.save_manifest("interrupted" if isinstance(error, (KeyboardInterrupt, SystemExit)) else "failed")
        raise


# ---- before anything is written: the inputs, and an earlier run in the same folder ------------------------------
def check_inputs(options: ExperimentOptions, config: dict) -> None:
    """Read the data and the tokenizer the run will use, as the fit will: the dataset can be read, its splits,
    columns and labels, the label words (one token each) and the k-shot demonstrations the train split must supply.
    A bad input is one sentence now, not a failure after the fine-tuning."""
    from analysis.models import K_SHOT

    data = {**config["data"], "tokenizer_name": config["model"]["model_name"]}
    datamodule = TweetSentimentDataModule(**data)
    datamodule.tokenizer  # noqa: B018 - the model first: its tokenizer is found (hub, folder or embedded) or not
    datamodule.label_token_ids  # noqa: B018 - the rows, their labels, the prompt and its one-token label words
    if K_SHOT in options.baselines:
        try:
            datamodule.make_encoder(options.k_shot)
        except UserInputError as error:
            raise UserInputError(
                f"The k-shot baseline cannot be built: {error} Drop k_shot from --baselines or lower --k-shot."
            ) from error


# Options that name where a run goes or how it is started, not what it computes.
_NOT_COMPARED = {"output_dir", "overwrite", "huggingface_token_given", "project_badge_dir", "project_badge"}


def recorded_options(options: ExperimentOptions, secrets: list[str | None]) -> dict:
    """The options as `run.json` records them: no token, only whether one was given."""
    recorded = {k: v for k, v in asdict(options).items() if k != "huggingface_token"}
    recorded["huggingface_token_given"] = any(secrets)
    return recorded


def previous_run(folder: Path, options: dict, config: dict) -> dict | None:
    """The manifest of an earlier run in `folder` that this one continues, or None when there is none.

    Its options must be these: a resumed run that mixed two configurations would be neither. A finished phase is
    then kept, an interrupted fit resumes from its checkpoint and an interrupted explanation from its finished
    tweets.
    """
    path = folder / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        before = manifest["options"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserInputError(
            f"The output folder '{folder}' holds a {MANIFEST_FILE} that cannot be read ({error}); choose another "
            "--output-dir, or add --overwrite to start over there."
        ) from error
    # An option or config key the earlier run did not have yet (an older version of the project) ran as its default.
    defaults = recorded_options(ExperimentOptions(), [])
    differ = [
        f"--{key.replace('_', '-')} {before.get(key, defaults.get(key))!r} there, {value!r} here"
        for key, value in options.items()
        if key not in _NOT_COMPARED and before.get(key, defaults.get(key)) != value
    ]
    changed = _changed_keys(manifest.get("config") or {}, without_secrets(config, []))
    if not differ and changed:
        differ = [f"the configuration these options give ({', '.join(changed)} changed in the project since that run)"]
    if differ:
        raise UserInputError(
            f"The output folder '{folder}' holds a run with other options ({'; '.join(differ)}); rerun with its "
            "options to resume it, choose another --output-dir, or add --overwrite to start over."
        )
    manifest.setdefault("phases_done", [])
    manifest.setdefault("summaries", {})
    return manifest


def _changed_keys(before: dict, now: dict, prefix: str = "") -> list[str]:
    """Dotted keys present in both configurations whose values differ (keys only one of them has are new options,
    which ran as their default)."""
    changed = []
    for key in before.keys() & now.keys():
        a, b = before[key], now[key]
        if isinstance(a, dict) and isinstance(b, dict):
            changed += _changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            changed.append(prefix + key)
    return sorted(changed)


def remove_previous_run(folder: Path) -> None:
    """--overwrite: remove what an earlier run wrote in `folder` (the names it lists and those a fit or an
    explanation writes before it lists them); other files stay."""
    import shutil

    path = folder / MANIFEST_FILE
    if not path.is_file():
        return
    try:
        listed = json.loads(path.read_text(encoding="utf-8")).get("outputs", [])
    except (OSError, ValueError, AttributeError):
        listed = []
    for name in {*listed, *TRAINING_OUTPUTS, SEEDS_DIR, PROGRESS_DIR, MANIFEST_FILE}:
        target = folder / Path(name).name  # names only: never a path outside the folder
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


class ExperimentRun:
    """One run's output folder, manifest and list of files it produced, filled in phase by phase.

    `run.json` is rewritten after every phase and lists the phases finished (`phases_done`) with their summary lines,
    so an interrupted run says what it did, and the same command continues it: finished phases are not redone.
    """

    def __init__(
        self,
        options: ExperimentOptions,
        folder: Path,
        config: dict,
        secrets: list[str | None],
        started: str,
        previous: dict | None = None,
    ):
        self.options, self.folder, self.secrets = options, folder, secrets
        self.timer = PhaseTimer()
        folder.mkdir(parents=True, exist_ok=True)
        self.config_path = write_text_atomic(folder / CONFIG_FILE, yaml.safe_dump(config, sort_keys=False))
        self.manifest: dict = {
            "command": "scripts/run_experiment.py",
            "status": "running",
            "started_at_utc": started,
            "options": recorded_options(options, secrets),
            "config": config,  # what every phase read: config.yaml, the flags applied to the base config
            "lightning_config": None,  # LightningCLI's full dump of it, with every default, once training ran
            "seed": DEFAULT_SEED,
            "seeds": {
                "seed_everything": DEFAULT_SEED,
                "data_subsets": DEFAULT_SEED,
                "bootstrap": config["compare"]["seed"],
                "shap": config["compare"]["seed"],
            },
            "model": model_record(options.model_name),
            "data": {"train": None, "eval": None, "explained": None},
            "device": device_description(),
            "packages": package_versions(),
            "git": git_commit(PROJECT_ROOT),
            "phase_seconds": {},
            # per phase: the resident high-water mark of the process image that ran it, when the phase ended (the
            # command line fits in one image and continues in a fresh one, `continue_in_fresh_process`; a resumed
            # run keeps the figures of the phases an earlier process finished): the run's peak is the largest
            "peak_rss_gib": {},
            "dtypes": {},  # per phase: the dtype its model computed in, and why
            "phases_done": [],
            "summaries": {},  # the summary lines of each finished phase, printed again when a resumed run ends
            "attempts": [],  # one entry per process that worked on this run: started, and how it ended
            "badge": None,
            "outputs": [],
        }
        self.produced = [CONFIG_FILE, MANIFEST_FILE]
        self.resuming = previous is not None
        # per-phase figures of the phases an earlier process finished: "phase_seconds" and "peak_rss_gib"
        self.earlier: dict[str, dict[str, float]] = {"phase_seconds": {}, "peak_rss_gib": {}}
        if previous is not None:
            for key in ("lightning_config", "data", "phases_done", "summaries", "attempts", "dtypes"):
                self.manifest[key] = previous.get(key, self.manifest[key])
            self.manifest["started_at_utc"] = previous.get("started_at_utc", started)
            self.produced += previous.get("outputs", [])
            self.earlier = {
                key: {k: v for k, v in previous.get(key, {}).items() if k in self.manifest["phases_done"]}
                for key in self.earlier
            }
        self.manifest["attempts"].append({"started_at_utc": started, "pid": os.getpid(), "status": "running"})
        # Training seeds 1 .. K-1, each a complete run of its own in seeds/seed_<k>/ (seed 0 is this folder).
        self.seed_configs = []
        for k in range(1, options.seeds):
            seed_folder = folder / SEEDS_DIR / f"seed_{k}"
            seed_folder.mkdir(parents=True, exist_ok=True)
            text = yaml.safe_dump(seed_config(config, k, seed_folder), sort_keys=False)
            self.seed_configs.append(write_text_atomic(seed_folder / CONFIG_FILE, text))
        if self.seed_configs:
            self.produced.append(SEEDS_DIR)
            self.manifest["seeds"]["training_seeds"] = [DEFAULT_SEED + k for k in range(options.seeds)]
        self.save_manifest()

    @property
    def summary(self) -> list[str]:
        return [line for lines in self.manifest["summaries"].values() for line in lines]

    def done(self, phase: str) -> bool:
        return phase in self.manifest["phases_done"]

    def finished(self, phase: str, summary: list[str] | None = None) -> None:
        """Record `phase` as done (with its summary lines) in run.json: a rerun of the command skips it."""
        self.manifest["phases_done"].append(phase)
        if summary:
            self.manifest["summaries"][phase] = list(summary)
        self.save_manifest()

    def _record_dtype(self, phase: str, choice) -> None:
        """The dtype `phase` computed in and why (`--model.dtype auto` decides per phase and machine)."""
        self.manifest.setdefault("dtypes", {})[phase] = choice.as_dict()

    def save_manifest(self, status: str = "running") -> None:
        self.manifest["status"] = status
        self.manifest["attempts"][-1]["status"] = status
        seconds = self.timer.summary()
        total = seconds.pop("total") + sum(self.earlier["phase_seconds"].values())
        self.manifest["phase_seconds"] = {**self.earlier["phase_seconds"], **seconds, "total": round(total, 3)}
        self.manifest["peak_rss_gib"] = {**self.earlier["peak_rss_gib"], **self.timer.peak_rss_gib}
        self.manifest["outputs"] = sorted(set(self.produced))
        write_json_atomic(self.folder / MANIFEST_FILE, without_secrets(self.manifest, self.secrets))

    def _fit(self, config_path: Path):
        """`scripts/train.py fit` on one configuration; after a kill, from its last checkpoint (the next batch)."""
        from analysis.configuration import fit

        # Only this run's own checkpoint (run.json says the folder holds it): never one another command left there.
        checkpoint = config_path.parent / CHECKPOINT_DIR / "last.ckpt"
        return fit(config_path, ckpt_path="last" if self.resuming and checkpoint.is_file() else None)

    def _seed_phase(self, phase: str, work: Callable[[], object]) -> None:
        """One further seed's fit, evaluation or explanation, unless it finished before: timed, its memory released,
        recorded in run.json (the seed's files are in its own folder; what `work` returns is dropped)."""
        if self.done(phase):
            return
        with self.timer.phase(phase):
            work()
        release_memory()
        self.finished(phase)

    def train(self) -> Path:
        for k, config_path in enumerate(self.seed_configs, start=1):
            self._seed_phase(f"train_seed_{k}", lambda path=config_path: self._fit(path))
        if not self.done("train"):
            with self.timer.phase("train"):
                cli = self._fit(self.config_path)
            self._record_dtype("train", cli.dtype_choice)
            datamodule = cli.datamodule
            train = _labelled_texts(datamodule, datamodule.train_examples)
            self.manifest["data"]["train"] = examples_fingerprint(train)
            saved_config = Path(cli.trainer.log_dir or self.folder) / CONFIG_FILE
            if saved_config.is_file():
                self.manifest["lightning_config"] = yaml.safe_load(saved_config.read_text())
            del cli, datamodule
            release_memory()
            self.produced += [name for name in TRAINING_OUTPUTS if (self.folder / name).exists()]
            self.finished("train")
        return self.folder / ADAPTER_DIR

    def evaluate(self) -> None:
        from analysis.configuration import load_run
        from analysis.evaluation.run import check_evaluation, evaluate
        from analysis.report.tables import evaluation_summary

        if not self.done("evaluate"):
            with self.timer.phase("evaluate"):
                loaded = load_run(["--config", str(self.config_path)], check=check_evaluation)
                self._record_dtype("evaluate", loaded.dtype)
                evaluation = evaluate(loaded)
                del loaded
            release_memory()
            self.produced += [path.name for path in evaluation.files] + [TENSORBOARD_DIR]
            self.manifest["data"]["eval"] = _predictions_fingerprint(self.folder / PREDICTIONS_FILE)
            self.finished("evaluate", evaluation_summary(evaluation))
        if not self.seed_configs or self.done("seed_metrics"):
            return
        per_seed = [self._metrics(self.folder)]
        for k, config_path in enumerate(self.seed_configs, start=1):
            seed_run = ["--config", str(config_path)]
            self._seed_phase(f"evaluate_seed_{k}", lambda args=seed_run: evaluate(load_run(args, check_evaluation)))
            per_seed.append(self._metrics(config_path.parent))
        summary = seed_metric_summary(per_seed, self.manifest["seeds"]["training_seeds"])
        write_json_atomic(self.folder / SEED_METRICS_FILE, summary)
        self.produced.append(SEED_METRICS_FILE)
        self.finished("seed_metrics", seed_metric_lines(summary))

    @staticmethod
    def _metrics(folder: Path) -> dict:
        return json.loads((folder / metrics_file(FINE_TUNED)).read_text(encoding="utf-8"))

    def explain(self) -> None:
        from analysis.configuration import load_run
        from analysis.evaluation.run import show_in_notebook
        from analysis.explanation.checks import check_explanation
        from analysis.explanation.run import run_analysis
        from analysis.report.tables import analysis_summary

        if not self.done("explain"):
            # An interrupted explanation resumes by itself: every finished tweet was saved in .progress/.
            with self.timer.phase("explain"):
                loaded = load_run(["--config", str(self.config_path)], check=check_explanation, phase="explain")
                self._record_dtype("explain", loaded.dtype)
                result = run_analysis(loaded, _to_stderr)
                del loaded
            release_memory()
            self.produced += [path.name for path in result.files]
            self.manifest["data"]["explained"] = _explained_fingerprint(self.folder / shap_file(result.models[0]))
            self.manifest["explained_models"] = list(result.models)
            self.finished("explain", analysis_summary(result))
        models = self.manifest.get("explained_models", [])
        if self.seed_configs and FINE_TUNED in models and not self.done("seed_null"):
            for k, config_path in enumerate(self.seed_configs, start=1):
                seed_run = ["--config", str(config_path)]
                self._seed_phase(
                    f"explain_seed_{k}",
                    lambda args=seed_run: run_analysis(load_run(args, check_explanation, phase="explain"), _to_stderr),
                )
            metrics = json.loads((self.folder / INTERPRETABILITY_FILE).read_text(encoding="utf-8"))
            baseline = next(model for model in models if model != FINE_TUNED)
            seed_folders = [path.parent for path in self.seed_configs]
            bootstrap_seed = metrics["settings"]["seed"]
            metrics["seed_null"] = seed_null_of_run(self.folder, seed_folders, baseline, bootstrap_seed)
            write_json_atomic(self.folder / INTERPRETABILITY_FILE, metrics)
            lines = [f"seed null: {row['verdict']}" for row in metrics["seed_null"]["statistics"].values()]
            self.finished("seed_null", lines)
        show_in_notebook([self.folder / shap_summary_plot(model) for model in models])

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
        summary = [*self.summary, f"report: {report}"]
        return ExperimentResult(self.folder, self.manifest, report, sorted(set(self.produced)), summary)


def _to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
