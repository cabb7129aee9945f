"""Single-GPU throughput of fit, evaluation and the SHAP value function on a Llama-3.2-1B-shaped model.

Random weights built from the config (no download, no internet); random token ids with the embedded default's
prompt shape (shared instruction prefix + tweet + tail). Each phase compares our recipe with the original one in the
same run, in examples per second and as a share of the card's bf16 matrix peak measured in the same run (FLOPs
counted from the positions each path really ran, as bench/accounting.py counts them on a CPU). `--tiny` shrinks the
model so the script can be checked on a CPU.
Usage: python bench/gpu_bench.py [--tiny] [--examples 256] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.accounting import WorkCounter, matmul_peak_gflops  # noqa: E402
from lightning_modules.scoring import LabelScorer, logits_at_positions  # noqa: E402

LLAMA_3_2_1B = dict(
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    max_position_embeddings=131072,
    rope_theta=500000.0,
    tie_word_embeddings=True,
)
TINY = dict(
    LLAMA_3_2_1B,
    vocab_size=4096,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
)
PREFIX, TWEET_RANGE, TAIL = 24, (12, 48), 3


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats: int = 1) -> float:
    fn()  # warm-up (kernels, allocator)
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - start) / repeats


@contextmanager
def guarded(phase: str):
    """A phase that fails prints its traceback and lets the next phase run (one lent GPU run must say all it can)."""
    try:
        yield
    except Exception:
        traceback.print_exc()
        print(f"{phase}: failed (traceback above)")


def profiled(fn, args, title: str) -> None:
    """With --profile: where one call of `fn` spends its time (torch.profiler, top operators by self CPU time) and
    how many kernels it launched, to tell launch-bound from compute-bound."""
    if not args.profile:
        return
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        fn()
    events = prof.key_averages()
    launches = sum(e.count for e in events if "LaunchKernel" in e.key)
    print(f"--- profile: {title}; {launches} kernel launches")
    print(events.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=48))


def peak_gflops(device, dtype) -> float:
    """The best matrix-product rate this device reaches in `dtype`: 8192^3 products on a GPU, as KINDS.md measures."""
    if device.type != "cuda":
        return matmul_peak_gflops(dtype)
    a, b = (torch.randn(8192, 8192, device=device, dtype=dtype) for _ in range(2))
    seconds = timed(lambda: [a @ b for _ in range(10)], device, 3) / 10
    return 2.0 * 8192**3 / seconds / 1e9


def counted(counter: WorkCounter, fn, fit: bool = False) -> float:
    """FLOPs of one call of `fn` (a separate, untimed call: the counting hooks synchronise the GPU)."""
    before = counter.snapshot()
    with counter:
        fn()
    work = counter.snapshot() - before
    return counter.fit_flops(work) if fit else counter.forward_flops(work)


def build(config: dict, device, dtype, four_bit: bool, lora: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**config)).to(dtype)
    if four_bit:  # quantise the random weights in place with bitsandbytes
        import bitsandbytes as bnb

        for module in list(model.model.modules()):
            for child_name, child in list(module.named_children()):
                if isinstance(child, torch.nn.Linear):
                    q = bnb.nn.Linear4bit(
                        child.in_features, child.out_features, bias=False, compute_dtype=dtype, quant_type="nf4"
                    )
                    q.weight = bnb.nn.Params4bit(child.weight.data.cpu(), requires_grad=False, quant_type="nf4")
                    setattr(module, child_name, q)
    model = model.to(device)
    if lora and importlib.util.find_spec("peft"):
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"]))
    return model


def prompts(n: int, vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(10, vocab, (PREFIX,), generator=g).tolist()
    rows = []
    for _ in range(n):
        length = int(torch.randint(*TWEET_RANGE, (1,), generator=g)) + TAIL
        rows.append(torch.randint(10, vocab, (length,), generator=g).tolist())
    return prefix, rows


def run_variant(weights: str, four_bit: bool, config: dict, device, dtype, args, peak: float) -> None:
    labels = [100, 200, 300]
    model = build(config, device, dtype, four_bit, lora=True)
    counter = WorkCounter(model, lora_active=True)
    prefix, rows = prompts(args.examples, config["vocab_size"])

    def line(phase: str, items: int, seconds: tuple[float, float], flops: tuple[float, float], rate: bool = True):
        """One row from the seconds and counted FLOPs of one call of each path over `items` examples: the rate
        (examples/s, or seconds per example), the ratio, and each path's GFLOP/s as a share of the peak."""
        shown = [items / t if rate else t / items for t in seconds]
        share = [100 * f / t / 1e9 / peak for f, t in zip(flops, seconds)]
        digits = 1 if rate else 3
        print(
            f"{phase:<22} {weights:<7} {shown[0]:>12.{digits}f} {shown[1]:>12.{digits}f} "
            f"{seconds[1] / seconds[0]:>6.1f}x {share[0]:>8.1f}% {share[1]:>8.1f}%"
        )

    with guarded(f"fit {weights}"):
        fit(model, counter, prefix, rows, labels, device, args, line)
    with guarded(f"evaluation {weights}"):
        evaluation(model, counter, prefix, rows, labels, device, args, line)
    with guarded(f"SHAP {weights}"):
        shap_value_function(model, counter, prefix, rows, labels, device, args, line)
    if device.type == "cuda":
        print(f"peak GPU memory ({weights}): {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
        torch.cuda.reset_peak_memory_stats()


def fit(model, counter, prefix, rows, labels, device, args, line) -> None:
    """Dynamic padding + label-position logits vs padding to 512 + full-vocabulary logits everywhere."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch = [prefix + r for r in rows[: args.fit_batch_size or args.batch_size // 4 or 1]]
    width = max(map(len, batch))
    ids = torch.zeros((len(batch), width), dtype=torch.long, device=device)
    for i, r in enumerate(batch):
        ids[i, : len(r)] = torch.tensor(r)
    positions = torch.tensor([len(r) - 1 for r in batch], device=device)
    targets = torch.tensor([labels[i % 3] for i in range(len(batch))], device=device)

    def ours_fit():
        loss = F.cross_entropy(logits_at_positions(model, ids, positions).float(), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    padded = torch.zeros((len(batch), 512), dtype=torch.long, device=device)
    padded[:, :width] = ids
    lm_labels = torch.full_like(padded, -100)
    lm_labels[torch.arange(len(batch)), positions + 1] = targets

    def original_fit():
        model(input_ids=padded, labels=lm_labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    t_ours, t_orig = timed(ours_fit, device, 3), timed(original_fit, device, 3)
    flops = counted(counter, ours_fit, fit=True), counted(counter, original_fit, fit=True)
    line("fit (examples/s)", len(batch), (t_ours, t_orig), flops)


def evaluation(model, counter, prefix, rows, labels, device, args, line) -> None:
    """Prefix cache + last-position lm_head vs generate(max_new_tokens=1) with left padding."""
    model.eval()
    n = len(rows)

    def ours_evaluation():  # a new scorer per pass: each pass pays for its own prefix, as one evaluation does
        LabelScorer(model, prefix, labels, batch_size=args.batch_size)(rows)

    t_ours = timed(ours_evaluation, device)

    def generate_reference():
        for start in range(0, n, args.batch_size):
            chunk = [prefix + r for r in rows[start : start + args.batch_size]]
            w = max(map(len, chunk))
            ids = torch.zeros((len(chunk), w), dtype=torch.long, device=device)
            mask = torch.zeros_like(ids)
            for i, r in enumerate(chunk):
                ids[i, w - len(r) :] = torch.tensor(r)
                mask[i, w - len(r) :] = 1
            with torch.no_grad():
                model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    max_new_tokens=1,
                    do_sample=False,
                    output_scores=True,
                    return_dict_in_generate=True,
                    pad_token_id=0,
                )

    t_orig = timed(generate_reference, device)
    flops = counted(counter, ours_evaluation), counted(counter, generate_reference)
    line("evaluation (ex/s)", n, (t_ours, t_orig), flops)
    profiled(ours_evaluation, args, "evaluation, ours")


def shap_value_function(model, counter, prefix, rows, labels, device, args, line) -> None:
    """Masked variants of one tweet, prefix-cached vs the full prompt with all-position logits."""
    scorer = LabelScorer(model, prefix, labels, batch_size=64)  # the instruction's cache computed once, as in SHAP
    tweet = rows[0]
    masked = [[tok if (i * 7 + j) % 3 else 0 for j, tok in enumerate(tweet)] for i in range(args.shap_evals)]

    def ours_shap():
        scorer(masked)

    def original_shap():
        for start in range(0, len(masked), 64):
            chunk = torch.tensor([prefix + m for m in masked[start : start + 64]], device=device)
            with torch.no_grad():
                torch.softmax(model(input_ids=chunk).logits[:, -1], -1)

    t_ours, t_orig = timed(ours_shap, device), timed(original_shap, device)
    flops = counted(counter, ours_shap), counted(counter, original_shap)
    line("SHAP (s/example)", 1, (t_ours, t_orig), flops, rate=False)
    profiled(ours_shap, args, "SHAP, ours")
    profiled(original_shap, args, "SHAP, original")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--fit-batch-size", type=int, default=0, help="examples per fit step (default: batch-size / 4)")
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table per path")
    parser.add_argument("--weights", nargs="+", default=["bf16", "nf4"], help="variants to run")
    parser.add_argument("--shap-evals", type=int, default=200, help="masked variants per explained example")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = TINY if args.tiny else LLAMA_3_2_1B
    dtype = torch.bfloat16 if device.type == "cuda" or args.tiny else torch.float32
    variants = [("bf16", False)]
    if importlib.util.find_spec("bitsandbytes") and device.type == "cuda":
        variants.append(("nf4", True))
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"device: {name}; model: {'tiny ' if args.tiny else ''}Llama-3.2-1B shape, random weights, LoRA r=16 q/v")
    peak = peak_gflops(device, dtype)
    print(f"matmul peak ({str(dtype).removeprefix('torch.')}, measured now): {peak:,.0f} GFLOP/s")
    print(f"{'phase':<22} {'weights':<7} {'ours':>12} {'original':>12} {'ratio':>7} {'ours %pk':>9} {'orig %pk':>9}")
    for weights, four_bit in [v for v in variants if v[0] in args.weights]:
        with guarded(f"{weights} weights"):
            run_variant(weights, four_bit, config, device, dtype, args, peak)


if __name__ == "__main__":
    main()
