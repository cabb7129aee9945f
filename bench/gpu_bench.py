"""Single-GPU throughput of fit, evaluation and the SHAP value function on a Llama-3.2-1B-shaped model.

Random weights built from the config (no download, no internet); random token ids with the embedded default's
prompt shape (shared instruction prefix + tweet + tail). Each phase compares our recipe with the original one in the
same run. `--tiny` shrinks the model so the script can be checked on a CPU.
Usage: python bench/gpu_bench.py [--tiny] [--examples 256] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

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


def run_variant(weights: str, four_bit: bool, config: dict, device, dtype, args) -> None:
    labels = [100, 200, 300]
    model = build(config, device, dtype, four_bit, lora=True)
    prefix, rows = prompts(args.examples, config["vocab_size"])

    # fit: dynamic padding + label-position logits vs padding to 512 + full-vocabulary logits everywhere
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch = [prefix + r for r in rows[: args.batch_size // 4 or 1]]
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
    print(
        f"{'fit (examples/s)':<22} {weights:<7} {len(batch) / t_ours:>12.1f} {len(batch) / t_orig:>12.1f} "
        f"{t_orig / t_ours:>6.1f}x"
    )

    # evaluation: prefix cache + last-position lm_head vs generate(max_new_tokens=1) with left padding
    model.eval()
    n = len(rows)
    # a new scorer per pass: each pass pays for its own prefix, as one evaluation does
    t_ours = timed(lambda: LabelScorer(model, prefix, labels, batch_size=args.batch_size)(rows), device)

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
    print(f"{'evaluation (ex/s)':<22} {weights:<7} {n / t_ours:>12.1f} {n / t_orig:>12.1f} {t_orig / t_ours:>6.1f}x")

    # SHAP value function: masked variants of one tweet, prefix-cached vs full prompt with all-position logits
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
    print(f"{'SHAP (s/example)':<22} {weights:<7} {t_ours:>12.3f} {t_orig:>12.3f} {t_orig / t_ours:>6.1f}x")
    if device.type == "cuda":
        print(f"peak GPU memory ({weights}): {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
        torch.cuda.reset_peak_memory_stats()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
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
    print(f"{'phase':<22} {'weights':<7} {'ours':>12} {'original':>12} {'ratio':>7}")
    for weights, four_bit in variants:
        run_variant(weights, four_bit, config, device, dtype, args)


if __name__ == "__main__":
    main()
