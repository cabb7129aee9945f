"""Does torch offer a faster fp32 matrix product than `F.linear` on this CPU? One decoder layer's products, four ways.

The explainers' cached value function spends two-thirds to four-fifths of its time (by host) in the model's linear
products (docs/benchmarks.md); for occlusion, and on some hosts KernelSHAP and LIME, the 5x target of issue 14 could
only be reached with faster products. Beside the plain product, torch ships MKL's and oneDNN's fp32 linear ops, which
its own inductor backend uses on a CPU:

linear      `torch.nn.functional.linear`, what the model runs (MKL's GEMM for fp32 in torch's CPU build)
mkl packed  `torch.ops.mkl._mkl_reorder_linear_weight` + `_mkl_linear`: the weight packed once by MKL for a given
            row count (the packing hint); a call with any other row count falls back to the unpacked product
onednn      `torch.ops.mkldnn._reorder_linear_weight` + `_linear_pointwise`: the weight reordered once for oneDNN
            (a second copy of every weight)
onednn plain  `_linear_pointwise` on the model's own weight, no copy

Each is timed on the embedded SmolLM2's first decoder layer (its seven projections, real weights, random inputs) at
several row counts; the paths take turns, and each one's fastest of `--trials` timed loops counts. "packed for other
rows" is the MKL path called with rows that differ from its hint (`--off-hint` fewer rows than the hint), as the
prefix tree's forwards do: their row counts vary from forward to forward. Each path's error is its largest absolute
difference from the same products computed in float64.
Usage: python bench/bench_matmul_paths.py [--rows 64 128 256 512 1024] [--trials 5] [--seconds 0.3] [--json PATH]
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.accounting import cpu_model, fastest_seconds  # noqa: E402
from foundation.atomic_files import write_json_atomic  # noqa: E402
from lightning_modules.backbone import load_causal_lm  # noqa: E402

MODEL = "embedded:smollm2-135m-instruct"


def layer_weights() -> list[torch.Tensor]:
    model = load_causal_lm(MODEL, quantize_4bit=False, dtype="float32")
    layer = model.model.layers[0]
    weights = [p.detach().contiguous() for p in layer.parameters() if p.dim() == 2]
    del model
    return weights


def measure_rows(weights: list[torch.Tensor], rows: int, off_hint: int, trials: int, seconds: float) -> dict:
    inputs = {w.shape[1]: torch.randn(rows, w.shape[1]) for w in weights}
    mkl = [torch.ops.mkl._mkl_reorder_linear_weight(w, rows) for w in weights]
    # packed for more rows than this call has: the row count of a prefix-tree forward is never known in advance
    mkl_other = [torch.ops.mkl._mkl_reorder_linear_weight(w, rows + off_hint) for w in weights]
    onednn = [torch.ops.mkldnn._reorder_linear_weight(w, rows) for w in weights]
    paths = {
        "linear": lambda: [torch.nn.functional.linear(inputs[w.shape[1]], w) for w in weights],
        "mkl packed": lambda: [
            torch.ops.mkl._mkl_linear(inputs[w.shape[1]], p, w, None, rows) for w, p in zip(weights, mkl)
        ],
        "mkl packed for other rows": lambda: [
            torch.ops.mkl._mkl_linear(inputs[w.shape[1]], p, w, None, rows + off_hint)
            for w, p in zip(weights, mkl_other)
        ],
        "onednn": lambda: [
            torch.ops.mkldnn._linear_pointwise(inputs[w.shape[1]], p, None, "none", [], "")
            for w, p in zip(weights, onednn)
        ],
        "onednn plain": lambda: [
            torch.ops.mkldnn._linear_pointwise(inputs[w.shape[1]], w, None, "none", [], "") for w in weights
        ],
    }
    exact = [torch.nn.functional.linear(inputs[w.shape[1]].double(), w.double()) for w in weights]
    row = {"rows": rows}
    for name, products in paths.items():
        row[name] = {
            "us": float("inf"),
            "error": max(float((a.double() - b).abs().max()) for a, b in zip(products(), exact)),
        }
    # the paths take turns, one timed loop each per trial, so that a slow spell of the host falls on all of them alike
    for _ in range(trials):
        for name, products in paths.items():
            row[name]["us"] = min(row[name]["us"], 1e6 * fastest_seconds(products, 1, seconds))
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[64, 128, 256, 512, 1024])
    parser.add_argument(
        "--off-hint", type=int, default=56, help="how many more rows than a call has the 'other rows' packing is for"
    )
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=0.3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if min(args.rows) < 1 or args.off_hint < 1 or args.trials < 1 or args.seconds <= 0:
        parser.error("--rows and --off-hint must be at least 1, --trials at least 1 and --seconds above 0")
    if not (torch._C.has_mkl and torch.backends.mkldnn.is_available()):
        parser.error("this torch build lacks MKL or oneDNN, so there are no prepacked paths to compare")
    weights = layer_weights()
    shapes = ", ".join(f"{w.shape[1]}->{w.shape[0]}" for w in weights)
    print(
        f"# one SmolLM2 decoder layer's products ({shapes}), fp32; {cpu_model()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, {platform.machine()}"
    )
    table = [measure_rows(weights, rows, args.off_hint, args.trials, args.seconds) for rows in args.rows]
    others = [name for name in table[0] if name not in ("rows", "linear")]
    header = [f"{name}: µs, vs linear" for name in others]
    header = [h.replace("for other rows", f"for {args.off_hint} more rows") for h in header]
    print(f"| rows | linear µs | {' | '.join(header)} | error vs float64: {', '.join(['linear', *others])} |")
    print("|---" * (3 + len(others)) + "|")
    for row in table:
        base = row["linear"]["us"]
        cells = [f"{row[name]['us']:.0f}, {row[name]['us'] / base:.2f}" for name in others]
        errors = ", ".join(f"{row[name]['error']:.1e}" for name in ["linear", *others])
        print(f"| {row['rows']} | {base:.0f} | {' | '.join(cells)} | {errors} |")
    if args.json:
        record = {"cpu": cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__, "rows": table}
        write_json_atomic(args.json, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
