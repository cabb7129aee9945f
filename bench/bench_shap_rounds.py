"""How the explainer's masks per round change SHAP accuracy and speed at a fixed budget, against exact Owen values.

shap's Partition explainer expands, each round, the queued groups with the largest effect; a round of B masks is one
call of the value function. Small rounds follow the priorities more greedily, large rounds batch better. For each eval
tweet this computes the exact Owen values of the predicted class (a budget of `evals_for_exact_owen`, so every group
is split in every context), then the values at `--max-evals` for each round size, and reports per round size: the
relative L2 error and Spearman correlation with the exact values, the overlap of the top-5 tokens by |value|, and the
seconds per tweet.

Usage: python bench/bench_shap_rounds.py [--examples 16] [--max-evals 200] [--rounds 5 16 32 64 128] [--json PATH]
About 8 minutes for 16 tweets on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import analysis.explanation.shap_values as shap_explain  # noqa: E402
from analysis.explanation.shap_values import (  # noqa: E402
    LabelProbabilities,
    evals_for_exact_owen,
    explain_tweet,
    normalize_tweet,
    tweet_masker,
)
from analysis.statistics.explanations import paired_example_statistics  # noqa: E402
from datamodules import TweetSentimentDataModule  # noqa: E402
from foundation.embedded_model import EMBEDDED_MODEL  # noqa: E402
from lightning_modules.backbone import load_causal_lm  # noqa: E402


def values_with_round(function, masker, text: str, max_evals: int, masks_per_round: int) -> tuple[np.ndarray, float]:
    """The tweet's SHAP values (tokens, classes) with `masks_per_round` masks per explainer round, and the seconds."""
    previous, shap_explain.MASKS_PER_ROUND = shap_explain.MASKS_PER_ROUND, masks_per_round
    try:
        start = time.perf_counter()
        explained = explain_tweet(text, {"model": function}, masker, max_evals)
        return explained["models"]["model"]["values"], time.perf_counter() - start
    finally:
        shap_explain.MASKS_PER_ROUND = previous


def measure(examples: int = 16, max_evals: int = 200, rounds: tuple[int, ...] = (5, 16, 32, 64, 128)) -> dict:
    datamodule = TweetSentimentDataModule(eval_subset=500)
    encoder = datamodule.encoder
    model = load_causal_lm(EMBEDDED_MODEL, quantize_4bit=False, dtype="float32").eval()
    function = LabelProbabilities.for_model(model, encoder)
    masker = tweet_masker(encoder)
    texts = [normalize_tweet(e.text) for e in datamodule.eval_examples]
    texts = [t for t in texts if len(masker.data_transform(t)[0]) > 2 * 10][:examples]  # long enough to be budgeted
    explain_tweet("so happy today", {"model": function}, masker, 8)  # warm-up
    rows = {size: [] for size in rounds}
    for text in texts:
        exact_evals = evals_for_exact_owen(masker.clustering(text))
        target = int(np.argmax(function([text])[0]))
        exact, _ = values_with_round(function, masker, text, exact_evals + 8, max(rounds))
        exact = exact[:, target]
        for size in rounds:
            values, seconds = values_with_round(function, masker, text, max_evals, size)
            values = values[:, target]
            agreement = paired_example_statistics(values, exact)  # the analysis's own top-k overlap and Spearman
            rows[size].append(
                {
                    "relative_l2_error": float(np.linalg.norm(values - exact) / np.linalg.norm(exact)),
                    "spearman": agreement["spearman"],
                    "top5_overlap": agreement["top5_overlap"],
                    "seconds": seconds,
                    "tokens": len(values),
                    "evals_for_exact_owen": exact_evals,
                }
            )
    summary = {size: {key: float(np.mean([r[key] for r in rows[size]])) for key in rows[size][0]} for size in rounds}
    return {"examples": len(texts), "max_evals": max_evals, "summary": summary, "per_tweet": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=16, help="eval tweets with more than 20 tokens (default 16)")
    parser.add_argument("--max-evals", type=int, default=200, help="the budget compared (default 200)")
    parser.add_argument("--rounds", type=int, nargs="+", default=[5, 16, 32, 64, 128], help="masks per round")
    parser.add_argument("--json", type=Path, help="also write the measurements to this JSON file")
    args = parser.parse_args(argv)
    result = measure(args.examples, args.max_evals, tuple(args.rounds))
    print(f"# {result['examples']} eval tweets, max_evals {result['max_evals']}, target: the predicted class")
    print("| masks per round | rel. L2 error vs exact Owen | Spearman | top-5 overlap | s / tweet |")
    print("|---|---|---|---|---|")
    for size, s in result["summary"].items():
        marker = " (ours)" if size == shap_explain.MASKS_PER_ROUND else ""
        print(
            f"| {size}{marker} | {s['relative_l2_error']:.3f} | {s['spearman']:.3f} | {s['top5_overlap']:.3f} | "
            f"{s['seconds']:.2f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
