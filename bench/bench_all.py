"""`make bench`: the fit, evaluation and SHAP benchmarks on the embedded default, one combined table.

Each phase (and each dtype) runs in its own process (bench/bench_fit.py, bench_eval.py, bench_shap.py with `--json`),
so no phase's memory or warm caches leak into another's. The machine's matmul peak (fp32 and bf16, 2048 x 2048
torch.matmul, best of 5 loops) is measured in this run, before and after the phases; the better figure counts.

Per row: rate (examples/s; SHAP: seconds per explained tweet), speed-up over the phase's baseline (bf16 rows: over
the same fp32 baseline), the issue-15 target and whether it holds (fit >= 30x the original recipe, evaluation >= 8x
the left-padded generate reference, SHAP >= 15x), achieved GFLOP/s from the positions actually run
(bench/accounting.py) and its share of the matmul peak of the row's dtype (target >= 60 % for our rows), the peak
resident memory while the path ran, and a correctness check. The `memory` phase (bench/bench_memory.py) runs a whole
experiment twice at the same small sizes, ours and the original script's recipe, each in a fresh process, and prints
both peaks and their ratio (issue 15: ours <= 25 %).

bf16 gates (`dtype: auto` picks bf16 for a phase only where its gates pass, `lightning_modules/precision.py`):
- on the base model (bench_eval.py, bench_shap.py): bf16 predictions agree with fp32 on >= 99 % of `--gate-examples`
  eval examples; bf16 SHAP values correlate with fp32's at Pearson r >= 0.99 over the target-class values;
- on the demo's own work (bench/gate_dtypes.py, the `gates` phase): the demo's fit in fp32 and bf16 (accuracy and
  macro-F1 inside fp32's CIs, fp32 validation losses within 0.02), evaluation and SHAP of the fine-tuned and the
  zero-shot model in both dtypes (>= 99 % equal predictions, r >= 0.99).
The results go to `assets/dtype_gates.json` for this model and this kind of hardware (`--no-record` leaves it), but
only from a run at the default gate sizes or larger; the summary then prints the dtype `auto` picks per phase.
On a machine without native bf16 (a CPU without avx512_bf16 or AMX) the bf16 rows and gates are skipped and the
summary says why: torch emulates bf16 there (the demo-sized bf16 fit alone would take hours) and `auto` picks fp32
whatever a gate says. `--emulated-bf16` measures them anyway.
Usage: python bench/bench_all.py [--phases fit,evaluation,shap,gates,memory] [--fit-batches 8] [--eval-examples 128]
       [--gate-examples 500] [--shots 4] [--shap-examples 4] [--max-evals 200] [--gate-train 2000]
       [--gate-eval 500] [--gate-explain 4] [--memory-train 64] [--memory-eval 64] [--memory-shap 3] [--no-bf16]
       [--emulated-bf16] [--no-record] [--threads N] [--json P]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.accounting import cpu_model, matmul_peak_gflops, run_measured  # noqa: E402
from foundation.embedded_model import EMBEDDED_MODEL  # noqa: E402
from lightning_modules.precision import PHASES as DTYPE_PHASES  # noqa: E402
from lightning_modules.precision import choose_dtype, hardware_kind, native_bf16, record_gates  # noqa: E402

HERE = Path(__file__).resolve().parent
PHASES = ("fit", "evaluation", "shap", "gates", "memory")
PEAK_TARGET = 0.6  # issue 15: every phase >= 60 % of the matmul peak of its dtype
AGREEMENT_GATE = 0.99  # bf16 predictions equal to fp32's
CORRELATION_GATE = 0.99  # Pearson r of bf16 vs fp32 target-class SHAP values


def run_phase(script: str, args: list[str], threads: int | None) -> dict:
    """Run one benchmark script in its own process; its measurements plus the process's peak resident memory.

    The script's own table streams through; its log and warnings go to a file shown only if it fails.
    """
    with tempfile.TemporaryDirectory() as folder:
        out, log = Path(folder) / "result.json", Path(folder) / "stderr.log"
        args = [*args, *(["--threads", str(threads)] if threads else [])]
        print(f"\n$ python bench/{script} {' '.join(args)}", flush=True)
        with log.open("w") as stderr:
            code, peak, seconds = run_measured(
                [sys.executable, str(HERE / script), *args, "--json", str(out)], stderr=stderr
            )
        if code:
            sys.stderr.write(log.read_text()[-5000:])
            raise SystemExit(f"error: bench/{script} {' '.join(args)} failed with exit code {code}.")
        result = json.loads(out.read_text())
    result["process_peak_rss_gib"] = peak  # the child's own, not this process's inherited high-water mark
    result["process_seconds"] = seconds
    return result


def matmul_peaks() -> dict[str, float]:
    fp32 = matmul_peak_gflops(torch.float32)
    if native_bf16(hardware_kind()):
        return {"float32": fp32, "bfloat16": matmul_peak_gflops(torch.bfloat16)}
    # Emulated bf16 runs at about 1 GFLOP/s (AMD EPYC without AVX-512, 2026-12-03): one 2048 x 2048 product takes over
    # a minute there, so the emulation is measured on 512 x 512 products, once.
    return {"float32": fp32, "bfloat16": matmul_peak_gflops(torch.bfloat16, size=512, trials=1, seconds=0.2)}


def emulated_bf16_note(peaks: dict[str, float]) -> str:
    """Why a machine without native bf16 gets no bf16 rows, with this run's own matmul figures."""
    return (
        f"{hardware_kind()} has no native bf16: torch emulates it (matmul {peaks['bfloat16']:.1f} GFLOP/s at "
        f"512 x 512 vs fp32 {peaks['float32']:.0f} GFLOP/s at 2048 x 2048 in this run), so `dtype auto` picks fp32 "
        "here and a bf16 row would only measure the emulation; --emulated-bf16 measures them anyway"
    )


