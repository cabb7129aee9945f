"""Evaluation speed: our predict loop vs the original generate-one-token recipe, on the same model and prompts.

`python bench/bench_eval.py [--config configs/embedded.yaml] [--examples 64] [--batch-size 16] [--repeats 2]
[--right-padded] [--shots 4] [--dtype float32|bfloat16] [--no-reference] [--gate-examples N] [--json PATH]`

ours:       `trainer.predict` -> `predict_step`: the instruction prefix run once and reused as a KV cache,
            length-sorted batches, the lm_head applied at the label position only.
reference:  the original recipe, `model.generate(max_new_tokens=1, output_scores=True)` per batch on the full
            prompt ids in data order, but LEFT-padded with an attention mask so it reads the right position
            (the original right-padded, so for the shorter prompts of a batch it read the logits after a pad).
            This is the fair speed baseline.
original:   with `--right-padded`, the original's right-padded variant, to show how many predictions it changes.
k-shot:     with `--shots K`, prompts with K demonstrations in the fixed prefix (`--data.num_demonstrations K`),
            scored by a `LabelScorer` with the prefix cache (`prefix_cache` mode) and by one in `padded` mode.

Columns: wall seconds (fastest pass), examples/s, speed-up over the left-padded reference (k-shot: over the uncached
scoring), the same for process CPU seconds (steadier when other jobs share the machine), tokens run (decoder
positions incl. padding: the work a CPU pays for), achieved GFLOP/s (bench/accounting.py), peak resident GiB while
the path ran, share of predictions equal to ours (k-shot: to the cached scoring), and the largest difference in a
label probability.

All paths read the zero-shot model (adapter disabled) in the same process; tokenisation is excluded from the
timings. The paths run alternately `--repeats` times and each reports its fastest pass (robust to a busy machine).
`--gate-examples N` also scores N eval examples once with our loop and returns their probabilities (the bf16 gate
of bench/bench_all.py compares them across dtypes).
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.configuration import load_run  # noqa: E402
from analysis.evaluation.run import make_predict_trainer, score_eval_split  # noqa: E402
from bench.accounting import WorkCounter  # noqa: E402
from datamodules import TweetSentimentDataModule  # noqa: E402
from foundation.memory import PeakMemory  # noqa: E402
from lightning_modules.scoring import LabelScorer  # noqa: E402

TARGET = 8.0  # issue 15: evaluation >= 8x the reference's examples/s


@torch.no_grad()
def generate_label_scores(model, prompts: list[list[int]], label_ids: list[int], batch_size: int, pad: int, left: bool):
    """Label-token scores of the one generated step, batch by batch in the given order."""
    scores = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        width = max(len(p) for p in batch)
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, ids in enumerate(batch):
            span = slice(width - len(ids), width) if left else slice(0, len(ids))
            input_ids[row, span] = torch.tensor(ids)
            attention_mask[row, span] = 1
        out = model.generate(
            input_ids=input_ids.to(model.device),
            attention_mask=attention_mask.to(model.device),
            max_new_tokens=1,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
            pad_token_id=pad,
        )
        scores.append(out.scores[0][:, label_ids].float().cpu())
    return torch.cat(scores).numpy()


class TimedPath:
    """One measured path: fastest wall and CPU seconds over its passes, the work of a pass, its peak memory."""

    def __init__(self, name: str, label: str, fn, counter: WorkCounter):
        self.name, self.label, self.fn, self.counter = name, label, fn, counter
        self.seconds = self.cpu_seconds = float("inf")
        self.peak_rss_gib = 0.0
        self.result = None
        self.work = None

    def run(self) -> None:
        before = self.counter.snapshot()
        with PeakMemory() as memory:
            wall, cpu = time.perf_counter(), time.process_time()
            self.result = self.fn()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        self.seconds, self.cpu_seconds = min(self.seconds, wall), min(self.cpu_seconds, cpu)
        self.peak_rss_gib = max(self.peak_rss_gib, memory.gib)
        self.work = self.counter.snapshot() - before

    def row(self, examples: int, probabilities: np.ndarray, against: np.ndarray) -> dict:
        return {
            "path": self.name,
            "label": self.label,
            "examples": examples,
            "seconds": self.seconds,
            "cpu_seconds": self.cpu_seconds,
            "rate": examples / self.seconds,
            "positions": self.work.positions,
            "flops": self.counter.forward_flops(self.work),
            "peak_rss_gib": self.peak_rss_gib,
            "same_predictions": float(np.mean(probabilities.argmax(1) == against.argmax(1))),
            "max_abs_dp": float(np.abs(probabilities - against).max()),
        }


def softmax(scores: np.ndarray) -> np.ndarray:
    return torch.softmax(torch.from_numpy(scores).double(), dim=-1).numpy()


def with_settings(datamodule, **changes) -> TweetSentimentDataModule:
    """The same data, prompt and tokenizer with other settings (eval subset size, demonstrations)."""
    accepted = inspect.signature(TweetSentimentDataModule).parameters
    settings = {name: value for name, value in datamodule.hparams.items() if name in accepted}
    return TweetSentimentDataModule(**{**settings, **changes})


def measure(
    config: str = "configs/embedded.yaml",
    examples: int = 64,
    batch_size: int = 16,
    repeats: int = 2,
    dtype: str = "float32",
    reference: bool = True,
    right_padded: bool = False,
    shots: int = 0,
    gate_examples: int = 0,
) -> dict:
    """Rows for ours, the reference and (optionally) the right-padded original and k-shot cached / uncached."""
    overrides = ["--data.eval_subset", str(examples), "--data.eval_batch_size", str(batch_size)]
    run = load_run(["--config", config, *overrides, "--model.dtype", dtype])
    datamodule, module = run.datamodule, run.module
    module.eval()
    datamodule.setup("predict")  # encode prompts before timing: tokenisation is excluded from every path
    encoder = datamodule.encoder
    prompts = [encoder.encode(example.text).input_ids for example in datamodule.eval_examples]
    label_ids = encoder.label_token_ids
    pad = datamodule.tokenizer.pad_token_id
    trainer = make_predict_trainer(progress_bar=False)
    counter = WorkCounter(module.backbone, lora_active=False)  # every path reads the adapter-disabled model

    def generated(left: bool):
        with module.adapter(False):
            return softmax(generate_label_scores(module.backbone, prompts, label_ids, batch_size, pad, left))

    ours = TimedPath(
        "ours",
        "ours: predict, prefix cache, sorted, last-position lm_head",
        lambda: score_eval_split(trainer, module, datamodule, use_adapter=False).probabilities,
        counter,
    )
    left = TimedPath(
        "reference", "reference: generate(max_new_tokens=1), left padding", lambda: generated(True), counter
    )
    right = TimedPath(
        "original", "original: generate(max_new_tokens=1), right padding", lambda: generated(False), counter
    )
    timed = [ours, left] if reference else [ours]
    # Warm both code paths up (allocator, threads, lazy init); the repeats also absorb Lightning's first-call setup
    # and the kernels created on the first use of each shape (bf16 on AMX: noticeably slow).
    generate_label_scores(module.backbone, prompts[:2], label_ids, 2, pad, left=True)
    with module.adapter(False):
        LabelScorer(module.backbone, encoder.prefix_ids, label_ids)([p[len(encoder.prefix_ids) :] for p in prompts[:2]])
    with counter:
        for _ in range(repeats):  # alternate, so a burst of load elsewhere does not hit one path only
            for path in timed:
                path.run()
        if reference and right_padded:
            right.run()
    n = len(prompts)
    rows = [path.row(n, path.result, ours.result) for path in timed]
    if reference and right_padded:
        rows.append(right.row(n, right.result, ours.result))
    result = {
        "phase": "evaluation",
        "model": module.hparams.model_name,
        "dtype": str(next(module.parameters()).dtype).removeprefix("torch."),
        "examples": n,
        "batch_size": batch_size,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "target": TARGET,
        "rows": rows,
    }
    if shots:
        result["shots"] = k_shot_rows(module, datamodule, shots, batch_size, repeats)
    if gate_examples:
        gate_data = with_settings(datamodule, eval_subset=gate_examples)
        gate_data.setup("predict")
        start = time.perf_counter()
        probabilities = score_eval_split(trainer, module, gate_data, use_adapter=False).probabilities
        result["gate"] = {
            "examples": len(probabilities),
            "seconds": time.perf_counter() - start,
            "probabilities": probabilities.tolist(),
        }
    return result


def k_shot_rows(module, datamodule, shots: int, batch_size: int, repeats: int) -> dict:
    """k-shot prompts scored with and without the prefix cache: same call, same batches, only the cache differs."""
    k_data = with_settings(datamodule, num_demonstrations=shots)
    encoder = k_data.encoder
    continuations = [encoder.continuation(example.text) for example in k_data.eval_examples]
    pad = k_data.tokenizer.pad_token_id
    counter = WorkCounter(module.backbone, lora_active=False)

    def scored(use_prefix_cache: bool, prompts=continuations):
        # A new scorer per pass: each pass pays for its own prefix, as a fresh evaluation would.
        scorer = LabelScorer(
            module.backbone,
            encoder.prefix_ids,
            encoder.label_token_ids,
            mode="prefix_cache" if use_prefix_cache else "padded",
            batch_size=batch_size,
            pad_token_id=pad,
            state=lambda: module.adapter(False),
        )
        return scorer(prompts).probabilities

    cached = TimedPath(f"k{shots}_cache", f"k={shots}: LabelScorer, prefix cache", lambda: scored(True), counter)
    uncached = TimedPath(f"k{shots}_no_cache", f"k={shots}: same, padded (no cache)", lambda: scored(False), counter)
    for use_prefix_cache in (True, False):  # warm-up, untimed
        scored(use_prefix_cache, continuations[:2])
    with counter:
        for _ in range(repeats):
            cached.run()
            uncached.run()
    n = len(continuations)
    return {
        "k": shots,
        "prefix_tokens": len(encoder.prefix_ids),
        "mean_continuation_tokens": float(np.mean([len(c) for c in continuations])),
        "rows": [cached.row(n, cached.result, cached.result), uncached.row(n, uncached.result, cached.result)],
    }


def print_rows(rows: list[dict], baseline: dict) -> None:
    header = ("path", "wall s", "ex/s", "speed-up", "CPU s", "CPU ratio", "tokens", "GFLOP/s", "peak GiB", "same")
    print("{:<58} {:>7} {:>7} {:>8} {:>7} {:>9} {:>7} {:>7} {:>8} {:>6}".format(*header), "max |dp|")
    for row in rows:
        print(
            f"{row['label']:<58} {row['seconds']:>7.2f} {row['rate']:>7.2f} "
            f"{baseline['seconds'] / row['seconds']:>7.2f}x {row['cpu_seconds']:>7.2f} "
            f"{baseline['cpu_seconds'] / row['cpu_seconds']:>8.2f}x {row['positions']:>7d} "
            f"{row['flops'] / row['seconds'] / 1e9:>7.1f} {row['peak_rss_gib']:>8.2f} {row['same_predictions']:>6.1%} "
            f"{row['max_abs_dp']:.1e}"
        )


def print_table(result: dict) -> None:
    print(
        f"\nmodel {result['model']} ({result['dtype']}, cpu), {result['examples']} eval examples, batch size "
        f"{result['batch_size']}, {result['threads']} CPU threads, fastest of {result['repeats']} passes"
    )
    rows = result["rows"]
    print_rows(rows, rows[1] if len(rows) > 1 else rows[0])
    if "shots" in result:
        shots = result["shots"]
        print(
            f"k-shot: {shots['k']} demonstrations, prefix {shots['prefix_tokens']} tokens, continuation "
            f"{shots['mean_continuation_tokens']:.0f} tokens on average"
        )
        print_rows(shots["rows"], shots["rows"][1])
    if "gate" in result:
        gate = result["gate"]
        print(f"gate set: {gate['examples']} eval examples scored by ours in {gate['seconds']:.1f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/embedded.yaml")
    parser.add_argument("--examples", type=int, default=64, help="eval examples to time (default 64)")
    parser.add_argument("--batch-size", type=int, default=16, help="batch size for every path (default 16)")
    parser.add_argument("--repeats", type=int, default=2, help="timed passes per path, fastest kept (default 2)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="model dtype")
    parser.add_argument("--right-padded", action="store_true", help="also run the original right-padded recipe")
    parser.add_argument("--no-reference", action="store_true", help="time ours only (no generate baselines)")
    parser.add_argument("--shots", type=int, default=0, help="also time K-shot prompts with / without the cache")
    parser.add_argument("--gate-examples", type=int, default=0, help="also score N examples once for the bf16 gate")
    parser.add_argument("--json", type=Path, help="also write the measurements to this JSON file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = measure(
        args.config,
        args.examples,
        args.batch_size,
        args.repeats,
        args.dtype,
        reference=not args.no_reference,
        right_padded=args.right_padded,
        shots=args.shots,
        gate_examples=args.gate_examples,
    )
    print_table(result)
    if args.json:
        args.json.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
