"""The commands behind `scripts/evaluate.py`, `scripts/analyze.py` (and `python -m analysis`), `scripts/roar.py` and
`scripts/run_experiment.py`: parse the one configuration, run, exit with a clear message.

evaluate and analyze accept `--config FILE` (any config of this project: a training config, or the `config.yaml` a
one-command run saved), every dotted option (`--data.eval_subset 9`, `--explain.max_evals 500`; see `--help`),
`--print_config`, and the dashed flags the README documents, which are aliases of dotted options.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path

from analysis.configuration import Alias, load_run, run_reporting_user_errors, translate_aliases

# Options both commands share.
_COMPARE = {
    "--adapter": Alias("--compare.adapter"),
    "--k-shot": Alias("--compare.k_shot"),
    "--n-resamples": Alias("--compare.n_resamples"),
    "--seed": Alias("--compare.seed"),
}
EVALUATE_ALIASES = {
    **_COMPARE,
    "--output-dir": Alias("--evaluate.output_dir"),
    "--baselines": Alias("--evaluate.baselines", "list"),
    "--eval-subset": Alias("--data.eval_subset", "subset"),
    "--batch-size": Alias("--data.eval_batch_size"),
    "--accelerator": Alias("--trainer.accelerator"),
}
ANALYZE_ALIASES = {
    **_COMPARE,
    "--output-dir": Alias("--explain.output_dir"),
    "--baselines": Alias("--explain.baselines", "list"),
    "--shap-example-count": Alias("--explain.example_count"),
    "--shap-max-evals": Alias("--explain.max_evals"),
    "--target": Alias("--explain.target"),
    "--comparison-target": Alias("--explain.comparison_target"),
    "--features": Alias("--explain.features"),
    "--explainers": Alias("--explain.explainers", "list"),
    "--num-shards": Alias("--explain.num_shards"),
    "--shard-index": Alias("--explain.shard_index"),
}


ROAR_ALIASES = {
    **_COMPARE,
    "--output-dir": Alias("--roar.output_dir"),
    "--explainer": Alias("--roar.explainers", "list"),
    "--explainers": Alias("--roar.explainers", "list"),
    "--fractions": Alias("--roar.fractions", "list"),
    "--train-subset": Alias("--data.train_subset", "subset"),
    "--eval-subset": Alias("--data.eval_subset", "subset"),
    "--target": Alias("--explain.target"),
    "--features": Alias("--explain.features"),
    "--num-shards": Alias("--explain.num_shards"),
    "--shard-index": Alias("--explain.shard_index"),
}


def with_page(lines: list[str], folder: Path) -> list[str]:
    """The command's summary, after writing `report.html` over every file in its output folder (so evaluate.py and
    analyze.py writing into one folder build one page)."""
    from analysis.report.page import write_folder_report

    return [*lines, f"report: {write_folder_report(folder).resolve()}"]


def evaluate_main(argv: Sequence[str] | None = None) -> int:
    """Baselines (raw and calibrated zero-shot, k-shot) vs fine-tuned: metrics, predictions and plots."""
    from analysis.evaluation.run import check_evaluation, evaluate
    from analysis.report.tables import evaluation_summary

    arguments = translate_aliases(sys.argv[1:] if argv is None else argv, EVALUATE_ALIASES)

    def work() -> list[str]:
        result = evaluate(load_run(arguments, check_evaluation, EVALUATE_ALIASES))
        return with_page(evaluation_summary(result), result.output_dir)

    return run_reporting_user_errors(work)


def analyze_main(argv: Sequence[str] | None = None) -> int:
    """SHAP explanations of baselines and the fine-tuned model on the first N eval tweets, with statistics."""
    from analysis.explanation.checks import check_explanation
    from analysis.explanation.run import run_analysis
    from analysis.report.tables import analysis_summary

    arguments = translate_aliases(sys.argv[1:] if argv is None else argv, ANALYZE_ALIASES)

    def work() -> list[str]:
        result = run_analysis(load_run(arguments, check_explanation, ANALYZE_ALIASES, phase="explain"))
        lines = analysis_summary(result)
        return with_page(lines, result.output_dir) if result.merged else lines  # a shard's page waits for all

    return run_reporting_user_errors(work)


def experiment_aliases() -> dict[str, Alias]:
    """The original script's dashed flags (`--model-name`, `--no-run-shap`, ...) for `ExperimentOptions`' fields."""
    from analysis.provenance.experiment import ExperimentOptions

    aliases = {}
    for option in fields(ExperimentOptions):
        dotted, dashed = f"--{option.name}", "--" + option.name.replace("_", "-")
        kind = {"train_subset": "subset", "eval_subset": "subset"}.get(option.name, "value")
        if option.type.startswith("list"):
            kind = "list"
        if option.type == "bool":
            aliases[dashed] = Alias(dotted, "true")
            aliases["--no-" + dashed[2:]] = Alias(dotted, "false")
        else:
            aliases[dashed] = Alias(dotted, kind)
    return aliases


def parse_experiment_options(argv: Sequence[str]):
    """`ExperimentOptions` from the original script's flags (or their underscored names); bad values exit 2."""
    from jsonargparse import ArgumentParser

    from analysis.provenance.experiment import ExperimentOptions

    parser = ArgumentParser(description=experiment_main.__doc__.splitlines()[0], exit_on_error=False)
    parser.add_class_arguments(ExperimentOptions, instantiate=False)
    return ExperimentOptions(**dict(parser.parse_args(translate_aliases(argv, experiment_aliases()))))


def experiment_main(argv: Sequence[str] | None = None, fresh_process_after_fit: bool = False) -> int:
    """The original experiment in one command: fine-tune, evaluate, explain, report.

    `fresh_process_after_fit`: after its fit, the process continues as a fresh image of the same command line
    (`continue_in_fresh_process`); for the command line only, which owns its process.
    """
    from analysis.provenance.experiment import continue_in_fresh_process, run_experiment

    arguments = sys.argv[1:] if argv is None else argv
    after_fit = continue_in_fresh_process if fresh_process_after_fit else None
    return run_reporting_user_errors(
        lambda: run_experiment(parse_experiment_options(arguments), after_fit=after_fit).summary
    )


def roar_main(argv: Sequence[str] | None = None) -> int:
    """ROAR: remove each tweet's top words by an explainer (and as many at random), retrain LoRA, measure the drop."""
    from analysis.roar.run import check_roar, run_roar

    arguments = translate_aliases(sys.argv[1:] if argv is None else argv, ROAR_ALIASES)

    def work() -> list[str]:
        result = run_roar(load_run(arguments, check_roar, ROAR_ALIASES, phase="explain"))
        return result.summary if result.complete else result.notes[-1:]

    return run_reporting_user_errors(work)