def prediction_agreement(fp32: dict, bf16: dict) -> dict:
    a, b = np.asarray(fp32["gate"]["probabilities"]), np.asarray(bf16["gate"]["probabilities"])
    agree = float(np.mean(a.argmax(1) == b.argmax(1)))
    return {
        "examples": len(a),
        "agreement": agree,
        "max_abs_dp": float(np.abs(a - b).max()),
        "passes": agree >= AGREEMENT_GATE,
    }


def shap_correlation(fp32: dict, bf16: dict) -> dict:
    """Pearson r over the target-class SHAP values (the fp32 model's predicted class) of every explained tweet."""
    x, y = [], []
    for a, b in zip(fp32["tweets"], bf16["tweets"]):
        target = int(np.argmax(a["probabilities"]))
        x.extend(np.asarray(a["values"])[:, target])
        y.extend(np.asarray(b["values"])[:, target])
    r = float(np.corrcoef(x, y)[0, 1])
    return {"tweets": len(fp32["tweets"]), "values": len(x), "pearson_r": r, "passes": r >= CORRELATION_GATE}


# ---- the combined table -----------------------------------------------------------------------------------------
def table_rows(results: dict, peaks: dict) -> list[dict]:
    """One row per measured path, with its baseline's rate for the speed-up and the targets where they apply."""
    rows = []

    def add(phase, label, row, baseline=None, target=None, peak_target=False, check="", base=False):
        seconds = row["seconds"]
        gflops = row["flops"] / seconds / 1e9
        per_second = phase != "shap"
        entry = {
            "phase": phase,
            "path": label,
            "dtype": row.get("dtype", "float32"),
            "n": row["examples"],
            "rate": row["rate"],
            "unit": "ex/s" if per_second else "s/ex",
            "speed_up": None,
            "base": base,
            "target": target,
            "gflops": gflops,
            "peak_share": gflops / peaks[row.get("dtype", "float32")],
            "peak_target": peak_target,
            "peak_rss_gib": row["peak_rss_gib"],
            "check": check,
        }
        if baseline is not None:
            ratio = row["rate"] / baseline["rate"]
            entry["speed_up"] = ratio if per_second else 1 / ratio
        rows.append(entry)

    if "fit" in results:
        fit = results["fit"]
        ours, original = ({r["path"]: r for r in fit["rows"]}[k] for k in ("ours", "original"))
        add("fit", "ours", ours, original, fit["target"], True, f"same first loss: {fit['same_first_loss']}")
        if "fit_bf16" in results:
            gate = results.get("gates", {}).get("fit")
            check = f"gate: {'PASS' if gate['passes'] else 'FAIL'} (below)" if gate else ""
            add("fit", "ours", results["fit_bf16"]["rows"][0], original, fit["target"], True, check)
        add("fit", "original: pad to 512, logits everywhere", original, base=True)
    if "evaluation" in results:
        evaluation = results["evaluation"]
        paths = {r["path"]: {**r, "dtype": evaluation["dtype"]} for r in evaluation["rows"]}
        reference = paths["reference"]
        add("evaluation", "ours", paths["ours"], reference, evaluation["target"], True, "")
        if "evaluation_bf16" in results:
            bf16 = results["evaluation_bf16"]
            row = {**bf16["rows"][0], "dtype": bf16["dtype"]}
            gate = results.get("gates", {}).get("evaluation")
            check = ""
            if gate:
                verdict = "PASS" if gate["passes"] else "FAIL"
                check = f"gate: {gate['agreement']:.1%} of {gate['examples']} agree ({verdict})"
            add("evaluation", "ours", row, reference, evaluation["target"], True, check)
        add("evaluation", "reference: generate, left padding", reference, check=_same(reference), base=True)
        if "original" in paths:
            add(
                "evaluation",
                "original: generate, right padding",
                paths["original"],
                reference,
                check=_same(paths["original"]),
            )
        if "shots" in evaluation:
            shots = evaluation["shots"]
            cached, uncached = ({**r, "dtype": evaluation["dtype"]} for r in shots["rows"])
            k = shots["k"]
            add("evaluation", f"k={k}: prefix cache", cached, uncached, check="")
            add("evaluation", f"k={k}: no prefix cache", uncached, check=_same(uncached), base=True)
    if "shap" in results:
        shap_fp32 = results["shap"]
        paths = {r["path"]: r for r in shap_fp32["rows"]}
        original = paths.get("original")
        check = ""
        if "max_shap_error_vs_uncached" in shap_fp32:
            check = f"max ΔSHAP vs uncached {shap_fp32['max_shap_error_vs_uncached']:.0e}"
        add("shap", "ours", paths["ours"], original, shap_fp32["target"], True, check)
        if "shap_bf16" in results:
            gate = results["gates"]["shap"]
            check = f"gate: r = {gate['pearson_r']:.4f} ({'PASS' if gate['passes'] else 'FAIL'})"
            add("shap", "ours", results["shap_bf16"]["rows"][0], original, shap_fp32["target"], True, check)
        if original:
            add("shap", "original: shap.Explainer, full prompt", original, base=True)
    return rows


