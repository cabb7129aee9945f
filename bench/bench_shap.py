"""SHAP speed: ours vs the original recipe, on the embedded default, at the same max_evals, in one run.

ours      Partition explainer over the tweet's tokens only; masked tweets scored in batches through the shared
          instruction KV cache, lm_head at the label position only (analysis.explanation.shap_values)
original  plain `shap.Explainer(f, shap.maskers.Text(tokenizer))` over the whole prompt string, f = a full forward
          of every padded prompt with logits at all positions (shap's default batching)
reference our value function without the prefix cache (full prompts, other batch size): the values must agree

Both explain the same tweets with the same base model and max_evals; times are seconds per explained tweet, after
an untimed warm-up. About 4 minutes on 2 idle CPU cores. On a CPU shared with other jobs pass --threads 1: two
torch threads competing with another process for two cores can run 5x slower, which swamps the comparison.
`--dtype bfloat16 --no-original --no-reference` times ours alone in bf16 (bench/bench_all.py compares its values
with fp32's).
Usage: python bench/bench_shap.py [--examples 2] [--max-evals 200] [--batch-size 16] [--skip 0] [--threads N]
       [--dtype float32|bfloat16] [--no-original] [--no-reference] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import shap
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.explanation.shap_values import LabelProbabilities, explain_tweet, normalize_tweet, tweet_masker  # noqa: E402
from bench.accounting import WorkCounter  # noqa: E402
from datamodules import TweetSentimentDataModule  # noqa: E402
from foundation.embedded_model import EMBEDDED_MODEL  # noqa: E402
from foundation.memory import PeakMemory  # noqa: E402
from lightning_modules.backbone import load_causal_lm  # noqa: E402

TARGET = 15.0  # issue 15: SHAP >= 15x faster per explained tweet than the original recipe


class FullPromptFunction:
    """The original value function: prompt strings -> label probabilities from a full forward, logits everywhere."""

    def __init__(self, model, tokenizer, label_token_ids):
        self.model, self.tokenizer = model, tokenizer
        self.label_ids = torch.tensor(label_token_ids)
        self.evaluations = 0

    @torch.no_grad()
    def __call__(self, prompts) -> np.ndarray:
        batch = self.tokenizer([str(p) for p in prompts], padding=True, return_tensors="pt")
        logits = self.model(**batch).logits  # (n, length, vocab)
        last = batch["attention_mask"].sum(1) - 1
        self.evaluations += len(prompts)
        return torch.softmax(logits[torch.arange(len(last)), last][:, self.label_ids].float(), -1).numpy()


class Recording:
    """A value function that remembers its output for every masked tweet it scored."""

    def __init__(self, function):
        self.function, self.outputs = function, {}

    def __call__(self, texts) -> np.ndarray:
        out = self.function(texts)
        self.outputs.update(zip((str(t) for t in texts), out))
        return out


class Tally:
    """Seconds, work and peak memory of one path, summed (memory: maximum) over the tweets it explained."""

    def __init__(self, name: str, counter: WorkCounter):
        self.name, self.counter = name, counter
        self.seconds, self.flops, self.positions, self.peak_rss_gib, self.examples = 0.0, 0.0, 0, 0.0, 0

    def run(self, function, *args, **kwargs):
        before = self.counter.snapshot()
        with PeakMemory() as memory:
            start = time.perf_counter()
            out = function(*args, **kwargs)
            seconds = time.perf_counter() - start
        work = self.counter.snapshot() - before
        self.seconds += seconds
        self.flops += self.counter.forward_flops(work)
        self.positions += work.positions
        self.peak_rss_gib = max(self.peak_rss_gib, memory.gib)
        self.examples += 1
        return out, seconds

    def row(self, dtype: str) -> dict:
        return {
            "path": self.name,
            "dtype": dtype,
            "examples": self.examples,
            "seconds": self.seconds,
            "rate": self.seconds / self.examples,  # seconds per explained tweet
            "flops": self.flops,
            "positions": self.positions,
            "peak_rss_gib": self.peak_rss_gib,
        }


def measure(
    examples: int = 2,
    max_evals: int = 200,
    batch_size: int = 16,
    skip: int = 0,
    dtype: str = "float32",
    original: bool = True,
    reference: bool = True,
) -> dict:
    """Rows for ours (and the original), per-tweet details, and our SHAP values for every explained tweet."""
    datamodule = TweetSentimentDataModule(eval_subset=500)
    encoder, tokenizer = datamodule.encoder, datamodule.tokenizer
    model = load_causal_lm(EMBEDDED_MODEL, quantize_4bit=False, dtype=dtype).eval()
    texts = [normalize_tweet(e.text) for e in datamodule.eval_examples[skip : skip + examples]]

    ours = LabelProbabilities.for_model(model, encoder, batch_size)
    uncached = LabelProbabilities.for_model(model, encoder, max(1, batch_size // 2 - 1), mode="padded")
    masker = tweet_masker(encoder)
    original_f = FullPromptFunction(model, tokenizer, encoder.label_token_ids)
    original_explainer = shap.Explainer(original_f, shap.maskers.Text(tokenizer), algorithm="partition")
    # Warm-up, not timed: first forwards, and shap's numba kernels compiling on the first explanation.
    explain_tweet("so happy today", {"ours": ours}, masker, 8)
    if original:
        original_explainer([encoder.instruction + " so happy today" + encoder.TAIL], max_evals=8, silent=True)

    counter = WorkCounter(model, lora_active=False)
    ours_tally, original_tally = Tally("ours", counter), Tally("original", counter)
    tweets, value_errors, shap_errors = [], [], []
    with counter:
        for text in texts:
            ours_scored = Recording(ours)
            explained, ours_seconds = ours_tally.run(explain_tweet, text, {"ours": ours_scored}, masker, max_evals)
            prompt = encoder.instruction + " " + text + encoder.TAIL
            tweet = {
                "text": text,
                "features_ours": len(explained["data"]),
                "features_original": len(tokenizer(prompt)["input_ids"]),
                "evals_ours": explained["evals_used"],
                "seconds_ours": ours_seconds,
                "values": explained["models"]["ours"]["values"].tolist(),
                "probabilities": ours([text])[0].tolist(),
            }
            if original:
                before = original_f.evaluations
                _, tweet["seconds_original"] = original_tally.run(
                    original_explainer, [prompt], max_evals=max_evals, silent=True
                )
                tweet["evals_original"] = original_f.evaluations - before
            if reference:
                reference_scored = Recording(uncached)
                check = explain_tweet(text, {"reference": reference_scored}, masker, max_evals)
                difference = explained["models"]["ours"]["values"] - check["models"]["reference"]["values"]
                shap_errors.append(float(np.abs(difference).max()))
                shared = ours_scored.outputs.keys() & reference_scored.outputs.keys()
                value_errors.append(
                    float(max(np.abs(ours_scored.outputs[t] - reference_scored.outputs[t]).max() for t in shared))
                )
            tweets.append(tweet)
    rows = [ours_tally.row(dtype)] + ([original_tally.row(dtype)] if original else [])
    result = {
        "phase": "shap",
        "model": EMBEDDED_MODEL,
        "dtype": dtype,
        "max_evals": max_evals,
        "skip": skip,
        "threads": torch.get_num_threads(),
        "shap_version": shap.__version__,
        "target": TARGET,
        "rows": rows,
        "tweets": tweets,
    }
    if original:
        result["speed_up"] = rows[1]["rate"] / rows[0]["rate"]
    if reference:
        result["max_shap_error_vs_uncached"] = max(shap_errors)
        result["max_value_error_vs_uncached"] = max(value_errors)
    return result


def print_table(result: dict) -> None:
    print(f"# SHAP per tweet, {result['model']} {result['dtype']}, max_evals={result['max_evals']}, ", end="")
    print(f"{platform.processor() or 'cpu'}, torch {torch.__version__}, {result['threads']} threads, ", end="")
    print(f"shap {result['shap_version']}")
    has_original = "speed_up" in result
    if has_original:
        print("| tweet | features ours / original | evals ours / original | ours s | original s | speed-up |")
        print("|---|---|---|---|---|---|")
    else:
        print("| tweet | features | evals | ours s |")
        print("|---|---|---|---|")
    for i, tweet in enumerate(result["tweets"]):
        if has_original:
            print(
                f"| {result['skip'] + i} | {tweet['features_ours']} / {tweet['features_original']} | "
                f"{tweet['evals_ours']} / {tweet['evals_original']} | {tweet['seconds_ours']:.2f} | "
                f"{tweet['seconds_original']:.2f} | {tweet['seconds_original'] / tweet['seconds_ours']:.1f}x |"
            )
        else:
            print(
                f"| {result['skip'] + i} | {tweet['features_ours']} | {tweet['evals_ours']} | "
                f"{tweet['seconds_ours']:.2f} |"
            )
    rows = {row["path"]: row for row in result["rows"]}
    if has_original:
        print(f"| mean | | | {rows['ours']['rate']:.2f} | {rows['original']['rate']:.2f} | {result['speed_up']:.1f}x |")
    else:
        print(f"| mean | | | {rows['ours']['rate']:.2f} |")
    for row in result["rows"]:
        print(
            f"{row['path']}: {row['positions']} decoder positions, {row['flops'] / row['seconds'] / 1e9:.1f} GFLOP/s, "
            f"peak {row['peak_rss_gib']:.2f} GiB"
        )
    if "max_shap_error_vs_uncached" in result:
        print(f"max |SHAP ours - SHAP uncached reference|: {result['max_shap_error_vs_uncached']:.2e}")
        print(
            "max |f ours - f uncached reference| over the masked tweets both evaluated: "
            f"{result['max_value_error_vs_uncached']:.2e}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=2, help="eval tweets to explain (default 2)")
    parser.add_argument("--max-evals", type=int, default=200, help="shap max_evals for both (default 200)")
    parser.add_argument("--batch-size", type=int, default=16, help="our forward batch size (default 16)")
    parser.add_argument("--skip", type=int, default=0, help="start at this eval example (default 0)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="model dtype")
    parser.add_argument("--no-original", action="store_true", help="do not time the original recipe")
    parser.add_argument("--no-reference", action="store_true", help="skip the uncached-reference check")
    parser.add_argument("--json", type=Path, help="also write the measurements to this JSON file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = measure(
        args.examples,
        args.max_evals,
        args.batch_size,
        args.skip,
        args.dtype,
        original=not args.no_original,
        reference=not args.no_reference,
    )
    print_table(result)
    if args.json:
        args.json.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
