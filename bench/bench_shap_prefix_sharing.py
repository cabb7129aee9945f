"""SHAP value function with and without prefix sharing, on the embedded default, alternating in one process.

padded   a `prefix_cache` LabelScorer: masked tweets in length-sorted batches of 16, right-padded, on the
         instruction cache
tree     a `prefix_tree` LabelScorer with a prefix cache that remembers nothing: lexicographically adjacent
         masked tweets merged into one prefix tree (at most 16 x the longest one's nodes) and run as one sequence
         with a tree attention mask: every distinct prefix of the call once, no pads
shared   the same, with the prefix cache remembering computed prefixes across the explainer's calls for the tweet
         (as inside `with PrefixCache.remembering():`): every distinct prefix of the tweet once

Per tweet, the real Partition explainer runs --repeats times with each, alternating (padded, tree, shared, ...), so
load from other jobs hits both alike; times are the process's CPU seconds on one thread (--wall for wall-clock); the
token counts (decoder positions computed, pads included) do not depend on the load at all. Then the same for scoring
unrelated eval prompts (evaluation's case: little to share). Also checks that both give the same f on every masked
tweet and the same SHAP values.
Usage: python bench/bench_shap_prefix_sharing.py [--examples 2] [--skip 0] [--max-evals 200] [--repeats 2]
       [--threads 1] [--wall]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import shap
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.explanation.shap_values import explain_tweet, normalize_tweet, tweet_masker  # noqa: E402
from datamodules import TweetSentimentDataModule  # noqa: E402
from foundation.embedded_model import EMBEDDED_MODEL  # noqa: E402
from lightning_modules.backbone import load_causal_lm  # noqa: E402
from lightning_modules.scoring import LabelScorer, PrefixCache  # noqa: E402

BATCH_SIZE = 16
VARIANTS = {
    "padded": ("prefix_cache", 0),
    "tree": ("prefix_tree", 0),
    "shared": ("prefix_tree", 4096),
}  # mode, max_remembered


class PositionCounter:
    """Decoder positions computed (pads included), read off the embedding layer's outputs."""

    def __init__(self, model):
        self.count = 0
        model.get_input_embeddings().register_forward_hook(self._add)

    def _add(self, module, inputs, output) -> None:
        self.count += output.shape[0] * output.shape[1]


class ValueFunction:
    """Masked tweets -> label probabilities through a LabelScorer, with its own fresh instruction cache; remembers
    every output."""

    def __init__(self, model, encoder, mode: str, max_remembered: int):
        self.encoder = encoder
        self.scorer = LabelScorer(
            model,
            encoder.prefix_ids,
            encoder.label_token_ids,
            mode=mode,
            batch_size=BATCH_SIZE,
            pad_token_id=encoder.tokenizer.pad_token_id or 0,
        )
        device = next(model.parameters()).device
        self.cache = self.scorer.prefix_cache = PrefixCache(
            model, encoder.prefix_ids, device, max_remembered=max_remembered
        )
        self.outputs: dict[str, np.ndarray] = {}

    def __call__(self, texts) -> np.ndarray:
        texts = [str(t) for t in texts]
        scores = self.scorer([self.encoder.continuation(t) for t in texts])
        self.outputs.update(zip(texts, scores.probabilities))
        return scores.probabilities


def measure(clock, counter: PositionCounter, function, *args, **kwargs):
    """The result, the seconds on `clock` and the decoder positions computed."""
    counter.count = 0
    start = clock()
    out = function(*args, **kwargs)
    return out, clock() - start, counter.count