def json_row(row: dict) -> dict:
    """A table row as `--json` keeps it: phase, path, dtype, rate, speed_up, percent_of_peak, peak_gib, ..."""
    return {
        "phase": row["phase"],
        "path": row["path"],
        "dtype": row["dtype"],
        "n": row["n"],
        "rate": row["rate"],
        "unit": row["unit"],
        "speed_up": 1.0 if row["base"] else row["speed_up"],
        "target": row["target"],
        "gflops": row["gflops"],
        "percent_of_peak": 100 * row["peak_share"],
        "peak_gib": row["peak_rss_gib"],
        "check": row["check"],
    }


def memory_json_rows(memory: dict | None) -> list[dict]:
    """The whole-run memory rows (bench_memory.py) in `--json`'s row shape: no rate, a peak and its ratio."""
    if not memory:
        return []
    original = next(row for row in memory["rows"] if row["path"] == "original")["peak_rss_gib"]
    return [
        {
            "phase": "memory",
            "path": row["path"],
            "dtype": row["dtype"],
            "n": memory["sizes"],
            "rate": None,
            "unit": None,
            "speed_up": None,
            "target": memory["target"] if row["path"] == "ours" else None,
            "gflops": None,
            "percent_of_peak": None,
            "peak_gib": row["peak_rss_gib"],
            "check": f"{row['peak_rss_gib'] / original:.0%} of the original's peak",
        }
        for row in memory["rows"]
    ]


