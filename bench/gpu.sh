#!/usr/bin/env bash
# Single-GPU benchmark for a machine with no internet whose Python may lack bitsandbytes (then only bf16 runs).
# Needs torch and transformers (peft optional: without it the LoRA wrapper is skipped). Finishes in a few minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
PYTHONUNBUFFERED=1 python3 bench/gpu_bench.py "$@"
