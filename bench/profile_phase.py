"""Where a fit step's (or an evaluation's, or SHAP's) time goes: torch profiler, and the matmul rate at the phase's
shapes.

`--phase fit`: `bench_fit.ours_step` (the label-position loss, dynamic padding) with AdamW on the embedded default,
the first step untimed, then `--steps` profiled steps. `--phase evaluation`: the evaluation's scoring of
`--examples` eval tweets (`score_eval_split`, the base model, batch 16), once untimed, then profiled. `--phase shap`:
the base model's SHAP values of `--examples` eval tweets (word features, max_evals 200, the prefix-tree value
function, as bench/bench_shap.py times them), after an untimed warm-up. Prints the operators by self CPU time, then
times `torch.matmul` at the shapes of this model's linear layers (rows = the tokens of one batch, or the mean new
tree nodes of one SHAP forward) and at 2048 x 2048 (the peak probe of `make bench`), in fp32 and bf16: the ceiling
a linear-bound phase can reach on this CPU.
Usage: python bench/profile_phase.py [--phase fit] [--dtype bfloat16] [--batch-size 4] [--steps 2] [--examples 128]
       [--rows 25]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_fit import ours_step  # noqa: E402
from datamodules import TweetSentimentDataModule  # noqa: E402
from foundation.embedded_model import EMBEDDED_MODEL  # noqa: E402
from lightning_modules.backbone import attach_lora, load_causal_lm  # noqa: E402


def matmul_gflops(rows: int, inner: int, outer: int, dtype: torch.dtype, seconds: float = 0.5) -> float:
    a, b = torch.randn(rows, inner, dtype=dtype), torch.randn(outer, inner, dtype=dtype)
    for _ in range(3):
        a @ b.t()
    start, calls = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        a @ b.t()
        calls += 1
    return 2 * rows * inner * outer * calls / (time.perf_counter() - start) / 1e9


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phase", default="fit", choices=["fit", "evaluation", "shap"])
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--examples", type=int, help="eval tweets scored (evaluation: 128) or explained (shap: 2)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--rows", type=int, default=25, help="operators listed")
    args = parser.parse_args(argv)
    from torch.profiler import ProfilerActivity, profile

    if args.phase == "evaluation":
        return profile_evaluation(args)
    if args.phase == "shap":
        return profile_shap(args)
    examples = (args.steps + 1) * args.batch_size
    dm = TweetSentimentDataModule(train_subset=examples, eval_subset=8, batch_size=args.batch_size)
    dm.setup("fit")
    batches = list(dm.train_dataloader())[: args.steps + 1]
    base = load_causal_lm(EMBEDDED_MODEL, quantize_4bit=False, dtype=args.dtype)
    model = attach_lora(base, 16, 32, 0.0, ["q_proj", "v_proj"], quantized=False, gradient_checkpointing=False)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step(batch) -> None:
        ours_step(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad()

    step(batches[0])
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        for batch in batches[1:]:
            step(batch)
    tokens = sum(b["input_ids"].numel() for b in batches[1:])
    print(f"# {args.steps} fit steps, {EMBEDDED_MODEL} {args.dtype}, batch {args.batch_size}, {tokens} positions")
    print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    print_matmul_ceiling(base.config, tokens // args.steps)
    return 0


def profile_evaluation(args) -> int:
    from torch.profiler import ProfilerActivity, profile

    from analysis.configuration import load_run
    from analysis.evaluation.run import make_predict_trainer, score_eval_split

    args.examples = args.examples or 128
    sizes = ["--data.eval_subset", str(args.examples), "--data.eval_batch_size", "16", "--model.dtype", args.dtype]
    run = load_run(["--config", str(Path(__file__).resolve().parents[1] / "configs" / "embedded.yaml"), *sizes])
    module, datamodule = run.module, run.datamodule
    module.eval()
    trainer = make_predict_trainer(progress_bar=False)
    score_eval_split(trainer, module, datamodule, use_adapter=False)
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        score_eval_split(trainer, module, datamodule, use_adapter=False)
    seconds = time.perf_counter() - start
    print(f"# evaluation of {args.examples} eval tweets, {EMBEDDED_MODEL} {args.dtype}, batch 16: {seconds:.2f} s")
    print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    prompts = [datamodule.encoder.encode(example.text).input_ids for example in datamodule.eval_examples]
    prefix = len(datamodule.encoder.prefix_ids)
    print_matmul_ceiling(module.backbone.config, 16 * sum(len(p) - prefix for p in prompts) // len(prompts))
    return 0


def profile_shap(args) -> int:
    from torch.profiler import ProfilerActivity, profile

    from analysis.explanation.shap_values import LabelProbabilities, explain_tweet, normalize_tweet, tweet_masker
    from bench.accounting import WorkCounter

    examples = args.examples or 2
    datamodule = TweetSentimentDataModule(eval_subset=500)
    model = load_causal_lm(EMBEDDED_MODEL, quantize_4bit=False, dtype=args.dtype).eval()
    value = LabelProbabilities.for_model(model, datamodule.encoder, 16)
    masker = tweet_masker(datamodule.encoder)
    texts = [normalize_tweet(e.text) for e in datamodule.eval_examples[:examples]]
    explain_tweet("so happy today", {"ours": value}, masker, 8)  # first forwards, shap's numba kernels
    counter = WorkCounter(model, lora_active=False)
    forwards = []  # new tree nodes per forward

    def count(module, args, kwargs) -> None:
        forwards.append(kwargs["inputs_embeds"].shape[1])

    hook = model.get_decoder().register_forward_pre_hook(count, with_kwargs=True)
    start = time.perf_counter()
    with counter, profile(activities=[ProfilerActivity.CPU]) as profiler:
        for text in texts:
            explain_tweet(text, {"ours": value}, masker, 200)
    seconds = time.perf_counter() - start
    hook.remove()
    flops = counter.forward_flops(counter.snapshot())
    print(
        f"# SHAP of {examples} eval tweets, {EMBEDDED_MODEL} {args.dtype}, max_evals 200: {seconds:.2f} s, "
        f"{len(forwards)} tree forwards of {np.mean(forwards):.0f} new nodes on average, "
        f"{flops / seconds / 1e9:.1f} GFLOP/s"
    )
    print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    print_matmul_ceiling(model.config, int(np.mean(forwards)))
    return 0


def print_matmul_ceiling(config, rows: int) -> None:
    hidden, intermediate = config.hidden_size, config.intermediate_size
    print(f"# matmul GFLOP/s at this phase's shapes ({rows} rows) and at the 2048^2 peak probe")
    print("| shape | fp32 | bf16 | bf16 / fp32 |")
    print("|---|---|---|---|")
    for m, k, n in ((rows, hidden, intermediate), (rows, intermediate, hidden), (rows, hidden, hidden)):
        a, b = matmul_gflops(m, k, n, torch.float32), matmul_gflops(m, k, n, torch.bfloat16)
        print(f"| {m} x {k} x {n} | {a:.0f} | {b:.0f} | {b / a:.2f} |")
    a, b = matmul_gflops(2048, 2048, 2048, torch.float32), matmul_gflops(2048, 2048, 2048, torch.bfloat16)
    print(f"| 2048 x 2048 x 2048 | {a:.0f} | {b:.0f} | {b / a:.2f} |")


if __name__ == "__main__":
    sys.exit(main())