def row(cells) -> str:
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=2, help="eval tweets to explain (default 2)")
    parser.add_argument("--skip", type=int, default=0, help="start at this eval example (default 0)")
    parser.add_argument("--max-evals", type=int, default=200, help="shap max_evals (default 200)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per variant and tweet (default 2)")
    parser.add_argument("--eval-prompts", type=int, default=64, help="unrelated eval prompts to score (default 64)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: fair under load)")
    parser.add_argument("--wall", action="store_true", help="time wall-clock seconds instead of CPU seconds")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # The process's CPU seconds on one thread are the work done, however busy the machine; wall time under load from
    # other jobs swings 2-10x.
    clock = time.perf_counter if args.wall else time.process_time

    datamodule = TweetSentimentDataModule(eval_subset=max(500, args.eval_prompts))
    encoder = datamodule.encoder
    model = load_causal_lm(EMBEDDED_MODEL, quantize_4bit=False).eval()
    counter = PositionCounter(model)
    examples = datamodule.eval_examples
    texts = [normalize_tweet(e.text) for e in examples[args.skip : args.skip + args.examples]]
    masker = tweet_masker(encoder)
    for variant in VARIANTS.values():  # warm-up, not timed: first forwards, shap's numba kernels
        explain_tweet("so happy today", {"f": ValueFunction(model, encoder, *variant)}, masker, 8)

    names = list(VARIANTS)
    kind = "wall" if args.wall else "CPU"
    print(f"# SHAP per tweet, {EMBEDDED_MODEL}, max_evals={args.max_evals}, batch {BATCH_SIZE}, ", end="")
    print(f"{platform.processor() or 'cpu'}, torch {torch.__version__}, {torch.get_num_threads()} threads, ", end="")
    print(f"shap {shap.__version__}; {kind} seconds, median of {args.repeats} alternating runs")
    print(row(["tweet", "features", *(f"{n} positions" for n in names), *(f"{n} s" for n in names), "speed-up"]))
    print(row(["---"] * (3 + 2 * len(names))))
    positions = {name: [] for name in names}
    seconds = {name: [] for name in names}
    value_error = shap_error = 0.0
    for index, text in zip(range(args.skip, args.skip + len(texts)), texts):
        runs = {name: [] for name in names}
        counts = {}
        for _ in range(args.repeats):
            functions, explained = {}, {}
            for name in names:
                functions[name] = ValueFunction(model, encoder, *VARIANTS[name])  # fresh caches: nothing remembered
                explained[name], elapsed, counts[name] = measure(
                    clock, counter, explain_tweet, text, {"f": functions[name]}, masker, args.max_evals
                )
                runs[name].append(elapsed)
            for name in names[1:]:
                outputs = functions[name].outputs
                reference = functions["padded"].outputs
                value_error = max(value_error, *(np.abs(reference[t] - outputs[t]).max() for t in outputs))
                difference = explained["padded"]["models"]["f"]["values"] - explained[name]["models"]["f"]["values"]
                shap_error = max(shap_error, float(np.abs(difference).max()))
        for name in names:
            positions[name].append(counts[name])
            seconds[name].append(float(np.median(runs[name])))
        print(
            row(
                [
                    index,
                    len(explained["padded"]["data"]),
                    *(positions[n][-1] for n in names),
                    *(f"{seconds[n][-1]:.2f}" for n in names),
                    " / ".join(f"{seconds['padded'][-1] / seconds[n][-1]:.2f}x" for n in names[1:]),
                ]
            )
        )
    print(
        row(
            [
                "mean",
                "",
                *(f"{np.mean(positions[n]):.0f}" for n in names),
                *(f"{np.mean(seconds[n]):.2f}" for n in names),
                " / ".join(f"{np.sum(seconds['padded']) / np.sum(seconds[n]):.2f}x" for n in names[1:]),
            ]
        )
    )
    print("speed-up: padded s / tree s, padded s / shared s; positions: decoder positions computed, pads included")
    print(f"max |f padded - f tree or shared| over every masked tweet: {value_error:.2e}")
    print(f"max |SHAP padded - SHAP tree or shared|: {shap_error:.2e}")

    # Evaluation's case: unrelated tweets share little beyond their first token, so a tree saves the pads only, and
    # its attention over the whole packed sequence costs more than a padded batch's.
    prompts = [encoder.continuation(normalize_tweet(e.text)) for e in examples[: args.eval_prompts]]
    runs = {name: [] for name in names[:2]}
    counts, scores = {}, {}
    for _ in range(args.repeats):
        for name in runs:
            function = ValueFunction(model, encoder, *VARIANTS[name])
            scores[name], elapsed, counts[name] = measure(clock, counter, function.scorer, prompts)
            runs[name].append(elapsed)
    median = {name: float(np.median(times)) for name, times in runs.items()}
    error = np.abs(scores["padded"].probabilities - scores["tree"].probabilities).max()
    print(f"\n# {len(prompts)} unrelated eval prompts, batch {BATCH_SIZE}, {kind} seconds")
    print(row(["padded positions", "tree positions", "padded s", "tree s", "speed-up", "max abs diff"]))
    print(row(["---"] * 6))
    padded_s, tree_s = median["padded"], median["tree"]
    cells = [counts["padded"], counts["tree"], f"{padded_s:.2f}", f"{tree_s:.2f}", f"{padded_s / tree_s:.2f}x"]
    print(row([*cells, f"{error:.1e}"]))


if __name__ == "__main__":
    main()
