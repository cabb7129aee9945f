"""SHAP speed: ours vs the original recipe, on the embedded default, at the same max_evals, in one run.

ours      Partition explainer over the tweet's tokens only; masked tweets scored in batches through the shared
          instruction KV cache, lm_head at the label position only (analysis.shap_explain)
original  plain `shap.Explainer(f, shap.maskers.Text(tokenizer))` over the whole prompt string, f = a full forward
          of every padded prompt with logits at all positions (shap's default batching)
reference our value function without the prefix cache (full prompts, other batch size): the values must agree

Both explain the same tweets with the same base model and max_evals; times are seconds per explained tweet, after
an untimed warm-up. About 4 minutes on 2 idle CPU cores. On a CPU shared with other jobs pass --threads 1: two
torch threads competing with another process for two cores can run 5x slower, which swamps the comparison.
Usage: python bench/bench_shap.py [--examples 2] [--max-evals 200] [--batch-size 16] [--skip 0] [--threads N]
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

from analysis.shap_explain import LabelProbabilities, explain_tweet, normalize_tweet, tweet_masker  # noqa: E402
from datamodules import TweetSentimentDataModule  # noqa: E402
from lightning_modules.backbone import load_causal_lm  # noqa: E402
from lightning_modules.embedded_model import EMBEDDED_MODEL  # noqa: E402


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


def timed(function, *args, **kwargs):
    start = time.perf_counter()
    out = function(*args, **kwargs)
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=2, help="eval tweets to explain (default 2)")
    parser.add_argument("--max-evals", type=int, default=200, help="shap max_evals for both (default 200)")
    parser.add_argument("--batch-size", type=int, default=16, help="our forward batch size (default 16)")
    parser.add_argument("--skip", type=int, default=0, help="start at this eval example (default 0)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    datamodule = TweetSentimentDataModule(eval_subset=500)
    encoder, tokenizer = datamodule.encoder, datamodule.tokenizer
    model = load_causal_lm(EMBEDDED_MODEL, quantize_4bit=False).eval()
    texts = [normalize_tweet(e.text) for e in datamodule.eval_examples[args.skip : args.skip + args.examples]]

    ours = LabelProbabilities(model, encoder, args.batch_size)
    reference = LabelProbabilities(model, encoder, max(1, args.batch_size // 2 - 1), use_prefix_cache=False)
    masker = tweet_masker(encoder)
    original_f = FullPromptFunction(model, tokenizer, encoder.label_token_ids)
    original = shap.Explainer(original_f, shap.maskers.Text(tokenizer), algorithm="partition")
    # Warm-up, not timed: first forwards, and shap's numba kernels compiling on the first explanation.
    explain_tweet("so happy today", {"ours": ours}, masker, 8)
    original([encoder.instruction + " so happy today" + encoder.TAIL], max_evals=8, silent=True)

    rows, value_errors, shap_errors = [], [], []
    for text in texts:
        ours_scored, reference_scored = Recording(ours), Recording(reference)
        explained, ours_seconds = timed(explain_tweet, text, {"ours": ours_scored}, masker, args.max_evals)
        prompt = encoder.instruction + " " + text + encoder.TAIL
        before = original_f.evaluations
        _, original_seconds = timed(original, [prompt], max_evals=args.max_evals, silent=True)
        uncached = explain_tweet(text, {"reference": reference_scored}, masker, args.max_evals)
        difference = explained["models"]["ours"]["values"] - uncached["models"]["reference"]["values"]
        shap_errors.append(np.abs(difference).max())
        shared = ours_scored.outputs.keys() & reference_scored.outputs.keys()
        value_errors.append(max(np.abs(ours_scored.outputs[t] - reference_scored.outputs[t]).max() for t in shared))
        rows.append(
            (
                len(explained["data"]),
                len(tokenizer(prompt)["input_ids"]),
                explained["evals_used"],
                original_f.evaluations - before,
                ours_seconds,
                original_seconds,
            )
        )

    print(f"# SHAP per tweet, {EMBEDDED_MODEL}, max_evals={args.max_evals}, {platform.processor() or 'cpu'}, ", end="")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, shap {shap.__version__}")
    print("| tweet | features ours / original | evals ours / original | ours s | original s | speed-up |")
    print("|---|---|---|---|---|---|")
    for i, (n_ours, n_orig, e_ours, e_orig, s_ours, s_orig) in enumerate(rows):
        print(f"| {args.skip + i} | {n_ours} / {n_orig} | {e_ours} / {e_orig} | {s_ours:.2f} | {s_orig:.2f} | ", end="")
        print(f"{s_orig / s_ours:.1f}x |")
    ours_mean = np.mean([r[4] for r in rows])
    original_mean = np.mean([r[5] for r in rows])
    print(f"| mean | | | {ours_mean:.2f} | {original_mean:.2f} | {original_mean / ours_mean:.1f}x |")
    print(f"max |SHAP ours - SHAP uncached reference|: {max(shap_errors):.2e}")
    print(f"max |f ours - f uncached reference| over the masked tweets both evaluated: {max(value_errors):.2e}")


if __name__ == "__main__":
    main()
