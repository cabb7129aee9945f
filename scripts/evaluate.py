"""Baselines (raw and calibrated zero-shot, k-shot) vs fine-tuned: metrics, predictions and plots.

`python scripts/evaluate.py --config configs/embedded.yaml --adapter outputs/embedded/lora_adapter
--output-dir outputs/embedded/evaluation`
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.baselines import BASELINES, DEFAULT_K  # noqa: E402
from scripts.cli import run_reporting_user_errors  # noqa: E402


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the training YAML (model, data, prompt)")
    parser.add_argument("--adapter", help="an exported lora_adapter/ folder or a Lightning .ckpt; omit for zero-shot")
    parser.add_argument("--output-dir", required=True, help="folder for the metrics, predictions and plots")
    parser.add_argument("--eval-subset", type=positive_int, help="score a seeded sample of this many eval rows")
    parser.add_argument("--batch-size", type=positive_int, help="eval batch size (default: the config's)")
    parser.add_argument("--n-resamples", type=positive_int, default=1000, help="bootstrap resamples (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    parser.add_argument("--accelerator", default="auto", help="Lightning accelerator (default auto)")
    add_baseline_arguments(parser, default=BASELINES)
    return parser.parse_args(argv)


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or a positive integer, got {text}")
    return value


def add_baseline_arguments(parser: argparse.ArgumentParser, default) -> None:
    parser.add_argument(
        "--baselines",
        nargs="+",
        choices=BASELINES,
        default=list(default),
        help=f"prompt-only models compared with the fine-tuned one (default: {' '.join(default)})",
    )
    parser.add_argument(
        "--k-shot",
        type=non_negative_int,
        default=DEFAULT_K,
        help=f"demonstrations in the k_shot baseline's prompt, drawn from the train split (default {DEFAULT_K})",
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from analysis.evaluation import evaluate, summary_lines

    return run_reporting_user_errors(
        lambda: summary_lines(
            evaluate(
                config=args.config,
                output_dir=args.output_dir,
                adapter=args.adapter,
                eval_subset=args.eval_subset,
                batch_size=args.batch_size,
                n_resamples=args.n_resamples,
                seed=args.seed,
                accelerator=args.accelerator,
                baselines=args.baselines,
                k_shot=args.k_shot,
            )
        )
    )


if __name__ == "__main__":
    sys.exit(main())
