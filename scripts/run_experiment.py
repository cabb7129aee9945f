"""The original experiment in one command: fine-tune, evaluate, explain, report.

`python scripts/run_experiment.py --finetune --run-shap --output-dir outputs/tweet_sentiment_extraction`
(the offline default: add `--model-name embedded:smollm2-135m-instruct --dataset-name embedded:crowdflower-tweets
--no-load-in-4bit`). The flags are the original script's, with its names and defaults.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.baselines import BASELINES  # noqa: E402
from analysis.experiment import ExperimentOptions  # noqa: E402
from scripts.cli import run_reporting_user_errors  # noqa: E402

DEFAULTS = ExperimentOptions()


def subset_size(text: str) -> int | None:
    """A number of examples, or `None` for all of them (as in the original)."""
    if text.strip().lower() == "none":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of examples or None, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--model-name", default=DEFAULTS.model_name, help="hub id, local folder or embedded:smollm2-135m-instruct")
    add(
        "--dataset-name", default=DEFAULTS.dataset_name, help="hub id, local file/folder or embedded:crowdflower-tweets"
    )
    add("--dataset-config", default=DEFAULTS.dataset_config)
    add("--train-split", default=DEFAULTS.train_split)
    add("--eval-split", default=DEFAULTS.eval_split)
    add("--text-field", default=DEFAULTS.text_field)
    add("--label-field", default=DEFAULTS.label_field)
    add("--label-space", nargs="*", help="labels to keep, in order (ids or names; default: all in the data)")
    add("--train-subset", type=subset_size, default=DEFAULTS.train_subset, help="training examples (None = all)")
    add("--eval-subset", type=subset_size, default=DEFAULTS.eval_subset, help="evaluation examples (None = all)")
    add("--run-shap", action="store_true", help="explain the first eval tweets with SHAP (the default)")
    add("--no-run-shap", dest="run_shap", action="store_false", help="skip SHAP")
    add("--shap-example-count", type=int, default=DEFAULTS.shap_example_count)
    add("--shap-max-evals", type=int, default=DEFAULTS.shap_max_evals, help="model evaluations per tweet and model")
    add("--load-in-4bit", action="store_true", help="NF4 quantisation on a CUDA GPU (the default)")
    add("--no-load-in-4bit", dest="load_in_4bit", action="store_false", help="full precision")
    add("--finetune", action="store_true", help="train a LoRA adapter and compare it with the zero-shot model")
    add(
        "--baselines",
        nargs="+",
        choices=BASELINES,
        default=list(DEFAULTS.baselines),
        help=f"prompt-only models evaluated beside the fine-tuned one (default: {' '.join(DEFAULTS.baselines)})",
    )
    add("--k-shot", type=int, default=DEFAULTS.k_shot, help="demonstrations in the k_shot baseline (default 4)")
    add(
        "--shap-baselines",
        nargs="+",
        choices=BASELINES,
        default=list(DEFAULTS.shap_baselines),
        help="baselines explained with SHAP beside the fine-tuned model (default: zero_shot)",
    )
    add("--output-dir", default=DEFAULTS.output_dir)
    add("--project-badge-dir", default=DEFAULTS.project_badge_dir, help="where to copy the badge (default: output dir)")
    add("--no-project-badge", dest="project_badge", action="store_false", help="do not copy the Quantum Pass badge")
    add(
        "--huggingface-token",
        default=None,
        help="token for gated hub repos; kept in this process's environment only (default: HF_TOKEN / "
        "HUGGINGFACE_TOKEN)",
    )
    parser.set_defaults(run_shap=DEFAULTS.run_shap, load_in_4bit=DEFAULTS.load_in_4bit, project_badge=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    options = ExperimentOptions(**vars(build_parser().parse_args(argv)))
    from analysis.experiment import run_experiment

    return run_reporting_user_errors(lambda: run_experiment(options).summary)


if __name__ == "__main__":
    sys.exit(main())
