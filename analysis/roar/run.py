"""ROAR, remove and retrain: delete each tweet's most important words by an explainer, retrain, measure the drop.

1. **Explain** every training and evaluation tweet with the model under study (the fine-tuned model given
   `--adapter`, else the zero-shot base model) at its `explain.target` class, with every explainer of
   `roar.explainers`, through the analysis's prefix-cached value function (`AttributionMethods`). Each tweet is saved
   at once in `DIR/.progress/`: a killed run resumes, and shards (`--num-shards/--shard-index`, or torchrun) split
   the tweets like `analyze.py`.
2. **Remove** (`analysis.roar.removal`): per share and explainer the words of largest |attribution| are deleted from
   both splits; the `random` control deletes as many words per tweet, chosen by a seeded generator; `none` keeps
   every word. Each condition's rows are written to `DIR/roar_data/<condition>/{train,test}.jsonl`.
3. **Retrain** per condition with the config's recipe (trainer, model and data options, seeds) on its own rows, in
   `DIR/roar_runs/<condition>/` (adapter, TensorBoard log, `last.ckpt`: a killed fit resumes from it), and score its
   evaluation rows; a finished condition is kept in `result.json` and not refitted.
4. **Compare**: accuracy and macro-F1 per condition with bootstrap CIs; per explainer and share, the difference to
   the random control of the same share and to `none`, paired over the evaluation tweets (bootstrap CI, McNemar);
   `report.html` over the folder shows them with the learning check and the curves.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import yaml

from analysis.explanation.checks import check_method_options
from analysis.explanation.methods import AttributionMethods
from analysis.explanation.progress import ProgressStore, ShardAssignment
from analysis.explanation.run import (
    ExplainedTweets,
    RunNotes,
    adapter_digest,
    tweet_budget,
)
from analysis.explanation.shap_values import mask_tweet, model_value_functions, tweet_masker
from analysis.models import FINE_TUNED, ZERO_SHOT, display_name, model_specs, release_memory, to_device
from analysis.report.page import write_folder_report
from analysis.report.plots import plot_roar
from analysis.report.tensorboard import write_tensorboard
from analysis.roar.removal import keep_mask, random_removal, ranked_removal
from analysis.settings import ROAR_CONTROL
from analysis.statistics.classification import classification_metrics, compare_predictions
from foundation.atomic_files import write_json_atomic, write_jsonl_atomic, write_text_atomic
from foundation.errors import UserInputError
from foundation.output_folder import check_output_dir, require_output_dir
from foundation.output_names import (
    ADAPTER_DIR,
    CHECKPOINT_DIR,
    CONFIG_FILE,
    PROGRESS_DIR,
    ROAR_COMPARISON_PLOT,
    ROAR_DATA_DIR,
    ROAR_METRICS_FILE,
    ROAR_RESULTS_FILE,
    ROAR_RUNS_DIR,
    TENSORBOARD_DIR,
)

if TYPE_CHECKING:
    from analysis.configuration import LoadedRun

NONE = "none"  # the condition that removes nothing: the same recipe on the unchanged rows
RESULT_FILE = "result.json"
FIT_KEY_FILE = "fit_key.json"
SPLITS = ("train", "test")
COMPARED = ("accuracy", "macro_f1")
RANDOM_SEED_OFFSET = 104_729  # the random control's generator: [compare.seed + offset, tweet index, share index]


@dataclass
class RoarPlan:
    """What a ROAR run will do, derived from its settings before any model is loaded."""

    folder: Path
    adapter: Path | None
    explainers: list[str]
    fractions: list[float]
    shard: ShardAssignment

    @property
    def model(self) -> str:
        return FINE_TUNED if self.adapter else ZERO_SHOT

    def conditions(self) -> list[tuple[str, str, float]]:
        """(name, removal, share): `none` first, then per share the random control and each explainer."""
        out = [(NONE, NONE, 0.0)]
        for fraction in self.fractions:
            for removal in (ROAR_CONTROL, *self.explainers):
                out.append((condition_name(removal, fraction), removal, fraction))
        return out


@dataclass
class RoarResult:
    folder: Path
    notes: list[str]
    complete: bool = True  # False: this shard explained its share; the fits wait for every tweet
    metrics: dict = field(default_factory=dict)
    analysis: dict = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    summary: list[str] = field(default_factory=list)  # the table the command prints


def share_key(fraction: float) -> str:
    """The share as a whole percentage: `30` for 0.3."""
    return str(round(100 * fraction))


def condition_name(removal: str, fraction: float) -> str:
    """`<explainer>_<percent>` (`occlusion_30`, `random_10`), or `none`."""
    return NONE if removal == NONE else f"{removal}_{share_key(fraction)}"


def check_roar(settings: dict) -> RoarPlan:
    """Everything about the ROAR options that can be wrong, checked without loading a model."""
    from lightning_modules.adapters import existing_adapter

    compare, explain, roar = settings["compare"], settings["explain"], settings["roar"]
    adapter = existing_adapter(compare.adapter)
    explainers = list(dict.fromkeys(roar.explainers))
    if not explainers:
        raise UserInputError("--explainer names no explainer; give one, e.g. --explainer occlusion.")
    if ROAR_CONTROL in explainers:
        raise UserInputError(
            f"--explainer {ROAR_CONTROL} is the control, which every ROAR run trains; name an explainer to test "
            "against it, e.g. --explainer occlusion."
        )
    check_method_options(replace(explain, explainers=explainers), "--explainer")
    if explain.features != "words":
        raise UserInputError(
            f"ROAR removes words; --features {explain.features} is not supported by roar.py (use words, the default)."
        )
    fractions = [float(f) for f in roar.fractions]
    if not fractions or any(not 0 < f < 1 for f in fractions):
        raise UserInputError(
            "--fractions must be shares of a tweet's words strictly between 0 and 1, e.g. 0.1 0.3 0.5; got "
            f"{fractions}."
        )
    if len({share_key(f) for f in fractions}) != len(fractions):
        raise UserInputError(f"--fractions {fractions} names one percentage twice; give each share once.")
    shard = ShardAssignment.resolve(explain.shard_index, explain.num_shards)
    folder = check_output_dir(require_output_dir(roar.output_dir))
    return RoarPlan(folder, adapter, explainers, sorted(fractions), shard)


# ---- 1. explain every tweet -----------------------------------------------------------------------------------------
class TweetAttributions:
    """Each tweet's attributions at the model's target class by every ROAR explainer, saved as soon as computed."""

    def __init__(self, methods: AttributionMethods, model: str, explainers: list[str], target: str, seed: int):
        self.methods, self.model, self.explainers, self.target, self.seed = methods, model, explainers, target, seed

    def explain(self, index: int, split: str, text: str, gold: int) -> dict:
        function = self.methods.joint.value_functions[self.model]
        probabilities = function([text])[0]
        target = int(np.argmax(probabilities)) if self.target == "predicted" else gold
        record = {
            "index": index,
            "split": split,
            "text": text,
            "gold": gold,
            "target": target,
            "probabilities": probabilities,
            "feature_names": self.methods.masker.feature_names(text)[0],
            "values": {},
            "evaluations": {},
            "seconds": {},
        }
        budget = tweet_budget(self.methods.masker, text, self.methods.settings)[0]  # the partition explainer's
        for method in self.explainers:
            explained = self.methods.explain(method, text, self.seed + index, budget)
            record["values"][method] = explained["models"][self.model]["values"][:, target]
            record["evaluations"][method] = explained["evaluations"]
            record["seconds"][method] = explained["seconds"]
        return record


def _tweets(datamodule, encoder) -> list[tuple[str, int, str | None, int]]:
    """(split, index within it, the tweet as the model sees it or None, gold) for every training and eval tweet."""
    out = []
    for split, examples in (("train", datamodule.train_examples), ("test", datamodule.eval_examples)):
        shown = ExplainedTweets(examples, encoder, encoder.tweet_budget)
        for i, example in enumerate(examples):
            out.append((split, i, shown.text(i)[0], int(example.label)))
    return out


# ---- 2. remove ------------------------------------------------------------------------------------------------------
def removals(records: list[dict], plan: RoarPlan, seed: int) -> dict[str, list[list[int]]]:
    """Per condition, the indices of the words removed from each tweet (in the order of `records`)."""
    out: dict[str, list[list[int]]] = {NONE: [[] for _ in records]}
    for k, fraction in enumerate(plan.fractions):
        out[condition_name(ROAR_CONTROL, fraction)] = [
            random_removal(
                len(r["feature_names"]), fraction, np.random.default_rng([seed + RANDOM_SEED_OFFSET, r["index"], k])
            ).tolist()
            for r in records
        ]
        for method in plan.explainers:
            out[condition_name(method, fraction)] = [
                ranked_removal(np.asarray(r["values"][method]), fraction).tolist() for r in records
            ]
    return out


def ablated_rows(records: list[dict], removed: list[list[int]], masker, label_names: list[str]) -> dict[str, list]:
    """The condition's rows per split: each tweet with its removed words deleted, as the explainer masks them."""
    rows: dict[str, list] = {split: [] for split in SPLITS}
    for record, drop in zip(records, removed):
        n = len(record["feature_names"])
        text = record["text"] if not drop else mask_tweet(masker, record["text"], keep_mask(n, np.array(drop)))
        rows[record["split"]].append({"text": text, "label": label_names[record["gold"]]})
    return rows


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---- 3. retrain -----------------------------------------------------------------------------------------------------
def condition_config(
    resolved: Mapping, data_dir: Path, run_dir: Path, label_names: list[str], dtype: str = "auto"
) -> dict:
    """The run's recipe (trainer, model, data options, seeds) on the condition's rows, fitted in its own folder on
    one device (the parallel part of ROAR is the explaining, sharded like analyze.py). `dtype` is the `--model.dtype`
    the user gave: the fit resolves `auto` for itself (its gate is not the explanation's)."""
    from analysis.configuration import SECTIONS

    config = copy.deepcopy(dict(resolved))
    for section in SECTIONS:  # the analysis sections: a fit reads none of them
        config.pop(section, None)
    config["trainer"] = {**config["trainer"], "default_root_dir": str(run_dir), "devices": 1, "num_nodes": 1}
    config["model"] = {**config["model"], "dtype": dtype}
    config["data"] = {
        **config["data"],
        "dataset_name": str(data_dir),
        "dataset_config": None,
        "train_split": "train",
        "eval_split": "test",
        "text_field": "text",
        "label_field": "label",
        "label_space": list(label_names),
        "class_names": None,
        "train_subset": None,
        "eval_subset": None,
        "num_demonstrations": 0,
    }
    return config


