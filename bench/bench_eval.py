"""Evaluation speed: our predict loop vs the original generate-one-token recipe, on the same model and prompts.

`python bench/bench_eval.py [--config configs/embedded.yaml] [--examples 64] [--batch-size 16] [--repeats 2]`

ours:       `trainer.predict` -> `predict_step`: the instruction prefix run once and reused as a KV cache,
            length-sorted batches, the lm_head applied at the label position only.
reference:  the original recipe, `model.generate(max_new_tokens=1, output_scores=True)` per batch on the full
            prompt ids in data order, but LEFT-padded with an attention mask so it reads the right position
            (the original right-padded, so for the shorter prompts of a batch it read the logits after a pad).
With `--right-padded` the original's right-padded variant is also run, to show how many predictions it changes.

Columns: wall seconds (fastest pass), examples/s, speed-up over the left-padded reference, the same for process
CPU seconds (steadier when other jobs share the machine), tokens run (decoder positions incl. padding: the work a
CPU pays for), share of predictions equal to ours, and the largest difference in a label probability from ours.

Both read the zero-shot model (adapter disabled) in the same process; tokenisation is excluded from both timings.
The paths run alternately `--repeats` times and each reports its fastest pass (robust to a busy machine).
The prediction is the argmax over the label tokens' scores; the table reports the share that agree with ours.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.evaluation import make_predict_trainer, score_eval_split  # noqa: E402
from scripts.cli import build_from_config  # noqa: E402


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


def tokens_run(widths_and_sizes) -> int:
    """Token positions a padded batch loop pushes through the decoder: sum of batch size x padded width."""
    return sum(size * width for width, size in widths_and_sizes)


def timed(fn):
    """The result, wall seconds and process CPU seconds (the latter barely moves when other jobs share the CPU)."""
    wall, cpu = time.perf_counter(), time.process_time()
    value = fn()
    return value, time.perf_counter() - wall, time.process_time() - cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/embedded.yaml")
    parser.add_argument("--examples", type=int, default=64, help="eval examples to score (default 64)")
    parser.add_argument("--batch-size", type=int, default=16, help="batch size for both paths (default 16)")
    parser.add_argument("--repeats", type=int, default=2, help="timed passes per path, fastest kept (default 2)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--right-padded", action="store_true", help="also run the original right-padded recipe")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    overrides = ["--data.eval_subset", str(args.examples), "--data.eval_batch_size", str(args.batch_size)]
    datamodule, module = build_from_config(args.config, overrides)
    module.eval()
    datamodule.setup("predict")  # encode prompts before timing: tokenisation is excluded from both paths
    encoder = datamodule.encoder
    examples = datamodule.eval_examples
    prompts = [encoder.encode(example.text).input_ids for example in examples]
    label_ids = encoder.label_token_ids
    pad = datamodule.tokenizer.pad_token_id
    trainer = make_predict_trainer(progress_bar=False)

    def reference(left: bool):
        with module.zero_shot():
            return generate_label_scores(module.backbone, prompts, label_ids, args.batch_size, pad, left)

    # Warm the model up (allocator, threads, lazy init); the repeats absorb Lightning's first-call setup.
    generate_label_scores(module.backbone, prompts[:2], label_ids, 2, pad, left=True)
    ours_s = ref_s = ours_cpu = ref_cpu = float("inf")
    for _ in range(args.repeats):  # alternate, so a burst of load elsewhere does not hit one path only
        ours, seconds, cpu = timed(lambda: score_eval_split(trainer, module, datamodule, use_adapter=False))
        ours_s, ours_cpu = min(ours_s, seconds), min(ours_cpu, cpu)
        ref_scores, seconds, cpu = timed(lambda: reference(left=True))
        ref_s, ref_cpu = min(ref_s, seconds), min(ref_cpu, cpu)
    # Work each path does, in decoder token positions (pads included): on a CPU the time follows this closely.
    prefix_length = len(encoder.prefix_ids)
    ours_tokens = prefix_length + tokens_run(
        (int(batch["label_position"].max()) - prefix_length, len(batch["label_position"]))
        for batch in datamodule.predict_dataloader()
    )
    ref_tokens = tokens_run(
        (max(len(p) for p in prompts[i : i + args.batch_size]), len(prompts[i : i + args.batch_size]))
        for i in range(0, len(prompts), args.batch_size)
    )
    ours_pred = ours.predictions
    ref_probs = torch.softmax(torch.from_numpy(ref_scores).double(), dim=-1).numpy()
    rows = [
        ("ours: predict, prefix cache, sorted, last-position lm_head", ours_s, ours_cpu, ours_tokens, 1.0, 0.0),
        (
            "reference: generate(max_new_tokens=1), left padding",
            ref_s,
            ref_cpu,
            ref_tokens,
            float(np.mean(ref_scores.argmax(1) == ours_pred)),
            float(np.abs(ref_probs - ours.probabilities).max()),
        ),
    ]
    if args.right_padded:
        right_scores, right_s, right_cpu = timed(lambda: reference(left=False))
        right_probs = torch.softmax(torch.from_numpy(right_scores).double(), dim=-1).numpy()
        rows.append(
            (
                "original: generate(max_new_tokens=1), right padding",
                right_s,
                right_cpu,
                ref_tokens,
                float(np.mean(right_scores.argmax(1) == ours_pred)),
                float(np.abs(right_probs - ours.probabilities).max()),
            )
        )

    n = len(examples)
    print(
        f"\nmodel {module.hparams.model_name} ({next(module.parameters()).dtype}, {module.device}), "
        f"{n} eval examples, batch size {args.batch_size}, {torch.get_num_threads()} CPU threads, "
        f"fastest of {args.repeats} passes"
    )
    header = ("path", "wall s", "examples/s", "speed-up", "CPU s", "CPU ratio", "tokens run", "same pred", "max |dp|")
    print("{:<58} {:>7} {:>10} {:>8} {:>7} {:>9} {:>10} {:>9} {:>8}".format(*header))
    for name, seconds, cpu, tokens, agree, max_diff in rows:
        print(
            f"{name:<58} {seconds:>7.2f} {n / seconds:>10.2f} {ref_s / seconds:>7.2f}x {cpu:>7.2f} "
            f"{ref_cpu / cpu:>8.2f}x {tokens:>10d} {agree:>9.1%} {max_diff:>8.1e}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
