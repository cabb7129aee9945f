#!/usr/bin/env bash
# Single-GPU benchmark for a machine with no internet whose Python may lack bitsandbytes (then only bf16 runs).
# Needs torch and transformers (peft optional: without it the LoRA wrapper is skipped). Finishes in a few minutes.
# A bitsandbytes wheel carried in .gpuwheels/ (pip download --no-deps bitsandbytes -d .gpuwheels) is installed
# first, so the nf4 row runs too.
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".gpuwheels/*.whl" >/dev/null; then
    python3 -m pip install --quiet --no-deps --no-index .gpuwheels/*.whl
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
PYTHONUNBUFFERED=1 python3 bench/gpu_bench.py "$@"