def retrain(name: str, config: dict, data_dir: Path, log: Callable[[str], None]) -> dict:
    """Fit the condition (resuming a killed fit of the same recipe and rows), score its eval rows; the result is
    saved in the condition's folder and read back by a later run instead of refitting."""
    from analysis.configuration import fit
    from analysis.evaluation.run import make_predict_trainer, score_eval_split
    from lightning_modules.export_adapter import write_adapter

    run_dir = Path(config["trainer"]["default_root_dir"])
    key = json.loads(json.dumps({"config": config, "rows": _digest([_read(data_dir / f"{s}.jsonl") for s in SPLITS])}))
    result_path, key_path = run_dir / RESULT_FILE, run_dir / FIT_KEY_FILE
    done = json.loads(result_path.read_text()) if result_path.is_file() else {}
    if done.get("key") == key:
        log(f"ROAR {name}: retrained before, kept")
        return done
    checkpoint = run_dir / CHECKPOINT_DIR / "last.ckpt"
    resume = key_path.is_file() and json.loads(key_path.read_text()) == key and checkpoint.is_file()
    if not resume and run_dir.exists():
        shutil.rmtree(run_dir)  # another recipe or other rows: nothing in it is reusable
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(key_path, key)
    config_path = write_text_atomic(run_dir / CONFIG_FILE, yaml.safe_dump(config, sort_keys=False))
    log(f"ROAR {name}: {'resuming the fit' if resume else 'fitting'} in {run_dir}")
    cli = fit(config_path, ckpt_path="last" if resume else None)
    datamodule, module = cli.datamodule, cli.model
    if not (run_dir / ADAPTER_DIR).is_dir():  # the config may lack the ExportAdapter callback: every condition has one
        write_adapter(module, run_dir / ADAPTER_DIR, datamodule.prompt_description())
    trainer = make_predict_trainer(config["trainer"].get("accelerator") or "auto", progress_bar=False)
    scores = score_eval_split(trainer, module, datamodule, use_adapter=True)
    result = {
        "key": key,
        "labels": [example.label for example in datamodule.eval_examples],
        "probabilities": scores.probabilities,
        "n_train": len(datamodule.train_examples),
    }
    del cli, datamodule, module, trainer
    release_memory()
    write_json_atomic(result_path, result)
    return json.loads(result_path.read_text())


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