def memory_lines(memory: dict) -> list[str]:
    sizes = memory["sizes"]
    rows = {row["path"]: row for row in memory["rows"]}
    ours, original = rows["ours"], rows["original"]
    verdict = "meets" if memory["meets_target"] else "misses"
    return [
        f"whole-run peak memory (train {sizes['train']} / eval {sizes['eval']} / SHAP {sizes['shap']} tweets, each "
        f"run in a fresh process, bench_memory.py): ours {ours['peak_rss_gib']:.2f} GiB ({ours['seconds']:.0f} s), "
        f"the original recipe {original['peak_rss_gib']:.2f} GiB ({original['seconds']:.0f} s): "
        f"{memory['ratio']:.0%}, {verdict} the target <= {memory['target']:.0%}"
    ]


def policy_record(results: dict) -> dict | None:
    """The gate record `dtype: auto` reads (lightning_modules/precision.py): a phase's gate passes only where every
    gate of it measured here passed; None unless all of fit, evaluation and explain were measured."""
    gates, demo = results.get("gates", {}), (results.get("dtype_gates") or {}).get("gates", {})
    parts = {
        "fit": [demo.get("fit")],
        "evaluation": [gates.get("evaluation"), demo.get("evaluation")],
        "explain": [gates.get("shap"), demo.get("explain")],
    }
    if not all(gate is not None for measured in parts.values() for gate in measured):
        return None
    base = {"evaluation": "base model", "explain": "base model"}
    policy = {}
    for phase, measured in parts.items():
        summaries = [gate.get("summary") or _base_summary(phase, gate) for gate in measured]
        policy[phase] = {
            "passes": all(gate["passes"] for gate in measured),
            "summary": "; ".join(summaries),
            "measured_on": [base.get(phase, "demo fit")] + (["demo"] if phase in base else []),
        }
    import datetime as dt

    return {
        "model": EMBEDDED_MODEL,
        "hardware": hardware_kind(),
        "cpu": cpu_model(),
        "torch": torch.__version__,
        "measured": dt.date.today().isoformat(),
        "command": "make bench (bench/bench_all.py)",
        "gates": policy,
    }


def _base_summary(phase: str, gate: dict) -> str:
    if phase == "evaluation":
        return f"base model: {gate['agreement']:.1%} of {gate['examples']} predictions agree"
    return f"base model: SHAP r = {gate['pearson_r']:.4f} over {gate['tweets']} tweets"


def _same(row: dict) -> str:
    return f"same pred {row['same_predictions']:.1%}, max Δp {row['max_abs_dp']:.0e}"


def _yes_no(ok: bool) -> str:
    return "yes" if ok else "**no**"


def format_table(rows: list[dict]) -> list[str]:
    header = [
        "phase",
        "path",
        "dtype",
        "n",
        "rate",
        "speed-up",
        "target",
        "met",
        "GFLOP/s",
        "% of peak",
        ">= 60 %",
        "peak GiB",
        "check",
    ]
    cells = []
    for row in rows:
        has_target = row["target"] is not None and row["speed_up"] is not None
        cells.append(
            [
                row["phase"],
                row["path"],
                {"float32": "fp32", "bfloat16": "bf16"}.get(row["dtype"], row["dtype"]),
                str(row["n"]),
                f"{row['rate']:.2f} {row['unit']}",
                "1.00x (base)" if row["base"] else f"{row['speed_up']:.2f}x" if row["speed_up"] is not None else "",
                f">= {row['target']:.0f}x" if has_target else "",
                _yes_no(row["speed_up"] >= row["target"]) if has_target else "",
                f"{row['gflops']:.1f}",
                f"{row['peak_share']:.0%}",
                _yes_no(row["peak_share"] >= PEAK_TARGET) if row["peak_target"] else "",
                f"{row['peak_rss_gib']:.2f}",
                row["check"],
            ]
        )
    widths = [max(len(header[i]), *(len(c[i]) for c in cells)) for i in range(len(header))]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(cell, widths)) + " |" for cell in cells]
    return lines


