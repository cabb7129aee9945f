"""Training throughput: ours vs the original recipe, on the embedded default, in one run.

ours      dynamic padding per batch, cross-entropy from logits at the label position only
original  every example padded to 512 tokens, full-vocabulary logits at every position, HF's shifted LM loss

Both run the same LoRA model, optimizer and batches; only the recipe differs. Each path gets a freshly loaded model
(ours first, so the original's 512-wide activations never sit in its resident set). GFLOP/s counts forward and
backward of a frozen base with LoRA from the positions actually run (bench/accounting.py).
`--dtype bfloat16` loads the frozen base in bf16 (the LoRA weights, their gradients and AdamW's state stay fp32, as
in `scripts/train.py fit --model.dtype bfloat16`); `--no-original` times ours alone (bench/bench_all.py compares the
bf16 row with the fp32 original).
Usage: python bench/bench_fit.py [--batches 8] [--batch-size 4] [--warmup 1] [--dtype float32] [--no-original]
       [--json PATH]
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.accounting import WorkCounter  # noqa: E402
from datamodules import TweetSentimentDataModule  # noqa: E402
from foundation.embedded_model import EMBEDDED_MODEL  # noqa: E402
from foundation.memory import PeakMemory  # noqa: E402
from lightning_modules.backbone import attach_lora, load_causal_lm  # noqa: E402
from lightning_modules.scoring import logits_at_positions  # noqa: E402

ORIGINAL_LENGTH = 512
TARGET = 30.0  # issue 15: fit >= 30x the original recipe's examples/s (the original in fp32)


def ours_step(model, batch) -> torch.Tensor:
    logits = logits_at_positions(model, batch["input_ids"], batch["label_position"] - 1, batch["attention_mask"])
    targets = batch["labels"][torch.arange(len(logits)), batch["label_position"]]
    return F.cross_entropy(logits.float(), targets)


def original_step(model, batch, pad_token_id: int) -> torch.Tensor:
    width = ORIGINAL_LENGTH
    n, length = batch["input_ids"].shape
    input_ids = torch.full((n, width), pad_token_id, dtype=torch.long)
    labels = torch.full((n, width), -100, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    input_ids[:, :length] = batch["input_ids"]
    labels[:, :length] = batch["labels"]
    mask[:, :length] = batch["attention_mask"]
    return model(input_ids=input_ids, attention_mask=mask, labels=labels).loss


def train_steps(step, model, batches, warmup: int) -> dict:
    """Optimizer steps over `batches`; the first `warmup` are neither timed nor counted."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    losses, seconds, examples = [], 0.0, 0
    with WorkCounter(model, lora_active=True) as counter, PeakMemory() as memory:
        for i, batch in enumerate(batches):
            if i == warmup:
                before = counter.snapshot()
            start = time.perf_counter()
            loss = step(model, batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if i >= warmup:
                seconds += time.perf_counter() - start
                examples += len(batch["input_ids"])
            losses.append(loss.item())
        work = counter.snapshot() - before
    return {
        "examples": examples,
        "seconds": seconds,
        "rate": examples / seconds,
        "flops": counter.fit_flops(work),
        "positions": work.positions,
        "first_loss": losses[0],
        "peak_rss_gib": memory.gib,
    }


def measure(
    batches: int = 8, batch_size: int = 4, warmup: int = 1, dtype: str = "float32", original: bool = True
) -> dict:
    """Both recipes (or ours alone) on the same batches: one row per recipe, plus the setting."""
    if batches <= warmup:
        raise SystemExit(f"error: --batches {batches} leaves nothing to time after --warmup {warmup}.")
    dm = TweetSentimentDataModule(train_subset=batches * batch_size, eval_subset=8, batch_size=batch_size)
    dm.setup("fit")
    data = list(dm.train_dataloader())[:batches]
    pad = dm.tokenizer.pad_token_id
    steps = {"ours": ours_step, "original": lambda m, b: original_step(m, b, pad)}
    if not original:
        del steps["original"]
    rows = []
    for name, step in steps.items():
        torch.manual_seed(0)
        base = load_causal_lm(EMBEDDED_MODEL, quantize_4bit=False, dtype=dtype)
        model = attach_lora(base, 16, 32, 0.0, ["q_proj", "v_proj"], quantized=False, gradient_checkpointing=False)
        model.train()
        rows.append({"path": name, "dtype": dtype, **train_steps(step, model, data, warmup)})
        del base, model
        gc.collect()
    lengths = [int(b["attention_mask"].sum()) for b in data]
    result = {
        "phase": "fit",
        "model": EMBEDDED_MODEL,
        "batch_size": batch_size,
        "timed_batches": batches - warmup,
        "mean_prompt_length": sum(lengths) / sum(len(b["input_ids"]) for b in data),
        "threads": torch.get_num_threads(),
        "rows": rows,
        "target": TARGET,
    }
    if original:
        # Same supervised token: the original's shifted LM loss over a masked batch equals ours at the label position.
        result["same_first_loss"] = abs(rows[0]["first_loss"] - rows[1]["first_loss"]) < 1e-4
        result["speed_up"] = rows[0]["rate"] / rows[1]["rate"]
    return result


def print_table(result: dict) -> None:
    print(f"machine: {platform.processor() or platform.machine()}, {result['threads']} torch threads")
    print(
        f"model: {result['model']} {result['rows'][0]['dtype']} + LoRA r=16 (q_proj, v_proj); batch size "
        f"{result['batch_size']}; {result['timed_batches']} timed batches; mean prompt length "
        f"{result['mean_prompt_length']:.0f} tokens"
    )
    print(f"{'recipe':<10} {'examples/s':>11} {'first loss':>11} {'positions':>10} {'GFLOP/s':>8} {'peak GiB':>9}")
    for row in sorted(result["rows"], key=lambda r: r["path"]):
        print(
            f"{row['path']:<10} {row['rate']:>11.2f} {row['first_loss']:>11.4f} {row['positions']:>10d} "
            f"{row['flops'] / row['seconds'] / 1e9:>8.1f} {row['peak_rss_gib']:>9.2f}"
        )
    if "speed_up" in result:
        print(f"speed-up: {result['speed_up']:.1f}x (target >= {result['target']:.0f}x)")
        print(f"same first-batch loss: {result['same_first_loss']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--no-original", action="store_true", help="time ours alone")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, help="also write the measurements to this JSON file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = measure(args.batches, args.batch_size, args.warmup, args.dtype, not args.no_original)
    print_table(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