# ---- 4. compare -----------------------------------------------------------------------------------------------------
def _removed_share(records: list[dict], removed: list[list[int]], split: str) -> float:
    shares = [len(d) / len(r["feature_names"]) for r, d in zip(records, removed) if r["split"] == split]
    return float(np.mean(shares)) if shares else 0.0


def condition_metrics(plan: RoarPlan, results: Mapping, records, removed, label_names, n_resamples, seed) -> dict:
    out = {}
    for name, removal, fraction in plan.conditions():
        result = results[name]
        y, probs = np.asarray(result["labels"]), np.asarray(result["probabilities"])
        metrics = classification_metrics(y, probs, label_names, n_resamples=n_resamples, seed=seed)
        out[name] = {
            "removal": removal,
            "fraction": fraction,
            "removed_share": {split: _removed_share(records, removed[name], split) for split in SPLITS},
            "n_train": result["n_train"],
            "n_eval": len(y),
            **{key: metrics[key] for key in ("accuracy", "macro_f1", "mcc", "confidence_intervals", "per_class")},
        }
    return out


def learning_check(metrics: Mapping, labels: list[int]) -> dict:
    """Whether the recipe learned the task at all on the unchanged tweets: `none`'s accuracy CI above the share of
    the most frequent eval class. If not, every drop measures noise, not the explainer."""
    majority = float(np.bincount(np.asarray(labels)).max() / len(labels))
    low = metrics[NONE]["confidence_intervals"]["accuracy"]["low"]
    return {
        "none_accuracy": metrics[NONE]["accuracy"],
        "none_ci_low": low,
        "majority_share": majority,
        "learned": bool(low > majority),
    }


