"""What glibc's default handling of freed memory costs: each workload run with it, and with freed heap kept.

default   glibc as it comes: blocks of 128 KiB and up (a threshold it raises as such blocks are freed, to at most
          32 MiB) are mmapped and handed back when freed, and the top of the heap is trimmed past twice that, so where
          block sizes change from forward to forward, activations fault their pages in again, 4 KiB at a time
kept      the child first calls mallopt(M_MMAP_THRESHOLD, 32 MiB) and mallopt(M_TRIM_THRESHOLD, 2**31 - 1): blocks
          under 32 MiB come from the heap, and freed heap stays with the process for the next forward

The project does not change the allocator: on the Intel host of 2026-12-06 this measured no gain beyond noise
(docs/benchmarks.md). The benchmark stays so that a host where page faults do cost can be measured with one command.
Each workload is one of the other benchmarks, run as a child process (the setting is one of the whole process),
default and kept alternating, `--repeats` times each; the fastest run of each side is kept. Which side goes first
swaps each repeat: a workload's first run starts cold (about 15 % slower in fit), so use at least 2. Measured by the
parent from the child's resource usage (`bench.accounting.run_with_usage`: os.wait4 from a small launcher, so the
parent's peak is not carried into the child's): wall seconds (model load included), user and system CPU seconds,
minor page faults and the peak resident set. The children's own output is not shown. Linux with glibc only.
Usage: python bench/bench_allocator.py [--workloads fit,evaluation,explanation,reference,explainers] [--repeats 2]
       [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.accounting import cpu_model, run_with_usage  # noqa: E402

# name -> (what it runs, the benchmark and its arguments)
WORKLOADS = {
    "fit": ("6 LoRA training steps of 4 tweets", ["bench/bench_fit.py", "--no-original", "--batches", "7"]),
    "evaluation": (
        "64 eval tweets scored, batches of 16",
        ["bench/bench_eval.py", "--no-reference", "--examples", "64", "--repeats", "1"],
    ),
    "explanation": (
        "2 tweets, exact Owen values, prefix-cached",
        ["bench/bench_shap.py", "--no-original", "--no-reference", "--examples", "2"],
    ),
    "reference": (
        "the same, then again over padded uncached forwards",
        ["bench/bench_shap.py", "--no-original", "--examples", "2"],
    ),
    "explainers": (
        "1 tweet, every explainer, cached and uncached",
        ["bench/bench_explainers.py", "--examples", "1"],
    ),
}

# The child: optionally the setting, then the benchmark as its own __main__ with its own arguments.
CHILD = """
import ctypes, runpy, sys
sys.path.insert(0, {root!r})
if {kept}:
    mallopt = ctypes.CDLL("libc.so.6").mallopt
    # M_MMAP_THRESHOLD (-3) first: setting it also stops glibc's own raising of it; then M_TRIM_THRESHOLD (-1)
    assert mallopt(-3, 32 * 2**20) and mallopt(-1, 2**31 - 1), "mallopt refused the settings"
sys.argv = {argv!r}
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_child(argv: list[str], kept: bool) -> dict:
    code = CHILD.format(root=str(ROOT), kept=kept, argv=[str(ROOT / argv[0]), *argv[1:]])
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    with tempfile.TemporaryFile("w+") as errors:
        status, wall, usage = run_with_usage(
            [sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=errors
        )
        if status != 0 or not usage:
            errors.seek(0)
            raise SystemExit(f"{' '.join(argv)} failed with kept={kept}:\n{errors.read()[-3000:]}")
    return {"wall_s": wall, **usage}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated (default: all)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per side, alternating, fastest kept (default 2)")
    parser.add_argument("--json", type=Path, help="also write the measurements to this JSON file")
    args = parser.parse_args()
    names = [name.strip() for name in args.workloads.split(",") if name.strip()]
    unknown = sorted(set(names) - set(WORKLOADS))
    if unknown:
        parser.error(f"unknown workload(s) {', '.join(unknown)} in --workloads; choose from {', '.join(WORKLOADS)}")
    if platform.libc_ver()[0] != "glibc":
        parser.error("this benchmark measures glibc's allocator: run it on Linux with glibc")
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")

    print(f"CPU: {cpu_model()} ({os.cpu_count()} cores), {platform.libc_ver()[0]} {platform.libc_ver()[1]}")
    rows = []
    for name in names:
        what, argv = WORKLOADS[name]
        runs: dict[str, list[dict]] = {"default": [], "kept": []}
        for repeat in range(args.repeats):  # the side that goes first swaps: a workload's first run starts cold
            for side in ("default", "kept") if repeat % 2 == 0 else ("kept", "default"):
                runs[side].append(run_child(argv, kept=side == "kept"))
        best = {side: min(found, key=lambda run: run["wall_s"]) for side, found in runs.items()}
        rows.append({"workload": name, "what": what, "command": " ".join(argv), **best, "all_runs": runs})

    header = f"{'workload':<12}{'side':<9}{'wall s':>8}{'user s':>8}{'sys s':>8}{'minor faults':>14}{'peak GiB':>10}"
    print(header)
    print("-" * len(header))
    for row in rows:
        for side in ("default", "kept"):
            run = row[side]
            print(
                f"{row['workload']:<12}{side:<9}{run['wall_s']:>8.1f}{run['user_s']:>8.1f}{run['sys_s']:>8.1f}"
                f"{run['minor_faults']:>14,}{run['peak_rss_gib']:>10.2f}"
            )
        ratio = row["kept"]["wall_s"] / row["default"]["wall_s"]
        print(f"{'':<12}{'kept/default wall':<26}{ratio:.3f}   ({row['what']})")
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_model(), "repeats": args.repeats, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
