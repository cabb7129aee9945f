"""The bf16 gates on the demo's own work: fit, evaluation and explanation of the fine-tuned and the zero-shot model.

1. **fit**: the demo's recipe fitted in fp32 and in bf16, each by the real `scripts/train.py fit --config
   configs/embedded.yaml --model.dtype D` in its own process, at the demo's sizes by default (2,000 training tweets,
   500 eval tweets). `scripts/evaluate.py` scores both adapters in fp32 on the same eval tweets (accuracy and
   macro-F1 with 95 % bootstrap CIs), and Lightning's `Trainer.validate` gives each adapter's validation loss (the
   fit's `val/loss`: cross-entropy of the label token over the full vocabulary) on an fp32 base. Passes when the
   bf16 adapter's accuracy and macro-F1 lie inside the fp32 adapter's CIs and the two losses differ by < 0.02. Both
   losses are computed in fp32 so that the gate measures the fit, not bf16's rounding at evaluation (each fit's own
   `val/loss`, in its dtype, is reported beside them).
2. **evaluation**: the fp32 adapter and the zero-shot model scored by `scripts/evaluate.py` in fp32 and in bf16:
   passes when, for each model, >= 99 % of the eval tweets get the same prediction.
3. **explain**: `scripts/analyze.py` explains the first `--explain` eval tweets with both models (the fp32 adapter)
   in fp32 and in bf16: passes when the target-class SHAP values (the fp32 run's targets) correlate at Pearson
   r >= 0.99, for each model.

Usage: python bench/gate_dtypes.py [--train 2000] [--eval 500] [--explain 4] [--threads N] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ["--config", "configs/embedded.yaml"]
LOSS_GATE = 0.02
AGREEMENT_GATE = 0.99
CORRELATION_GATE = 0.99
MODELS = ("fine_tuned", "zero_shot")


def _run(script: str, args: list[str], log: Path) -> float:
    start = time.perf_counter()
    with log.open("w") as out:
        done = subprocess.run([sys.executable, str(ROOT / "scripts" / script), *args], stdout=out, stderr=out, cwd=ROOT)
    if done.returncode:
        sys.stderr.write(log.read_text()[-5000:])
        raise SystemExit(f"error: scripts/{script} {' '.join(args)} failed with exit code {done.returncode}.")
    return time.perf_counter() - start


def fit_val_loss(root: Path) -> float:
    """The last `val/loss` the fit logged (computed in the fit's dtype)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs = sorted((root / "lightning_logs").glob("version_*"))[-1]
    events = EventAccumulator(str(logs), size_guidance={"scalars": 0})
    events.Reload()
    return float(events.Scalars("val/loss")[-1].value)


def fp32_val_loss(adapter: Path, sizes: list[str]) -> float:
    """Lightning's validation loss of `adapter` on an fp32 base: the fit's `val/loss`, in fp32."""
    import lightning as L

    sys.path.insert(0, str(ROOT))
    from analysis.configuration import load_run
    from lightning_modules.adapters import load_adapter

    run = load_run([*CONFIG, *sizes, "--model.dtype", "float32"])
    load_adapter(run.module, adapter, run.datamodule.prompt_description())
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    return float(trainer.validate(run.module, run.datamodule, verbose=False)[0]["val/loss"])


def evaluate(adapter: Path, out: Path, dtype: str, sizes: list[str], baselines: list[str], log: Path) -> Path:
    args = [*CONFIG, "--adapter", str(adapter), *sizes, "--output-dir", str(out), "--baselines", *baselines]
    _run("evaluate.py", [*args, "--model.dtype", dtype], log)
    return out


def fit(dtype: str, folder: Path, sizes: list[str]) -> dict:
    root = folder / f"fit_{dtype}"
    args = ["fit", *CONFIG, "--trainer.default_root_dir", str(root), *sizes, "--model.dtype", dtype]
    seconds = _run("train.py", [*args, "--trainer.enable_progress_bar", "false"], folder / f"fit_{dtype}.log")
    adapter = root / "lora_adapter"
    scored = evaluate(adapter, root / "eval_fp32", "float32", sizes, [], folder / f"evaluate_fit_{dtype}.log")
    metrics = json.loads((scored / "fine_tuned_metrics.json").read_text())
    return {
        "dtype": dtype,
        "adapter": adapter,
        "fit_seconds": seconds,
        "val_loss": fp32_val_loss(adapter, sizes),
        "val_loss_in_fit_dtype": fit_val_loss(root),
        **{name: metrics["confidence_intervals"][name] for name in ("accuracy", "macro_f1")},
    }


def fit_gate(fp32: dict, bf16: dict) -> dict:
    inside = {
        name: fp32[name]["low"] <= bf16[name]["estimate"] <= fp32[name]["high"] for name in ("accuracy", "macro_f1")
    }
    gap = abs(bf16["val_loss"] - fp32["val_loss"])
    summary = (
        f"bf16-fitted accuracy {bf16['accuracy']['estimate']:.3f} in fp32's CI [{fp32['accuracy']['low']:.3f}, "
        f"{fp32['accuracy']['high']:.3f}]: {inside['accuracy']}; macro-F1 {bf16['macro_f1']['estimate']:.3f} in "
        f"[{fp32['macro_f1']['low']:.3f}, {fp32['macro_f1']['high']:.3f}]: {inside['macro_f1']}; fp32 val loss "
        f"{bf16['val_loss']:.4f} vs {fp32['val_loss']:.4f}, |diff| {gap:.4f} < {LOSS_GATE}: {gap < LOSS_GATE}"
    )
    return {"inside_ci": inside, "val_loss_gap": gap, "passes": all(inside.values()) and gap < LOSS_GATE,
            "summary": summary}  # fmt: skip


def predictions(folder: Path) -> dict[str, np.ndarray]:
    rows = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
    return {model: np.array([row[model]["prediction_index"] for row in rows]) for model in MODELS}


def evaluation_gate(fp32: Path, bf16: Path) -> dict:
    a, b = predictions(fp32), predictions(bf16)
    agreement = {model: float(np.mean(a[model] == b[model])) for model in MODELS}
    n = len(a[MODELS[0]])
    summary = ", ".join(f"{model} {share:.1%}" for model, share in agreement.items())
    return {
        "examples": n,
        "agreement": agreement,
        "passes": min(agreement.values()) >= AGREEMENT_GATE,
        "summary": f"bf16 predictions equal fp32's on {summary} of {n} eval tweets (>= {AGREEMENT_GATE:.0%})",
    }


def explain_gate(fp32: Path, bf16: Path) -> dict:
    correlation = {}
    for model in MODELS:
        a, b = (json.loads((folder / f"{model}_shap.json").read_text()) for folder in (fp32, bf16))
        x = np.concatenate([np.asarray(v)[:, t] for v, t in zip(a["values"], a["target_classes"])])
        y = np.concatenate([np.asarray(v)[:, t] for v, t in zip(b["values"], a["target_classes"])])
        correlation[model] = float(np.corrcoef(x, y)[0, 1])
    tweets = len(a["values"])
    summary = ", ".join(f"{model} r = {r:.4f}" for model, r in correlation.items())
    return {
        "tweets": tweets,
        "pearson_r": correlation,
        "passes": min(correlation.values()) >= CORRELATION_GATE,
        "summary": f"bf16 vs fp32 target-class SHAP values of {tweets} tweets: {summary} (>= {CORRELATION_GATE})",
    }


def measure(train: int = 2000, evaluate_n: int = 500, explain_n: int = 4, threads: int | None = None) -> dict:
    if threads:
        os.environ["OMP_NUM_THREADS"] = str(threads)  # the commands inherit it
    sizes = ["--data.train_subset", str(train), "--data.eval_subset", str(evaluate_n)]
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        fp32, bf16 = fit("float32", folder, sizes), fit("bfloat16", folder, sizes)
        adapter = fp32["adapter"]
        scored = {
            dtype: evaluate(adapter, folder / f"eval_{dtype}", dtype, sizes, ["zero_shot"], folder / f"e_{dtype}.log")
            for dtype in ("float32", "bfloat16")
        }
        explained = {}
        for dtype in ("float32", "bfloat16"):
            out = folder / f"explain_{dtype}"
            args = [*CONFIG, "--adapter", str(adapter), *sizes, "--output-dir", str(out)]
            args += ["--shap-example-count", str(explain_n), "--model.dtype", dtype]
            explained[dtype] = (out, _run("analyze.py", args, folder / f"explain_{dtype}.log"))
        for row in (fp32, bf16):
            row["adapter"] = str(row["adapter"].relative_to(folder))
        return {
            "phase": "dtype_gates",
            "sizes": {"train_subset": train, "eval_subset": evaluate_n, "explained_tweets": explain_n},
            "fits": [fp32, bf16],
            "fit_speed_up": fp32["fit_seconds"] / bf16["fit_seconds"],
            "explain_seconds": {dtype: seconds for dtype, (_, seconds) in explained.items()},
            "gates": {
                "fit": fit_gate(fp32, bf16),
                "evaluation": evaluation_gate(scored["float32"], scored["bfloat16"]),
                "explain": explain_gate(explained["float32"][0], explained["bfloat16"][0]),
            },
        }


def print_result(result: dict) -> None:
    for row in result["fits"]:
        print(
            f"fit {row['dtype']}: {row['fit_seconds']:.0f} s, fp32 val loss {row['val_loss']:.4f} (in its own "
            f"dtype {row['val_loss_in_fit_dtype']:.4f}), accuracy {row['accuracy']['estimate']:.3f}, macro-F1 "
            f"{row['macro_f1']['estimate']:.3f}"
        )
    print(f"bf16 fit: {result['fit_speed_up']:.2f}x the fp32 fit's speed (whole fit, with validation)")
    for phase, gate in result["gates"].items():
        print(f"bf16 {phase} gate: {gate['summary']}: {'PASS' if gate['passes'] else 'FAIL'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=2000, help="training tweets (default: the demo's 2000)")
    parser.add_argument("--eval", type=int, default=500, help="eval tweets (default: the demo's 500)")
    parser.add_argument("--explain", type=int, default=4, help="tweets explained in both dtypes (default 4)")
    parser.add_argument("--threads", type=int, help="torch CPU threads of the commands (default: torch's choice)")
    parser.add_argument("--json", type=Path, help="also write the measurements to this JSON file")
    args = parser.parse_args(argv)
    result = measure(args.train, args.eval, args.explain, args.threads)
    print_result(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