def _verdict(difference: dict) -> str:
    if difference["ci_high"] < 0:
        return "drops more than random removal"
    if difference["ci_low"] > 0:
        return "drops less than random removal"
    return "no detectable difference from random removal"


def roar_analysis(plan: RoarPlan, results: Mapping, metrics: Mapping, n_resamples: int, seed: int) -> dict:
    """Per explainer and share: the condition minus random removal of the same share, and minus `none`."""
    y = np.asarray(results[NONE]["labels"])

    def paired(a: str, b: str) -> dict:
        compared = compare_predictions(
            y, np.asarray(results[a]["probabilities"]), np.asarray(results[b]["probabilities"]), a, b, n_resamples, seed
        )
        return {
            **{name: compared["differences"][name] for name in COMPARED},
            "mcnemar_p_value": compared["mcnemar"]["p_value"],
        }

    out = {}
    for method in plan.explainers:
        shares = {}
        for fraction in plan.fractions:
            name, control = condition_name(method, fraction), condition_name(ROAR_CONTROL, fraction)
            vs_random = paired(control, name)
            shares[share_key(fraction)] = {
                "condition": name,
                "fraction": fraction,
                "accuracy": metrics[name]["accuracy"],
                "random_accuracy": metrics[control]["accuracy"],
                # The original project's ROAR score (accuracy of random removal minus the explainer's), unclipped:
                # a negative score is a finding (the explainer's words mattered less than random ones).
                "roar_score": metrics[control]["accuracy"] - metrics[name]["accuracy"],
                "vs_random": vs_random,
                "vs_none": paired(NONE, name),
                "verdict": _verdict(vs_random["accuracy"]),
            }
        out[method] = shares
    return out


