"""SHAP explanations of baselines and the fine-tuned model on the first N eval tweets, with statistics.

`python scripts/analyze.py --config configs/embedded.yaml --adapter outputs/embedded/lora_adapter
--output-dir outputs/embedded/analysis` (or `python -m analysis` with the same flags)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.baselines import ZERO_SHOT  # noqa: E402
from scripts.cli import run_reporting_user_errors  # noqa: E402
from scripts.evaluate import add_baseline_arguments, non_negative_int, positive_int  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the training YAML (model, data, prompt)")
    parser.add_argument(
        "--adapter", help="an exported lora_adapter/ folder or a Lightning .ckpt; omit to explain baselines only"
    )
    parser.add_argument("--output-dir", required=True, help="folder for the explanations, statistics and plots")
    parser.add_argument(
        "--shap-example-count", type=positive_int, default=10, help="explain the first N eval tweets (default 10)"
    )
    parser.add_argument(
        "--shap-max-evals",
        type=positive_int,
        default=200,
        help="model evaluations per tweet and model; about 2 x the tweet's tokens at least (default 200)",
    )
    parser.add_argument("--batch-size", type=positive_int, default=16, help="masked tweets per forward (default 16)")
    parser.add_argument(
        "--target",
        choices=["predicted", "gold"],
        default="predicted",
        help="the class explained per tweet: each model's predicted class (default) or the gold label",
    )
    parser.add_argument("--n-resamples", type=positive_int, default=1000, help="bootstrap resamples (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="seed for shap's tie-breaking, baselines, bootstrap")
    add_baseline_arguments(parser, default=[ZERO_SHOT])
    parser.add_argument(
        "--num-shards",
        type=positive_int,
        help="split the examples across this many processes (default: torchrun's WORLD_SIZE, else 1)",
    )
    parser.add_argument("--shard-index", type=non_negative_int, help="this process's shard, 0..N-1 (default: RANK)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from analysis.analyze import run_analysis, summary_lines

    if (args.num_shards is None) != (args.shard_index is None):
        print("error: give --num-shards and --shard-index together (or neither).", file=sys.stderr)
        return 2
    return run_reporting_user_errors(
        lambda: summary_lines(
            run_analysis(
                config=args.config,
                adapter=args.adapter,
                output_dir=args.output_dir,
                example_count=args.shap_example_count,
                max_evals=args.shap_max_evals,
                batch_size=args.batch_size,
                target=args.target,
                seed=args.seed,
                n_resamples=args.n_resamples,
                baselines=args.baselines,
                k_shot=args.k_shot,
                shard_index=args.shard_index,
                num_shards=args.num_shards,
            )
        )
    )


if __name__ == "__main__":
    sys.exit(main())