def print_summary(results: dict, peaks: dict, settings: dict, seconds: float) -> None:
    print("\n# make bench: fit, evaluation and SHAP, ours vs the original recipe, one run")
    print(
        f"{settings['model']} on {settings['data']}; torch {torch.__version__}, {settings['threads']} threads; "
        f"matmul peak (2048x2048, best of 5, this run): fp32 {peaks['float32']:.0f} GFLOP/s, "
        f"bf16 {peaks['bfloat16']:.0f} GFLOP/s"
    )
    print(f"sizes: {settings['sizes']}")
    before, after = settings["load_average"]
    print(f"1-minute load average before / after: {before:.2f} / {after:.2f}", end="")
    # Our own phases add about the thread count to the load: more than that means other jobs shared the cores.
    busy = before > 0.5 or after > settings["threads"] + 0.5
    print(" (other jobs shared the CPU: timings are off, and competing threads distort the ratios)" if busy else "")
    print()
    print("\n".join(format_table(table_rows(results, peaks))))
    print()
    gates = results.get("gates", {})
    if "evaluation" in gates:
        g = gates["evaluation"]
        print(
            f"bf16 gate, evaluation: predictions agree with fp32 on {g['agreement']:.2%} of {g['examples']} eval "
            f"examples (>= {AGREEMENT_GATE:.0%}), max |dp| {g['max_abs_dp']:.2e}: {'PASS' if g['passes'] else 'FAIL'}"
        )
    if "shap" in gates:
        g = gates["shap"]
        print(
            f"bf16 gate, SHAP: Pearson r {g['pearson_r']:.4f} over {g['values']} target-class values of {g['tweets']} "
            f"tweet(s) (>= {CORRELATION_GATE}): {'PASS' if g['passes'] else 'FAIL'}"
        )
    demo = results.get("dtype_gates")
    if demo:
        fits = {row["dtype"]: row for row in demo["fits"]}
        print(
            f"demo fit ({demo['sizes']['train_subset']} tweets, gate_dtypes.py): fp32 "
            f"{fits['float32']['fit_seconds']:.0f} s, bf16 {fits['bfloat16']['fit_seconds']:.0f} s "
            f"({demo['fit_speed_up']:.2f}x)"
        )
        for phase, gate in demo["gates"].items():
            print(f"bf16 gate, demo {phase}: {gate['summary']}: {'PASS' if gate['passes'] else 'FAIL'}")
    if settings.get("bf16_skipped"):
        print(f"bf16 rows and gates skipped: {settings['bf16_skipped']}")
    for phase, line in settings.get("auto", {}).items():
        print(f"dtype auto on this machine ({settings['hardware']}), {phase}: {line}")
    if "evaluation" in results and "shots" in results["evaluation"]:
        shots = results["evaluation"]["shots"]
        cached, uncached = shots["rows"]
        print(
            f"k={shots['k']} (prefix {shots['prefix_tokens']} tokens): the prefix cache scores "
            f"{cached['rate'] / uncached['rate']:.1f}x the examples/s of the same scoring without it; identical "
            f"predictions: {uncached['same_predictions'] == 1.0}"
        )
    if "memory" in results:
        print("\n".join(memory_lines(results["memory"])))
    processes = ", ".join(
        f"{name} {result['process_peak_rss_gib']:.2f} GiB"
        for name, result in results.items()
        if "process_peak_rss_gib" in result
    )
    print(f"peak resident memory per phase process: {processes}")
    print(f"total {seconds / 60:.1f} min")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--phases", default=",".join(PHASES), help="comma-separated subset of fit,evaluation,shap,gates,memory"
    )
    parser.add_argument("--fit-batches", type=int, default=8, help="fit batches, the first untimed (default 8)")
    parser.add_argument("--fit-batch-size", type=int, default=4, help="fit batch size (default 4)")
    parser.add_argument("--eval-examples", type=int, default=128, help="eval examples timed per path (default 128)")
    parser.add_argument("--eval-batch-size", type=int, default=16, help="evaluation batch size (default 16)")
    parser.add_argument("--repeats", type=int, default=2, help="evaluation passes per path, fastest kept (default 2)")
    parser.add_argument("--shots", type=int, default=4, help="k-shot rows with this k; 0 skips them (default 4)")
    parser.add_argument(
        "--gate-examples", type=int, default=500, help="eval examples for the bf16 prediction gate (default 500)"
    )
    parser.add_argument("--shap-examples", type=int, default=4, help="tweets to explain (default 4)")
    parser.add_argument("--max-evals", type=int, default=200, help="shap max_evals (default 200)")
    parser.add_argument("--gate-train", type=int, default=2000, help="demo gates: training tweets (default 2000)")
    parser.add_argument("--gate-eval", type=int, default=500, help="demo gates: eval tweets (default 500)")
    parser.add_argument("--gate-explain", type=int, default=4, help="demo gates: tweets explained (default 4)")
    parser.add_argument("--memory-train", type=int, default=64, help="whole-run memory: training tweets (default 64)")
    parser.add_argument("--memory-eval", type=int, default=64, help="whole-run memory: eval tweets (default 64)")
    parser.add_argument("--memory-shap", type=int, default=3, help="whole-run memory: tweets explained (default 3)")
    parser.add_argument("--no-bf16", action="store_true", help="skip the bf16 rows and gates")
    parser.add_argument(
        "--emulated-bf16",
        action="store_true",
        help="measure the bf16 rows and gates on a machine without native bf16 too (hours: torch emulates it)",
    )
    parser.add_argument("--no-record", action="store_true", help="do not record the gates in assets/dtype_gates.json")
    parser.add_argument("--threads", type=int, help="torch CPU threads in every phase (default: torch's choice)")
    parser.add_argument("--json", type=Path, help="also write every measurement to this JSON file")
    args = parser.parse_args(argv)
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = sorted(set(phases) - set(PHASES))
    if unknown:
        parser.error(f"unknown phases {unknown}; choose from {', '.join(PHASES)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    bf16 = not args.no_bf16

    start = time.perf_counter()
    load_before = os.getloadavg()[0]
    peaks = matmul_peaks()
    bf16_skipped = None
    if bf16 and not native_bf16(hardware_kind()) and not args.emulated_bf16:
        bf16, bf16_skipped = False, emulated_bf16_note(peaks)
        print(f"bf16 rows and gates skipped: {bf16_skipped}", file=sys.stderr, flush=True)
    results: dict = {}
    if "fit" in phases:
        sizes = ["--batches", str(args.fit_batches), "--batch-size", str(args.fit_batch_size)]
        results["fit"] = run_phase("bench_fit.py", sizes, args.threads)
        if bf16:
            bf16_sizes = sizes + ["--dtype", "bfloat16", "--no-original"]
            results["fit_bf16"] = run_phase("bench_fit.py", bf16_sizes, args.threads)
    if "evaluation" in phases:
        sizes = ["--examples", str(args.eval_examples), "--batch-size", str(args.eval_batch_size)]
        sizes += ["--repeats", str(args.repeats), "--gate-examples", str(args.gate_examples if bf16 else 0)]
        results["evaluation"] = run_phase(
            "bench_eval.py", sizes + ["--right-padded", "--shots", str(args.shots)], args.threads
        )
        if bf16:
            results["evaluation_bf16"] = run_phase(
                "bench_eval.py", sizes + ["--dtype", "bfloat16", "--no-reference"], args.threads
            )
    if "shap" in phases:
        sizes = ["--examples", str(args.shap_examples), "--max-evals", str(args.max_evals)]
        results["shap"] = run_phase("bench_shap.py", sizes, args.threads)
        if bf16:
            results["shap_bf16"] = run_phase(
                "bench_shap.py", sizes + ["--dtype", "bfloat16", "--no-original", "--no-reference"], args.threads
            )
    if "gates" in phases and bf16:
        sizes = ["--train", str(args.gate_train), "--eval", str(args.gate_eval), "--explain", str(args.gate_explain)]
        results["dtype_gates"] = run_phase("gate_dtypes.py", sizes, args.threads)
    if "memory" in phases:
        sizes = ["--train", str(args.memory_train), "--eval", str(args.memory_eval), "--shap", str(args.memory_shap)]
        results["memory"] = run_phase("bench_memory.py", sizes, args.threads)
    # The peak again after the phases: a burst of load elsewhere during the first measurement would lower it.
    peaks = {dtype: max(value, again) for (dtype, value), again in zip(peaks.items(), matmul_peaks().values())}
    gates = {}
    if "evaluation_bf16" in results and args.gate_examples:
        gates["evaluation"] = prediction_agreement(results["evaluation"], results["evaluation_bf16"])
    if "shap_bf16" in results:
        gates["shap"] = shap_correlation(results["shap"], results["shap_bf16"])
    if "dtype_gates" in results:
        gates["fit"] = results["dtype_gates"]["gates"]["fit"]
    if gates:
        results["gates"] = gates
    defaults = parser.parse_args([])
    full_size = all(
        getattr(args, name) >= getattr(defaults, name)
        for name in ("gate_examples", "gate_train", "gate_eval", "gate_explain", "shap_examples")
    )
    record = policy_record(results) if bf16 else None
    recorded = None
    if record and full_size and not args.no_record:
        recorded = record_gates(record)
    sizes = {
        "fit": f"fit {args.fit_batches} batches of {args.fit_batch_size} (first untimed)",
        "evaluation": (
            f"evaluation {args.eval_examples} examples, batch {args.eval_batch_size}, fastest of {args.repeats}, "
            f"k={args.shots}, bf16 gate on {args.gate_examples if bf16 else 0}"
        ),
        "shap": f"SHAP {args.shap_examples} tweets, max_evals {args.max_evals}",
        "gates": f"demo gates: fit {args.gate_train} / eval {args.gate_eval} tweets, {args.gate_explain} explained",
        "memory": f"whole-run memory: {args.memory_train} / {args.memory_eval} / {args.memory_shap} tweets",
    }
    settings = {
        "load_average": (load_before, os.getloadavg()[0]),
        "model": "embedded:smollm2-135m-instruct",
        "data": "embedded:crowdflower-tweets (configs/embedded.yaml)",
        "threads": torch.get_num_threads(),
        "sizes": "; ".join(size for phase, size in sizes.items() if phase in phases),
        "hardware": hardware_kind(),
        "recorded": str(recorded) if recorded else None,
        "bf16_skipped": bf16_skipped,
        "auto": {phase: choose_dtype("auto", EMBEDDED_MODEL, phase).reason for phase in DTYPE_PHASES},
    }
    print_summary(results, peaks, settings, time.perf_counter() - start)
    if record and not recorded:
        why = "--no-record" if args.no_record else "gate sizes below the defaults"
        print(f"gates not recorded in assets/dtype_gates.json ({why})")
    if args.json:
        rows = [json_row(row) for row in table_rows(results, peaks)] + memory_json_rows(results.get("memory"))
        args.json.write_text(
            json.dumps({"settings": settings, "matmul_peak_gflops": peaks, "rows": rows, **results}, default=str)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