def _summary(plan: RoarPlan, metrics: Mapping, analysis: Mapping) -> list[str]:
    lines = [
        f"ROAR on {display_name(plan.model)}: accuracy and macro-F1 after retraining [95% CI]",
        "| condition | removed (eval) | accuracy | macro-F1 | vs random: accuracy difference |",
        "|---|---|---|---|---|",
    ]
    for name, removal, fraction in plan.conditions():
        row = metrics[name]
        ci = row["confidence_intervals"]

        def cell(metric: str, row=row, ci=ci) -> str:
            return f"{row[metric]:.3f} [{ci[metric]['low']:.3f}, {ci[metric]['high']:.3f}]"

        versus = ""
        if removal in analysis:
            d = analysis[removal][share_key(fraction)]["vs_random"]["accuracy"]
            versus = f"{d['difference']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]"
        share = f"{100 * row['removed_share']['test']:.0f} %"
        lines.append(f"| {name} | {share} | {cell('accuracy')} | {cell('macro_f1')} | {versus} |")
    return lines


def run_roar(
    run: LoadedRun, log: Callable[[str], None] = lambda message: print(message, file=sys.stderr, flush=True)
) -> RoarResult:
    """Explain every tweet, write each condition's rows, retrain and score every condition, compare them."""
    from lightning_modules.adapters import load_adapter

    plan = check_roar({"compare": run.compare, "explain": run.explain, "roar": run.roar})
    datamodule, module, explain, seed = run.datamodule, run.module, run.explain, run.compare.seed
    notes = RunNotes(log)
    prompt = datamodule.prompt_description()
    if plan.adapter:
        load_adapter(module, plan.adapter, prompt)
    to_device(module)
    specs = model_specs(module, datamodule, [plan.model])
    encoder = datamodule.encoder
    masker = tweet_masker(encoder, "words")
    methods = AttributionMethods(
        masker, model_value_functions(module, specs, explain.forward_batch_size), explain, module, specs
    )
    label_names = datamodule.label_names
    tweets = [t for t in _tweets(datamodule, encoder) if t[2] is not None]
    settings = {
        "base_model": module.hparams.model_name,
        "dtype": run.dtype.as_dict(),  # what the base computed in, and why
        "adapter": str(plan.adapter) if plan.adapter else None,
        "adapter_digest": adapter_digest(module) if plan.adapter else None,
        "explained_model": plan.model,
        "prompt": prompt,
        "data": {key: datamodule.hparams[key] for key in ("dataset_name", "train_subset", "eval_subset", "seed")},
        "explainers": plan.explainers,
        "target": explain.target,
        "features": "words",
        "seed": seed,
        **{key: getattr(explain, key) for key in ("max_evals", "max_evals_cap", "kernel_samples", "lime_samples")},
        "ig_steps": explain.ig_steps,
    }
    plan.folder.mkdir(parents=True, exist_ok=True)
    fingerprint = {**settings, "dtype": settings["dtype"]["dtype"]}  # the dtype counts, not why auto chose it
    store = ProgressStore.open(plan.folder / PROGRESS_DIR, fingerprint, plan.shard, notes.add)
    attributions = TweetAttributions(methods, plan.model, plan.explainers, explain.target, seed)
    n = len(tweets)
    n_train = sum(t[0] == "train" for t in tweets)
    log(f"ROAR: explaining {n} tweets ({n_train} training, {n - n_train} eval) with {', '.join(plan.explainers)}")

    def record(k: int, compute: bool) -> dict | None:
        split, i, text, gold = tweets[k]
        found = store.load(k, text)
        if found is not None or not compute:
            return found
        saved = store.save(k, attributions.explain(k, split, text, gold))
        if (k + 1) % 50 == 0 or k + 1 == n:
            log(f"ROAR: explained tweet {k + 1}/{n}")
        return saved

    for k in plan.shard.indices(n):
        record(k, compute=True)
    if plan.shard.count > 1:
        plan.shard.barrier()
    records = [record(k, compute=plan.shard.merger) for k in range(n)]
    if any(r is None for r in records) or plan.shard.distributed:
        missing = sum(r is None for r in records)
        notes.add(
            f"this shard explained its tweets; {missing} of {n} are still missing: the shard that finishes last "
            "retrains"
            if missing
            else "every tweet is explained; run roar.py again without torchrun to retrain (the fits run on one device)"
        )
        return RoarResult(plan.folder, list(notes), complete=False)

    removed = removals(records, plan, seed)
    results = {}
    for name, _, _ in plan.conditions():
        data_dir = plan.folder / ROAR_DATA_DIR / name
        for split, rows in ablated_rows(records, removed[name], masker, label_names).items():
            write_jsonl_atomic(data_dir / f"{split}.jsonl", rows)
        folder = plan.folder / ROAR_RUNS_DIR / name
        config = condition_config(run.resolved, data_dir, folder, label_names, run.dtype.requested)
        results[name] = retrain(name, config, data_dir, log)
        if results[name]["labels"] != results[NONE]["labels"]:
            raise RuntimeError(f"the ROAR condition {name} scored other eval tweets than {NONE}")

    metrics = condition_metrics(plan, results, records, removed, label_names, run.compare.n_resamples, seed)
    analysis = roar_analysis(plan, results, metrics, run.compare.n_resamples, seed)
    learned = learning_check(metrics, results[NONE]["labels"])
    if not learned["learned"]:
        notes.add(
            f"the adapter retrained on the unchanged tweets (none) reaches accuracy {learned['none_accuracy']:.3f} "
            f"(CI low {learned['none_ci_low']:.3f}), not above the most frequent class's share of the eval tweets "
            f"({learned['majority_share']:.3f}): at these sizes the recipe does not learn the task, so the ROAR "
            "differences measure noise, not the explainer; retrain on more tweets (--train-subset) or longer",
            level="warning",
        )
    source = {**settings, "fractions": plan.fractions, "label_names": label_names}
    metrics_file = {
        "conditions": metrics,
        "source": source,
        "meaning": "each condition retrains a fresh LoRA adapter with the config's recipe and seed on the training "
        "tweets with its words removed and is scored on the evaluation tweets with the same removal; `none` removes "
        "nothing; CIs are bootstrap intervals over the evaluation tweets (one training seed: they do not include "
        "the retraining noise)",
    }
    per_tweet = [
        {
            "index": r["index"],
            "split": r["split"],
            "text": r["text"],
            "gold": r["gold"],
            "target": r["target"],
            "feature_names": r["feature_names"],
            "attributions": r["values"],
            "removed": {name: removed[name][k] for name in removed if name != NONE},
        }
        for k, r in enumerate(records)
    ]
    analysis_file = {
        "explainers": analysis,
        "learning_check": learned,
        "notes": list(notes),
        "source": source,
        "meaning": "per explainer and share of words removed: the retrained model's accuracy and macro-F1 minus "
        "those after removing as many random words (`vs_random`; negative: the explainer found words the task "
        "needs) and minus `none` (`vs_none`), paired bootstrap CIs over the evaluation tweets and exact McNemar; "
        "roar_score = random accuracy - explainer accuracy (the original project's score, not clipped at 0)",
        "removal_rule": "the round(share x n) words of largest |attribution| at the target class (halves up, at "
        "least one removed and one kept; ties to the earlier word); random: as many, seeded per tweet",
        "tweets": per_tweet,
    }
    files = [
        write_json_atomic(plan.folder / ROAR_METRICS_FILE, metrics_file),
        write_json_atomic(plan.folder / ROAR_RESULTS_FILE, analysis_file),
        plot_roar(metrics, plan.explainers, display_name(plan.model), plan.folder / ROAR_COMPARISON_PLOT),
    ]
    summary = _summary(plan, metrics, analysis) + ([] if learned["learned"] else [f"warning: {notes[-1]}"])
    scalars = {f"roar/{name}/{metric}": row[metric] for name, row in metrics.items() for metric in COMPARED}
    figures = {"roar/comparison": plan.folder / ROAR_COMPARISON_PLOT}
    write_tensorboard(plan.folder / TENSORBOARD_DIR, scalars, figures, {"roar/summary": summary})
    # Over every file in the folder: written beside a run's outputs, that run's page (and its badge) gains ROAR.
    files.append(write_folder_report(plan.folder))
    return RoarResult(
        plan.folder,
        list(notes),
        metrics=metrics_file,
        analysis=analysis_file,
        files=files,
        summary=[*summary, f"report: {files[-1].resolve()}"],
    )
