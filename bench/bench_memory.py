"""Peak memory of a whole run, side by side: ours and the original script's recipe, on the same work (issue 15).

Both fine-tune a LoRA adapter on `--train` tweets, evaluate the zero-shot and the fine-tuned model on `--eval` tweets
and explain `--shap` tweets with SHAP (max_evals 200) under both models, on the embedded default (SmolLM2-135M, CPU).
Each runs in a fresh process; the figure is that process's own peak resident set (`ru_maxrss`, through a small
launcher as `/usr/bin/time` does: bench/accounting.py `run_measured`), what `/usr/bin/time -v` reports as "Maximum
resident set size".

ours      `scripts/run_experiment.py --finetune --run-shap --train-subset N --eval-subset M --shap-example-count K`,
          exactly as a user runs it (`--model.dtype auto`: per phase the dtype its recorded gate allows). It does more
          than the original: the k-shot and calibrated baselines, CIs, the report, TensorBoard, the checkpoints.
original  the original script's recipe (`experiments_shap.py` in jamesjyoon/llm_interpretability), ported to the
          same data and prompts: one fp32 model for the whole run (its CPU path); the zero-shot evaluation in batches
          of 8 padded to the longest, full-vocabulary logits; LoRA r 16 on q/v (dropout 0.1), every training example
          padded to 512 tokens, the LM loss over all positions, batch 4, 4 batches accumulated, AdamW; the fine-tuned
          evaluation; shap's partition explainer over the prompt's tokens with full-prompt forwards, for both models.
The target: ours at most 25 % of the original's peak.
Usage: python bench/bench_memory.py [--train 64] [--eval 64] [--shap 3] [--threads N] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.accounting import cpu_model, run_measured  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TARGET = 0.25  # issue 15: the demo's peak <= 25 % of the original's on the same work
MAX_EVALS = 200
ORIGINAL_BATCH = 8  # the original's evaluation batch
ORIGINAL_ACCUMULATION = 4


def original_run(train: int, evaluate: int, explain: int) -> None:
    """The original script's recipe, end to end, in this process (see the module docstring)."""
    import shap

    from bench.bench_fit import original_step
    from bench.bench_shap import FullPromptFunction
    from datamodules import TweetSentimentDataModule
    from foundation.embedded_model import EMBEDDED_MODEL
    from lightning_modules.backbone import attach_lora, load_causal_lm

    torch.manual_seed(0)
    datamodule = TweetSentimentDataModule(train_subset=train, eval_subset=evaluate, batch_size=4)
    datamodule.setup("fit")
    encoder, tokenizer = datamodule.encoder, datamodule.tokenizer
    prompts = [f"{encoder.instruction} {e.text}{encoder.TAIL}" for e in datamodule.eval_examples]
    base = load_causal_lm(EMBEDDED_MODEL, quantize_4bit=False, dtype="float32")
    model = attach_lora(base, 16, 32, 0.1, ["q_proj", "v_proj"], quantized=False, gradient_checkpointing=False)
    value = FullPromptFunction(model, tokenizer, encoder.label_token_ids)

    def evaluation() -> None:
        model.eval()
        for start in range(0, len(prompts), ORIGINAL_BATCH):
            value(prompts[start : start + ORIGINAL_BATCH])

    with model.disable_adapter():
        evaluation()
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    pad = tokenizer.pad_token_id
    for step, batch in enumerate(datamodule.train_dataloader(), start=1):
        (original_step(model, batch, pad) / ORIGINAL_ACCUMULATION).backward()
        if step % ORIGINAL_ACCUMULATION == 0:
            optimizer.step()
            optimizer.zero_grad()
    evaluation()
    explainer = shap.Explainer(value, shap.maskers.Text(tokenizer), algorithm="partition")
    with model.disable_adapter():
        explainer(prompts[:explain], max_evals=MAX_EVALS, silent=True)
    explainer(prompts[:explain], max_evals=MAX_EVALS, silent=True)


def ours_command(train: int, evaluate: int, explain: int, folder: Path) -> list[str]:
    return [
        str(ROOT / "scripts" / "run_experiment.py"),
        "--finetune",
        "--run-shap",
        "--model-name",
        "embedded:smollm2-135m-instruct",
        "--dataset-name",
        "embedded:crowdflower-tweets",
        "--no-load-in-4bit",
        "--train-subset",
        str(train),
        "--eval-subset",
        str(evaluate),
        "--shap-example-count",
        str(explain),
        "--output-dir",
        str(folder),
    ]


def peak_of(command: list[str], threads: int | None) -> tuple[float, float]:
    """Run `python command...` in a fresh process: its own peak resident set (GiB) and its seconds."""
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    with tempfile.TemporaryFile("w+") as log:
        code, gib, seconds = run_measured([sys.executable, *command], stdout=log, stderr=subprocess.STDOUT, env=env)
        if code:
            log.seek(0)
            sys.stderr.write(log.read()[-5000:])
            raise SystemExit(f"error: `python {' '.join(command)}` failed; its log is above.")
    return gib, seconds


def measure(train: int = 64, evaluate: int = 64, explain: int = 3, threads: int | None = None) -> dict:
    """Both whole runs on the same sizes, ours first; one row each, and the ratio."""
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        ours = ours_command(train, evaluate, explain, Path(folder) / "run")
        gib, seconds = peak_of(ours, threads)
        rows.append({"path": "ours", "dtype": "auto", "peak_rss_gib": gib, "seconds": seconds})
    sizes = ["--train", str(train), "--eval", str(evaluate), "--shap", str(explain)]
    gib, seconds = peak_of([str(Path(__file__).resolve()), "--original-run", *sizes], threads)
    rows.append({"path": "original", "dtype": "float32", "peak_rss_gib": gib, "seconds": seconds})
    ratio = rows[0]["peak_rss_gib"] / rows[1]["peak_rss_gib"]
    return {
        "phase": "memory",
        "sizes": {"train": train, "eval": evaluate, "shap": explain, "max_evals": MAX_EVALS},
        "cpu": cpu_model(),
        "threads": threads or torch.get_num_threads(),
        "rows": rows,
        "ratio": ratio,
        "target": TARGET,
        "meets_target": ratio <= TARGET,
    }


def print_table(result: dict) -> None:
    sizes = result["sizes"]
    print(f"machine: {result['cpu']}, {result['threads']} threads")
    print(
        f"whole run, train {sizes['train']} / eval {sizes['eval']} / SHAP {sizes['shap']} tweets (max_evals "
        f"{sizes['max_evals']}), each in a fresh process"
    )
    print(f"{'path':<9} {'dtype':<8} {'peak GiB':>9} {'seconds':>8}")
    for row in result["rows"]:
        print(f"{row['path']:<9} {row['dtype']:<8} {row['peak_rss_gib']:>9.2f} {row['seconds']:>8.0f}")
    verdict = "meets" if result["meets_target"] else "misses"
    print(f"ours / original: {result['ratio']:.0%} ({verdict} the target <= {result['target']:.0%})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=64)
    parser.add_argument("--eval", type=int, default=64)
    parser.add_argument("--shap", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--original-run", action="store_true", help=argparse.SUPPRESS)  # the measured child
    args = parser.parse_args(argv)
    for name in ("train", "eval", "shap"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}.")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.original_run:
        original_run(args.train, args.eval, args.shap)
        return 0
    result = measure(args.train, args.eval, args.shap, args.threads)
    print_table(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
